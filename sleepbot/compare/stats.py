"""From finished runs to the statistics of results.json, and reading a comparison back."""

from __future__ import annotations

import dataclasses
import json
import math
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
from sleepbot.compare.config import CompareConfig
from sleepbot.config import RunConfig, build_config
from sleepbot.errors import SleepbotError

RESULTS_SCHEMA = 1


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


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
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


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so results.json is strict JSON other tools can read."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


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
