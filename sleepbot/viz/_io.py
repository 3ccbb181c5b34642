"""What every plot function shares: turning a source (a run file, a directory of runs, a comparison's output
directory or a live object) into data, and figures that need no display.

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas, never through pyplot, so
plotting works headless and never changes the backend of a notebook or application that imports sleepbot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.errors import SleepbotError


@dataclass
class Curve:
    """One run's validation curve and its sleep events (steps), whatever it was read from."""

    name: str
    steps: np.ndarray  # [V]
    values: np.ndarray  # [V]
    accepted: list[int] = field(default_factory=list)  # steps of accepted sleeps
    rejected: list[int] = field(default_factory=list)  # steps of rolled-back or rejected sleeps
    group: str = "run"


def new_figure(width: float, height: float):
    """A Figure attached to an Agg canvas (headless, independent of pyplot's global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, out: str | Path | None, dpi: int = 110) -> Path | None:
    """Save `fig` to `out` (format from the suffix; parent directories are created); None saves nothing."""
    if out is None:
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def is_compare_dir(path: Path) -> bool:
    return path.is_dir() and (path / "results.json").is_file() and (path / "runs").is_dir()


def run_paths(source: str | Path) -> list[Path]:
    """The run files (.h5) a path names: itself, or those under a directory (a comparison's `runs/` too)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SleepbotError(f"{str(path)!r} is neither a run file nor a directory of runs")
    paths = sorted(p for p in path.rglob("*.h5") if p.is_file())
    if not paths:
        raise SleepbotError(f"no run files (*.h5) under {str(path)!r}")
    return paths


def open_run(source: Any, run: str | None = None):
    """One RunFile from a path, a directory (the first run whose file name contains `run`, default the first
    complete one) or an already open RunFile (returned as is). The caller closes what it opened."""
    from sleepbot.store import RunFile

    if hasattr(source, "weights") and hasattr(source, "norms"):
        return source
    paths = run_paths(source)
    if run is not None:
        paths = [p for p in paths if run in p.name]
        if not paths:
            raise SleepbotError(f"no run file under {str(source)!r} has {run!r} in its name")
    first = None
    for p in paths:
        f = RunFile(p)
        if f.complete or len(paths) == 1:
            if first is not None:
                first.close()
            return f
        if first is None:
            first = f
        else:
            f.close()
    return first


def _events(events: Sequence[Mapping[str, Any]] | None) -> tuple[list[int], list[int]]:
    acc, rej = [], []
    for e in events or []:
        (acc if e.get("accepted", True) else rej).append(int(e["step"]))
    return acc, rej


def curve_of(obj: Any, metric: str = "val_acc", name: str | None = None) -> Curve:
    """A Curve from a RunResult, its dict (`RunResult.to_dict()`, a comparison's run JSON) or a RunFile."""
    if hasattr(obj, "to_dict") and not isinstance(obj, Mapping):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        key = {"val_acc": "val_acc", "val_loss": "val_loss"}.get(metric)
        if key is None or key not in obj:
            raise SleepbotError(f"unknown curve metric {metric!r} for a run result; valid: val_acc, val_loss")
        acc, rej = _events(obj.get("events"))
        strategy = ((obj.get("config") or {}).get("sleep") or {}).get("strategy", "run")
        return Curve(
            name or str(obj.get("name", "run")),
            np.asarray(obj["val_step"], dtype=float),
            np.asarray(obj[key], dtype=float),
            acc,
            rej,
            strategy,
        )
    if hasattr(obj, "metrics") and hasattr(obj, "events"):
        key = {"val_acc": "val/acc", "val_loss": "val/loss"}.get(metric)
        if key is None:
            raise SleepbotError(f"unknown curve metric {metric!r} for a run file; valid: val_acc, val_loss")
        acc, rej = _events(obj.events())
        strategy = ((obj.attrs.get("config") or {}).get("sleep") or {}).get("strategy", "run")
        return Curve(
            name or obj.path.stem,
            np.asarray(obj.metrics["val/step"], dtype=float),
            np.asarray(obj.metrics[key], dtype=float),
            acc,
            rej,
            strategy,
        )
    raise SleepbotError(f"cannot read a learning curve from a {type(obj).__name__}")


def load_curve_groups(
    source: Any, metric: str = "val_acc", workload: str | None = None
) -> tuple[dict[str, list[Curve]], dict[str, Any]]:
    """Learning curves grouped by arm, and what is known about them (target, workload).

    Args:
        source: a comparison's output directory (grouped by arm; `workload` picks one, default the first),
            a directory of run files or one run file (grouped by sleep strategy), a RunFile, a RunResult or
            its dict, a list of those, or a mapping {group: [those]}.
        metric: `val_acc` or `val_loss`.
        workload: for a comparison directory.

    Returns:
        ({group: [Curve]}, {"target": float | None, "workload": str | None}).
    """
    meta: dict[str, Any] = {"target": None, "workload": workload}
    if isinstance(source, (str, Path)):
        path = Path(source)
        if is_compare_dir(path):
            from sleepbot.compare import load_results, load_runs

            results = load_results(path)
            workload = workload or next(iter(results["workloads"]))
            if workload not in results["workloads"]:
                raise SleepbotError(
                    f"no workload {workload!r} in {str(path)!r}; it has {', '.join(results['workloads'])}"
                )
            meta = {"target": results["workloads"][workload]["target"], "workload": workload}
            groups = {
                arm: [curve_of(r, metric) for r in runs] for arm, runs in load_runs(path, workload).items()
            }
            return groups, meta
        if path.suffix == ".json" and path.is_file():
            return load_curve_groups(json.loads(path.read_text()), metric)
        from sleepbot.store import RunFile

        groups: dict[str, list[Curve]] = {}
        for p in run_paths(path):
            with RunFile(p) as f:
                c = curve_of(f, metric)
            groups.setdefault(c.group, []).append(c)
        return groups, meta
    if isinstance(source, Mapping) and "val_step" not in source:
        return {
            str(k): [curve_of(r, metric) for r in (v if isinstance(v, (list, tuple)) else [v])]
            for k, v in source.items()
        }, meta
    items = source if isinstance(source, (list, tuple)) else [source]
    groups = {}
    for item in items:
        c = curve_of(item, metric)
        groups.setdefault(c.group, []).append(c)
    if not groups:
        raise SleepbotError("no learning curves to plot")
    return groups, meta
