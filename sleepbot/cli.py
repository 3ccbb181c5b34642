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


# --------------------------------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a one-minute version (used by the tests)")


def _run_demo(args: argparse.Namespace) -> int:
    from sleepbot.config import resolve_run_config
    from sleepbot.training import run_training

    cfg = resolve_run_config(
        None, {"out_dir": args.out, "trainer": {"max_steps": 100 if args.quick else 500}}
    )
    result = run_training(cfg)
    print(f"demo: {result.name} reached val acc {result.final_val_acc:.4f}, test acc {result.test_acc:.4f}")
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
    "demo": ("the main job on the embedded digits data", _add_demo, _run_demo, False),
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
