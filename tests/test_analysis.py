"""Statistics against hand-computed cases: a known miss, a tie, a CI on a fixed sample, saturation signals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sleepbot.analysis import (
    align_curves,
    bootstrap_ci,
    curve_auc,
    fit_asymptote,
    fraction_of_oracle,
    layer_dynamics,
    paired_speedup,
    rate_of_change,
    relative_spread,
    settled_step,
    steps_to_target,
    summarize,
    wilcoxon_p,
)


# ------------------------------------------------------------------------------------- steps to target
def test_steps_to_target_first_hit_counts_equality():
    assert steps_to_target([10, 20, 30], [0.5, 0.8, 0.9], target=0.8, budget=30) == 20.0


def test_steps_to_target_known_miss_is_twice_the_budget():
    assert steps_to_target([10, 20, 30], [0.5, 0.6, 0.7], target=0.8, budget=30) == 60.0
    assert steps_to_target([10, 20, 30], [0.5, 0.6, 0.7], target=0.8, budget=30, miss_factor=3) == 90.0


def test_steps_to_target_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        steps_to_target([10, 20], [0.5], target=0.8, budget=30)


# ------------------------------------------------------------------------------------- bootstrap and tests
def test_bootstrap_ci_of_two_values_by_hand():
    # Resampled medians of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=3) == (0.0, 1.0)
    s = summarize([0.0, 1.0], n_boot=4000, seed=3)
    assert (s.median, s.lo, s.hi, s.n) == (0.5, 0.0, 1.0, 2)


def test_bootstrap_ci_constant_sample_and_determinism():
    assert bootstrap_ci([7.0] * 5) == (7.0, 7.0)
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    lo, hi = bootstrap_ci(x, seed=1)
    assert 1.0 <= lo <= np.median(x) <= hi <= 9.0


def test_summarize_drops_nan_and_handles_empty():
    assert summarize([float("nan"), 2.0]).median == 2.0
    s = summarize([float("nan")])
    assert s.n == 0 and math.isnan(s.median)


def test_paired_speedup_exact_halving():
    sp = paired_speedup([100, 200, 300, 400], [50, 100, 150, 200])
    # Every resample keeps arm = base / 2 seed by seed, so the CI collapses onto the ratio.
    assert (sp.ratio, sp.lo, sp.hi, sp.n) == (2.0, 2.0, 2.0, 4)


def test_wilcoxon_known_p_and_all_ties():
    # Six positive differences of distinct size: the exact two-sided p is 2 / 2^6.
    assert wilcoxon_p([2, 4, 6, 8, 10, 12], [1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)
    assert wilcoxon_p([1, 2, 3], [1, 2, 3]) == 1.0


def test_fraction_of_oracle_by_hand():
    base = [100, 200, 300]
    arm = [75, 150, 225]  # saves 50 at the median
    oracle = [0, 100, 200]  # saves 100 at the median
    v, lo, hi = fraction_of_oracle(base, arm, oracle)
    assert v == pytest.approx(0.5)
    assert lo <= v <= hi
    v, lo, hi = fraction_of_oracle(base, arm, base)  # an oracle that saves nothing: undefined
    assert math.isnan(v) and math.isnan(lo)


def test_curve_auc_trapezoid_by_hand():
    assert curve_auc([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert curve_auc([5], [0.4]) == 0.4


def test_align_curves_interpolates_and_never_extrapolates():
    grid, vals = align_curves([([0, 10, 20], [0.0, 0.5, 1.0]), ([0, 20], [0.0, 1.0]), ([10, 20], [0.2, 0.4])])
    assert grid.tolist() == [0, 10, 20]
    assert vals[1].tolist() == [0.0, 0.5, 1.0]
    assert math.isnan(vals[2, 0]) and vals[2, 1:].tolist() == [0.2, 0.4]


# ------------------------------------------------------------------------------------- training dynamics
def test_relative_spread_by_hand():
    out = relative_spread([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]])
    assert out[0] == pytest.approx(0.5)  # mean 2, population std 1
    assert out[1] == 0.0
    assert math.isnan(out[2])
    with pytest.raises(ValueError):
        relative_spread([1.0, 2.0])


def test_rate_of_change_is_exact_on_a_line_and_matches_a_loop():
    steps = np.arange(0, 100, 5, dtype=float)
    rng = np.random.default_rng(0)
    values = 0.3 * steps + rng.normal(size=steps.size)
    fast = rate_of_change(steps, values, window=4)
    for i in range(3, steps.size):  # slow reference: numpy's polyfit on each trailing window
        assert fast[i] == pytest.approx(np.polyfit(steps[i - 3 : i + 1], values[i - 3 : i + 1], 1)[0])
    assert np.isnan(fast[:3]).all()
    assert rate_of_change(steps, 2 * steps + 1, window=3)[5] == pytest.approx(2.0)


def test_settled_step_cases():
    assert settled_step([1, 2, 3, 4], [1.0, 0.0, 0.0, 0.0], tol=0.5) == 2.0
    assert settled_step([1, 2, 3, 4], [1.0, 0.0, 1.0, 0.0], tol=0.5) == 4.0
    assert settled_step([1, 2, 3, 4], [0.0, 0.0, 0.0, 1.0], tol=0.5) is None
    assert settled_step([1, 2, 3], [float("nan"), 0.1, 0.1], tol=0.5) == 2.0


def test_layer_dynamics_reads_a_run_like_object():
    class Run:
        steps = np.arange(50)
        layers = ["a"]

        def norms(self, layer):
            t = np.arange(50.0)[:, None]
            return np.hstack([1 + 0 * t, 1 + np.minimum(t, 20) / 10])  # spread grows until step 20, then flat

    d = layer_dynamics(Run(), window=5, tol=1e-6)["a"]
    assert d.spread.shape == (50,)
    assert d.settled_step == 24.0  # the first window that lies entirely on the flat part ends at step 24


def test_fit_asymptote_recovers_an_exact_curve():
    t = np.arange(0, 1001, 10, dtype=float)
    y = 0.95 - 0.85 * np.exp(-t / 100)
    fit = fit_asymptote(t, y, tol=0.01)
    assert fit.value == pytest.approx(0.95, abs=1e-6)
    assert fit.tau == pytest.approx(100, rel=1e-4)
    # By hand: 0.85 exp(-t / 100) = 0.01 at t = 100 ln 85.
    assert fit.saturation_step == pytest.approx(100 * math.log(85), rel=1e-4)
    assert fit.saturated and fit.r2 > 0.999999


def test_fit_asymptote_not_saturated_and_capped():
    t = np.arange(0, 200, 10, dtype=float)
    slow = fit_asymptote(t, 0.9 - 0.8 * np.exp(-t / 1000))
    assert not slow.saturated and slow.saturation_step > t[-1]
    capped = fit_asymptote(t, np.minimum(1.0, 1.3 - 1.2 * np.exp(-t / 30)))
    assert capped.value <= 1.0


# ------------------------------------------------------------------------------------- early stopping
def test_saturation_stopping_decision_without_a_trainer():
    from sleepbot.stopping import SaturationStopping

    cb = SaturationStopping(min_points=5, tol=0.01)
    t = np.arange(10, 1001, 10)
    cb.steps, cb.values = t[:20].tolist(), (0.95 - 0.85 * np.exp(-t[:20] / 100)).tolist()
    assert not cb.curve_saturated()  # at step 200 the curve is still 0.11 below its asymptote
    cb.steps, cb.values = t.tolist(), (0.95 - 0.85 * np.exp(-t / 100)).tolist()
    assert cb.curve_saturated()
    state = cb.state_dict()
    other = SaturationStopping()
    other.load_state_dict(state)
    assert other.steps == cb.steps and other.values == cb.values


def test_saturation_stopping_stops_a_real_run(tiny_config):
    from sleepbot.stopping import SaturationStopping
    from sleepbot.training import run_training

    cfg = tiny_config
    cfg.model.lr = 1e-2
    cfg.trainer.max_steps = 400
    cb = SaturationStopping(tol=0.02, min_points=5, patience=1, spread_tol=1e-2)
    result = run_training(cfg, callbacks=[cb], test=False, quiet=True)
    assert cb.stopped_step is not None and cb.stopped_step < 400
    assert result.steps == cb.stopped_step
    assert set(cb.spreads) == {"net.0.0", "net.0.2", "net.1"}
