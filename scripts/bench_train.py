"""Benchmark `sleepbot train` on digits / small_cnn / adam: steps and wall-clock to 95% validation accuracy,
and start-up time from launching the command to the first training step.

    python scripts/bench_train.py [--repeats 3] [--out bench_train.json]

Each repeat launches the real CLI in a fresh process (so start-up includes importing torch and Lightning).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "train_digits.yaml"))
    ap.add_argument("--out", default="bench_train.json")
    args = ap.parse_args()
    rows = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            res_path = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                "-m",
                "sleepbot.cli",
                "train",
                "--config",
                args.config,
                "--json",
                str(res_path),
            ]
            cmd += [
                "--out_dir",
                tmp,
                "--seed",
                str(r),
                "--trainer.logger",
                "none",
                "--trainer.progress_bar",
                "false",
            ]
            t0 = time.time()
            subprocess.run(cmd, check=True, capture_output=True)
            total = time.time() - t0
            res = json.loads(res_path.read_text())
        hit = [s for s, a in zip(res["val_step"], res["val_acc"]) if a >= TARGET]
        steps_per_s = res["steps"] / res["fit_seconds"]
        rows.append(
            {
                "seed": r,
                "steps_to_95": hit[0] if hit else None,
                "seconds_to_95": hit[0] / steps_per_s if hit else None,
                "final_val_acc": res["val_acc"][-1],
                "test_acc": res["test_acc"],
                "steps": res["steps"],
                "fit_seconds": res["fit_seconds"],
                "steps_per_second": steps_per_s,
                "startup_seconds": res["first_step_unix"] - t0,
                "command_seconds": total,
            }
        )
        print(json.dumps(rows[-1]))
    med = {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in rows[0] if k != "seed"}
    out = {"target": TARGET, "config": args.config, "runs": rows, "median": med}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"median: {json.dumps(med)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
