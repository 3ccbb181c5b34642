"""Running a comparison: run keys (config + code digest), the worker task, the phases, results.json/csv."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sleepbot.compare.config import Arm, CompareConfig, Workload
from sleepbot.compare.stats import (
    CSV_COLUMNS,
    RESULTS_SCHEMA,
    choose_lr,
    headline_rows,
    json_safe,
    summarize_comparison,
)
from sleepbot.config import RunConfig, build_config, merge
from sleepbot.errors import SleepbotError

# --------------------------------------------------------------------------------------------- one run
_NUMBERS_CODE = ("training.py", "models.py", "data.py", "neurons.py", "compare", "sleep", "forecast")


@functools.cache
def code_digest() -> str:
    """A hash of the package source that decides a run's numbers (training, models, data, sleep, forecast).

    Part of every run's key, so that a resumed comparison never mixes runs of different code: after an edit to
    any of these files, runs are redone rather than silently reused.
    """
    root = Path(__file__).resolve().parent.parent  # the sleepbot package
    h = hashlib.sha1()
    for name in _NUMBERS_CODE:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _numbers_key(config: dict[str, Any]) -> str:
    """A hash of everything in a run config that changes its numbers (not where its files go), and of the code."""
    c = json.loads(json.dumps(config))
    c["code"] = code_digest()
    for k in ("out_dir", "name"):
        c.pop(k, None)
    c["record"].pop("path", None)
    c["record"].pop("overwrite", None)
    c["trainer"].pop("progress_bar", None)
    c["trainer"].pop("logger", None)
    opts = c["sleep"].get("options") or {}
    opts.pop("run", None)  # the oracle's source file: its numbers are in the no-sleep run's own key
    # A forecaster is named by its contents, not its path: a retrained checkpoint at the same path gives new runs.
    for holder in (c["sleep"], opts):
        if isinstance(holder.get("forecaster"), str) and Path(holder["forecaster"]).is_file():
            holder["forecaster"] = "sha1:" + hashlib.sha1(Path(holder["forecaster"]).read_bytes()).hexdigest()
    return hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:10]


def run_stem(workload: str, arm: str, lr: float, seed: int, config: dict[str, Any]) -> str:
    """File name stem of one run: readable parts plus the numbers hash."""
    return f"{workload}__{arm}__lr{lr:.3g}__s{seed}__{_numbers_key(config)}"


def _test_curve_callback():
    """A callback that evaluates the test split at every validation, for the best test accuracy of a run.

    Built in a function so that importing this module does not import Lightning. The evaluation runs in eval
    mode under no_grad and draws no random numbers, so the run's trajectory is unchanged; its time is measured
    and taken out of the run's wall-clock.
    """
    import pytorch_lightning as pl
    import torch

    class TestCurve(pl.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.accs: list[float] = []
            self.seconds = 0.0

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or (self.steps and self.steps[-1] == trainer.global_step):
                return
            t0 = time.perf_counter()
            was_training = pl_module.training
            pl_module.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in trainer.datamodule.test_dataloader():
                    logits = pl_module(x.to(pl_module.device))
                    correct += int((logits.argmax(1).cpu() == y).sum())
                    total += len(y)
            pl_module.train(was_training)
            self.steps.append(int(trainer.global_step))
            self.accs.append(correct / max(total, 1))
            self.seconds += time.perf_counter() - t0

    return TestCurve()


def compare_task(config: dict[str, Any], json_path: str) -> dict[str, Any]:
    """A worker task: train one run of a comparison and save its result as JSON (atomically).

    The result is `RunResult.to_dict()` plus `test_step`/`test_curve` (test accuracy at every validation) and
    `wall_seconds` (training wall-clock including sleep, excluding the test evaluations).
    """
    from sleepbot.training import run_training

    cfg = build_config(RunConfig, config)
    cfg.trainer.progress_bar = False
    curve = _test_curve_callback()
    result = run_training(cfg, callbacks=[curve], quiet=True).to_dict()
    result["test_step"] = curve.steps
    result["test_curve"] = curve.accs
    result["wall_seconds"] = result["fit_seconds"] - curve.seconds
    path = Path(json_path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # a crash leaves no half-written result behind
    return result


# --------------------------------------------------------------------------------------------- the harness
@dataclass
class _Task:
    workload: str
    arm: str
    lr: float
    seed: int
    config: dict[str, Any]
    stem: str
    phase: str


def _make_task(
    cfg: CompareConfig, out: Path, w: Workload, arm: Arm, lr: float, seed: int, phase: str
) -> _Task:
    run = merge(w.run, {"seed": seed, "model": {"lr": lr}, "sleep": arm.sleep})
    run_cfg = build_config(RunConfig, run)
    run_cfg.record.enabled = True
    run_cfg.record.every_n_steps = cfg.record_every
    run_cfg.trainer.logger = "none"
    config = run_cfg.to_dict()
    stem = run_stem(w.name, arm.name, lr, seed, config)
    config["out_dir"] = str(out / "runs")
    config["name"] = stem
    config["record"]["path"] = str(out / "runs" / f"{stem}.h5")
    # No JSON means the run never finished: its partial HDF5 file (ours, same stem) is redone from scratch.
    config["record"]["overwrite"] = True
    return _Task(w.name, arm.name, lr, seed, config, stem, phase)


def _run_tasks(
    tasks: list[_Task], out: Path, workers: int | None, desc: str, progress: bool | None
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run the tasks whose JSON is missing; return ({stem: result} for all finished, {stem: error})."""
    from sleepbot.experiments import run_parallel

    results: dict[str, dict[str, Any]] = {}
    todo = []
    seen = set()
    for t in tasks:
        if t.stem in seen:
            continue
        seen.add(t.stem)
        path = out / "runs" / f"{t.stem}.json"
        if path.is_file():
            try:
                results[t.stem] = json.loads(path.read_text())
                continue
            except json.JSONDecodeError:
                pass  # a corrupt result (hand-edited?) is redone; the atomic write never leaves one
        todo.append(t)
    errors: dict[str, str] = {}
    if todo:
        outs = run_parallel(
            compare_task,
            [{"config": t.config, "json_path": str(out / "runs" / f"{t.stem}.json")} for t in todo],
            workers=workers,
            desc=desc,
            progress=progress,
        )
        for t, (ok, res) in zip(todo, outs):
            if ok:
                results[t.stem] = res
            else:
                errors[t.stem] = str(res)
    return results, errors


def compare(
    cfg: CompareConfig,
    out: str | Path,
    workers: int | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    on_phase: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Run a comparison into `out` (resumable) and write `results.json` and `results.csv` there.

    Args:
        cfg: the comparison (see `load_compare_config`).
        out: output directory; `runs/` inside holds one JSON result and one HDF5 recording per run.
        workers: parallel worker processes (default: one per core).
        progress: a progress bar per phase (default: on an interactive terminal).
        overwrite: allow an out dir that holds a comparison of a different config (its run files are kept:
            their names carry their config's hash; only results.json/csv are replaced).
        on_phase: called as on_phase(name, n_tasks) before each phase (the demo prints its stages with it).

    Returns:
        The results dict, as written to results.json.
    """
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cfg_path = out / "compare_config.json"
    cfg_json = json.dumps(json_safe(cfg.to_dict()), sort_keys=True, indent=1)
    if cfg_path.is_file() and cfg_path.read_text() != cfg_json and not overwrite:
        raise SleepbotError(
            f"{str(out)!r} holds a comparison of a different config; use a new --out directory or --overwrite "
            f"(finished runs are kept and reused either way)"
        )
    cfg_path.write_text(cfg_json)
    t0 = time.time()
    none_arm = next(a for a in cfg.arms if a.sleep["strategy"] == "none")
    errors: dict[str, str] = {}
    records: list[dict[str, Any]] = []

    # Phase 1: tune the no-sleep baseline's lr per workload.
    tuning: dict[str, Any] = {}
    lr_of: dict[str, float] = {}
    if cfg.tune_lrs:
        tasks = [
            _make_task(cfg, out, w, none_arm, lr, s, "tune")
            for w in cfg.workloads
            for lr in cfg.tune_lrs
            for s in cfg.tune_seeds
        ]
        if on_phase:
            on_phase("tune", len(tasks))
        res, err = _run_tasks(tasks, out, workers, "tune lr", progress)
        errors.update(err)
        for w in cfg.workloads:
            table = {
                lr: [res[t.stem] for t in tasks if t.workload == w.name and t.lr == lr and t.stem in res]
                for lr in cfg.tune_lrs
            }
            lr, rows = choose_lr(table, cfg.miss_factor)
            lr_of[w.name] = lr
            tuning[w.name] = {
                "lr": lr,
                "grid": list(cfg.tune_lrs),
                "seeds": list(cfg.tune_seeds),
                "table": rows,
            }
    for w in cfg.workloads:
        if w.name not in lr_of:
            lr_of[w.name] = float(build_config(RunConfig, w.run).model.lr)
            tuning[w.name] = {"lr": lr_of[w.name], "grid": None, "seeds": [], "table": []}

    # Phase 2: the no-sleep arm (the oracle reads its recordings), then phase 3: every other arm.
    base_tasks = [
        _make_task(cfg, out, w, none_arm, lr_of[w.name], s, "none") for w in cfg.workloads for s in cfg.seeds
    ]
    if on_phase:
        on_phase("none", len(base_tasks))
    base_res, err = _run_tasks(base_tasks, out, workers, "no sleep", progress)
    errors.update(err)
    base_path = {(t.workload, t.seed): t.config["record"]["path"] for t in base_tasks if t.stem in base_res}

    arm_tasks = []
    for w in cfg.workloads:
        for a in cfg.arms:
            if a is none_arm:
                continue
            for s in cfg.seeds:
                arm = a
                if a.sleep["strategy"] == "oracle":
                    if (w.name, s) not in base_path:
                        errors[f"{w.name}__{a.name}__s{s}"] = (
                            "no recorded no-sleep run for the oracle to read"
                        )
                        continue
                    opts = dict(a.sleep.get("options") or {})
                    opts["run"] = base_path[(w.name, s)]
                    arm = Arm(a.name, {**a.sleep, "options": opts})
                arm_tasks.append(_make_task(cfg, out, w, arm, lr_of[w.name], s, "arms"))
    if on_phase:
        on_phase("arms", len(arm_tasks))
    arm_res, err = _run_tasks(arm_tasks, out, workers, "sleep arms", progress)
    errors.update(err)

    for t in [*base_tasks, *arm_tasks]:
        r = base_res.get(t.stem) or arm_res.get(t.stem)
        if r is not None:
            records.append(
                {
                    "workload": t.workload,
                    "arm": t.arm,
                    "seed": t.seed,
                    "lr": t.lr,
                    "stem": t.stem,
                    "result": r,
                }
            )
    stats = summarize_comparison(cfg, records, tuning)
    results = {
        "schema": RESULTS_SCHEMA,
        "config": cfg.to_dict(),
        "workloads": stats,
        "runs": [{k: v for k, v in rec.items() if k != "result"} for rec in records],
        "errors": errors,
        "seconds": time.time() - t0,
    }
    results["headline"] = headline_rows(results)
    results = json_safe(results)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    with open(out / "results.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results["headline"]:
            writer.writerow({k: row.get(k) for k in CSV_COLUMNS})
    os.replace(out / "results.csv.tmp", out / "results.csv")
    return results
