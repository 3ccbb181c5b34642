"""scripts/branch_ceiling.py: how much of a run's future the data order leaves open, on real digits training."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("branch_ceiling", ROOT / "scripts" / "branch_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_branch_stats_follow_their_definitions():
    mod = _script()
    g = torch.Generator().manual_seed(0)
    now = {"w": torch.zeros(50)}
    mean = torch.randn(50, generator=g)
    ends = [{"w": mean + 0.5 * torch.randn(50, generator=g)} for _ in range(2)]
    s = mod.branch_stats(now, ends, ["w"])
    # With two branches the leave-one-out mean is the other branch: the ceiling is (1 + R2 of the other) / 2.
    assert s["r2_ceiling"] == pytest.approx((1 + s["r2_other_branch"]) / 2)
    same = mod.branch_stats(now, [{"w": mean}, {"w": mean.clone()}, {"w": mean.clone()}], ["w"])
    assert same["r2_ceiling"] == pytest.approx(1.0) and same["cos_mean"] == pytest.approx(1.0)
    still = mod.branch_stats(now, [{"w": torch.zeros(50)}, {"w": torch.zeros(50)}], ["w"])
    assert math.isnan(still["r2_ceiling"])  # nothing moved: no R2, not a division by zero
    # Many branches around one mean: the ceiling estimates 1 - noise / total without the leave-one-out's bias.
    many = [{"w": mean + 0.5 * torch.randn(50, generator=g)} for _ in range(400)]
    expect = 1 - 0.25 * 50 / (mean.pow(2).sum() + 0.25 * 50)
    assert mod.branch_stats(now, many, ["w"])["r2_ceiling"] == pytest.approx(float(expect), abs=0.03)


def test_the_trend_of_a_straight_path_is_exact():
    mod = _script()
    direction = torch.randn(30, generator=torch.Generator().manual_seed(1))
    snaps = {s: {"w": s * direction} for s in range(0, 110, 10)}
    end = {"w": 150 * direction}  # 50 steps on along the same line
    s = mod.trend_stats(snaps, 100, 50, [end, end], ["w"])
    assert s["r2_trend"] == pytest.approx(1.0) and s["cos_trend"] == pytest.approx(1.0)


def test_forecasters_are_scored_on_the_neuron_layout():
    """On a straight path a linear forecaster's jump is the future (R2 1, and it lands there); persistence scores 0
    by definition and lands where the run is; DMD read as a forecaster fits the path too; a horizon that is not a
    whole number of 10-step snapshots has no score."""
    from sleepbot.forecast.baselines import LinearForecaster, PersistenceForecaster

    mod = _script()
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 2), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    g = torch.Generator().manual_seed(2)
    rate = {k: torch.randn(p.shape, generator=g) for k, p in net.named_parameters()}
    snaps = {s: {k: s * v for k, v in rate.items()} for s in range(0, 110, 10)}
    end = {k: 150 * v for k, v in rate.items()}
    fcs = {"line": LinearForecaster(context=5), "still": PersistenceForecaster(context=5)}
    x, y = torch.randn(8, 2, 2, generator=g), torch.randint(0, 2, (8,), generator=g)
    data = {"train": (x, y), "val": (x, y)}
    s = mod.forecaster_stats(net, snaps, 100, 50, [end, end], fcs, data)
    assert s["r2_line"] == pytest.approx(1.0) and s["cos_line"] == pytest.approx(1.0)
    assert s["r2_still"] == 0.0
    # where each jump lands: the linear one at the future, persistence where the run is
    assert s["loss_line"] == pytest.approx(mod.evaluate(net, end, data)["train_loss"], rel=1e-5)
    assert s["loss_still"] == pytest.approx(mod.evaluate(net, snaps[100], data)["train_loss"], rel=1e-5)
    # a sleep strategy read as a forecaster: DMD fits the straight path exactly too
    dmd = mod.StrategyPredictor(_strategy("dmd"))
    assert mod.forecaster_stats(net, snaps, 100, 50, [end, end], {"dmd": dmd})["r2_dmd"] == pytest.approx(1.0)
    assert math.isnan(mod.forecaster_stats(net, snaps, 100, 45, [end, end], fcs)["r2_line"])


def _strategy(name: str):
    from sleepbot.sleep import make_strategy

    return make_strategy(name)


def _tiny_linear(seed: int):
    """A 3 -> 2 linear classifier, 16 random examples as both splits, its parameters now, and the generator."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    now = {k: p.detach().clone() for k, p in net.named_parameters()}
    return net, {"train": (x, y), "val": (x, y)}, now, g


def test_a_probe_along_a_straight_path_lands_on_the_mean():
    """Branches that move on one straight line: the probe points at the mean (cosine 1), its best length is the
    ratio of the horizons, and stretched it lands exactly where the mean lands."""
    mod = _script()
    net, data, now, g = _tiny_linear(3)
    rate = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in now.items()}
    ends = {h: [{k: now[k] + h * rate[k] for k in now} for _ in range(6)] for h in (10, 40)}
    rows = mod.probe_stats(net, now, ends, 40, list(now), data)
    assert [(r["branches"], r["probe_steps"]) for r in rows] == [(1, 10), (4, 10)]
    for r in rows:
        assert r["cos"] == pytest.approx(1.0) and r["best_length"] == pytest.approx(4.0)
        assert r["loss_stretched"] == pytest.approx(r["loss_at_mean"], rel=1e-5)
        assert r["loss_best_length"] == pytest.approx(r["loss_at_mean"], rel=1e-5)


def test_a_larger_batch_is_scored_as_a_prediction_of_the_branches():
    """A larger batch's future that is the branches' mean points along it (cosine 1, best length 1, so its R2 as
    it is equals its R2 at the best length), and its landing loss is the loss at that point."""
    mod = _script()
    net, data, now, g = _tiny_linear(4)
    step = {k: torch.randn(v.shape, generator=g) for k, v in now.items()}
    noise = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in now.items()}
    ends = [{k: now[k] + step[k] + s * noise[k] for k in now} for s in (1, -1)]
    mean = {k: now[k] + step[k] for k in now}
    s = mod.large_batch_stats(net, now, {8: mean}, ends, list(now), data)
    assert s["cos_batch8x"] == pytest.approx(1.0) and s["r2_batch8x"] == pytest.approx(
        s["r2_batch8x_best_length"]
    )
    assert 0 < s["r2_batch8x"] < 1
    at_mean = mod.evaluate(net, mean, data)
    assert (
        s["loss_batch8x"] == pytest.approx(at_mean["train_loss"]) and s["acc_batch8x"] == at_mean["val_acc"]
    )
    with pytest.raises(ValueError, match="batch size 65 for 64 examples"):
        next(mod.batches(64, 65, torch.Generator()))


def test_full_batch_branches_agree_and_minibatch_branches_do_not(tmp_path, capsys):
    """With one batch of the whole (subset of the) training split, every data order gives the same gradients:
    the branches coincide and the ceiling is 1. With batches of 8 they differ, and the ceiling is below 1."""
    mod = _script()
    common = [
        "--train-subset",
        "64",
        "--seeds",
        "3",
        "--steps",
        "10",
        "--horizons",
        "5",
        "10",
        "--branches",
        "3",
    ]
    full, small = tmp_path / "full.json", tmp_path / "small.json"
    shipped = "shipped=" + str(ROOT / "sleepbot" / "assets" / "forecaster.pt")
    assert (
        mod.main([*common, "--batch-size", "64", "--json", str(full), "--forecaster", shipped, "--dmd", "2"])
        == 0
    )
    assert mod.main([*common, "--batch-size", "8", "--large-batch", "8", "--json", str(small)]) == 0
    rows = json.loads(full.read_text())["rows"]
    assert [(r["step"], r["horizon"]) for r in rows] == [(10, 5), (10, 10)]
    for r in rows:
        assert r["pooled"]["r2_ceiling"] > 0.999 and r["pooled"]["r2_other_branch"] > 0.999
        assert set(r["per_tensor"]) == {n for n, _ in _net_params()}
        assert {"now", "one branch (mean over branches)", "mean of 2 branches"} <= set(r["points"])
        assert math.isnan(r["pooled"]["r2_shipped"])  # 2 snapshots by step 10: too few for its 5
    for r in json.loads(small.read_text())["rows"]:
        assert r["pooled"]["r2_ceiling"] < 0.99
        assert r["pooled"]["r2_other_branch"] < r["pooled"]["r2_ceiling"]
        # batch 8 x 8 is the whole subset: a full-batch future, scored against the batch-8 branches
        assert -1 < r["pooled"]["cos_batch8x"] <= 1 and r["pooled"]["loss_batch8x"] > 0
        assert 0 <= r["pooled"]["acc_batch8x"] <= 1
    assert "R2 ceiling" in capsys.readouterr().out
    md = tmp_path / "full.md"
    assert mod.main(["--from-json", str(full), str(small), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.count("| horizon (steps) | R2 ceiling |") == 2 and "\n| 10 | 1.000 | 1.000 |" in text
    assert (
        "| the trend | shipped |" in text
    )  # the first run scored the shipped forecaster, the second did not
    assert "| the trend | one branch, batch x8 |" in text
    assert (
        text.count("Where each point lands 10 steps on") == 2
        and "| mean of 2 branches | one branch, batch x8 |" in text
    )


def _net_params():
    from sleepbot.models import build_arch

    return build_arch("small_cnn", (1, 8, 8), 10).named_parameters()


def test_the_simulation_is_paired_and_counts_misses(tmp_path):
    """A target no run reaches is a miss in every arm; a target reached at the first check is reached alike by
    every arm (the jumps come after the first check)."""
    mod = _script()
    common = [
        "--no-branch-stats",
        "--train-subset",
        "64",
        "--batch-size",
        "16",
        "--seeds",
        "5",
        "--branches",
        "2",
        "--sleep-every",
        "10",
        "--sleep-horizon",
        "10",
        "--max-steps",
        "30",
        "--large-batch",
        "2",
    ]
    out = tmp_path / "sim.json"
    assert mod.main([*common, "--target", "1.01", "--json", str(out)]) == 0
    sim = json.loads(out.read_text())["simulation"]
    arms = sim["seeds"]["5"]
    assert all(a["steps"] is None for a in arms.values())
    assert arms["none"]["jumps"] == 0 and arms["oracle (one branch)"]["jumps"] == 2
    assert arms["none at batch x2"]["jumps"] == 0 and arms["one branch at batch x2"]["jumps"] == 2
    # the trace: every check, and where every jump landed (a jump changes the weights between two checks)
    oracle = arms["oracle (one branch)"]["trace"]
    assert [c[0] for c in oracle["checks"]] == [10, 20, 30] and [j[0] for j in oracle["landed"]] == [10, 20]
    assert oracle["landed"][0][1] != oracle["checks"][0][1] and arms["none"]["trace"]["landed"] == []
    assert sim["none"]["misses"] == 1 and sim["none"]["median_steps"] == 60  # a miss counts 2x the budget
    assert sim["pair"]["speedup"] == 1.0
    assert [q["vs"] for q in sim["pairs"]] == ["oracle (one branch)", "one branch at batch x2"]
    again = tmp_path / "again.json"
    assert mod.main([*common, "--target", "0.0", "--json", str(again)]) == 0
    arms = json.loads(again.read_text())["simulation"]["seeds"]["5"]
    assert {a["steps"] for a in arms.values()} == {10}
    md = tmp_path / "sim.md"
    assert mod.main(["--from-json", str(out), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "| none | 60 | 1 | 1.00x [nan, nan] |" in text  # one seed: no interval
    assert "| oracle (one branch) | 2 |" in text  # what the run kept of its 2 jumps


def test_what_a_run_keeps_of_a_jump():
    """Each jump is read against the check before it and the check 10 steps after; a jump with no later check (the
    run stopped) and arms that never jumped are left out; results without traces give nothing."""
    mod = _script()
    seeds = {
        "1": {
            "none": {"trace": {"checks": [[10, 1.0, 0.5], [20, 0.9, 0.55]], "landed": []}},
            "oracle": {
                "trace": {
                    "checks": [[10, 1.0, 0.5], [20, 0.8, 0.6]],
                    "landed": [[10, 0.5, 0.7], [20, 0.4, 0.8]],
                }
            },
        }
    }
    kept = mod.jump_keeps({"seeds": seeds})
    assert list(kept) == ["oracle"] and kept["oracle"]["jumps"] == 1
    v = kept["oracle"]
    assert (v["before_acc"], v["landed_acc"], v["after_acc"]) == (0.5, 0.7, 0.6)
    assert (v["before_loss"], v["landed_loss"], v["after_loss"]) == (1.0, 0.5, 0.8)
    assert mod.jump_keeps({"seeds": {"1": {"oracle": {"steps": 10, "jumps": 0}}}}) == {}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--branches", "1"], "--branches must be >= 2"),
        (["--optimizer", "schedulefree_adamw"], "Schedule-Free"),
        (["--forecaster", "no label"], "LABEL=PATH"),
        (["--data", "nosuch"], "unknown dataset 'nosuch'"),
        (["--train-subset", "64", "--large-batch", "4"], "each --large-batch multiple must give 1 to"),
    ],
)
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        _script().main(argv)
    assert message in capsys.readouterr().err
