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


def choose_lr(
    table: dict[float, list[dict[str, Any]]],
    miss_factor: float = 2.0,
    target: float | None = None,
    budget: int | None = None,
) -> tuple[float, list[dict]]:
    """The one lr-tuning rule of sleepbot.

    Without a target (the reference optimizer, whose tuned runs define the target): the lr with the best median
    final validation accuracy; ties (accuracies are multiples of 1/len(val set)) go to fewer median steps to reach
    it. With a target (every other base optimizer): the lr with the fewest median steps to the target, a miss
    counting `miss_factor` x the budget; ties go to the higher median final accuracy, then the smaller lr.

    Args:
        table: {lr: [run results]} of the tuning seeds.
        target: the validation accuracy to reach, or None.
        budget: the step budget (default: each run's max_steps).

    Returns:
        (chosen lr, one row per lr: lr, median final val acc, median steps to target or to the best accuracy, n).
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
    goal = best if target is None else target
    for row in rows:
        runs = table[row["lr"]]
        row["median_steps_to_target" if target is not None else "median_steps_to_best"] = float(
            np.median(
                [
                    steps_to_target(
                        r["val_step"],
                        r["val_acc"],
                        goal,
                        budget or r["config"]["trainer"]["max_steps"],
                        miss_factor,
                    )
                    for r in runs
                ]
            )
            if runs
            else float("inf")
        )
    if target is None:
        tied = [r for r in rows if r["median_final_val_acc"] == best]
        chosen = min(tied, key=lambda r: (r["median_steps_to_best"], r["lr"]))
    else:
        ok = [r for r in rows if r["n"]]
        chosen = min(ok, key=lambda r: (r["median_steps_to_target"], -r["median_final_val_acc"], r["lr"]))
    return float(chosen["lr"]), rows


# A training step is a forward and a backward pass, about three forward passes' worth of compute: the rate at
# which the held-batch forward passes a sleep spends (its check, the adaptive jump's probe) count as steps.
FORWARDS_PER_STEP = 3.0


def sleep_cost_steps(result: dict[str, Any], before_step: float) -> float:
    """The step-equivalents a run's sleeps spent on held-batch forward passes before `before_step`: the sum of
    their events' `forwards` / FORWARDS_PER_STEP (0 for a run without sleep or without held batches)."""
    forwards = sum(int(e.get("forwards") or 0) for e in result.get("events") or [] if e["step"] < before_step)
    return forwards / FORWARDS_PER_STEP


def seconds_to_target(result: dict[str, Any], target: float, miss_factor: float) -> float:
    """Training wall-clock (validation excluded; sleeping, forecaster and probe included) until the first
    validation at `target`; a miss counts `miss_factor` x the run's whole training time. NaN for a run recorded
    before the per-validation times were (no `val_train_seconds`)."""
    secs = result.get("val_train_seconds") or []
    if len(secs) != len(result.get("val_acc") or []) or not secs:
        return float("nan")
    hit = np.nonzero(np.asarray(result["val_acc"], dtype=float) >= target)[0]
    return float(secs[hit[0]]) if hit.size else float(miss_factor * secs[-1])


def _arm_stats(
    runs_by_seed: dict[int, dict[str, Any]], target: float, budget: int, miss_factor: float, n_boot: int
) -> dict[str, Any]:
    seeds = sorted(runs_by_seed)
    rs = [runs_by_seed[s] for s in seeds]
    raw = [steps_to_target(r["val_step"], r["val_acc"], target, budget, miss_factor) for r in rs]
    # Steps to target count what the sleeps spent before it (a miss already counts miss_factor x the budget).
    steps = [s + sleep_cost_steps(r, s) if s <= budget else s for s, r in zip(raw, rs)]
    hit_steps = [s for s in raw if s <= budget]
    final_test = [r.get("test_acc") if r.get("test_acc") is not None else float("nan") for r in rs]
    best_val_test = [
        r["test_acc_at_best_val"] if r.get("test_acc_at_best_val") is not None else float("nan") for r in rs
    ]
    aucs = [curve_auc(r["val_step"], r["val_acc"]) if r.get("val_acc") else float("nan") for r in rs]
    walls = [float(r.get("wall_seconds", r.get("fit_seconds", float("nan")))) for r in rs]
    wall_to_target = [seconds_to_target(r, target, miss_factor) for r in rs]
    sleeps = [sum(1 for e in r.get("events") or [] if e.get("accepted", True)) for r in rs]

    def s(x: list[float], seed: int = 0) -> dict[str, float]:
        return dataclasses.asdict(summarize(x, n_boot=n_boot, seed=seed))

    return {
        "seeds": seeds,
        "n": len(seeds),
        "steps_to_target": steps,
        "optimizer_steps_to_target": raw,
        "steps": s(steps),
        "misses": len(steps) - len(hit_steps),
        "final_test_acc": s(final_test),
        "test_acc_at_best_val": s(best_val_test),
        "final_val_acc": s([_final_val(r) for r in rs]),
        "auc": s(aucs),
        "wall_seconds": s(walls),
        "seconds_to_target": wall_to_target,
        "wall_to_target": s(wall_to_target),
        "accepted_sleeps": float(np.median(sleeps)) if sleeps else 0.0,
    }


def _steps_of(arm_stats: dict[str, Any], seeds: list[int], key: str = "steps_to_target") -> list[float]:
    """An arm's steps to target (or another per-seed list, `key`) for `seeds`, in that order (pairs arms by
    seed)."""
    return [arm_stats[key][arm_stats["seeds"].index(s)] for s in seeds]


def _paired_vs(
    base: dict[str, Any], arm: dict[str, Any], n_boot: int, name: str, key: str = "steps_to_target"
) -> dict[str, Any] | None:
    """The arm's speedup over `base` (another arm's stats) in `key` (steps, or `seconds_to_target`), paired by
    seed; None without common seeds (or without times)."""
    paired = sorted(set(base["seeds"]) & set(arm["seeds"]))
    if key != "steps_to_target":
        paired = [
            x for x in paired if math.isfinite(_steps_of(base, [x], key)[0] + _steps_of(arm, [x], key)[0])
        ]
    if not paired:
        return None
    sp = dataclasses.asdict(
        paired_speedup(_steps_of(base, paired, key), _steps_of(arm, paired, key), n_boot=n_boot)
    )
    sp["vs"] = name
    sp["n_pairs"] = len(paired)
    return sp


def summarize_comparison(
    cfg: CompareConfig, runs: list[dict[str, Any]], tuning: dict[str, Any]
) -> dict[str, Any]:
    """Turn finished runs into the per-workload, per-arm statistics of results.json.

    Per arm: steps to target, accuracies, wall-clock; `speedup` over the baseline (`none` on the reference
    optimizer) and `speedup_vs_best` over the best tuned alternative (the other base optimizers alone: the one
    with the fewest median steps on these seeds, which favours the alternative); `fraction_of_oracle`: its step
    saving over its own base optimizer alone, as a fraction of the oracle's on the same base optimizer.

    Args:
        cfg: the comparison.
        runs: run records: {"workload", "arm", "seed", "lr", "stem", "result"}.
        tuning: {workload: {optimizer: {"lr", "grid", "seeds", "rule", "table"}}}.
    """
    out: dict[str, Any] = {}
    none_name = cfg.baseline.name
    alone = {a.optimizer: a.name for a in cfg.arms if a.sleep["strategy"] == "none"}
    for w in cfg.workloads:
        by_arm: dict[str, dict[int, dict[str, Any]]] = {a.name: {} for a in cfg.arms}
        for rec in runs:
            if rec["workload"] == w.name and rec["arm"] in by_arm:
                by_arm[rec["arm"]][rec["seed"]] = rec["result"]
        base = by_arm[none_name]
        budget = int(build_config(RunConfig, w.run).trainer.max_steps)
        if cfg.target is not None:
            target, target_source = cfg.target, "config"
        elif base:
            target = float(np.median([_final_val(r) for r in base.values()]))
            target_source = f"median final val acc of '{none_name}'"
        else:
            raise SleepbotError(f"workload {w.name!r}: every no-sleep run failed, so there is no target")
        tuned = tuning.get(w.name) or {}
        arms: dict[str, Any] = {}
        for a in cfg.arms:
            info = {
                "strategy": a.sleep["strategy"],
                "optimizer": a.optimizer,
                "lr": (tuned.get(a.optimizer) or {}).get("lr"),
                "chosen_on": a.chosen_on,
            }
            if not by_arm[a.name]:
                arms[a.name] = {"n": 0, **info}
                continue
            st = _arm_stats(by_arm[a.name], target, budget, cfg.miss_factor, cfg.n_boot)
            st.update(info, sleep=a.sleep)
            arms[a.name] = st
        alternatives = [alone[o] for o in alone if o != cfg.reference and arms[alone[o]].get("n")]
        best_alt = min(
            alternatives,
            key=lambda n: (arms[n]["steps"]["median"], -(arms[n]["final_val_acc"]["median"] or 0)),
            default=None,
        )
        for a in cfg.arms:
            st = arms[a.name]
            if not st.get("n"):
                continue
            if a.name != none_name and arms[none_name].get("n"):
                st["speedup"] = _paired_vs(arms[none_name], st, cfg.n_boot, none_name)
                st["wall_speedup"] = _paired_vs(
                    arms[none_name], st, cfg.n_boot, none_name, "seconds_to_target"
                )
            if best_alt is not None and a.name != best_alt:
                st["speedup_vs_best"] = _paired_vs(arms[best_alt], st, cfg.n_boot, best_alt)
        # Each sleep arm's step saving as a fraction of the oracle's on the same base optimizer.
        for a in cfg.arms:
            if a.sleep["strategy"] in ("none", "oracle") or not arms[a.name].get("n"):
                continue
            oracle = next(
                (
                    o.name
                    for o in cfg.arms
                    if o.sleep["strategy"] == "oracle"
                    and o.optimizer == a.optimizer
                    and arms[o.name].get("n")
                ),
                None,
            )
            ref = arms[alone[a.optimizer]]
            if oracle is None or not ref.get("n"):
                continue
            paired = sorted(set(arms[a.name]["seeds"]) & set(ref["seeds"]) & set(arms[oracle]["seeds"]))
            if not paired:
                continue
            v, lo, hi = fraction_of_oracle(
                _steps_of(ref, paired),
                _steps_of(arms[a.name], paired),
                _steps_of(arms[oracle], paired),
                cfg.n_boot,
            )
            arms[a.name]["fraction_of_oracle"] = {"value": v, "lo": lo, "hi": hi, "oracle": oracle}
        pairs = []
        for name, against in cfg.pairs:
            if arms[name].get("n") and arms[against].get("n"):
                sp = _paired_vs(arms[against], arms[name], cfg.n_boot, against)
                if sp is not None:
                    pairs.append({"arm": name, **sp})
        out[w.name] = {
            "pairs": pairs,
            "target": target,
            "target_source": target_source,
            "budget": budget,
            "baseline": none_name,
            "reference": cfg.reference,
            "best_alternative": best_alt,
            "tuning": tuned,
            "arms": arms,
        }
    return out


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per workload and arm (results.csv and results.json's `headline`)."""
    rows = []
    for wname, w in results["workloads"].items():
        for aname, a in w["arms"].items():
            if not a.get("n"):
                rows.append({"workload": wname, "arm": aname, "n": 0})
                continue
            sp = a.get("speedup") or {}
            sb = a.get("speedup_vs_best") or {}
            ws = a.get("wall_speedup") or {}
            fo = a.get("fraction_of_oracle") or {}
            rows.append(
                {
                    "workload": wname,
                    "arm": aname,
                    "strategy": a["strategy"],
                    "optimizer": a.get("optimizer"),
                    "lr": a.get("lr"),
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
                    "best_alternative": w.get("best_alternative"),
                    "speedup_vs_best": sb.get("ratio"),
                    "speedup_vs_best_lo": sb.get("lo"),
                    "speedup_vs_best_hi": sb.get("hi"),
                    "final_test_acc": a["final_test_acc"]["median"],
                    "test_acc_at_best_val": a["test_acc_at_best_val"]["median"],
                    "final_val_acc": a["final_val_acc"]["median"],
                    "auc_val_acc": a["auc"]["median"],
                    "wall_seconds": a["wall_seconds"]["median"],
                    "wall_to_target": (a.get("wall_to_target") or {}).get("median"),
                    "wall_speedup": ws.get("ratio"),
                    "wall_speedup_lo": ws.get("lo"),
                    "wall_speedup_hi": ws.get("hi"),
                    "accepted_sleeps": a["accepted_sleeps"],
                    "fraction_of_oracle": fo.get("value"),
                    "fraction_of_oracle_lo": fo.get("lo"),
                    "fraction_of_oracle_hi": fo.get("hi"),
                    "chosen_on": a.get("chosen_on"),
                }
            )
    return rows


CSV_COLUMNS = (
    "workload",
    "arm",
    "strategy",
    "optimizer",
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
    "best_alternative",
    "speedup_vs_best",
    "speedup_vs_best_lo",
    "speedup_vs_best_hi",
    "final_test_acc",
    "test_acc_at_best_val",
    "final_val_acc",
    "auc_val_acc",
    "wall_seconds",
    "wall_to_target",
    "wall_speedup",
    "wall_speedup_lo",
    "wall_speedup_hi",
    "accepted_sleeps",
    "fraction_of_oracle",
    "fraction_of_oracle_lo",
    "fraction_of_oracle_hi",
    "chosen_on",
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


TABLE_HEADER = (
    "arm",
    "base optimizer (lr)",
    "n",
    "steps to target, median [95% CI]",
    "misses",
    "vs none [95% CI]",
    "Wilcoxon p",
    "vs best alternative [95% CI]",
    "final test acc",
    "test acc at best val",
    "AUC val acc",
    "wall s to target (vs none)",
    "saving / oracle's",
)


def _ratio(sp: dict[str, Any] | None, baseline: str) -> str:
    if not sp:
        return baseline
    return f"{_f(sp['ratio'], 2)}x [{_f(sp['lo'], 2)}, {_f(sp['hi'], 2)}]"


def table_rows(workload: dict[str, Any], show_speedup: bool = True) -> list[list[str]]:
    """The rows (strings, TABLE_HEADER's columns) of one workload's results table: the one table of sleepbot, used
    by the CLI, the report, docs/ and the README. `show_speedup=False` blanks the speedup columns (an untuned lr)."""
    rows = []
    best = workload.get("best_alternative")
    for name, a in workload["arms"].items():
        opt = f"{a.get('optimizer', '')} ({_g(a.get('lr'))})"
        if not a.get("n"):
            rows.append([name, opt, "0"] + ["-"] * (len(TABLE_HEADER) - 3))
            continue
        st, fo = a["steps"], a.get("fraction_of_oracle")
        sp = a.get("speedup") if show_speedup else None
        sb = a.get("speedup_vs_best") if show_speedup else None
        rows.append(
            [
                name,
                opt,
                str(a["n"]),
                f"{_f(st['median'], 0)} [{_f(st['lo'], 0)}, {_f(st['hi'], 0)}]",
                str(a["misses"]),
                _ratio(
                    sp, "(baseline)" if a.get("strategy") == "none" and name == workload["baseline"] else "-"
                ),
                _f(sp["p_value"], 3) if sp else "-",
                _ratio(sb, "(best alternative)" if name == best else "-"),
                _f(a["final_test_acc"]["median"], 4),
                _f(a["test_acc_at_best_val"]["median"], 4),
                _f(a["auc"]["median"], 3),
                _wall(a, show_speedup),
                f"{_f(fo['value'], 2)} [{_f(fo['lo'], 2)}, {_f(fo['hi'], 2)}]"
                if fo and show_speedup
                else "-",
            ]
        )
    return rows


def _wall(a: dict[str, Any], show_speedup: bool) -> str:
    """Median training seconds to the target, with the paired wall-clock speedup over none when there is one."""
    med = (a.get("wall_to_target") or {}).get("median")
    ws = a.get("wall_speedup") if show_speedup else None
    return _f(med, 1) + (f" ({_f(ws['ratio'], 2)}x)" if ws else "")


def table_notes(results: dict[str, Any], wname: str) -> list[str]:
    """The sentences that belong under a workload's table: target, budget, how each lr was tuned, which seeds chose
    each arm's settings, and the caveats of peer arms."""
    w = results["workloads"][wname]
    cfg = results["config"]
    seeds = cfg["seeds"]
    notes = [
        f"{len(seeds)} paired seeds ({_span(seeds)}); target val acc {w['target']:.4f} ({w['target_source']}); "
        f"budget {w['budget']} steps (a miss counts as {cfg['miss_factor']:g}x); speedup = median steps of the "
        f"reference / of the arm (> 1 is faster), paired BCa 95% CI. A sleep arm's steps include what its sleeps "
        f"spent before the target: each held-batch forward pass (check, adaptive probe) = 1/{FORWARDS_PER_STEP:g} "
        f"step. Wall s to target: training seconds (validation excluded; sleeping, forecaster and probe included; "
        f"a miss counts {cfg['miss_factor']:g}x the run's) to the first validation at the target, median, with "
        f"the paired speedup over none; every run on one core of the same machine, recording its weights (the "
        f"oracle reads the no-sleep ones)."
    ]
    for opt, t in (w.get("tuning") or {}).items():
        if t.get("grid"):
            notes.append(
                f"{opt}: lr {_g(t['lr'])} chosen on tuning seeds {_span(t['seeds'])} from "
                f"{', '.join(_g(x) for x in t['grid'])} ({t.get('rule', 'best final val acc')})."
            )
        else:
            notes.append(f"{opt}: lr {_g(t['lr'])} NOT tuned.")
    if w.get("best_alternative"):
        notes.append(
            f"Best alternative: {w['best_alternative']} (the base optimizer alone with the fewest median steps "
            f"on these seeds)."
        )
    for name, a in w["arms"].items():
        if a.get("chosen_on"):
            notes.append(f"{name}: settings chosen on {a['chosen_on']}.")
        if a.get("strategy") == "nino":
            spacing = (a.get("sleep") or {}).get("snapshot_every") or "the default 10"
            notes.append(
                f"{name}: NiNo's WNN+ model, whose training states were 200 steps apart; here its states are "
                f"{spacing} steps apart (out of its training distribution)."
            )
    return notes


PAIR_HEADER = ("arm", "against", "pairs", "speedup [95% CI]", "Wilcoxon p")


def pair_rows(workload: dict[str, Any]) -> list[list[str]]:
    """The config's `pairs` for one workload: each arm's speedup over another, paired by seed (steps to target,
    sleep costs counted, as in the table)."""
    return [
        [p["arm"], p["vs"], str(p["n_pairs"]), _ratio(p, "-"), _f(p["p_value"], 3)]
        for p in workload.get("pairs") or []
    ]


def format_table(results: dict[str, Any], markdown: bool = False, show_speedup: bool = True) -> str:
    """Every workload's results table, as fixed-width text (the CLI) or Markdown (report.md, docs/, README), with
    the config's arm-against-arm pairs below it."""
    lines: list[str] = []
    for wname in results["workloads"]:
        rows = table_rows(results["workloads"][wname], show_speedup)
        pairs = pair_rows(results["workloads"][wname]) if show_speedup else []
        notes = table_notes(results, wname)
        if markdown:
            lines.append(f"**{wname}**\n")
            for header, body in ((TABLE_HEADER, rows), (PAIR_HEADER, pairs)):
                if not body:
                    continue
                lines.append("| " + " | ".join(header) + " |")
                lines.append("|" + "|".join("---" for _ in header) + "|")
                lines.extend("| " + " | ".join(r) + " |" for r in body)
                lines.append("")
            lines.extend(notes)
            lines.append("")
        else:
            lines.append(f"{wname}: " + notes[0])
            for header, body in ((TABLE_HEADER, rows), (PAIR_HEADER, pairs)):
                if not body:
                    continue
                widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
                lines.append("  " + "  ".join(h.ljust(n) for h, n in zip(header, widths)))
                lines.extend("  " + "  ".join(c.ljust(n) for c, n in zip(r, widths)) for r in body)
            lines.extend("  " + n for n in notes[1:])
    return "\n".join(lines).rstrip() + "\n"


def _span(seeds: list[int]) -> str:
    if seeds and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _g(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}"


def _f(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"
