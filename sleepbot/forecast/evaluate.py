"""Judging forecasters on held-out runs, side by side, per horizon and per layer kind.

Two numbers per (forecaster, horizon, layer kind), summed over every window of every held-out run:

    R2_disp = 1 - sum ||w_hat - w(t+h)||^2 / sum ||w(t+h) - w(t)||^2     (persistence scores 0, a perfect forecast 1)
    cos     = mean over (neuron, window) of cos(w_hat - w(t), w(t+h) - w(t))   (0 for persistence)

All forecasters see the same windows: end snapshots from the largest context on, every `stride` snapshots.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sleepbot.errors import SleepbotError
from sleepbot.forecast.base import Forecaster
from sleepbot.forecast.windows import RunInfo, WindowDataset


def evaluate(
    models: dict[str, Forecaster],
    runs: Sequence[RunInfo],
    horizons: Sequence[int] | None = None,
    *,
    stride: int = 1,
    max_weights: int = 1 << 17,
    use_progress: bool = True,
    smooth: int = 1,
    context: int | None = None,
) -> dict[str, Any]:
    """R2_disp and mean cosine of every model on every window of `runs`.

    Args:
        models: name -> forecaster (e.g. the trained one plus `checkpoint.load_baselines`).
        runs: held-out runs (`windows.scan_runs`).
        horizons: snapshots ahead to score (default: the first model's trained horizons).
        stride: spacing of window end snapshots.
        max_weights: weights per group (memory vs speed only; the result does not depend on it).
        use_progress: give the forecasters step / max_steps (as the sleep callback does when it knows max_steps).
        smooth: score against the mean of the last `smooth` snapshots up to each horizon (1: the point target).
        context: snapshots behind each window's end (default: the largest context of the models). A larger one
            scores every model on the windows of a longer-reading one (each still reads only its own context),
            so that separate evaluations of forecasters with different contexts are comparable.

    Returns:
        A JSON-ready dict: horizons, kinds, models, runs (ids), rows (one per model, horizon and kind, kind `all`
        included: r2_disp, cos, windows, weights).
    """
    if not models:
        raise SleepbotError("nothing to evaluate: no forecasters given")
    if not runs:
        raise SleepbotError("nothing to evaluate on: no held-out runs")
    first = next(iter(models.values()))
    horizons = tuple(int(h) for h in (horizons or first.horizons))
    longest = max(m.context for m in models.values())
    if context is not None and int(context) < longest:
        raise SleepbotError(
            f"context {context} is shorter than a model's context {longest}; valid: >= {longest}"
        )
    context = longest if context is None else int(context)
    ds = WindowDataset(
        runs, context, horizons, mode="all", max_weights=max_weights, stride=stride, smooth=smooth
    )
    names = list(models)
    n_h = len(horizons)
    # acc[(name, kind)] = [H, 4]: sse, sst, sum of cosines, windows (neuron-windows) ; weights counted apart.
    acc: dict[tuple[str, str], torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for group in ds:
            history, target, mask = group["history"], group["target"], group["mask"]  # [C,M,F] [H,M,F] [H,M]
            kind = group["kind"]
            progress = group["progress"] if use_progress else None
            true = target - history[-1]  # [H, M, F]
            m = mask.to(true.dtype)  # [H, M]
            true_norm = true.norm(dim=-1)  # [H, M]
            weights.setdefault(kind, torch.zeros(n_h, dtype=torch.float64))
            weights[kind] += (m.sum(1) * history.shape[-1]).double()
            for name in names:
                model = models[name]
                pred = model.displacement(model.check_history(history), horizons, kind, progress)  # [H, M, F]
                sse = ((pred - true).pow(2).sum(-1) * m).sum(1)  # [H]
                sst = (true.pow(2).sum(-1) * m).sum(1)
                cos = (pred * true).sum(-1) / (pred.norm(dim=-1) * true_norm).clamp_min(1e-30)  # [H, M]
                row = torch.stack([sse, sst, (cos * m).sum(1), m.sum(1)], -1).double()  # [H, 4]
                key = (name, kind)
                acc[key] = acc.get(key, torch.zeros(n_h, 4, dtype=torch.float64)) + row
    ds.close()
    kinds = sorted({k for _, k in acc})
    rows = []
    for name in names:
        total = sum(acc[(name, k)] for k in kinds)
        for kind, a in [*((k, acc[(name, k)]) for k in kinds), ("all", total)]:
            w = sum(weights.values()) if kind == "all" else weights[kind]
            for j, h in enumerate(horizons):
                sse, sst, cos, n = (float(x) for x in a[j])
                rows.append(
                    {
                        "model": name,
                        "horizon": h,
                        "kind": kind,
                        "r2_disp": 1 - sse / sst if sst > 0 else float("nan"),
                        "cos": cos / n if n > 0 else float("nan"),
                        "windows": int(n),
                        "weights": int(w[j]),
                    }
                )
    return {
        "horizons": list(horizons),
        "kinds": [*kinds, "all"],
        "models": names,
        "runs": [r.run_id for r in runs],
        "stride": stride,
        "smooth": smooth,
        "snapshot_every": runs[0].snapshot_every,
        "rows": rows,
    }


def score(result: dict[str, Any], model: str, horizon: int, kind: str = "all", key: str = "r2_disp") -> float:
    """One number out of an `evaluate` result."""
    for row in result["rows"]:
        if row["model"] == model and row["horizon"] == horizon and row["kind"] == kind:
            return float(row[key])
    raise KeyError(f"no row for model {model!r}, horizon {horizon}, kind {kind!r}")


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The evaluation as a text (or Markdown) table: one line per horizon and kind, R2_disp / cos per model."""
    names = result["models"]
    head = ["horizon", "kind", "windows", *[f"{n} R2 / cos" for n in names]]
    lines = []
    for h in result["horizons"]:
        for kind in result["kinds"]:
            cells = [f"{h}", kind, f"{int(score(result, names[0], h, kind, 'windows'))}"]
            best = max(score(result, n, h, kind) for n in names)
            for n in names:
                r2, cos = score(result, n, h, kind), score(result, n, h, kind, "cos")
                top = r2 == best and len(names) > 1
                if markdown:
                    cells.append(f"**{r2:.3f}** / {cos:.3f}" if top else f"{r2:.3f} / {cos:.3f}")
                else:
                    cells.append(f"{r2:7.3f}{'*' if top else ' '}/ {cos:5.3f}")
            lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), *(fmt.format(*cells) for cells in lines)]
    out.append(
        f"(* best R2_disp; {len(result['runs'])} held-out runs, snapshots every {result['snapshot_every']} "
        f"steps, horizons in snapshots)"
    )
    return "\n".join(out)


def write_json(result: dict[str, Any], path: str | Path, overwrite: bool = False) -> None:
    """Write an evaluation result as JSON (refuses to overwrite without `overwrite`)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SleepbotError(f"{str(path)!r} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")


def select_runs(
    runs: Sequence[RunInfo], split: dict[str, list[str]] | None, which: str = "auto"
) -> list[RunInfo]:
    """The runs to score, given the split recorded in a forecaster's checkpoint.

    Args:
        runs: every run found in the data.
        split: the checkpoint's {'train': [...], 'val': [...], 'test': [...]} run ids (None: unknown).
        which: `auto` (every run the forecaster did not train or validate on: its test runs and any run it never
            saw), `test`, `val` or `train` (that split's runs present in the data), or `all` (every run, seen or
            not: a score on training runs measures memory, not forecasting).
    """
    valid = ("auto", "test", "val", "train", "all")
    if which not in valid:
        raise SleepbotError(f"unknown split {which!r}; valid: {', '.join(valid)}")
    split = split or {}
    if which == "all":
        return list(runs)
    if which == "auto":
        seen = set(split.get("train", [])) | set(split.get("val", []))
        return [r for r in runs if r.run_id not in seen]
    ids = set(split.get(which, []))
    return [r for r in runs if r.run_id in ids]


def evaluate_by(
    models: dict[str, Forecaster], runs: Sequence[RunInfo], attr: str, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """`evaluate` on each group of runs sharing the value of a run attribute (`lr`, `arch`, `dataset`, ...)."""
    groups: dict[str, list[RunInfo]] = {}
    for r in runs:
        if attr not in r.attrs:
            raise SleepbotError(f"unknown run attribute {attr!r}; valid: {', '.join(sorted(r.attrs))}")
        groups.setdefault(f"{attr}={r.attrs[attr]}", []).append(r)
    return {key: evaluate(models, rs, **kwargs) for key, rs in sorted(groups.items())}
