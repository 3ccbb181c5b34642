"""`sleepbot compare`: sleep strategies x seeds x workloads, with a tuned no-sleep baseline, judged honestly.

The protocol (AlgoPerf / NiNo, see PRIOR_ART.md):

1. Per workload (dataset, architecture, optimizer), the no-sleep baseline is tuned first: every learning rate of a
   grid is trained on a few seeds, and the lr with the best median final validation accuracy (ties: the one whose
   runs reach that accuracy in fewer median steps) is used by every arm. A speedup over an untuned baseline is
   mostly a learning-rate effect.
2. Every arm runs the same seeds. The no-sleep arm runs first and is recorded, because the `oracle` control jumps
   to the weights its own seed's no-sleep run had `horizon` snapshots later.
3. The target is the no-sleep arm's median final validation accuracy (unless the config fixes one); a run that
   never reaches it counts as `miss_factor` x the step budget.
4. Per arm: median steps to target with a bootstrap CI, the speedup over no sleep with a paired bootstrap CI and a
   Wilcoxon signed-rank p-value, best and final test accuracy, the area under the validation curve and the
   wall-clock of training including the cost of sleeping; the learned arm's step saving as a fraction of the
   oracle's.

Resumable: each run's result is a JSON file under `<out>/runs/` whose name carries a hash of everything that
changes the run's numbers (its config, a forecaster's contents, the source of the training and sleep code), so a
rerun skips finished runs and never confuses runs of different configs or code versions.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.analysis import (
    curve_auc,
    fraction_of_oracle,
    paired_speedup,
    steps_to_target,
    summarize,
)
from sleepbot.config import RunConfig, SleepConfig, build_config, load_yaml, merge
from sleepbot.errors import ConfigError, SleepbotError

RESULTS_SCHEMA = 1
_SLEEP_KEYS = {f.name for f in dataclasses.fields(SleepConfig)}


# --------------------------------------------------------------------------------------------- config
@dataclass
class Arm:
    """One strategy with its sleep settings (SleepConfig fields; `strategy` defaults to the arm's name)."""

    name: str
    sleep: dict[str, Any]


@dataclass
class Workload:
    """One kind of run: a RunConfig dict (data, model, trainer), the same for every arm."""

    name: str
    run: dict[str, Any]


@dataclass
class CompareConfig:
    """A comparison: workloads x arms x seeds, the lr grid that tunes the baseline and the statistics' knobs."""

    workloads: list[Workload]
    arms: list[Arm]
    seeds: list[int]
    tune_lrs: list[float] | None = None  # None: no tuning, each workload's own lr
    tune_seeds: list[int] = field(default_factory=list)
    target: float | None = None  # None: the no-sleep arm's median final validation accuracy
    miss_factor: float = 2.0
    record_every: int = 10  # snapshot interval of every recorded run (the oracle reads the no-sleep ones)
    n_boot: int = 2000

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TOP_KEYS = (
    "seeds",
    "seed_start",
    "base",
    "workloads",
    "arms",
    "tune",
    "target",
    "miss_factor",
    "record_every",
)
_TUNE_KEYS = ("lrs", "low", "high", "num", "seeds")


def _check_keys(d: Any, valid: tuple[str, ...] | set[str], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    for key in d:
        if key not in valid:
            raise ConfigError(f"unknown {where} key {key!r}; valid keys: {', '.join(sorted(valid))}")
    return d


def _float_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of numbers, got {value!r}")
    out = []
    for v in value:
        try:
            out.append(float(v))  # YAML 1.1 reads 1e-3 as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must hold numbers, got {v!r}") from None
        if not math.isfinite(out[-1]) or out[-1] <= 0:
            raise ConfigError(f"{where} must hold positive numbers, got {v!r}")
    return out


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check_name(name: str, what: str) -> str:
    # Names become parts of file names: no path separators, no spaces.
    if not _NAME.match(name):
        raise ConfigError(
            f"{what} name {name!r} must be letters, digits and _ . + - (it becomes part of file names)"
        )
    return name


def log_grid(low: float, high: float, num: int) -> list[float]:
    """`num` log-spaced learning rates from `low` to `high`, rounded to 3 significant digits for readable names."""
    if not (0 < low <= high) or num < 1:
        raise ConfigError(
            f"lr grid needs 0 < low <= high and num >= 1, got low={low}, high={high}, num={num}"
        )
    if num == 1:
        return [float(f"{low:.3g}")]
    return [float(f"{x:.3g}") for x in np.geomspace(low, high, num)]


def parse_compare_config(values: dict[str, Any], seeds: int | None = None) -> CompareConfig:
    """Build and check a CompareConfig from a YAML mapping (see configs/compare_*.yaml for the layout).

    Every run config is built once here, so a bad dataset name or key fails before anything trains.

    Args:
        values: the YAML mapping.
        seeds: override the number of seeds (keeps `seed_start`).
    """
    _check_keys(values, _TOP_KEYS, "compare config")
    seed_spec = values.get("seeds", 10) if seeds is None else seeds
    start = values.get("seed_start", 0)
    if isinstance(seed_spec, bool) or not isinstance(start, int):
        raise ConfigError(f"compare config 'seeds' must be a count or a list of ints, got {seed_spec!r}")
    if isinstance(seed_spec, int):
        if seed_spec < 1:
            raise ConfigError(f"compare config 'seeds' must be >= 1, got {seed_spec}")
        seed_list = list(range(start, start + seed_spec))
    elif isinstance(seed_spec, list) and seed_spec and all(isinstance(s, int) for s in seed_spec):
        seed_list = list(dict.fromkeys(seed_spec))
    else:
        raise ConfigError(f"compare config 'seeds' must be a count or a list of ints, got {seed_spec!r}")

    base = _check_keys(values.get("base", {}) or {}, {f.name for f in dataclasses.fields(RunConfig)}, "base")
    raw_workloads = values.get("workloads") or [{"name": "default", "run": {}}]
    if not isinstance(raw_workloads, list):
        raise ConfigError(f"compare config 'workloads' must be a list, got {raw_workloads!r}")
    workloads = []
    for i, w in enumerate(raw_workloads):
        _check_keys(w, ("name", "run"), f"workloads[{i}]")
        run = merge(base, w.get("run") or {})
        run_cfg = build_config(RunConfig, run)  # checks names and types now
        name = str(w.get("name") or f"{run_cfg.data.name}-{run_cfg.model.arch}-{run_cfg.model.optimizer}")
        _check_name(name, "workload")
        if any(name == x.name for x in workloads):
            raise ConfigError(f"workload name {name!r} appears twice; give each workload its own name")
        workloads.append(Workload(name=name, run=run))

    raw_arms = values.get("arms") or [{"name": "none"}]
    if not isinstance(raw_arms, list):
        raise ConfigError(f"compare config 'arms' must be a list, got {raw_arms!r}")
    arms = []
    for i, a in enumerate(raw_arms):
        if isinstance(a, str):
            a = {"name": a}
        _check_keys(a, {"name", *_SLEEP_KEYS}, f"arms[{i}]")
        if "name" not in a:
            raise ConfigError(f"arms[{i}] needs a 'name'")
        _check_name(str(a["name"]), "arm")
        sleep = {k: v for k, v in a.items() if k != "name"}
        sleep.setdefault("strategy", a["name"])
        build_config(RunConfig, {"sleep": sleep})  # type-check the sleep settings
        if any(a["name"] == x.name for x in arms):
            raise ConfigError(f"arm name {a['name']!r} appears twice; give each arm its own name")
        arms.append(Arm(name=str(a["name"]), sleep=sleep))
    if not any(a.sleep["strategy"] == "none" for a in arms):
        arms.insert(0, Arm(name="none", sleep={"strategy": "none"}))  # the baseline every statistic needs

    tune = values.get("tune")
    tune_lrs = None
    tune_seeds: list[int] = []
    if tune:
        _check_keys(tune, _TUNE_KEYS, "tune")
        if "lrs" in tune:
            tune_lrs = _float_list(tune["lrs"], "tune.lrs")
        else:
            lo = _float_list([tune.get("low", 1e-3)], "tune.low")[0]
            hi = _float_list([tune.get("high", 3e-2)], "tune.high")[0]
            tune_lrs = log_grid(lo, hi, int(tune.get("num", 4)))
        n_tune = tune.get("seeds", 3)
        if not isinstance(n_tune, int) or isinstance(n_tune, bool) or n_tune < 1:
            raise ConfigError(f"tune.seeds must be a count >= 1, got {n_tune!r}")
        # The first seeds of the comparison: their no-sleep runs at the chosen lr are reused by the none arm.
        tune_seeds = seed_list[: min(n_tune, len(seed_list))]

    target = values.get("target")
    if target is not None:
        target = _float_list([target], "target")[0]
    miss = _float_list([values.get("miss_factor", 2.0)], "miss_factor")[0]
    record_every = values.get("record_every", 10)
    if not isinstance(record_every, int) or record_every < 1:
        raise ConfigError(f"record_every must be an int >= 1, got {record_every!r}")
    return CompareConfig(
        workloads=workloads,
        arms=arms,
        seeds=seed_list,
        tune_lrs=tune_lrs,
        tune_seeds=tune_seeds,
        target=target,
        miss_factor=miss,
        record_every=record_every,
    )


def load_compare_config(path: str | Path, seeds: int | None = None) -> CompareConfig:
    """Read and check a compare YAML file."""
    return parse_compare_config(load_yaml(path), seeds=seeds)


# --------------------------------------------------------------------------------------------- one run
_NUMBERS_CODE = ("training.py", "models.py", "data.py", "neurons.py", "compare.py", "sleep", "forecast")


@functools.cache
def code_digest() -> str:
    """A hash of the package source that decides a run's numbers (training, models, data, sleep, forecast).

    Part of every run's key, so that a resumed comparison never mixes runs of different code: after an edit to
    any of these files, runs are redone rather than silently reused.
    """
    root = Path(__file__).resolve().parent
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


def _final_val(r: dict[str, Any]) -> float:
    return float(r["val_acc"][-1]) if r.get("val_acc") else float("nan")


def choose_lr(table: dict[float, list[dict[str, Any]]], miss_factor: float = 2.0) -> tuple[float, list[dict]]:
    """The lr with the best median final validation accuracy; ties go to fewer median steps to reach it.

    Args:
        table: {lr: [run results]}.

    Returns:
        (chosen lr, one row per lr: lr, median final val acc, median steps to that accuracy, n).
    """
    rows = []
    for lr, runs in sorted(table.items()):
        finals = [_final_val(r) for r in runs]
        med = float(np.median(finals)) if finals else float("nan")
        rows.append({"lr": lr, "median_final_val_acc": med, "n": len(runs)})
    best = max(
        (r["median_final_val_acc"] for r in rows if not math.isnan(r["median_final_val_acc"])), default=None
    )
    if best is None:
        raise SleepbotError("every tuning run failed; see the errors above")
    for row in rows:
        runs = table[row["lr"]]
        row["median_steps_to_best"] = float(
            np.median(
                [
                    steps_to_target(
                        r["val_step"], r["val_acc"], best, r["config"]["trainer"]["max_steps"], miss_factor
                    )
                    for r in runs
                ]
            )
        )
    # Ties: accuracies are multiples of 1/len(val set), so equal medians are real ties, broken by speed.
    tied = [r for r in rows if r["median_final_val_acc"] == best]
    chosen = min(tied, key=lambda r: (r["median_steps_to_best"], r["lr"]))
    return float(chosen["lr"]), rows


def _arm_stats(
    runs_by_seed: dict[int, dict[str, Any]], target: float, budget: int, miss_factor: float, n_boot: int
) -> dict[str, Any]:
    seeds = sorted(runs_by_seed)
    rs = [runs_by_seed[s] for s in seeds]
    steps = [steps_to_target(r["val_step"], r["val_acc"], target, budget, miss_factor) for r in rs]
    hit_steps = [s for s in steps if s <= budget]
    final_test = [r.get("test_acc") if r.get("test_acc") is not None else float("nan") for r in rs]
    best_test = [max(r["test_curve"]) if r.get("test_curve") else float("nan") for r in rs]
    aucs = [curve_auc(r["val_step"], r["val_acc"]) if r.get("val_acc") else float("nan") for r in rs]
    walls = [float(r.get("wall_seconds", r.get("fit_seconds", float("nan")))) for r in rs]
    sleeps = [sum(1 for e in r.get("events") or [] if e.get("accepted", True)) for r in rs]

    def s(x: list[float], seed: int = 0) -> dict[str, float]:
        return dataclasses.asdict(summarize(x, n_boot=n_boot, seed=seed))

    return {
        "seeds": seeds,
        "n": len(seeds),
        "steps_to_target": steps,
        "steps": s(steps),
        "misses": len(steps) - len(hit_steps),
        "final_test_acc": s(final_test),
        "best_test_acc": s(best_test),
        "final_val_acc": s([_final_val(r) for r in rs]),
        "auc": s(aucs),
        "wall_seconds": s(walls),
        "accepted_sleeps": float(np.median(sleeps)) if sleeps else 0.0,
    }


def _steps_of(arm_stats: dict[str, Any], seeds: list[int]) -> list[float]:
    """An arm's steps to target for `seeds`, in that order (pairs arms by seed)."""
    return [arm_stats["steps_to_target"][arm_stats["seeds"].index(s)] for s in seeds]


def summarize_comparison(
    cfg: CompareConfig, runs: list[dict[str, Any]], tuning: dict[str, Any]
) -> dict[str, Any]:
    """Turn finished runs into the per-workload, per-arm statistics of results.json.

    Args:
        cfg: the comparison.
        runs: run records: {"workload", "arm", "seed", "lr", "stem", "result"}.
        tuning: {workload: {"lr", "grid", "table"}}.
    """
    out: dict[str, Any] = {}
    for w in cfg.workloads:
        by_arm: dict[str, dict[int, dict[str, Any]]] = {a.name: {} for a in cfg.arms}
        for rec in runs:
            if rec["workload"] == w.name and rec["arm"] in by_arm:
                by_arm[rec["arm"]][rec["seed"]] = rec["result"]
        none_name = next(a.name for a in cfg.arms if a.sleep["strategy"] == "none")
        base = by_arm[none_name]
        budget = int(build_config(RunConfig, w.run).trainer.max_steps)
        if cfg.target is not None:
            target, target_source = cfg.target, "config"
        elif base:
            target = float(np.median([_final_val(r) for r in base.values()]))
            target_source = f"median final val acc of '{none_name}'"
        else:
            raise SleepbotError(f"workload {w.name!r}: every no-sleep run failed, so there is no target")
        arms = {}
        for a in cfg.arms:
            if not by_arm[a.name]:
                arms[a.name] = {"n": 0, "strategy": a.sleep["strategy"]}
                continue
            st = _arm_stats(by_arm[a.name], target, budget, cfg.miss_factor, cfg.n_boot)
            st["strategy"] = a.sleep["strategy"]
            st["sleep"] = a.sleep
            paired = sorted(set(by_arm[a.name]) & set(base))
            if a.name != none_name and len(paired) >= 1:
                b = [
                    steps_to_target(base[s]["val_step"], base[s]["val_acc"], target, budget, cfg.miss_factor)
                    for s in paired
                ]
                x = [st["steps_to_target"][st["seeds"].index(s)] for s in paired]
                sp = paired_speedup(b, x, n_boot=cfg.n_boot)
                st["speedup"] = dataclasses.asdict(sp)
            arms[a.name] = st
        # Each arm's step saving as a fraction of the oracle's (the most its schedule could gain).
        oracle = next((a.name for a in cfg.arms if a.sleep["strategy"] == "oracle" and by_arm[a.name]), None)
        if oracle is not None:
            for a in cfg.arms:
                if a.name in (none_name, oracle) or not by_arm[a.name]:
                    continue
                paired = sorted(set(by_arm[a.name]) & set(base) & set(by_arm[oracle]))
                if not paired:
                    continue

                v, lo, hi = fraction_of_oracle(
                    _steps_of(arms[none_name], paired),
                    _steps_of(arms[a.name], paired),
                    _steps_of(arms[oracle], paired),
                    cfg.n_boot,
                )
                arms[a.name]["fraction_of_oracle"] = {"value": v, "lo": lo, "hi": hi, "oracle": oracle}
        out[w.name] = {
            "target": target,
            "target_source": target_source,
            "budget": budget,
            "baseline": none_name,
            "tuning": tuning.get(w.name),
            "arms": arms,
        }
    return out


def _headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for wname, w in results["workloads"].items():
        for aname, a in w["arms"].items():
            if not a.get("n"):
                rows.append({"workload": wname, "arm": aname, "n": 0})
                continue
            sp = a.get("speedup") or {}
            fo = a.get("fraction_of_oracle") or {}
            rows.append(
                {
                    "workload": wname,
                    "arm": aname,
                    "strategy": a["strategy"],
                    "lr": (w.get("tuning") or {}).get("lr"),
                    "n": a["n"],
                    "target": w["target"],
                    "steps_median": a["steps"]["median"],
                    "steps_lo": a["steps"]["lo"],
                    "steps_hi": a["steps"]["hi"],
                    "misses": a["misses"],
                    "speedup": sp.get("ratio"),
                    "speedup_lo": sp.get("lo"),
                    "speedup_hi": sp.get("hi"),
                    "p_wilcoxon": sp.get("p_value"),
                    "final_test_acc": a["final_test_acc"]["median"],
                    "best_test_acc": a["best_test_acc"]["median"],
                    "final_val_acc": a["final_val_acc"]["median"],
                    "auc_val_acc": a["auc"]["median"],
                    "wall_seconds": a["wall_seconds"]["median"],
                    "accepted_sleeps": a["accepted_sleeps"],
                    "fraction_of_oracle": fo.get("value"),
                    "fraction_of_oracle_lo": fo.get("lo"),
                    "fraction_of_oracle_hi": fo.get("hi"),
                }
            )
    return rows


CSV_COLUMNS = (
    "workload",
    "arm",
    "strategy",
    "lr",
    "n",
    "target",
    "steps_median",
    "steps_lo",
    "steps_hi",
    "misses",
    "speedup",
    "speedup_lo",
    "speedup_hi",
    "p_wilcoxon",
    "final_test_acc",
    "best_test_acc",
    "final_val_acc",
    "auc_val_acc",
    "wall_seconds",
    "accepted_sleeps",
    "fraction_of_oracle",
    "fraction_of_oracle_lo",
    "fraction_of_oracle_hi",
)


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so results.json is strict JSON other tools can read."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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
    cfg_json = json.dumps(_json_safe(cfg.to_dict()), sort_keys=True, indent=1)
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
    results["headline"] = _headline_rows(results)
    results = _json_safe(results)
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


# --------------------------------------------------------------------------------------------- reading back
def load_results(out: str | Path) -> dict[str, Any]:
    """Read a comparison's results.json, with a one-line error when it is missing or not ours."""
    path = Path(out) / "results.json" if Path(out).is_dir() else Path(out)
    if not path.is_file():
        raise SleepbotError(f"no results.json in {str(out)!r}; run `sleepbot compare --out {out}` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SleepbotError(
            f"{str(path)!r} is not valid JSON (line {e.lineno}); rerun `sleepbot compare`"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != RESULTS_SCHEMA or "workloads" not in data:
        raise SleepbotError(f"{str(path)!r} is not a sleepbot comparison (schema {RESULTS_SCHEMA} expected)")
    return data


def load_runs(out: str | Path, workload: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The finished runs of a comparison grouped by arm: {arm: [RunResult dicts]} (one workload)."""
    out = Path(out)
    data = load_results(out)
    if workload is None:
        workload = next(iter(data["workloads"]))
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in data["runs"]:
        if rec["workload"] != workload:
            continue
        path = out / "runs" / f"{rec['stem']}.json"
        if path.is_file():
            groups.setdefault(rec["arm"], []).append(json.loads(path.read_text()))
    return groups


def format_table(results: dict[str, Any]) -> str:
    """The headline table as fixed-width text (what `compare` and `demo` print)."""
    lines = []
    for wname, w in results["workloads"].items():
        t = w.get("tuning") or {}
        grid = t.get("grid")
        tuned = (
            f"lr {t.get('lr'):.3g} (tuned on {', '.join(f'{x:.3g}' for x in grid)})"
            if grid
            else f"lr {t.get('lr')}"
        )
        lines.append(
            f"{wname}: target val acc {w['target']:.4f} ({w['target_source']}), {tuned}, budget {w['budget']} steps"
        )
        head = f"  {'arm':<18}{'n':>3}  {'steps to target [95% CI]':<26}{'miss':>5}  {'speedup [95% CI]':<20}{'p':>7}  {'test acc':>8}  {'best':>6}  {'AUC':>6}  {'wall s':>7}  {'of oracle':>9}"
        lines.append(head)
        for aname, a in w["arms"].items():
            if not a.get("n"):
                lines.append(f"  {aname:<18}{0:>3}  (no finished runs)")
                continue
            st = a["steps"]
            steps = f"{_f(st['median'], 0)} [{_f(st['lo'], 0)}, {_f(st['hi'], 0)}]"
            sp = a.get("speedup")
            speed = f"{_f(sp['ratio'], 2)}x [{_f(sp['lo'], 2)}, {_f(sp['hi'], 2)}]" if sp else "-"
            p = _f(sp["p_value"], 3) if sp else "-"
            fo = a.get("fraction_of_oracle")
            frac = _f(fo["value"], 2) if fo else "-"
            lines.append(
                f"  {aname:<18}{a['n']:>3}  {steps:<26}{a['misses']:>5}  {speed:<20}{p:>7}  "
                f"{_f(a['final_test_acc']['median'], 4):>8}  {_f(a['best_test_acc']['median'], 3):>6}  "
                f"{_f(a['auc']['median'], 3):>6}  {_f(a['wall_seconds']['median'], 1):>7}  {frac:>9}"
            )
    return "\n".join(lines)


def _f(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"
