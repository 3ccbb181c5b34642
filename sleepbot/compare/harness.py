"""Running a comparison: run keys (config + code digest), the worker task, the phases, results.json/csv."""

from __future__ import annotations

import csv
import dataclasses
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
# experiments.py sets each worker's torch threads, which change the float rounding of some kernels. The sleep and
# forecast code decides only the numbers of runs that sleep; a run without sleep never imports it.
_NUMBERS_CODE = (
    "training.py",
    "experiments.py",
    "models.py",
    "data.py",
    "neurons.py",
    "compare/harness.py",
)
_SLEEP_CODE = ("sleep", "forecast")


@functools.cache
def code_digest(sleeps: bool = True) -> str:
    """A hash of the package source that decides a run's numbers: training, models, data and this harness's run
    task, and for a run that sleeps also sleep/ and forecast/.

    Part of every run's key, so that a resumed comparison never mixes runs of different code: after an edit to
    any of these files, the runs it can change are redone rather than silently reused (a no-sleep run is kept
    across edits of the sleep code, which it never runs).
    """
    root = Path(__file__).resolve().parent.parent  # the sleepbot package
    h = hashlib.sha1()
    for name in (*_NUMBERS_CODE, *(_SLEEP_CODE if sleeps else ())):
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _numbers_key(config: dict[str, Any]) -> str:
    """A hash of everything in a run config that changes its numbers (not where its files go), and of the code."""
    c = json.loads(json.dumps(config))
    c["code"] = code_digest(sleeps=c["sleep"].get("strategy", "none") != "none")
    for k in ("out_dir", "name"):
        c.pop(k, None)
    c["record"].pop("path", None)
    c["record"].pop("overwrite", None)
    c["trainer"].pop("progress_bar", None)
    c["trainer"].pop("logger", None)
    opts = c["sleep"]["options"] = dict(c["sleep"].get("options") or {})
    if c["sleep"].get("strategy") == "learned" and not opts.get("forecaster"):
        from sleepbot.forecast.checkpoint import DEFAULT_PATH

        opts["forecaster"] = str(DEFAULT_PATH)  # the shipped checkpoint counts by its contents too (below)
    opts.pop("run", None)  # the oracle's source file: its numbers are in the no-sleep run's own key
    # A file an option names (a forecaster, a NiNo checkpoint) counts by its contents, not its path: a retrained
    # checkpoint at the same path gives new runs.
    for key, value in opts.items():
        if isinstance(value, str) and Path(value).is_file():
            opts[key] = "sha1:" + hashlib.sha1(Path(value).read_bytes()).hexdigest()
    return hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:10]


def run_stem(workload: str, arm: str, lr: float, seed: int, config: dict[str, Any]) -> str:
    """File name stem of one run: readable parts plus the numbers hash."""
    return f"{workload}__{arm}__lr{lr:.3g}__s{seed}__{_numbers_key(config)}"


def _best_val_test_callback():
    """A callback that keeps the weights of the best validation accuracy and, at the end of fit, evaluates them on
    the test split once: the run's "test acc at best val" (the test set is looked at once for this figure, and once
    for the final test accuracy; never at every validation).

    Built in a function so that importing this module does not import Lightning. The copy is taken right after
    validation (so for Schedule-Free it holds the evaluation weights) and evaluated on a deep copy of the module,
    so the run's trajectory is unchanged; its time is taken out of the run's wall-clock.
    """
    import copy

    import pytorch_lightning as pl
    import torch

    class BestValTest(pl.Callback):
        def __init__(self) -> None:
            self.best_acc = -1.0
            self.best_step: int | None = None
            self.best_state: dict[str, torch.Tensor] | None = None
            self.test_acc: float | None = None
            self.seconds = 0.0

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            acc = trainer.callback_metrics.get("val_acc")
            if acc is None or float(acc) <= self.best_acc:  # ties keep the earlier step
                return
            t0 = time.perf_counter()
            self.best_acc = float(acc)
            self.best_step = int(trainer.global_step)
            self.best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.seconds += time.perf_counter() - t0

        def on_fit_end(self, trainer, pl_module) -> None:
            if self.best_state is None:
                return
            t0 = time.perf_counter()
            model = copy.deepcopy(pl_module)
            model.load_state_dict(self.best_state)
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in trainer.datamodule.test_dataloader():
                    logits = model(x.to(model.device))
                    correct += int((logits.argmax(1).cpu() == y).sum())
                    total += len(y)
            self.test_acc = correct / max(total, 1)
            self.seconds += time.perf_counter() - t0

    return BestValTest()


def compare_task(config: dict[str, Any], json_path: str) -> dict[str, Any]:
    """A worker task: train one run of a comparison and save its result as JSON (atomically).

    The result is `RunResult.to_dict()` plus `best_val_step`/`test_acc_at_best_val` (the test accuracy of the
    weights with the best validation accuracy) and `wall_seconds` (training wall-clock including sleep, excluding
    that extra evaluation).
    """
    from sleepbot.training import run_training

    cfg = build_config(RunConfig, config)
    cfg.trainer.progress_bar = False
    best = _best_val_test_callback()
    result = run_training(cfg, callbacks=[best], quiet=True).to_dict()
    result["best_val_step"] = best.best_step
    result["test_acc_at_best_val"] = best.test_acc
    result["wall_seconds"] = result["fit_seconds"] - best.seconds
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
    opt = cfg.optimizer(arm.optimizer)
    run = merge(w.run, {"seed": seed, "model": {**opt.model, "lr": lr}, "sleep": arm.sleep})
    run_cfg = build_config(RunConfig, run)
    run_cfg.record.enabled = True
    run_cfg.record.snapshot_every = cfg.snapshot_every
    run_cfg.trainer.logger = "none"
    config = run_cfg.to_dict()
    stem = run_stem(w.name, arm.name, lr, seed, config)
    config["out_dir"] = str(out / "runs")
    config["name"] = stem
    config["record"]["path"] = str(out / "runs" / f"{stem}.h5")
    # No JSON means the run never finished: its partial HDF5 file (ours, same stem) is redone from scratch.
    config["record"]["overwrite"] = True
    return _Task(w.name, arm.name, lr, seed, config, stem, phase)


def check_arms(cfg: CompareConfig) -> None:
    """Build every arm's Sleep callback once, so that a bad option, a missing checkpoint or a learned arm whose
    settings do not fit its forecaster fails in one line before any run starts (the oracle's run file is the
    only thing not checked: it is made by the comparison)."""
    from sleepbot.sleep import sleep_from_config

    for w in cfg.workloads:
        for a in cfg.arms:
            if a.sleep["strategy"] == "none":
                continue
            sleep = dict(a.sleep)
            if sleep["strategy"] == "oracle":
                sleep["options"] = {**(sleep.get("options") or {}), "run": "(made by the comparison)"}
            probe = build_config(RunConfig, merge(w.run, {"sleep": sleep}))
            try:
                sleep_from_config(probe)
            except SleepbotError as e:
                raise SleepbotError(f"arm {a.name!r}: {e}") from None


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
    errors: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    alone = {a.optimizer: a for a in cfg.arms if a.sleep["strategy"] == "none"}  # each optimizer on its own

    # Phase 1: tune every base optimizer's lr per workload, on the tuning seeds (never the table's seeds).
    # The reference optimizer is tuned first by final accuracy (it defines the target); every other optimizer is
    # then tuned to reach that target in the fewest steps (choose_lr), the metric the table reports.
    tuning: dict[str, dict[str, Any]] = {w.name: {} for w in cfg.workloads}
    lr_of: dict[tuple[str, str], float] = {}
    tuned = [o for o in cfg.optimizers if o.lrs]
    tasks = [
        _make_task(cfg, out, w, alone[o.name], lr, s, "tune")
        for w in cfg.workloads
        for o in tuned
        for lr in o.lrs or ()
        for s in cfg.tune_seeds
    ]
    if tasks:
        if on_phase:
            on_phase("tune", len(tasks))
        res, err = _run_tasks(tasks, out, workers, "tune lr", progress)
        errors.update(err)
        for w in cfg.workloads:
            budget = int(build_config(RunConfig, w.run).trainer.max_steps)
            target = cfg.target
            for o in sorted(tuned, key=lambda o: o.name != cfg.reference):  # the reference first
                arm = alone[o.name].name
                table = {
                    lr: [
                        res[t.stem]
                        for t in tasks
                        if t.workload == w.name and t.arm == arm and t.lr == lr and t.stem in res
                    ]
                    for lr in o.lrs or ()
                }
                rule = (
                    f"fewest median steps to val acc {target:.4f}"
                    if target is not None
                    else "best final val acc"
                )
                lr, rows = choose_lr(table, cfg.miss_factor, target=target, budget=budget)
                if target is None and o.name == cfg.reference:  # its chosen lr's median final val acc
                    target = next(r["median_final_val_acc"] for r in rows if r["lr"] == lr)
                lr_of[(w.name, o.name)] = lr
                tuning[w.name][o.name] = {
                    "lr": lr,
                    "grid": list(o.lrs or ()),
                    "seeds": list(cfg.tune_seeds),
                    "rule": rule,
                    "table": rows,
                }
    for w in cfg.workloads:
        for o in cfg.optimizers:
            if (w.name, o.name) not in lr_of:
                run = build_config(RunConfig, merge(w.run, {"model": o.model}))
                lr_of[(w.name, o.name)] = float(run.model.lr)
                tuning[w.name][o.name] = {
                    "lr": lr_of[(w.name, o.name)],
                    "grid": None,
                    "seeds": [],
                    "table": [],
                }

    # Phase 2: every optimizer alone (the oracle reads these recordings), then phase 3: every sleep arm.
    base_tasks = [
        _make_task(cfg, out, w, a, lr_of[(w.name, o)], s, "none")
        for w in cfg.workloads
        for o, a in alone.items()
        for s in cfg.seeds
    ]
    if on_phase:
        on_phase("none", len(base_tasks))
    base_res, err = _run_tasks(base_tasks, out, workers, "no sleep", progress)
    errors.update(err)
    base_path = {
        (t.workload, t.arm, t.seed): t.config["record"]["path"] for t in base_tasks if t.stem in base_res
    }

    arm_tasks = []
    for w in cfg.workloads:
        for a in cfg.arms:
            if a.sleep["strategy"] == "none":
                continue
            for s in cfg.seeds:
                arm = a
                if a.sleep["strategy"] == "oracle":
                    key = (w.name, alone[a.optimizer].name, s)
                    if key not in base_path:
                        errors[f"{w.name}__{a.name}__s{s}"] = (
                            "no recorded no-sleep run for the oracle to read"
                        )
                        continue
                    opts = dict(a.sleep.get("options") or {})
                    opts["run"] = base_path[key]
                    arm = dataclasses.replace(a, sleep={**a.sleep, "options": opts})
                arm_tasks.append(_make_task(cfg, out, w, arm, lr_of[(w.name, a.optimizer)], s, "arms"))
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
