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


# ------------------------------------------------------------------------------------------ train-forecaster
def _add_train_forecaster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="directories of recorded runs (sleepbot collect) or .h5 files",
    )
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. forecaster.pt")
    p.add_argument("--model", default="lstm", help="forecaster to train: lstm (default) or mlp")
    p.add_argument("--context", type=int, default=5, help="snapshots read (default 5)")
    p.add_argument("--horizons", default="5,10,20", help="snapshots ahead, comma-separated (default 5,10,20)")
    p.add_argument(
        "--baselines",
        default="mlp",
        help="learned baselines trained alongside, comma-separated ('' for none)",
    )
    p.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (default 2000; = --trainer.max_steps)"
    )
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3, cosine to 0)")
    p.add_argument(
        "--groups-per-epoch", type=int, default=4000, help="window groups per epoch (default 4000)"
    )
    p.add_argument("--max-weights", type=int, default=16384, help="weights per window group (default 16384)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading HDF5 (default 0)")
    p.add_argument(
        "--holdout",
        action="append",
        default=[],
        metavar="KEY=V[,V]",
        help="send runs whose attribute matches to test only, e.g. arch=mlp (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="model init and window sampling (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="which runs go to val/test (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.epilog = (
        "Any Lightning Trainer option passes through as --trainer.KEY VALUE (e.g. --trainer.devices 2 "
        "--trainer.strategy ddp --trainer.precision bf16-mixed); forecaster options as --forecaster.KEY VALUE "
        "(e.g. --forecaster.hidden 64)."
    )


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SleepbotError(f"{what} must be comma-separated integers, got {text!r}") from None


def _run_train_forecaster(args: argparse.Namespace) -> int:
    from sleepbot.config import parse_overrides

    tree = parse_overrides(args.overrides)
    unknown = sorted(set(tree) - {"trainer", "forecaster"})
    if unknown:
        raise SleepbotError(
            f"unknown override section {unknown[0]!r}; valid: --trainer.KEY, --forecaster.KEY"
        )
    holdout = {}
    for item in args.holdout:
        if "=" not in item:
            raise SleepbotError(f"--holdout takes KEY=VALUE[,VALUE], got {item!r}")
        key, value = item.split("=", 1)
        holdout[key] = value.split(",")
    trainer_kwargs = dict(tree.get("trainer", {}))
    if args.max_steps is not None:
        trainer_kwargs["max_steps"] = args.max_steps
    from sleepbot.forecast.module import ForecasterTrainConfig, train_forecaster

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = ForecasterTrainConfig(
        model=args.model,
        context=args.context,
        horizons=_int_list(args.horizons, "--horizons"),
        model_options=dict(tree.get("forecaster", {})),
        baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()),
        lr=args.lr,
        groups_per_epoch=args.groups_per_epoch,
        max_weights=args.max_weights,
        num_workers=args.num_workers,
        holdout=holdout or None,
        seed=args.seed,
        split_seed=args.split_seed,
    )
    result = train_forecaster(
        args.data, cfg, trainer_kwargs=trainer_kwargs, out=args.out, overwrite=args.overwrite
    )
    sizes = ", ".join(f"{k} {len(v)}" for k, v in result.split.items())
    print(f"runs: {len(result.runs)} ({sizes}; split by run, recorded in the checkpoint)")
    for name, scores in result.val_scores.items():
        r2 = "  ".join(
            f"h{k.rsplit('h', 1)[1]} {v:.3f}" for k, v in scores.items() if k.startswith("val_r2_")
        )
        print(f"{name}: trained in {result.seconds[name]:.0f}s; validation R2_disp {r2}")
    print(f"wrote {args.out}; score it on held-out runs with:")
    print(f"  sleepbot evaluate-forecaster --model {args.out} --data {' '.join(args.data)}")
    return 0


# --------------------------------------------------------------------------------------- evaluate-forecaster
def _add_evaluate_forecaster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="forecaster checkpoint (default: the one shipped with sleepbot)"
    )
    p.add_argument("--data", required=True, nargs="+", help="directories of recorded runs or .h5 files")
    p.add_argument(
        "--split",
        default="auto",
        help="auto (default: every run the checkpoint did not train or validate on), test, val, train or all",
    )
    p.add_argument("--by", default=None, help="also one table per value of a run attribute, e.g. lr or arch")
    p.add_argument("--stride", type=int, default=1, help="spacing of window end snapshots (default 1: all)")
    p.add_argument("--compare", action="append", default=[], help="another checkpoint to score alongside")
    p.add_argument(
        "--no-progress", action="store_true", help="do not tell the forecasters the training progress"
    )
    p.add_argument("--json", default=None, help="write the tables as JSON to this file")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument(
        "--plot", default=None, help="save forecast-vs-actual for the first scored run to this PNG"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")


def _run_evaluate_forecaster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sleepbot.forecast import checkpoint_meta, load_baselines, load_forecaster
    from sleepbot.forecast.evaluate import evaluate, evaluate_by, format_table, select_runs, write_json
    from sleepbot.forecast.windows import resolve_paths, scan_runs

    for target in (args.json, args.plot):
        if target and Path(target).exists() and not args.overwrite:
            raise SleepbotError(f"{target!r} exists; pass --overwrite to replace it")
    model = load_forecaster(args.model)
    models = {**load_baselines(args.model)}
    for extra in args.compare:
        models[Path(extra).stem] = load_forecaster(extra)
    models[model.name if model.name not in models else f"{model.name} (checkpoint)"] = model
    meta = checkpoint_meta(args.model)
    runs = scan_runs(resolve_paths(args.data), min_snapshots=model.context + 1)
    chosen = select_runs(runs, meta.get("split"), args.split)
    if not chosen:
        raise SleepbotError(
            f"no runs to score: {len(runs)} runs found, none in split {args.split!r} of this checkpoint"
        )
    print(
        f"scoring {len(chosen)} of {len(runs)} runs (split {args.split}); forecaster {args.model or 'shipped'}"
    )
    kw = {"stride": args.stride, "use_progress": not args.no_progress}
    result = evaluate(models, chosen, **kw)
    print(format_table(result, markdown=args.markdown))
    out = {"all": result}
    if args.by:
        out["by"] = evaluate_by(models, chosen, args.by, **kw)
        for key, res in out["by"].items():
            print(f"\n{key} ({len(res['runs'])} runs)")
            print(format_table(res, markdown=args.markdown))
    if args.json:
        write_json(out, args.json, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    if args.plot:
        from sleepbot.viz.forecast import plot_forecast

        plot_forecast(chosen[0].path, args.plot, forecaster=model)
        print(f"wrote {args.plot} (forecast vs actual, {Path(chosen[0].path).stem})")
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
    "train-forecaster": (
        "train the weight forecaster (and its baselines) on recorded runs, split by run",
        _add_train_forecaster,
        _run_train_forecaster,
        True,
    ),
    "evaluate-forecaster": (
        "score a forecaster against persistence, linear and MLP baselines on held-out runs",
        _add_evaluate_forecaster,
        _run_evaluate_forecaster,
        False,
    ),
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
