"""`sleepbot` and its subcommands. Thin: parse, call the library, print.

Heavy libraries (torch, Lightning, h5py) are imported inside each command's function, never at module level, so
that `sleepbot --help` and argument errors answer in well under a second.

Each command is a pair of functions, `_add_<cmd>(parser)` and `_run_<cmd>(args) -> int`, listed in COMMANDS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def _check_new_file(path: str | None, overwrite: bool, flag: str) -> None:
    """Refuse, before any work, to write over an existing file without --overwrite."""
    import os

    if path and os.path.exists(path) and not overwrite:
        raise SleepbotError(f"{flag} {path!r} exists; pass --overwrite to replace it")


def _run_train(args: argparse.Namespace) -> int:
    from sleepbot.config import resolve_run_config, to_yaml

    cfg = resolve_run_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    _check_new_file(args.json, args.overwrite, "--json")
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
        "--overwrite",
        action="store_true",
        help="reuse an out dir that holds another config's comparison, and replace an existing report",
    )
    p.add_argument("--report", action="store_true", help="write the HTML/Markdown report when done")
    p.add_argument(
        "--markdown", metavar="FILE", help="also write the results tables as Markdown (docs/, README)"
    )


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sleepbot.compare import load_compare_config

    cfg = load_compare_config(args.config, seeds=args.seeds)
    if args.report and not args.overwrite:
        _check_new_file(str(Path(args.out) / "report.html"), False, "report")
    _check_new_file(args.markdown, args.overwrite, "--markdown")
    return _compare_and_print(
        cfg, args.out, args, command=f"sleepbot compare --config {args.config} --out {args.out}"
    )


def _compare_and_print(
    cfg, out: str, args: argparse.Namespace, command: str, show_speedup: bool = True
) -> int:
    """Run a comparison (arms checked first), print its table; exit 1 when runs failed."""
    from pathlib import Path

    from sleepbot.compare import check_arms, compare, format_table

    check_arms(cfg)  # bad options, checkpoints or forecaster fits fail now, before any run
    results = compare(cfg, out, workers=args.workers, overwrite=args.overwrite)
    print(format_table(results, show_speedup=show_speedup), end="")
    print(f"results: {out}/results.json, {out}/results.csv")
    if getattr(args, "markdown", None):
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(
            format_table(results, markdown=True) + f"\n_Produced by `{command}`._\n"
        )
        print(f"markdown: {args.markdown}")
    if getattr(args, "report", False):
        from sleepbot.report import write_report

        html_path, _ = write_report(out, overwrite=args.overwrite, command=command)
        print(f"report: {html_path}")
    if results["errors"]:
        first = next(iter(results["errors"].items()))
        print(
            f"sleepbot: {len(results['errors'])} run(s) failed; first {first[0]}: {first[1]} "
            f"(all in 'errors' of {out}/results.json)",
            file=sys.stderr,
        )
        return 1
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
        "--strategy", help="sleep strategy: a registry name (linear, learned, ...) or an import path"
    )
    p.add_argument("--forecaster", help="forecaster checkpoint for `learned` (default: the shipped one)")
    p.add_argument(
        "--vs",
        metavar="STRATEGY",
        help="compare with this strategy (usually `none`) on paired seeds, through `sleepbot compare`",
    )
    p.add_argument("--seeds", type=int, default=10, help="paired seeds per arm with --vs (default 10)")
    p.add_argument(
        "--tune",
        default="1e-3,3e-3,1e-2,3e-2",
        metavar="LRS",
        help="with --vs: the lr grid tuned first on 3 other seeds (default 1e-3,3e-3,1e-2,3e-2); `none`: no "
        "tuning, and then no speedup is printed",
    )
    p.add_argument(
        "--target", type=float, help="validation accuracy to reach (default: the baseline's median)"
    )
    p.add_argument("--out", help="with --vs: the comparison's directory (default: <out_dir>/sleep-vs)")
    p.add_argument("--workers", type=int, help="parallel worker processes with --vs (default: one per core)")
    p.add_argument("--json", metavar="FILE", help="write the run's result as JSON (without --vs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file or comparison")


def _run_sleep(args: argparse.Namespace) -> int:
    from sleepbot.config import resolve_run_config, to_yaml

    extra = ["--sleep.strategy", args.strategy] if args.strategy is not None else []
    if args.forecaster is not None:
        extra += ["--sleep.options.forecaster", args.forecaster]
    cfg = resolve_run_config(args.config, [*args.overrides, *extra])
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.seeds < 1:
        raise SleepbotError(f"--seeds must be >= 1, got {args.seeds}")
    if args.vs:
        return _sleep_vs(cfg, args)
    _check_new_file(args.json, args.overwrite, "--json")
    from sleepbot.sleep import sleep_from_config
    from sleepbot.training import run_training

    if cfg.sleep.strategy != "none":
        sleep_from_config(cfg)  # bad options or forecaster files fail here, before the run starts
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
        import json

        with open(args.json, "w") as fh:
            json.dump(r.to_dict(), fh, indent=1)
    return 0


def _sleep_vs(cfg, args: argparse.Namespace) -> int:
    """`sleep --vs`: the same run config as a two-arm comparison through the one harness (sleepbot.compare)."""
    from pathlib import Path

    from sleepbot.compare import parse_compare_config
    from sleepbot.compare.config import DEFAULT_TUNE_SEED_START

    run = cfg.to_dict()
    sleep = run.pop("sleep")
    seed = run.pop("seed")
    for key in ("name", "out_dir", "record"):
        run.pop(key)
    tune: dict = {}
    if args.tune.strip().lower() != "none":
        try:
            lrs = [float(x) for x in args.tune.split(",") if x.strip()]
        except ValueError:
            raise SleepbotError(
                f"--tune must be comma-separated learning rates or none, got {args.tune!r}"
            ) from None
        # 3 development seeds that are not among the table's: 900-902, or the 3 after the table's seeds.
        dev = range(DEFAULT_TUNE_SEED_START, DEFAULT_TUNE_SEED_START + 3)
        start = dev.start if not set(dev) & set(range(seed, seed + args.seeds)) else seed + args.seeds
        tune = {"lrs": lrs, "seeds": 3, "seed_start": start}
    arms: list = []
    for strategy in dict.fromkeys(["none", args.vs, cfg.sleep.strategy]):
        s = dict(sleep) if strategy == cfg.sleep.strategy else {"strategy": strategy}
        s["strategy"] = strategy
        name = strategy if strategy.replace("_", "").isalnum() else strategy.rsplit(".", 1)[-1]
        arms.append({"name": name, **s})
    values = {"seeds": args.seeds, "seed_start": seed, "base": run, "arms": arms, "tune": tune or None}
    if args.target is not None:
        values["target"] = args.target
    ccfg = parse_compare_config({k: v for k, v in values.items() if v is not None})
    out = args.out or str(Path(cfg.out_dir) / "sleep-vs")
    if not tune:
        print(
            "lr NOT tuned (--tune none): steps are shown, speedups are not (they would mostly be lr effects)"
        )
    rc = _compare_and_print(
        ccfg, out, args, command="sleepbot sleep ... --vs " + args.vs, show_speedup=bool(tune)
    )
    if args.seeds < 2:
        print("one seed per arm: no confidence interval (use --seeds 10 or more)")
    return rc


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
    p.add_argument(
        "--kind",
        default="lstm",
        help="forecaster kind to train (a registry name): lstm (default), multiscale or mlp",
    )
    p.add_argument("--context", type=int, default=5, help="snapshots read (default 5)")
    p.add_argument(
        "--min-context",
        type=int,
        default=None,
        help="train on every history length from this to --context (forecasters that read several, e.g. multiscale)",
    )
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
        "--target-smooth",
        type=int,
        default=1,
        help="train on the mean of the last K snapshots up to each horizon (default 1: the snapshot itself)",
    )
    p.add_argument(
        "--objective",
        default="r2",
        choices=["r2", "loss"],
        help="r2: the weights' displacement (default); loss: the base network's training loss where the jump "
        "lands (replays each corpus run's network and data)",
    )
    p.add_argument(
        "--settle-steps",
        type=int,
        default=0,
        metavar="K",
        help="with --objective loss: score each jump after K more updates of the run's own optimizer from its "
        "recorded state, against the same K updates without it (default 0: where the jump lands; needs runs "
        "collected with record.optimizer_state: true, e.g. configs/collect_state.yaml)",
    )
    p.add_argument(
        "--holdout",
        action="append",
        default=[],
        metavar="KEY=V[,V]",
        help="send runs whose attribute matches to test only, e.g. arch=mlp (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="model init and window sampling (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="which runs go to val/test (default 0)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the same numbers on any core count)"
    )
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

    cfg = ForecasterTrainConfig(
        threads=args.threads,
        model=args.kind,
        context=args.context,
        min_context=args.min_context,
        horizons=_int_list(args.horizons, "--horizons"),
        model_options=dict(tree.get("forecaster", {})),
        baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()),
        lr=args.lr,
        groups_per_epoch=args.groups_per_epoch,
        max_weights=args.max_weights,
        num_workers=args.num_workers,
        target_smooth=args.target_smooth,
        objective=args.objective,
        settle_steps=args.settle_steps,
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
        if args.objective == "loss" and name == args.kind:
            print(
                f"{name}: trained in {result.seconds[name]:.0f}s; validation log(L(jump) / L(now)) "
                f"{scores.get('val_loss', float('nan')):.3f} (the jump lowered the loss in "
                f"{scores.get('val_improved', float('nan')):.0%} of samples; the true future: "
                f"{scores.get('val_oracle', float('nan')):.3f})"
            )
            continue
        r2 = "  ".join(
            f"h{k.rsplit('h', 1)[1]} {v:.3f}" for k, v in scores.items() if k.startswith("val_r2_")
        )
        print(f"{name}: trained in {result.seconds[name]:.0f}s; validation R2_disp {r2}")
    print(f"wrote {args.out}; score it on held-out runs with:")
    print(f"  sleepbot evaluate-forecaster --forecaster {args.out} --data {' '.join(args.data)}")
    return 0


# --------------------------------------------------------------------------------------- evaluate-forecaster
def _add_evaluate_forecaster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--forecaster", default=None, help="forecaster checkpoint (default: the one shipped with sleepbot)"
    )
    p.add_argument("--data", required=True, nargs="+", help="directories of recorded runs or .h5 files")
    p.add_argument(
        "--split",
        default="auto",
        help="auto (default: every run the checkpoint did not train or validate on), test, val, train or all",
    )
    p.add_argument("--by", default=None, help="also one table per value of a run attribute, e.g. lr or arch")
    p.add_argument("--stride", type=int, default=1, help="spacing of window end snapshots (default 1: all)")
    p.add_argument(
        "--smooth",
        type=int,
        default=1,
        help="score against the mean of the last K snapshots up to each horizon (default 1: the point target)",
    )
    p.add_argument("--compare", action="append", default=[], help="another checkpoint to score alongside")
    p.add_argument(
        "--jumps",
        action="store_true",
        help="score each forecaster's jump by the training loss where it lands (replays each run's network "
        "and data), per dataset, arch and optimizer, instead of R2_disp",
    )
    p.add_argument(
        "--settle-steps",
        type=int,
        default=0,
        metavar="K",
        help="with --jumps: score the loss after K more updates of each run's own optimizer from its recorded "
        "state, with and without the jump (runs collected with record.optimizer_state: true)",
    )
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

    if args.settle_steps and not args.jumps:
        raise SleepbotError("--settle-steps scores jumps by the loss; pass it with --jumps")
    for target in (args.json, args.plot):
        if target and Path(target).exists() and not args.overwrite:
            raise SleepbotError(f"{target!r} exists; pass --overwrite to replace it")
    model = load_forecaster(args.forecaster)
    models = {**load_baselines(args.forecaster)}
    for extra in args.compare:
        models[Path(extra).stem] = load_forecaster(extra)
    models[model.name if model.name not in models else f"{model.name} (checkpoint)"] = model
    meta = checkpoint_meta(args.forecaster)
    runs = scan_runs(resolve_paths(args.data), min_snapshots=model.context + 1)
    chosen = select_runs(runs, meta.get("split"), args.split)
    if not chosen:
        raise SleepbotError(
            f"no runs to score: {len(runs)} runs found, none in split {args.split!r} of this checkpoint"
        )
    print(
        f"scoring {len(chosen)} of {len(runs)} runs (split {args.split}); forecaster {args.forecaster or 'shipped'}"
    )
    if args.jumps:
        return _print_jump_scores(models, chosen, args)
    kw = {"stride": args.stride, "use_progress": not args.no_progress, "smooth": args.smooth}
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


def _print_jump_scores(models: dict[str, Any], runs: list[Any], args: argparse.Namespace) -> int:
    """`evaluate-forecaster --jumps`: mean log(L(jump) / L(now)) per forecaster and per run attribute."""
    from sleepbot.forecast.evaluate import write_json
    from sleepbot.forecast.jumploss import evaluate_jumps

    learned = {k: m for k, m in models.items() if getattr(m, "learned", False)}
    horizon = max(max(m.horizons) for m in learned.values())
    out = {
        k: evaluate_jumps(
            m, runs, stride=max(args.stride, 1), horizon=horizon, settle_steps=args.settle_steps
        )
        for k, m in learned.items()
    }
    settled = f", both trained on for {args.settle_steps} updates" if args.settle_steps else ""
    print(
        f"mean log(L(w + jump) / L(w)) on the runs' training data{settled} (negative: the jump lowers the "
        f"loss); share of jumps that lower it; the true future {horizon} snapshots on, for scale"
    )
    for name, res in out.items():
        print(
            f"{name}: {res['log_ratio']:.3f} ({res['improved']:.0%} lower; true future "
            f"{res['oracle_log_ratio']:.3f}; {res['samples']} jumps of {res['runs']} runs, {res['skipped']} left out)"
        )
        for key, values in res["by"].items():
            cells = ", ".join(f"{v} {r['log_ratio']:.3f} ({r['improved']:.0%})" for v, r in values.items())
            print(f"  by {key}: {cells}")
    if args.json:
        write_json(out, args.json, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------- repair
def _add_repair(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a run file whose writer was killed (plain h5py refuses it: 'already open')")
    p.add_argument("--out", help="where to write the repaired run (default: FILE's stem + .repaired.h5)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists; without --out, replace FILE itself",
    )


def _run_repair(args: argparse.Namespace) -> int:
    from sleepbot.store import RunFile, repair_run

    out = repair_run(args.file, out=args.out, overwrite=args.overwrite)
    with RunFile(out) as run:
        print(f"{out}: status {run.status}, {len(run.steps)} steps, {len(run.snapshot_steps)} snapshots")
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
    "repair": (
        "close a killed run file so that plain h5py opens it (status 'killed')",
        _add_repair,
        _run_repair,
        False,
    ),
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
