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
    # Resampled medians of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, symmetric about the median, and
    # the jackknife is symmetric too: BCa's bias correction and acceleration are 0, so the ends are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=3) == (0.0, 1.0)
    s = summarize([0.0, 1.0], n_boot=4000, seed=3)
    assert (s.median, s.lo, s.hi, s.n) == (0.5, 0.0, 1.0, 2)


def test_bootstrap_ci_is_scipys_bca_and_deterministic():
    from scipy.stats import bootstrap

    x = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0, 5.5]
    ref = bootstrap((x,), np.median, n_resamples=2000, method="BCa", random_state=np.random.default_rng(1))
    assert bootstrap_ci(x, seed=1) == (ref.confidence_interval.low, ref.confidence_interval.high)
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    lo, hi = bootstrap_ci(x, seed=1)
    assert 1.0 <= lo <= np.median(x) <= hi <= 9.0


def test_bootstrap_ci_covers_the_true_median():
    # 100 samples of n = 10 from Exp(1), whose median is ln 2. Measured with these seeds: a 95% interval covers it
    # 93 times, an 80% one 76 times and the sample's [min, max] ~100 times, so [85, 99] passes only a 95% interval.
    # (A bootstrap interval of a median from 10 values undercovers a little; that is why the floor is 85.)
    hits = 0
    for i in range(100):
        x = np.random.default_rng(i).exponential(size=10)
        lo, hi = bootstrap_ci(x, seed=i)
        hits += lo <= math.log(2) <= hi
    assert 85 <= hits <= 99


def test_bootstrap_ci_degenerate_samples():
    assert bootstrap_ci([7.0] * 5) == (7.0, 7.0)  # BCa alone would give NaN: one value in every resample
    lo, hi = bootstrap_ci([5.0])  # one seed: no interval
    assert math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    s = summarize([5.0])
    assert s.median == 5.0 and s.n == 1 and math.isnan(s.lo) and math.isnan(s.hi)
    # Ties (steps are multiples of the validation interval) leave BCa's acceleration 0 / 0: the percentile
    # interval of the same resamples is returned instead of NaN.
    lo, hi = bootstrap_ci([230, 240, 240, 240, 240, 240, 240, 250, 260, 300])
    assert lo <= 240 <= hi and np.isfinite([lo, hi]).all()


def test_summarize_drops_nan_and_handles_empty():
    assert summarize([float("nan"), 2.0]).median == 2.0
    s = summarize([float("nan")])
    assert s.n == 0 and math.isnan(s.median)


def test_paired_speedup_exact_halving():
    sp = paired_speedup([100, 200, 300, 400], [50, 100, 150, 200])
    # Every resample keeps arm = base / 2 seed by seed, so the CI collapses onto the ratio.
    assert (sp.ratio, sp.lo, sp.hi, sp.n) == (2.0, 2.0, 2.0, 4)
    one = paired_speedup([100], [50])  # one seed: a ratio, no interval
    assert one.ratio == 2.0 and math.isnan(one.lo) and math.isnan(one.hi)


def test_paired_speedup_interval_is_narrower_than_unpaired_for_correlated_seeds():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    base = rng.lognormal(np.log(300), 0.4, size=12)  # seeds differ a lot...
    arm = base / 1.25 * rng.lognormal(0, 0.03, size=12)  # ...and each arm run tracks its seed's baseline
    sp = paired_speedup(base, arm)
    ratio = lambda b, a, axis=-1: np.median(b, axis=axis) / np.median(a, axis=axis)  # noqa: E731
    unpaired = bootstrap(
        (base, arm), ratio, n_resamples=2000, method="BCa", random_state=np.random.default_rng(0)
    ).confidence_interval
    assert sp.lo <= sp.ratio <= sp.hi
    assert (sp.hi - sp.lo) < 0.5 * (unpaired.high - unpaired.low)


def test_paired_speedup_resamples_pairs_together():
    # Swapping two seeds' arm values keeps both medians (the ratio) but breaks the pairing: the interval widens.
    base = np.array([100.0, 150, 200, 250, 300, 350, 400, 450])
    arm = base / 2
    shuffled = arm[[7, 6, 5, 4, 3, 2, 1, 0]]
    sp, sh = paired_speedup(base, arm), paired_speedup(base, shuffled)
    assert sp.ratio == sh.ratio == 2.0
    assert sp.lo == sp.hi == 2.0 and sh.hi - sh.lo > 1.0


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


def test_fraction_of_oracle_is_a_paired_bca_interval():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(1)
    base = rng.normal(400, 40, size=10).round(-1)
    arm, oracle = base - rng.normal(60, 5, size=10), base - rng.normal(120, 5, size=10)
    v, lo, hi = fraction_of_oracle(base, arm, oracle)

    def frac(b, a, o, axis=-1):
        mb = np.median(b, axis=axis)
        return (mb - np.median(a, axis=axis)) / (mb - np.median(o, axis=axis))

    ref = bootstrap(
        (base, arm, oracle),
        frac,
        paired=True,
        n_resamples=2000,
        method="BCa",
        random_state=np.random.default_rng(0),
    ).confidence_interval
    assert (lo, hi) == (ref.low, ref.high)
    assert lo < v < hi and 0.3 < lo and hi < 0.7  # the arm saves about half of what the oracle saves


def test_fraction_of_oracle_degenerate_cases():
    v, lo, hi = fraction_of_oracle([300], [250], [200])  # one seed: a value, no interval
    assert v == 0.5 and math.isnan(lo) and math.isnan(hi)
    # The oracle saves steps at the median but not in every resample: the ratio is unbounded there.
    v, lo, hi = fraction_of_oracle([100, 200, 300], [90, 190, 290], [110, 150, 310])
    assert v == pytest.approx(0.2) and math.isnan(lo) and math.isnan(hi)


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
