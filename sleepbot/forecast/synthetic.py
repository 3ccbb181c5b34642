"""Synthetic weight trajectories with a known law, for tests, benchmarks and sanity checks of the forecasters.

Every weight follows w(s) = w0 + v * tau * (1 - exp(-s / tau)) + noise at snapshot s (tau = inf: a straight line),
so the true future is known and linear extrapolation is exact only when tau is infinite and the noise is zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def synthetic_trajectory(
    snapshots: int,
    neurons: int,
    fan_in: int,
    *,
    tau: float = float("inf"),
    noise: float = 0.05,
    seed: int = 0,
) -> np.ndarray:
    """[S, N, F] float32: per-weight drift (velocity ~ N(0, 1) per snapshot) saturating with time constant `tau`
    snapshots, plus independent Gaussian noise of std `noise` at every snapshot, around w0 ~ N(0, 3)."""
    rng = np.random.default_rng(seed)
    s = np.arange(snapshots, dtype=np.float64)[:, None, None]
    w0 = rng.normal(0, 3, (1, neurons, fan_in))
    v = rng.normal(0, 1, (1, neurons, fan_in))
    path = v * s if np.isinf(tau) else v * tau * (1 - np.exp(-s / tau))
    return (w0 + path + rng.normal(0, noise, (snapshots, neurons, fan_in))).astype(np.float32)


def write_synthetic_runs(
    root: str | Path,
    runs: int = 6,
    *,
    snapshots: int = 30,
    every: int = 10,
    layers: Sequence[tuple[str, str, int, int]] = (("conv", "conv2d", 6, 10), ("fc", "linear", 4, 25)),
    tau: float = float("inf"),
    noise: float = 0.05,
    arch: str = "synthetic",
    seed: int = 0,
) -> list[Path]:
    """Write `runs` run files through the real store writer; returns their paths.

    Args:
        root: directory to write into (`<root>/synthetic-s<seed>.h5`).
        runs: how many (seeds seed, seed+1, ...).
        snapshots: snapshots per run, `every` steps apart from step 0.
        layers: (name, kind, neurons, fan_in incl. bias) per layer.
        tau, noise: the trajectory law (see `synthetic_trajectory`).
        arch: the `arch` attribute (lets tests hold out an architecture).
    """
    from sleepbot.store import LayerSpec, RunWriter

    root = Path(root)
    paths = []
    for r in range(runs):
        run_seed = seed + r
        specs = [
            LayerSpec(name, kind, (n, f - 1, 1, 1) if kind == "conv2d" else (n, f - 1), True, np.arange(n))
            for name, kind, n, f in layers
        ]
        trajs = {
            name: synthetic_trajectory(snapshots, n, f, tau=tau, noise=noise, seed=run_seed * 100 + i)
            for i, (name, _, n, f) in enumerate(layers)
        }
        path = root / f"{arch}-s{run_seed}.h5"
        config = {"trainer": {"max_steps": (snapshots - 1) * every}, "seed": run_seed}
        attrs = {
            "config": config,
            "seed": run_seed,
            "dataset": "synthetic",
            "arch": arch,
            "optimizer": "none",
        }
        writer = RunWriter(path, specs, attrs=attrs, buffer_snapshots=16)
        for s in range(snapshots):
            writer.write_snapshot(s * every, {(name, "weight"): trajs[name][s] for name, *_ in layers})
        writer.close("complete")
        paths.append(path)
    return paths
