"""Forecast against actual: sample weights of a recorded run, their recorded trajectory, and what a forecaster
(and linear extrapolation, from the same context) predicted from several points in time.

    from sleepbot.viz.forecast import plot_forecast
    plot_forecast("trajectories/digits/digits-mlp-adam-lr0.001-s3.h5", "forecast.png", forecaster="forecaster.pt")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sleepbot.errors import SleepbotError
from sleepbot.viz._io import new_figure, open_run, save


def _forecaster(forecaster: Any):
    from sleepbot.forecast import Forecaster, load_forecaster

    if isinstance(forecaster, Forecaster):
        return forecaster
    return load_forecaster(forecaster)


def plot_forecast(
    source: Any,
    out: str | Path | None = None,
    *,
    forecaster: Any = None,
    run: str | None = None,
    samples: int = 6,
    origins: int = 4,
    horizon: int | None = None,
    seed: int = 0,
):
    """One panel per sample weight: the recorded trajectory, and forecasts from `origins` points in time.

    Sample weights come from different layers in turn; in each, a neuron is drawn at random (by `seed`) and its
    weight that moved most over the run is shown, so that the panels show motion rather than flat lines. From each
    origin the forecaster reads its context (marked) and predicts every horizon up to `horizon`.

    Args:
        source: a run file, a directory of runs (the first complete one, or the one whose name contains `run`), or
            an open RunFile.
        out: where to save the PNG; None only returns the figure.
        forecaster: a checkpoint path, a Forecaster, or None for the shipped default.
        run: picks a run in a directory by a substring of its file name.
        samples: how many weights (panels).
        origins: forecast origins per panel, evenly spread over the run.
        horizon: the furthest snapshot ahead drawn (default: the forecaster's largest trained horizon).
        seed: which neurons are sampled.

    Returns:
        The matplotlib Figure.
    """
    model = _forecaster(forecaster)
    f = open_run(source, run)
    owned = f is not source
    try:
        steps = np.asarray(f.snapshot_steps, dtype=float)
        c = model.context
        hmax = int(horizon or (model.horizons[-1] if model.learned else model.default_horizon))
        if len(steps) < c + 1:
            raise SleepbotError(f"{str(f.path)!r} has {len(steps)} snapshots; a forecast needs more than {c}")
        max_steps = f.attrs.get("max_steps") or ((f.attrs.get("config") or {}).get("trainer") or {}).get(
            "max_steps"
        )
        rng = np.random.default_rng(seed)
        layers = list(f.layers)
        picks = []  # (layer, kind, neuron, weight, trajectory [S, F] of that neuron)
        for i in range(samples):
            layer = layers[i % len(layers)]
            info = f.layer_info(layer)
            n = int(rng.integers(info["n_kept"]))
            traj = np.asarray(f.weights(layer, neurons=[n]), dtype=np.float32)[:, 0]  # [S, F]
            w = int(np.abs(traj[-1] - traj[0]).argmax())
            picks.append((layer, str(info["kind"]), n, w, traj))
        title = f.path.stem
    finally:
        if owned:
            f.close()

    from sleepbot.forecast import build_forecaster

    linear = build_forecaster("linear", context=c, horizons=model.horizons)
    s = len(steps)
    last_origin = s - 1 - 1  # at least one snapshot ahead to compare with
    ends = np.unique(np.linspace(c - 1, max(c - 1, last_origin), origins).round().astype(int))
    hs = list(range(1, hmax + 1))
    cols = min(3, samples)
    rows = (samples + cols - 1) // cols
    fig = new_figure(4.2 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (layer, kind, n, w, traj) in zip(axes, picks):
        ax.plot(steps, traj[:, w], color="0.3", lw=1.2, label="recorded")
        for k, t in enumerate(ends):
            hist = torch.from_numpy(traj[t - c + 1 : t + 1])[:, None, :]  # [C, 1, F]: one neuron
            progress = torch.tensor([steps[t] / max_steps]) if max_steps else None
            with torch.no_grad():
                hist = model.check_history(hist)
                pred = model.displacement(hist, hs, kind, progress)[:, 0, w] + hist[-1, 0, w]  # [H]
                lin = linear.displacement(hist, hs, kind, progress)[:, 0, w] + hist[-1, 0, w]
            xs = steps[t] + np.asarray(hs) * (steps[1] - steps[0])
            ax.plot(steps[t - c + 1 : t + 1], traj[t - c + 1 : t + 1, w], "o", ms=3, color="tab:blue")
            ax.plot(
                [steps[t], *xs], [traj[t, w], *pred.numpy()], "-", color="tab:red", lw=1.5,
                label=f"{model.name} forecast" if k == 0 else None,
            )  # fmt: skip
            ax.plot(
                [steps[t], *xs], [traj[t, w], *lin.numpy()], "--", color="tab:orange", lw=1,
                label="linear extrapolation" if k == 0 else None,
            )  # fmt: skip
        ax.set_title(f"{layer} ({kind}) neuron {n}, weight {w}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_xlim(steps[0], steps[-1])
        lo, hi = float(traj[:, w].min()), float(traj[:, w].max())
        pad = 0.5 * (hi - lo) + 1e-8
        ax.set_ylim(
            lo - pad, hi + pad
        )  # a wild forecast is clipped, not allowed to flatten the recorded curve
    for ax in axes[len(picks) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"forecast vs actual: {title} (context {c} snapshots marked, up to {hmax} ahead)", fontsize=10
    )
    save(fig, out)
    return fig
