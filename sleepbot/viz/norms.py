"""Per-neuron weight-norm trajectories per layer, as lines and as a heatmap, with the settling signal below.

The signal is the relative spread of a layer's neuron norms (std / mean across neurons) and its rate of change
(`sleepbot.analysis.layer_dynamics`): it moves while neurons differentiate and flattens once the layer settles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.analysis import layer_dynamics
from sleepbot.errors import SleepbotError
from sleepbot.viz._io import new_figure, open_run, save


def _events(run: Any) -> list[int]:
    try:
        return [int(e["step"]) for e in run.events() if e.get("accepted", True)]
    except AttributeError:
        return []


def plot_norms(
    source: Any,
    out: str | Path | None = None,
    *,
    layers: list[str] | None = None,
    run: str | None = None,
    max_lines: int = 64,
    window: int = 20,
    tol: float = 1e-4,
):
    """Three rows per layer (one column each): norm lines, a norm heatmap, and the spread signal.

    Args:
        source: a run file, a directory of runs (the first complete run, or the one whose name contains
            `run`), a comparison's output directory, or an open RunFile (a live run too: it is read as far as
            it has been flushed).
        out: where to save the figure; None only returns it.
        layers: which layers (default: all, in the model's order).
        run: picks a run in a directory by a substring of its file name.
        max_lines: at most this many neuron lines per layer (evenly spaced by final norm); the heatmap shows all.
        window: points per rate-of-change estimate (norms are recorded every step).
        tol: |d spread / d step| that counts as settled (marked with a dotted line).

    Returns:
        The matplotlib Figure.
    """
    f = open_run(source, run)
    owned = f is not source
    try:
        names = list(layers) if layers is not None else list(f.layers)
        if not names:
            raise SleepbotError(f"{str(f.path)!r} has no recorded layers")
        steps = np.asarray(f.steps, dtype=float)
        if steps.size < 2:
            raise SleepbotError(
                f"{str(f.path)!r} has {steps.size} recorded step(s); norm plots need at least 2"
            )
        dyn = layer_dynamics(f, window=window, tol=tol, layers=names)
        norms = {name: np.asarray(f.norms(name), dtype=float) for name in names}  # [T, N] each
        events = _events(f)
        title = f.path.stem
    finally:
        if owned:
            f.close()

    from matplotlib import cm

    fig = new_figure(max(4.0, 3.3 * len(names)), 8.2)
    axes = fig.subplots(3, len(names), squeeze=False, sharex="col", height_ratios=[1.2, 1.0, 0.8])
    for j, name in enumerate(names):
        x = norms[name]  # [T, N]
        order = np.argsort(x[-1])  # neurons by final norm, smallest first
        lines = order[
            np.unique(np.linspace(0, len(order) - 1, min(max_lines, len(order))).round().astype(int))
        ]
        colors = cm.viridis(np.linspace(0, 1, len(lines)))
        ax = axes[0, j]
        for k, n in enumerate(lines):
            ax.plot(steps, x[:, n], color=colors[k], linewidth=0.7, alpha=0.8)
        ax.set_title(f"{name}  ({x.shape[1]} neurons)", fontsize=9)
        if j == 0:
            ax.set_ylabel("neuron weight norm")
        ax = axes[1, j]
        # Heatmap [N, T], neurons sorted by final norm; each row scaled by nothing: absolute norms.
        ax.imshow(
            x[:, order].T,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            extent=(steps[0], steps[-1], -0.5, x.shape[1] - 0.5),
            cmap="magma",
        )
        if j == 0:
            ax.set_ylabel("neuron (by final norm)")
        ax = axes[2, j]
        d = dyn[name]
        ax.plot(steps, d.spread, color="#1f77b4", linewidth=1.2, label="relative spread")
        if j == 0:
            ax.set_ylabel("spread (std/mean)", color="#1f77b4")
        ax2 = ax.twinx()
        ax2.plot(steps, d.rate * 1000, color="#d62728", linewidth=0.8, alpha=0.8, label="rate / 1k steps")
        ax2.axhline(0, color="#d62728", linewidth=0.5, alpha=0.5)
        for sgn in (-1, 1):
            ax2.axhline(sgn * tol * 1000, color="#d62728", linewidth=0.5, linestyle=":", alpha=0.6)
        if j == len(names) - 1:
            ax2.set_ylabel("d spread / 1k steps", color="#d62728")
        if d.settled_step is not None:
            ax.axvline(d.settled_step, color="#2ca02c", linestyle="--", linewidth=1)
            ax.text(d.settled_step, ax.get_ylim()[1], " settled", color="#2ca02c", fontsize=7, va="top")
        ax.set_xlabel("step")
        for row in range(3):
            for s in events:
                axes[row, j].axvline(s, color="#999999", linewidth=0.5, alpha=0.6)
    fig.suptitle(f"neuron norms: {title}" + ("  (grey lines: sleeps)" if events else ""), fontsize=11)
    save(fig, out)
    return fig
