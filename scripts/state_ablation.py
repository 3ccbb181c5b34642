"""Does reading the optimizer's state help a forecaster? Linear mixes with and without it, on held-out runs.

    sleepbot collect --config configs/collect_state.yaml --out trajectories/state
    python scripts/state_ablation.py --data trajectories/state [--test-seed 301] [--json out.json] [--md out.md]

Runs with seed --test-seed are scored; every other run fits. Per optimizer (Adam, AdamW, SGD+momentum; Adam with
warm-up + cosine counts as Adam) and horizon (2, 5, 20 snapshots), one pooled least-squares mix of: the 9 trend
features of the multiscale forecaster over the last 20 snapshots (`history`); those plus the step the optimizer's
state points to (`history+state`: Adam's -lr m_hat / sqrt(v_hat), the momentum buffer times -lr); the state's step
alone; the history plus its 4 slopes at rank --layer-rank over the layer's neurons (`history+layer`, the
cheapest neuron interaction); the history plus the step the optimizer would take with the gradient of the whole
training split at the snapshot, with and without the state's (`--no-gradient` skips these: the replay triples the
time). Scored by R2_disp against the point future and the smoothed one (the mean of the 5 snapshots up to t + h),
pooled over layers and windows (sleepbot.forecast.state). Prints a markdown table; --json keeps every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a directory of runs recorded with record.optimizer_state")
    p.add_argument("--test-seed", type=int, default=301, help="runs of this seed are scored, the rest fit")
    p.add_argument("--horizons", type=int, nargs="+", default=[2, 5, 20])
    p.add_argument("--context", type=int, default=20)
    p.add_argument("--stride", type=int, default=2, help="snapshots between window ends")
    p.add_argument("--layer-rank", type=int, default=2, help="rank of the layer-level slopes")
    p.add_argument(
        "--no-gradient", action="store_true", help="skip the training-split gradient's feature sets"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)

    from sleepbot.errors import SleepbotError
    from sleepbot.forecast.state import FEATURE_SETS, STATE_OPTIMIZERS, state_ablation
    from sleepbot.store import RunFile

    paths = sorted(Path(args.data).glob("*.h5"))
    if not paths:
        print(
            f"error: no .h5 runs in {args.data!r}; collect them with configs/collect_state.yaml",
            file=sys.stderr,
        )
        return 2
    train, test, skipped = [], [], {}
    try:
        for path in paths:
            with RunFile(path) as f:
                seed = int(f.attrs.get("seed", -1))
                opt = str(f.attrs.get("optimizer", ""))
            if opt not in STATE_OPTIMIZERS:  # plain SGD, Schedule-Free: no single step in their state
                skipped[opt] = skipped.get(opt, 0) + 1
                continue
            (test if seed == args.test_seed else train).append(str(path))
    except SleepbotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skipped:
        print(
            "skipped (no step readable from the state): "
            + ", ".join(f"{n} runs of {o or 'an unknown optimizer'}" for o, n in sorted(skipped.items()))
        )
    t0 = time.perf_counter()
    try:
        out = state_ablation(
            train, test, args.horizons, args.context, args.stride, args.layer_rank, not args.no_gradient
        )
    except SleepbotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["data"] = args.data
    out["test_seed"] = args.test_seed
    out["skipped"] = skipped

    by = {(r["optimizer"], r["horizon"], r["target"], r["features"]): r for r in out["rows"]}
    opts = sorted({r["optimizer"] for r in out["rows"]})
    sets = [f for f in FEATURE_SETS if any(r["features"] == f for r in out["rows"])]
    lines = []
    for target in ("point", "smooth"):
        lines += [
            f"R2_disp against the {target} future"
            + (" (the mean of the 5 snapshots up to t + h)" * (target == "smooth")),
            "",
            "| optimizer | runs fit / scored | horizon | "
            + " | ".join(s.replace("+", " + ") for s in sets)
            + " |",
            "|---|---|---|" + "---|" * len(sets),
        ]
        for o in opts:
            for h in args.horizons:
                r0 = by[(o, h, target, "history")]
                cells = [f"{by[(o, h, target, f)]['r2']:.3f}" for f in sets]
                lines.append(
                    f"| {o} | {r0['train_runs']} / {r0['test_runs']} | {h} | " + " | ".join(cells) + " |"
                )
        lines.append("")
    table = "\n".join(lines)
    print(table)
    print(f"({out['seconds']} s)")
    if args.md:
        Path(args.md).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
