"""The compare harness on a tiny real comparison: tuning, targets, statistics, resuming, bad configs."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
from _compare_fixture import TINY, tiny_comparison

from sleepbot.analysis import steps_to_target
from sleepbot.compare import (
    choose_lr,
    compare,
    format_table,
    load_results,
    load_runs,
    log_grid,
    parse_compare_config,
)
from sleepbot.errors import SleepbotError


@pytest.fixture(scope="session")
def comparison(tmp_path_factory):
    return tiny_comparison(tmp_path_factory)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, "unknown compare config key 'bogus'"),
        ({"seeds": 0}, "seeds must be >= 1"),
        ({"seeds": "many"}, "seeds must be a count or a list"),
        ({"base": {"data": {"name": "imagenet"}}}, "unknown data.name 'imagenet'"),
        ({"arms": ["none", "none"]}, "arm name 'none' appears twice"),
        ({"arms": [{"name": "x", "horizon": "far"}]}, "sleep.horizon"),
        ({"tune": {"lrs": [0.01, "fast"]}, "optimizers": None}, "tune.lrs must hold numbers"),
        ({"tune": {"seeds": 2, "seed_start": 6}}, r"tuning seeds \[6\] are also seeds of the comparison"),
        ({"arms": [{"name": "x", "strategy": "linear", "optimizer": "lion"}]}, "unknown optimizer 'lion'"),
        ({"reference": "sgd"}, "reference optimizer 'sgd' is not among the optimizers"),
        (
            {"optimizers": [{"name": "a", "lrs": [1e-3]}, {"name": "b", "lrs": [1e-3, 1e-2]}]},
            "the same tuning budget",
        ),
        ({"optimizers": [{"name": "a", "model": {"optimizer": "lion"}}]}, "unknown model.optimizer 'lion'"),
        ({"optimizers": [{"name": "a", "model": {"lr": 0.1}}]}, "give the grid as optimizers"),
        ({"tune": {"step": 3}}, "unknown tune key 'step'"),
        ({"arms": ["none", {"name": "../x", "strategy": "linear"}]}, "arm name '../x' must be"),
        ({"arms": ["none", {"name": "x", "strategy": "dream"}]}, "unknown sleep.strategy 'dream'"),
        ({"pairs": [["oracle", "dream"]]}, r"pairs\[0\]: unknown arm 'dream'; valid: none, "),
        ({"pairs": [["linear", "linear"]]}, "compares arm 'linear' with itself"),
        ({"pairs": [["linear"]]}, r"pairs\[0\] must be \[arm, against\]"),
        ({"pairs": "oracle"}, "must be a list of"),
    ],
)
def test_bad_compare_configs_are_one_line_errors(change, message):
    values = copy.deepcopy(TINY)
    values.update(change)
    values = {k: v for k, v in values.items() if v is not None}
    with pytest.raises(SleepbotError, match=message) as info:
        parse_compare_config(values)
    assert "\n" not in str(info.value)


def test_config_defaults_add_the_baseline_and_log_grid():
    cfg = parse_compare_config(
        {"arms": ["linear"], "seeds": [3, 4], "tune": {"low": 1e-3, "high": 1e-1, "num": 3}}
    )
    assert [a.name for a in cfg.arms] == ["none", "linear"]
    assert [o.name for o in cfg.optimizers] == ["adam"] and cfg.reference == "adam"
    assert cfg.optimizers[0].lrs == [1e-3, 1e-2, 1e-1] == log_grid(1e-3, 1e-1, 3)
    # lrs are tuned on development seeds, never on the comparison's own seeds
    assert cfg.seeds == [3, 4] and cfg.tune_seeds == [900, 901, 902]
    # every base optimizer runs alone: the reference as `none`, the others under their own name
    two = parse_compare_config(
        {"optimizers": [{"name": "adam"}, {"name": "sgd", "model": {"optimizer": "sgd"}}], "arms": ["linear"]}
    )
    assert [(a.name, a.optimizer, a.sleep["strategy"]) for a in two.arms] == [
        ("none", "adam", "none"),
        ("sgd", "sgd", "none"),
        ("linear", "adam", "linear"),
    ]


def _run(final_accs, steps=(10, 20, 30)):
    return [
        {"val_step": list(steps), "val_acc": list(accs), "config": {"trainer": {"max_steps": steps[-1]}}}
        for accs in final_accs
    ]


def test_choose_lr_best_median_then_fewer_steps_on_a_tie():
    table = {
        1e-3: _run([(0.5, 0.7, 0.9), (0.5, 0.7, 0.9)]),  # reaches 0.9 at step 30
        1e-2: _run([(0.9, 0.9, 0.9), (0.6, 0.9, 0.9)]),  # the same median final accuracy, reached sooner
        3e-2: _run([(0.9, 0.8, 0.8), (0.9, 0.8, 0.8)]),  # fast but ends lower
    }
    lr, rows = choose_lr(table)
    assert lr == 1e-2
    assert [r["median_steps_to_best"] for r in rows] == [30.0, 15.0, 10.0]
    lr, _ = choose_lr({1e-3: _run([(0.5, 0.7, 0.8)]), 1e-2: _run([(0.5, 0.6, 0.7)])})
    assert lr == 1e-3
    # With a target (an alternative optimizer): the fewest median steps to it, whatever the final accuracy.
    lr, rows = choose_lr(table, target=0.85)
    assert lr == 3e-2 and [r["median_steps_to_target"] for r in rows] == [30.0, 15.0, 10.0]
    # misses count miss_factor x the budget, so a fast-but-unreliable lr loses
    lr, _ = choose_lr(
        {1e-3: _run([(0.5, 0.9, 0.9)] * 3), 1e-2: _run([(0.9, 0.9, 0.9), (0.5,) * 3, (0.5,) * 3])}, target=0.9
    )
    assert lr == 1e-3


# ------------------------------------------------------------------------------------- results
def test_results_files_and_tuning(comparison):
    res = load_results(comparison)
    w = res["workloads"]["default"]
    assert w["tuning"]["adam"]["grid"] == [3e-3, 1e-2] and w["tuning"]["adam"]["lr"] in (3e-3, 1e-2)
    assert w["tuning"]["momentum"]["grid"] == [3e-2, 1e-1] and w["tuning"]["momentum"]["seeds"] == [100]
    assert w["tuning"]["adam"]["rule"] == "best final val acc"
    assert w["tuning"]["momentum"]["rule"].startswith("fewest median steps to val acc")
    arms = ["none", "momentum", "linear", "oracle", "linear+momentum"]
    assert list(w["arms"]) == arms and w["best_alternative"] == "momentum"
    assert all(a["n"] == 2 for a in w["arms"].values()) and not res["errors"]
    with open(comparison / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == arms
    text, md = format_table(res), format_table(res, markdown=True)
    assert "steps to target" in text and "vs best alternative" in md
    assert "linear+momentum: settings chosen on nothing (a test)." in md
    assert "momentum: lr" in md and "chosen on tuning seeds 100" in md


def test_speedups_are_paired_against_the_baseline_and_the_best_alternative(comparison):
    from sleepbot.analysis import paired_speedup

    w = load_results(comparison)["workloads"]["default"]
    arms = w["arms"]
    for name in ("linear", "linear+momentum", "oracle"):
        a = arms[name]
        for key, ref in (("speedup", "none"), ("speedup_vs_best", "momentum")):
            expect = paired_speedup(arms[ref]["steps_to_target"], a["steps_to_target"], n_boot=2000)
            assert a[key]["vs"] == ref and a[key]["ratio"] == pytest.approx(expect.ratio)
    assert "speedup" not in arms["none"] and "speedup_vs_best" not in arms["momentum"]
    # the composed arm runs at its own optimizer's tuned lr
    runs = load_runs(comparison)
    lr = w["tuning"]["momentum"]["lr"]
    assert {r["config"]["model"]["optimizer"] for r in runs["linear+momentum"]} == {"momentum"}
    assert {r["config"]["model"]["lr"] for r in runs["linear+momentum"] + runs["momentum"]} == {lr}


def test_pairs_are_one_arm_against_another_paired_by_seed(comparison):
    from sleepbot.analysis import paired_speedup
    from sleepbot.compare import format_table

    results = load_results(comparison)
    w = results["workloads"]["default"]
    (pair,) = w["pairs"]
    expect = paired_speedup(w["arms"]["linear"]["steps_to_target"], w["arms"]["oracle"]["steps_to_target"])
    assert (pair["arm"], pair["vs"], pair["n_pairs"]) == ("oracle", "linear", 2)
    assert (pair["ratio"], pair["p_value"]) == (pytest.approx(expect.ratio), pytest.approx(expect.p_value))
    md = format_table(results, markdown=True)
    assert "| arm | against | pairs | speedup [95% CI] | Wilcoxon p |" in md
    assert f"| oracle | linear | 2 | {pair['ratio']:.2f}x [" in md


def test_target_and_steps_match_the_runs(comparison):
    res = load_results(comparison)
    w = res["workloads"]["default"]
    runs = load_runs(comparison)
    finals = [r["val_acc"][-1] for r in runs["none"]]
    assert w["target"] == pytest.approx(float(np.median(finals)))
    for arm, rs in runs.items():
        seeds = w["arms"][arm]["seeds"]
        by_seed = {r["seed"]: r for r in rs}
        raw = [steps_to_target(by_seed[s]["val_step"], by_seed[s]["val_acc"], w["target"], 40) for s in seeds]
        assert w["arms"][arm]["optimizer_steps_to_target"] == raw
        # A sleep's held-batch forward passes before the target count a third of a step each; a miss is a miss.
        cost = [
            sum(e["forwards"] for e in by_seed[s]["events"] if e["step"] < st) / 3 if st <= 40 else 0.0
            for s, st in zip(seeds, raw)
        ]
        assert w["arms"][arm]["steps_to_target"] == pytest.approx([a + b for a, b in zip(raw, cost)])
        if arm == "linear":  # check_batches 1: every decision after the context filled cost its forwards
            assert all(
                e["forwards"] == 2
                for r in rs
                for e in r["events"]
                if e["reason"] != "history: 1 of 2 snapshots"
            )
        opt = w["arms"][arm]["optimizer"]
        for r in rs:  # the tuned lr of the arm's optimizer is used, on the same seeds
            assert r["config"]["model"]["lr"] == w["tuning"][opt]["lr"]
            # "test acc at best val" belongs to the first step with the best validation accuracy
            assert r["best_val_step"] == r["val_step"][int(np.argmax(r["val_acc"]))]
            assert 0 < r["test_acc_at_best_val"] <= 1
    assert sorted(w["arms"]["linear"]["seeds"]) == sorted(w["arms"]["none"]["seeds"]) == [5, 6]


def test_wall_clock_to_target_reads_each_runs_training_seconds(comparison):
    res = load_results(comparison)
    w = res["workloads"]["default"]
    runs = load_runs(comparison)
    for arm, rs in runs.items():
        by_seed = {r["seed"]: r for r in rs}
        st = w["arms"][arm]
        for seed, secs, steps in zip(st["seeds"], st["seconds_to_target"], st["optimizer_steps_to_target"]):
            r = by_seed[seed]
            times = r["val_train_seconds"]
            # one training time per validation, increasing, within the run's fit time
            assert len(times) == len(r["val_step"]) and all(b >= a for a, b in zip(times, times[1:]))
            assert 0 < times[-1] <= r["fit_seconds"]
            if steps <= 40:  # a hit: the time of the first validation at the target
                assert secs == times[r["val_step"].index(int(steps))]
            else:  # a miss: twice the run's training time
                assert secs == pytest.approx(2 * times[-1])
        if arm != "none":
            assert st["wall_speedup"]["vs"] == "none" and st["wall_speedup"]["ratio"] > 0


def test_oracle_reads_its_own_seeds_no_sleep_run(comparison):
    runs = load_runs(comparison)
    none_files = {r["seed"]: r["record_path"] for r in runs["none"]}
    for r in runs["oracle"]:
        assert r["config"]["sleep"]["options"]["run"] == none_files[r["seed"]]
        assert any(e["accepted"] for e in r["events"])


def test_resume_skips_finished_runs_and_redoes_a_missing_one_identically(comparison, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(comparison, out)
    res = load_results(out)
    jsons = sorted((out / "runs").glob("*__linear__*.json"))
    victim = jsons[0]
    old = json.loads(victim.read_text())
    victim.unlink()
    others = [p for p in (out / "runs").glob("*.json") if p != victim]
    before = {p: p.stat().st_mtime_ns for p in others}
    again = compare(parse_compare_config(TINY), out, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in others} == before  # finished runs are not rerun
    new = json.loads(victim.read_text())  # redone: same seed, same numbers, sleep events included
    assert new["val_acc"] == old["val_acc"] and new["test_acc_at_best_val"] == old["test_acc_at_best_val"]
    keys = ("step", "accepted", "rel_jump")  # not `seconds` (timing) nor NaN losses (NaN != NaN)
    assert [[e.get(k) for k in keys] for e in new["events"]] == [
        [e.get(k) for k in keys] for e in old["events"]
    ]
    for arm, st in again["workloads"]["default"]["arms"].items():
        assert st["steps_to_target"] == res["workloads"]["default"]["arms"][arm]["steps_to_target"]


def test_refuses_an_out_dir_of_another_config(comparison, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "compare_config.json").write_text("{}")
    with pytest.raises(SleepbotError, match="different config"):
        compare(parse_compare_config(TINY), out, workers=1, progress=False)


def test_load_results_errors(tmp_path):
    with pytest.raises(SleepbotError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SleepbotError, match="not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": 99}')
    with pytest.raises(SleepbotError, match="not a sleepbot comparison"):
        load_results(tmp_path)


def test_cli_compare_bad_config_is_one_line(tmp_path, capsys):
    from sleepbot.cli import main

    bad = tmp_path / "c.yaml"
    bad.write_text("arms: [none]\nbogus: 1\n")
    assert main(["compare", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sleepbot: error:") and "bogus" in err and "\n" not in err
