"""`sleepbot demo` (what `make demo` runs): the whole story on the embedded digits data, in four stages.

1. collect: record a small set of training runs (weight snapshots every few steps) to HDF5;
2. forecaster: train the LSTM weight forecaster on them;
3. compare: tune constant Adam (the baseline) and Schedule-Free AdamW (the alternative) on their own lr grids on
   development seeds, then run none / schedulefree / linear / learned (and the true-foresight oracle in the full
   demo) on fresh seeds, the same seeds in every arm;
4. report: write the HTML page and the Markdown summary, print the page's path and the headline table.

Everything lands in one output directory (default `demo_out/`); rerunning the demo there resumes: finished runs
and a trained forecaster are reused. The full demo stays within 5 minutes on 2 idle cores; `--quick` is a one-minute
version of the same pipeline at toy size (used by the tests).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sleepbot.errors import SleepbotError

MARKER = ".sleepbot-demo"

# Sizes. Full: 12 recorded runs for the forecaster; two optimizers x a 3-point lr grid x 3 development seeds, then
# 10 fresh seeds x 5 arms for the comparison, 400 steps each (the write-up's noise and square_normalize rules are
# in configs/compare_digits.yaml: they did nothing / wrecked every run, and cost a minute here).
# Quick: the same pipeline with 4 short runs, a few forecaster steps and 2 seeds; its numbers mean nothing.
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "collect": {
            "lrs": [1e-3, 3e-3, 1e-2],  # trajectories of every speed, as in configs/collect_digits.yaml
            "seeds": [0, 1, 2, 3],
            "run": {"trainer": {"max_steps": 400, "val_every_n_steps": 10}, "record": {"snapshot_every": 10}},
        },
        "forecaster": {"horizons": (5, 10), "max_steps": 400},
        "compare": {
            "seeds": 10,
            "seed_start": 1000,  # fresh: the forecaster never saw these seeds
            "base": {"trainer": {"max_steps": 400, "val_every_n_steps": 10}},
            "tune": {"seeds": 3, "seed_start": 900},  # development seeds: never the table's
            # Adam is the reference; Schedule-Free AdamW is the alternative a user would pick instead (the best
            # one measured on digits, configs/compare_alternatives.yaml). Each has its own 3-point grid around its
            # measured best (Schedule-Free's best lr is ~10x Adam's); 3 points keep `make demo` under 5 minutes.
            "optimizers": [
                {"name": "adam", "model": {"optimizer": "adam"}, "lrs": [3e-3, 1e-2, 3e-2]},
                {
                    "name": "schedulefree",
                    "model": {"optimizer": "schedulefree_adamw", "warmup_steps": 20},
                    "lrs": [3e-2, 1e-1, 3e-1],
                },
            ],
            "snapshot_every": 10,
            "sleep": {"every_n_steps": 50, "horizon": 5, "context": 5},
            "oracle": True,
        },
    },
    "quick": {
        "collect": {
            "lrs": [3e-3, 1e-2],
            "seeds": [0, 1],
            "run": {
                "data": {"train_subset": 512},
                "trainer": {"max_steps": 60, "val_every_n_steps": 10},
                "record": {"snapshot_every": 5},
            },
        },
        "forecaster": {"horizons": (5,), "max_steps": 10, "groups_per_epoch": 10, "max_weights": 2048},
        "compare": {
            "seeds": 2,
            "seed_start": 1000,
            "base": {"data": {"train_subset": 512}, "trainer": {"max_steps": 60, "val_every_n_steps": 10}},
            "tune": {"seeds": 1, "seed_start": 900},
            "optimizers": [
                {"name": "adam", "model": {"optimizer": "adam"}, "lrs": [3e-3, 1e-2]},
                {
                    "name": "schedulefree",
                    "model": {"optimizer": "schedulefree_adamw", "warmup_steps": 10},
                    "lrs": [3e-2, 1e-1],
                },
            ],
            "snapshot_every": 5,
            "sleep": {"every_n_steps": 25, "horizon": 5, "context": 5},
            "oracle": False,
        },
    },
}


@dataclass
class DemoResult:
    """What the demo produced."""

    report: Path
    summary: Path
    table: str
    seconds: dict[str, float]


def compare_values(plan: dict[str, Any], forecaster: str) -> dict[str, Any]:
    """The compare config (as YAML would give it) of a demo plan, with the learned arm reading `forecaster`."""
    c = plan["compare"]
    s = c["sleep"]
    # learned jumps as far as its forecaster was trained to (its default); the oracle control jumps as far, so
    # "saving / oracle's" compares a forecast with the truth at the same jump.
    far = max(plan["forecaster"]["horizons"])
    arms: list[Any] = [
        "none",
        {"name": "linear", "strategy": "linear", **s, "snapshot_every": c["snapshot_every"]},
        {
            "name": "learned",
            "strategy": "learned",
            "options": {"forecaster": forecaster},
            "every_n_steps": s["every_n_steps"],
            "horizon": far,
        },
    ]
    if c["oracle"]:
        arms.append(
            {
                "name": "oracle",
                "strategy": "oracle",
                **s,
                "horizon": far,
                "snapshot_every": c["snapshot_every"],
            }
        )
    return {
        "seeds": c["seeds"],
        "seed_start": c["seed_start"],
        "base": c["base"],
        "workloads": [{"name": "digits-small_cnn-adam", "run": {}}],
        "tune": c["tune"],
        "optimizers": c["optimizers"],
        "snapshot_every": c["snapshot_every"],
        "arms": arms,
    }


def _check_out(out: Path, mode: str, overwrite: bool) -> None:
    """Refuse to write into a directory that is not this kind of demo's, unless `overwrite`."""
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise SleepbotError(f"demo --out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if not marker.is_file():
            raise SleepbotError(
                f"{str(out)!r} exists and is not a sleepbot demo directory; use another --out or --overwrite"
            )
        try:
            old = json.loads(marker.read_text()).get("mode")
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old != mode:
            raise SleepbotError(
                f"{str(out)!r} holds a {old or 'different'} demo, this is a {mode} one; "
                f"use another --out or --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"mode": mode}))


def run_demo(
    out: str | Path = "demo_out",
    *,
    quick: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the four stages into `out` and return where the report is and the headline table.

    Args:
        out: the output directory (resumable; a directory that is not a demo's is refused without `overwrite`).
        quick: the one-minute toy version.
        workers: parallel training processes (default: one per core).
        overwrite: retrain the forecaster and accept a directory of another demo or of something else.
        progress: progress bars (default: on an interactive terminal).
        echo: where stage lines go.
    """
    from sleepbot.compare import compare, format_table, parse_compare_config
    from sleepbot.experiments import CollectConfig, collect

    mode = "quick" if quick else "full"
    plan = PLANS[mode]
    out = Path(out)
    _check_out(out, mode, overwrite)
    seconds: dict[str, float] = {}

    # 1. collect
    t0 = time.time()
    c = plan["collect"]
    ccfg = CollectConfig(
        datasets=["digits"],
        archs=["small_cnn"],
        optimizers=["adam"],
        lrs=c["lrs"],
        seeds=c["seeds"],
        run=c["run"],
    )
    n = len(c["lrs"]) * len(c["seeds"])
    echo(f"[1/4] collect: {n} recorded digits runs -> {out / 'trajectories'}")
    rows = collect(ccfg, out / "trajectories", workers=workers, overwrite=overwrite, progress=progress)
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        raise SleepbotError(
            f"demo: {len(failed)} collect run(s) failed, e.g. {failed[0].name}: {failed[0].note}"
        )
    seconds["collect"] = time.time() - t0

    # 2. forecaster
    t0 = time.time()
    fpath = out / "forecaster.pt"
    f = plan["forecaster"]
    if fpath.is_file() and not overwrite:
        echo(f"[2/4] forecaster: reusing {fpath}")
    else:
        from sleepbot.forecast.module import ForecasterTrainConfig, train_forecaster

        echo(f"[2/4] forecaster: training an LSTM for {f['max_steps']} steps -> {fpath}")
        opts = {k: v for k, v in f.items() if k != "max_steps"}
        train_forecaster(
            out / "trajectories",
            ForecasterTrainConfig(baselines=(), **opts),
            trainer_kwargs={
                "max_steps": f["max_steps"],
                **({} if progress is None else {"enable_progress_bar": progress}),
            },
            out=fpath,
            overwrite=True,
        )
    seconds["forecaster"] = time.time() - t0

    # 3. compare
    t0 = time.time()
    cfg = parse_compare_config(compare_values(plan, str(fpath.resolve())))

    def phase(name: str, n_tasks: int) -> None:
        what = {"tune": "tune the baseline's lr", "none": "no-sleep arm", "arms": "sleep arms"}[name]
        echo(f"[3/4] compare: {what} ({n_tasks} runs, finished ones skipped)")

    results = compare(
        cfg, out / "compare", workers=workers, progress=progress, overwrite=overwrite, on_phase=phase
    )
    if results["errors"]:
        first = next(iter(results["errors"].items()))
        echo(f"warning: {len(results['errors'])} run(s) failed, e.g. {first[0]}: {first[1]}")
    seconds["compare"] = time.time() - t0

    # 4. report
    t0 = time.time()
    echo("[4/4] report")
    from sleepbot.report import write_report

    html_path, md_path = write_report(
        out / "compare",
        out,
        forecaster=str(fpath),
        title=f"sleepbot demo ({mode})",
        overwrite=True,
        command=f"sleepbot demo {'--quick ' if quick else ''}--out {out}",
    )
    seconds["report"] = time.time() - t0
    return DemoResult(html_path, md_path, format_table(results), seconds)
