"""`sleepbot` and its subcommands. Thin: parse, call the library, print.

Heavy libraries (torch, Lightning, h5py) are imported inside each command's function, never at module level, so
that `sleepbot --help` and argument errors answer in well under a second.

Each command is a pair of functions, `_add_<cmd>(parser)` and `_run_<cmd>(args) -> int`, listed in COMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sleepbot._version import __version__
from sleepbot.errors import SleepbotError


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SleepbotError(f"{self.prog}: {message}")


def _add_run_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help="YAML run config (see configs/); dotted overrides follow, e.g. --model.lr 0.01"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


# --------------------------------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    _add_run_config_args(p)
    p.add_argument(
        "--json", metavar="PATH", help="also write the run's result (curve, test acc, timings) as JSON"
    )


def _run_train(args: argparse.Namespace) -> int:
    from sleepbot.config import resolve_run_config, to_yaml

    cfg = resolve_run_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from sleepbot.training import run_training

    result = run_training(cfg)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    print(
        f"{result.name}: {result.steps} steps in {result.fit_seconds:.1f}s, "
        f"final val acc {result.final_val_acc:.4f}, test acc {result.test_acc:.4f}"
        + (f", logs in {result.log_dir}" if result.log_dir else "")
    )
    return 0


# --------------------------------------------------------------------------------------------------- compare
def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="compare YAML (see configs/compare_*.yaml)")
    p.add_argument("--out", required=True, help="output directory (resumable: finished runs are skipped)")
    p.add_argument("--seeds", type=int, help="override the number of seeds")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: one per core)")
    p.add_argument(
        "--overwrite", action="store_true", help="reuse an out dir that holds another config's comparison"
    )
    p.add_argument("--report", action="store_true", help="write the HTML/Markdown report when done")


def _run_compare(args: argparse.Namespace) -> int:
    from sleepbot.compare import compare, format_table, load_compare_config

    cfg = load_compare_config(args.config, seeds=args.seeds)
    results = compare(cfg, args.out, workers=args.workers, overwrite=args.overwrite)
    print(format_table(results))
    if results["errors"]:
        print(
            f"{len(results['errors'])} run(s) failed; see 'errors' in {args.out}/results.json",
            file=sys.stderr,
        )
    print(f"results: {args.out}/results.json, {args.out}/results.csv")
    if args.report:
        from sleepbot.report import write_report

        html_path, _ = write_report(args.out, overwrite=True)
        print(f"report: {html_path}")
    return 0


# --------------------------------------------------------------------------------------------------- report
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a `compare --out` directory, or a directory of run files")
    p.add_argument("--out", help="where to write report.html / report.md (default: DIR)")
    p.add_argument("--forecaster", help="forecaster checkpoint for the forecast section")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--no-animation", action="store_true", help="skip the all-ones response animation")


def _run_report(args: argparse.Namespace) -> int:
    from sleepbot.report import write_report

    html_path, md_path = write_report(
        args.dir,
        args.out,
        forecaster=args.forecaster,
        overwrite=args.overwrite,
        animation=not args.no_animation,
    )
    print(f"report: {html_path}\nsummary: {md_path}")
    return 0


# --------------------------------------------------------------------------------------------------- collect
def _add_collect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="collect YAML: a grid of runs (see configs/collect_*.yaml)"
    )
    p.add_argument("--out", required=True, help="output directory, e.g. trajectories/digits (resumable)")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: one per core)")
    p.add_argument("--shard", metavar="K/N", help="run only shard K of N (1-based), e.g. a SLURM array task")
    p.add_argument("--overwrite", action="store_true", help="redo complete runs too, replacing their files")


def _run_collect(args: argparse.Namespace) -> int:
    from sleepbot.experiments import collect, collect_summary, load_collect_config

    cfg = load_collect_config(args.config)  # bad names fail here, before any worker starts
    rows = collect(
        cfg,
        args.out,
        workers=args.workers,
        shard=args.shard,
        overwrite=args.overwrite,
        config_file=args.config,
    )
    print(collect_summary(rows, args.out))
    return 1 if any(r.status == "failed" for r in rows) else 0


# --------------------------------------------------------------------------------------------------- inspect
def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="FILE_OR_DIR", help="a run file (.h5) or a directory of them")


def _run_inspect(args: argparse.Namespace) -> int:
    from sleepbot.store.summary import describe

    print(describe(args.path))
    return 0


# --------------------------------------------------------------------------------------------------- sleep
def _add_sleep(p: argparse.ArgumentParser) -> None:
    _add_run_config_args(p)
    p.add_argument(
        "--strategy", help="sleep strategy (linear, learned, noise, square_normalize, lookahead, ...)"
    )
    p.add_argument("--forecaster", help="forecaster checkpoint for `learned` (default: the shipped one)")
    p.add_argument(
        "--vs", metavar="BASELINE", help="also run this strategy (usually `none`) on the same seeds"
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm with --vs (default 1; use >= 10)")
    p.add_argument(
        "--target", type=float, help="validation accuracy to reach (default: the baseline's median)"
    )
    p.add_argument("--workers", type=int, help="parallel worker processes with --vs (default: one per core)")
    p.add_argument(
        "--json", metavar="FILE", help="also write the per-arm summary (and per-run curves) as JSON"
    )


def _sleep_arm_rows(results: dict, baseline: str, target: float, budget: int) -> dict:
    """Per arm: steps to target (median, bootstrap CI), accuracies, speedup over `baseline` paired by seed."""
    import numpy as np

    from sleepbot.analysis import bootstrap_ci, paired_speedup, steps_to_target

    steps = {
        arm: [steps_to_target(r["val_step"], r["val_acc"], target, budget) for r in runs]
        for arm, runs in results.items()
    }
    rows = {}
    for arm, runs in results.items():
        sp = paired_speedup(steps[baseline], steps[arm])
        events = [e for r in runs for e in r["events"]]
        rows[arm] = {
            "seeds": [r["seed"] for r in runs],
            "steps_to_target": steps[arm],
            "median_steps": float(np.median(steps[arm])),
            "steps_ci": list(bootstrap_ci(steps[arm])),
            "misses": int(sum(s > budget for s in steps[arm])),
            "final_val_acc": float(np.median([r["val_acc"][-1] for r in runs])),
            "test_acc": float(np.median([r["test_acc"] for r in runs])),
            "speedup": sp.ratio,
            "speedup_ci": [sp.lo, sp.hi],
            "p_value": sp.p_value,
            "sleeps": len(events),
            "accepted": int(sum(bool(e["accepted"]) for e in events)),
            "fit_seconds": float(np.median([r["fit_seconds"] for r in runs])),
        }
    return rows


def _run_sleep(args: argparse.Namespace) -> int:
    from sleepbot.config import resolve_run_config, to_yaml

    cfg = resolve_run_config(args.config, args.overrides)
    if args.strategy is not None:
        cfg = resolve_run_config(args.config, [*args.overrides, "--sleep.strategy", args.strategy])
    if args.forecaster is not None:
        cfg.sleep.forecaster = args.forecaster
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.seeds < 1:
        raise SleepbotError(f"--seeds must be >= 1, got {args.seeds}")
    import copy
    import json

    from sleepbot.sleep import sleep_from_config

    arms = [cfg.sleep.strategy] + ([args.vs] if args.vs else [])
    for arm in arms:  # bad strategies, options or forecaster files fail here, before any run starts
        probe = copy.deepcopy(cfg)
        probe.sleep.strategy = arm
        if arm != "none":
            sleep_from_config(probe)
    if not args.vs:
        from sleepbot.training import run_training

        r = run_training(cfg)
        accepted = sum(bool(e["accepted"]) for e in r.events)
        sleep_s = sum(e["seconds"] for e in r.events)
        print(
            f"{r.name} [{cfg.sleep.strategy}]: {r.steps} steps in {r.fit_seconds:.1f}s "
            f"({accepted}/{len(r.events)} jumps accepted, {sleep_s:.2f}s asleep), "
            f"final val acc {r.final_val_acc:.4f}, test acc {r.test_acc:.4f}"
            + (f", logs in {r.log_dir}" if r.log_dir else "")
        )
        if args.target is not None:
            from sleepbot.analysis import steps_to_target

            s = steps_to_target(r.val_step, r.val_acc, args.target, cfg.trainer.max_steps)
            print(f"steps to val acc {args.target}: " + (f"{s:.0f}" if s <= r.steps else "not reached"))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(r.to_dict(), fh, indent=1)
        return 0

    from sleepbot.experiments import run_parallel, train_task

    tasks, labels = [], []
    for arm in arms:
        for i in range(args.seeds):
            c = copy.deepcopy(cfg)
            c.seed = cfg.seed + i
            c.sleep.strategy = arm
            c.name = f"{cfg.run_name}-{arm}-s{c.seed}" if cfg.name else f"{c.run_name}-{arm}"
            tasks.append({"config": c.to_dict()})
            labels.append(arm)
    out = run_parallel(train_task, tasks, args.workers, desc="sleep runs")
    failed = [(labels[i], err) for i, (ok, err) in enumerate(out) if not ok]
    if failed:
        raise SleepbotError(
            f"{len(failed)} of {len(out)} runs failed; first ({failed[0][0]}): {failed[0][1]}"
        )
    results = {arm: [res for lab, (_, res) in zip(labels, out) if lab == arm] for arm in arms}
    baseline = args.vs
    budget = cfg.trainer.max_steps
    target = args.target
    if target is None:
        import numpy as np

        target = float(np.median([r["val_acc"][-1] for r in results[baseline]]))
    rows = _sleep_arm_rows(results, baseline, target, budget)
    print(
        f"{args.seeds} seeds per arm, target val acc {target:.4f}"
        + (" (given)" if args.target is not None else f" (median final of {baseline})")
        + f", budget {budget} steps (a miss counts {2 * budget})"
    )
    print(
        f"{'arm':<18} {'steps to target':>22} {'final val':>9} {'test acc':>8} {'speedup':>22} {'jumps':>9}"
    )
    for arm, row in rows.items():
        lo, hi = row["steps_ci"]
        slo, shi = row["speedup_ci"]
        print(
            f"{arm:<18} {row['median_steps']:>7.0f} [{lo:>5.0f}, {hi:>5.0f}] ({row['misses']} miss) "
            f"{row['final_val_acc']:>9.4f} {row['test_acc']:>8.4f} "
            f"{row['speedup']:>6.2f}x [{slo:.2f}, {shi:.2f}] {row['accepted']:>4}/{row['sleeps']:<4}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"target": target, "budget": budget, "arms": rows, "runs": results}, fh, indent=1)
    return 0


# --------------------------------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="demo_out", help="output directory (default: demo_out; rerunning resumes)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a one-minute version at toy size (used by the tests)"
    )
    p.add_argument("--workers", type=int, help="parallel training processes (default: one per core)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain the forecaster; accept a directory that is not this demo's",
    )


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from sleepbot.demo import run_demo

    t0 = time.time()
    result = run_demo(args.out, quick=args.quick, workers=args.workers, overwrite=args.overwrite)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    print(f"\n{result.table}\n")
    print(f"report: {result.report}\nsummary: {result.summary}\ndone in {time.time() - t0:.0f}s ({stages})")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable, bool]] = {
    # name: (help, add_arguments, run, takes dotted config overrides)
    "train": ("train one run from a YAML config plus dotted overrides", _add_train, _run_train, True),
    "compare": (
        "sleep strategies x seeds x workloads against a tuned baseline",
        _add_compare,
        _run_compare,
        False,
    ),
    "report": ("write the HTML page and Markdown summary of a comparison", _add_report, _run_report, False),
    "collect": ("record a grid of runs to HDF5 in parallel (resumable)", _add_collect, _run_collect, False),
    "inspect": ("summarise a run file, or a directory of runs as a table", _add_inspect, _run_inspect, False),
    "sleep": (
        "train with sleep; with --vs none --seeds N, paired arms and the speedup",
        _add_sleep,
        _run_sleep,
        True,
    ),
    "demo": ("the whole story on digits: collect, forecaster, compare, report", _add_demo, _run_demo, False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sleepbot",
        description="Record, forecast and jump ahead neural-network weight trajectories during training.",
    )
    parser.add_argument("--version", action="version", version=f"sleepbot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add, _, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        _, _, run, takes_overrides = COMMANDS[args.command]
        if rest and not takes_overrides:
            raise SleepbotError(f"sleepbot {args.command}: unrecognized arguments: {' '.join(rest)}")
        args.overrides = rest
        return run(args)
    except SleepbotError as e:
        print(f"sleepbot: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sleepbot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
