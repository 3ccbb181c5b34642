"""Learning curves per arm: the median over seeds with an interquartile band, sleep events marked.

Up and to the left is better: an arm that helps reaches the same accuracy in fewer steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.analysis import align_curves
from sleepbot.viz._io import Curve, load_curve_groups, new_figure, save

# The control in black, so every other arm reads against it; the rest in a fixed order (tab10).
_FIXED = {"none": "#222222", "oracle": "#7f7f7f"}
_CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def arm_colors(names: list[str]) -> dict[str, str]:
    """A stable colour per arm name: `none` black, `oracle` grey, the others in order."""
    out, i = {}, 0
    for n in names:
        if n in _FIXED:
            out[n] = _FIXED[n]
        else:
            out[n] = _CYCLE[i % len(_CYCLE)]
            i += 1
    return out


def curve_bands(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grid [G], median [G], q25 [G], q75 [G]) over runs, on the first run's validation steps."""
    grid, values = align_curves([(c.steps, c.values) for c in curves])  # values [R, G]
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            return (
                grid,
                np.nanmedian(values, axis=0),
                np.nanpercentile(values, 25, axis=0),
                np.nanpercentile(values, 75, axis=0),
            )


def _draw(ax, groups: dict[str, list[Curve]], colors: dict[str, str], events: bool) -> None:
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (name, curves) in enumerate(groups.items()):
        grid, med, lo, hi = curve_bands(curves)
        c = colors[name]
        ax.fill_between(grid, lo, hi, color=c, alpha=0.18, linewidth=0)
        ax.plot(grid, med, color=c, linewidth=1.6, label=f"{name} (n={len(curves)})")
        if not events:
            continue
        # Sleep events: one tick per step at which any run slept, in the arm's colour, in its own row along the
        # bottom; opacity is the fraction of runs whose sleep was accepted there (rolled-back ones are hollow).
        steps: dict[int, int] = {}
        rejected: dict[int, int] = {}
        for cv in curves:
            for s in cv.accepted:
                steps[s] = steps.get(s, 0) + 1
            for s in cv.rejected:
                rejected[s] = rejected.get(s, 0) + 1
        y = 0.03 + 0.035 * i
        for s, k in steps.items():
            ax.plot(
                [s],
                [y],
                marker="|",
                markersize=9,
                color=c,
                alpha=0.3 + 0.7 * k / len(curves),
                transform=trans,
            )
        for s in rejected:
            if s not in steps:
                ax.plot([s], [y], marker="o", markersize=3, mfc="none", color=c, alpha=0.8, transform=trans)


def plot_learning_curves(
    source: Any,
    out: str | Path | None = None,
    *,
    metric: str = "val_acc",
    workload: str | None = None,
    target: float | None = None,
    title: str | None = None,
    zoom: bool = True,
    events: bool = True,
):
    """Median learning curve per arm with its interquartile band; sleep events as ticks along the bottom.

    Args:
        source: a comparison's output directory, a directory of runs, a run file, RunResult(s) or their dicts,
            or {arm: [runs]} (see `sleepbot.viz._io.load_curve_groups`).
        out: where to save the figure (PNG, SVG, PDF by suffix); None only returns it.
        metric: `val_acc` or `val_loss`.
        workload: which workload of a comparison (default: the first).
        target: a horizontal line at the target (default: the comparison's own target).
        title: figure title (default: the workload's name).
        zoom: add a second panel zoomed on the last stretch of accuracy, where the arms differ.
        events: mark sleep events.

    Returns:
        The matplotlib Figure.
    """
    groups, meta = load_curve_groups(source, metric, workload)
    target = meta.get("target") if target is None else target
    colors = arm_colors(list(groups))
    fig = new_figure(11 if zoom else 6.5, 4.2)
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    ylabel = {"val_acc": "validation accuracy", "val_loss": "validation loss"}.get(metric, metric)
    for k, ax in enumerate(axes):
        _draw(ax, groups, colors, events and k == 0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(target, color="#555555", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    # Above the rows of sleep ticks (one row per arm along the bottom), so the legend never hides them.
    ticks_top = 0.03 + 0.035 * len(groups) + 0.01 if events else 0.0
    if metric == "val_acc":
        axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, ticks_top), fontsize=8)
    else:
        axes[0].legend(loc="upper right", fontsize=8)
    if zoom:
        meds = [curve_bands(c)[1] for c in groups.values()]
        top = np.nanmax([np.nanmax(m) for m in meds])
        ref = target if target is not None else top
        lo = max(0.0, ref - 0.08) if metric == "val_acc" else None
        if lo is not None:
            axes[1].set_ylim(lo, min(1.0, top + 0.01) if top > lo else lo + 0.1)
        axes[1].set_title("zoom: where the arms reach the target", fontsize=9)
    fig.suptitle(
        title or meta.get("workload") or "learning curves (up and to the left is better)", fontsize=11
    )
    save(fig, out)
    return fig


def plot_steps_to_target(source: Any, out: str | Path | None = None, *, workload: str | None = None):
    """Steps to target per seed, one row per arm: dots for seeds, a bar at the median, misses at the right.

    Args:
        source: a comparison's output directory or its loaded results dict.
        out: where to save the figure; None only returns it.
        workload: which workload (default: the first).

    Returns:
        The matplotlib Figure.
    """
    from sleepbot.compare import load_results

    results = source if isinstance(source, dict) else load_results(source)
    workload = workload or next(iter(results["workloads"]))
    w = results["workloads"][workload]
    arms = [(name, a) for name, a in w["arms"].items() if a.get("n")]
    colors = arm_colors([name for name, _ in arms])
    fig = new_figure(7.5, 0.8 + 0.45 * len(arms))
    ax = fig.subplots()
    budget = w["budget"]
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for i, (name, a) in enumerate(arms):
        y = len(arms) - 1 - i
        steps = np.asarray(a["steps_to_target"], dtype=float)
        ax.scatter(
            steps, y + rng.uniform(-0.15, 0.15, steps.size), s=14, color=colors[name], alpha=0.8, zorder=3
        )
        ax.plot([a["steps"]["median"]] * 2, [y - 0.3, y + 0.3], color=colors[name], linewidth=2.5, zorder=4)
        if a["steps"]["lo"] is not None:
            ax.plot([a["steps"]["lo"], a["steps"]["hi"]], [y, y], color=colors[name], linewidth=1, alpha=0.6)
    ax.axvspan(budget, ax.get_xlim()[1] if arms else budget * 2.1, color="#dddddd", alpha=0.5, zorder=0)
    ax.axvline(budget, color="#777777", linewidth=1, linestyle="--")
    ax.text(budget, -0.45, "  missed (counted as 2x budget)", fontsize=7, color="#555555", va="bottom")
    ax.set_yticks(range(len(arms)), [name for name, _ in reversed(arms)])
    ax.set_ylim(-0.6, len(arms) - 0.4)
    ax.set_xlabel(f"steps to reach val acc {w['target']:.4f} (bar: median; line: 95% CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{workload}: steps to target per seed (left is better)", fontsize=10)
    save(fig, out)
    return fig
