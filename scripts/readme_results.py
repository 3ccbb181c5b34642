"""Produce the README's headline results table and figure from a comparison (runs it first if needed).

    python scripts/readme_results.py --config configs/compare_digits.yaml --out reports/compare_digits \
        --table docs/results_digits.md --figure docs/curves_digits.png
    python scripts/readme_results.py --out demo_out/compare --table ... --figure ...   # `make demo`'s numbers

With --config the comparison runs first (resumable: finished runs are reused); without it, the results already in
--out (results.json) are used as they are. Writes the Markdown tables (sleepbot.compare.format_table, the one renderer), the learning-curve
figure (median + interquartile band per arm, sleeps marked) and a small JSON with the numbers, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="compare YAML to run first (default: use --out's results.json as is)")
    p.add_argument("--out", required=True, help="the comparison's output directory")
    p.add_argument("--table", required=True, help="Markdown file for the table")
    p.add_argument("--figure", required=True, help="PNG file for the learning curves")
    p.add_argument("--json", help="JSON file for the numbers (default: next to the table)")
    p.add_argument("--workers", type=int)
    p.add_argument("--seeds", type=int, help="override the number of seeds")
    args = p.parse_args(argv)

    from sleepbot.compare import compare, format_table, load_compare_config, load_results
    from sleepbot.viz.curves import plot_learning_curves

    t0 = time.time()
    if args.config:
        results = compare(load_compare_config(args.config, seeds=args.seeds), args.out, workers=args.workers)
    else:
        results = load_results(args.out)
    config = f"--config {args.config} " if args.config else ""
    lines = [format_table(results, markdown=True)]
    lines.append(f"_Produced by `python scripts/readme_results.py {config}--out {args.out} ...`._")
    table = Path(args.table)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(lines) + "\n")
    first = next(iter(results["workloads"]))
    plot_learning_curves(args.out, args.figure, workload=first)
    summary = {
        "config": args.config,
        "out": args.out,
        "seconds": time.time() - t0,
        "headline": results["headline"],
        "errors": results["errors"],
    }
    Path(args.json or table.with_suffix(".json")).write_text(json.dumps(summary, indent=1))
    print(format_table(results))
    print(f"table: {table}\nfigure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
