"""Forecaster ablations and leave-one-out on the meta-training corpus: which choices earn their place.

    python scripts/forecaster_ablations.py --data trajectories/meta --out reports/ablations \
        [--main sleepbot/assets/forecaster.pt] [--steps 2000] [--workers 2] [--only main point_target ...]
    python scripts/forecaster_ablations.py --family multiscale --out reports/ablations_multiscale   # ms_* variants

Every variant is a base recipe with ONE change, trained on the same training runs and scored on the same held-out
test runs (the split is by run, per dataset, arch and optimizer). Two families:

- `lstm` (the default): the shipped recipe (scripts/train_default_forecaster.sh: lstm, context 5, horizons
  5/10/20, targets smoothed over 5 snapshots, 2,000 steps, split seed 0); scored on windows ending from the 5th
  snapshot on.
- `multiscale` (`ms_*`): the multiscale forecaster of the README's "Long histories" (context 20, trained on every
  length from 5, same targets and steps); every variant, the 5-snapshot ones included, is scored on the same
  windows, ending from the 20th snapshot on (`--eval-context`; the lstm family's default is each variant's own).

Leave-one-out variants train without every run of one optimizer, architecture or dataset and are scored on exactly
those runs. Scores: R2_disp per horizon, pooled over every layer, against the point future w(t+h) and against the
smoothed one (the mean of the 5 snapshots up to t+h). Checkpoints are kept in --out (a rerun skips finished ones);
the table is printed and written to --out/ablations.json and --out/ablations.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HORIZONS = (5, 10, 20)
BASE = {"model": "lstm", "context": 5, "horizons": HORIZONS, "target_smooth": 5, "baselines": ()}

# name -> (what changes, ForecasterTrainConfig overrides, holdout)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, list[str]] | None]] = {
    "main": ("the shipped recipe", {}, None),
    "point_target": ("trained on the point future (no smoothing)", {"target_smooth": 1}, None),
    "no_recurrence": (
        "an MLP over the same step features instead of the LSTM",
        {"model_options": {"mixer": "mlp"}},
        None,
    ),
    "layer_context": (
        "also reads the layer's mean neuron state",
        {"model_options": {"layer_context": True}},
        None,
    ),
    "read_progress": (
        "also reads step / max_steps (budget-dependent, like the first forecaster)",
        {"model_options": {"read_progress": True}},
        None,
    ),
    "context_10": ("reads 10 snapshots (90 steps) instead of 5 (40)", {"context": 10}, None),
    "long_training": ("4x the training steps (8,000)", {"_steps_factor": 4}, None),
    "wnn_mlp": ("the WNN-style per-weight MLP (no neuron features, no recurrence)", {"model": "mlp"}, None),
}
# Leave-one-out, the same in every family: name -> (what changes, the runs left out of training and scored).
HOLDOUTS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "loo_mnist1d": ("trained without MNIST-1D; scored on MNIST-1D", {"dataset": ["mnist1d"]}),
    "loo_momentum": ("trained without SGD+momentum; scored on it", {"optimizer": ["momentum"]}),
    "adam_family": (
        "trained on the Adam, AdamW and Adam+cosine runs only; scored on the other optimizers",
        {"optimizer": ["sgd", "momentum", "schedulefree_adamw"]},
    ),
    "loo_small_cnn": ("trained without small_cnn; scored on it", {"arch": ["small_cnn"]}),
}
VARIANTS.update({name: (change, {}, holdout) for name, (change, holdout) in HOLDOUTS.items()})

# The multiscale family: README "Long histories" (sleepbot train-forecaster --kind multiscale --context 20
# --min-context 5 --baselines '' --max-steps 2000 --target-smooth 5).
MS = {"model": "multiscale", "context": 20, "min_context": 5}
MS_VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, list[str]] | None]] = {
    "ms_main": ("multiscale: 5-20 snapshots, LSTM mix, smoothed targets", {}, None),
    "ms_context_10": ("reads 5-10 snapshots (90 steps) instead of 5-20 (190)", {"context": 10}, None),
    "ms_context_5": ("reads 5 snapshots (40 steps), the shipped forecaster's context", {"context": 5}, None),
    "ms_point_target": ("trained on the point future (no smoothing)", {"target_smooth": 1}, None),
    "ms_no_recurrence": (
        "an MLP over the mean step features instead of the LSTM",
        {"model_options": {"mixer": "mlp"}},
        None,
    ),
    "ms_global_mix": (
        "one global mix of the trends (no neuron state: a linear forecaster fitted on the corpus)",
        {"model_options": {"mixer": "none"}},
        None,
    ),
    "ms_layer_context": (
        "also reads the layer's mean neuron state",
        {"model_options": {"layer_context": True}},
        None,
    ),
    "ms_weight_head": (
        "adds a per-weight MLP correction (32 hidden) over the trends",
        {"model_options": {"head_hidden": 32}},
        None,
    ),
}
MS_VARIANTS.update({f"ms_{name}": (change, {}, holdout) for name, (change, holdout) in HOLDOUTS.items()})
for _name, (_change, _over, _hold) in MS_VARIANTS.items():
    VARIANTS[_name] = (_change, {**MS, **_over}, _hold)
FAMILIES = {"lstm": [n for n in VARIANTS if not n.startswith("ms_")], "multiscale": list(MS_VARIANTS)}


def train_variant(name: str, data: str, out: str, steps: int) -> dict[str, Any]:
    """Worker task: train one variant into out/<name>.pt (skipped when present)."""
    from sleepbot.forecast.module import ForecasterTrainConfig, train_forecaster

    path = Path(out) / f"{name}.pt"
    if path.is_file():
        return {"name": name, "skipped": True}
    _, overrides, holdout = VARIANTS[name]
    overrides = dict(overrides)
    steps *= overrides.pop("_steps_factor", 1)
    cfg = ForecasterTrainConfig(**{**BASE, **overrides, "holdout": holdout, "threads": 1})
    t0 = time.time()
    train_forecaster(data, cfg, trainer_kwargs={"max_steps": steps}, out=path)
    return {"name": name, "seconds": time.time() - t0}


def score_variant(name: str, data: str, out: str, stride: int, context: int | None) -> dict[str, Any]:
    """R2_disp of one variant on its held-out runs, point and smoothed targets."""
    from sleepbot.forecast import checkpoint_meta, load_forecaster
    from sleepbot.forecast.evaluate import evaluate, score
    from sleepbot.forecast.windows import resolve_paths, scan_runs

    path = Path(out) / f"{name}.pt"
    model = load_forecaster(path)
    meta = checkpoint_meta(path)
    test = set(meta["split"]["test"])
    runs = [r for r in scan_runs(resolve_paths(data)) if r.run_id in test]
    _, _, holdout = VARIANTS[name]
    if holdout:  # only the left-out runs
        runs = [r for r in runs if all(str(r.attrs.get(k)) in v for k, v in holdout.items())]
    row: dict[str, Any] = {"variant": name, "change": VARIANTS[name][0], "runs": len(runs)}
    for smooth in (1, 5):
        res = evaluate({name: model}, runs, HORIZONS, stride=stride, smooth=smooth, context=context)
        for h in HORIZONS:
            row[f"r2_h{h}" + ("_smooth" if smooth > 1 else "")] = score(res, name, h)
    row["train_seconds"] = meta.get("seconds", {}).get(model.name)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="trajectories/meta")
    p.add_argument(
        "--family", choices=sorted(FAMILIES), default="lstm", help="which variants (default: lstm)"
    )
    p.add_argument("--out", default="reports/ablations")
    p.add_argument(
        "--main",
        default=None,
        help="a checkpoint of the family's base recipe to use as `main`/`ms_main` (no retrain)",
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--stride", type=int, default=2, help="spacing of scored window end snapshots")
    p.add_argument(
        "--eval-context",
        type=int,
        default=None,
        help="snapshots behind every scored window (default: lstm each variant's own, multiscale 20)",
    )
    p.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS))
    args = p.parse_args(argv)

    from sleepbot.experiments import run_parallel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or FAMILIES[args.family]
    main_name = "ms_main" if args.family == "multiscale" else "main"
    if args.main and main_name in names and not (out / f"{main_name}.pt").exists():
        shutil.copyfile(args.main, out / f"{main_name}.pt")
    # lstm: each variant on the windows of its own context (as docs/forecaster_ablations.md was made);
    # multiscale: every variant on the windows of the longest (20 snapshots behind), so that all are comparable
    eval_context = args.eval_context or (MS["context"] if args.family == "multiscale" else None)
    tasks = [{"name": n, "data": args.data, "out": str(out), "steps": args.steps} for n in names]
    for ok, res in run_parallel(train_variant, tasks, args.workers, desc="train", progress=False):
        if not ok:
            print(f"training failed: {res}", file=sys.stderr)
            return 1
        print(json.dumps(res), flush=True)
    rows = [
        res
        for ok, res in run_parallel(
            score_variant,
            [
                {
                    "name": n,
                    "data": args.data,
                    "out": str(out),
                    "stride": args.stride,
                    "context": eval_context,
                }
                for n in names
            ],
            args.workers,
            desc="score",
            progress=False,
        )
        if ok or print(f"scoring failed: {res}", file=sys.stderr)
    ]
    (out / "ablations.json").write_text(json.dumps(rows, indent=1))
    cols = [f"r2_h{h}" for h in HORIZONS] + [f"r2_h{h}_smooth" for h in HORIZONS]
    lines = [
        "| variant | change | held-out runs | " + " | ".join(c.replace("r2_", "R2 ") for c in cols) + " |",
        "|---" * (3 + len(cols)) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['change']} | {r['runs']} | "
            + " | ".join(f"{r[c]:.3f}" for c in cols)
            + " |"
        )
    table = "\n".join(lines)
    (out / "ablations.md").write_text(table + "\n")
    print(table)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
