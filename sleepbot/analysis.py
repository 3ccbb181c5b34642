"""Statistics of training runs: steps to a target, bootstrap confidence intervals, paired tests, saturation.

Conventions (the protocol of AlgoPerf and NiNo, see PRIOR_ART.md):
- steps to target: the first validation step whose accuracy is >= the target; a run that never reaches it counts
  as `miss_factor` (2) times the step budget, so a miss is penalised rather than dropped;
- speedup of an arm over the baseline: median baseline steps / median arm steps (> 1 is faster), with a bootstrap
  CI over seeds resampled in pairs (the same seeds run in every arm);
- the paired test is Wilcoxon's signed-rank test on per-seed step differences.

Confidence intervals are scipy.stats.bootstrap's BCa intervals (bias-corrected and accelerated), with a fixed
random state so the same numbers give the same interval. Three cases BCa cannot handle are decided here, the same
way for every statistic (see `_bootstrap`): one observation has no interval (NaN); a bootstrap distribution with a
single value (every seed alike, or every pair in the same ratio) gives that value as both ends; and ties that leave
BCa's acceleration 0 / 0 fall back to the percentile interval of the same resamples. Steps to target are multiples
of the validation interval, so that last case is common for medians of steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def steps_to_target(
    steps: Sequence[float], accs: Sequence[float], target: float, budget: float, miss_factor: float = 2.0
) -> float:
    """The first step at which validation accuracy reaches `target`, or `miss_factor * budget` if never.

    Args:
        steps: validation steps, increasing.
        accs: validation accuracy at those steps.
        target: accuracy to reach (>=).
        budget: the run's step budget (max_steps).
        miss_factor: the penalty multiple for a run that misses.
    """
    steps_a = np.asarray(steps, dtype=float)
    accs_a = np.asarray(accs, dtype=float)
    if steps_a.shape != accs_a.shape:
        raise ValueError(f"steps and accs differ in length: {steps_a.shape} vs {accs_a.shape}")
    hit = np.nonzero(accs_a >= target)[0]
    return float(steps_a[hit[0]]) if hit.size else float(miss_factor * budget)


def _bootstrap(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., Any],
    n_boot: int,
    level: float,
    seed: int,
) -> tuple[float, float]:
    """BCa interval of `statistic(*samples)`, resampling the samples' observations together (paired).

    The cases BCa leaves undefined, in order: fewer than 2 observations, or a NaN among the bootstrap values (the
    statistic is undefined on some resamples): (NaN, NaN); one value in the whole bootstrap distribution: that
    value twice; BCa's own NaN (ties make its jackknife acceleration 0 / 0): the percentile interval of the same
    resamples.
    """
    from scipy.stats import bootstrap

    if samples[0].size < 2:
        return float("nan"), float("nan")
    common = dict(
        paired=len(samples) > 1,
        vectorized=None,  # statistics that take `axis` (np.median does) get all resamples at once
        confidence_level=level,
        random_state=np.random.default_rng(seed),  # `rng` from scipy 1.15; this spelling works from 1.10
    )
    with warnings.catch_warnings():
        # BCa on a degenerate sample warns before returning NaN; the NaN is handled below.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*BCa confidence interval cannot be calculated.*")
        res = bootstrap(samples, statistic, n_resamples=n_boot, method="BCa", **common)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    if np.isnan(dist).any():
        return float("nan"), float("nan")
    if dist.min() == dist.max():
        return float(dist[0]), float(dist[0])
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isnan(lo) or np.isnan(hi):
        res = bootstrap(
            samples, statistic, n_resamples=0, bootstrap_result=res, method="percentile", **common
        )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo, hi


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[..., float] = np.median,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """BCa bootstrap confidence interval of `stat(values)` (scipy.stats.bootstrap); deterministic for a seed.

    Args:
        values: the sample (one value per seed).
        stat: the statistic; one that takes `axis` is evaluated on all resamples at once.
        n_boot: resamples.
        level: confidence level.
        seed: the resampling's random state.

    Returns:
        (lo, hi). Fewer than 2 values have no interval: (NaN, NaN), so one seed never gets a CI. A sample whose
        resamples all give the same statistic (all values equal) returns that value as both ends; when ties leave
        BCa undefined, the percentile interval of the same resamples is returned.
    """
    x = np.asarray(values, dtype=float)
    return _bootstrap((x,), stat, n_boot, level, seed)


@dataclass
class Speedup:
    """Median-steps ratio baseline / arm with a paired BCa bootstrap CI, and the Wilcoxon p-value."""

    ratio: float
    lo: float
    hi: float
    p_value: float
    n: int


def _median_ratio(b: np.ndarray, a: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(b, axis=axis) / np.median(a, axis=axis)


def paired_speedup(
    base_steps: Sequence[float],
    arm_steps: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Speedup:
    """Speedup of an arm over the baseline on the same seeds (index i of both lists is the same seed).

    The CI is a BCa bootstrap interval that resamples seeds, each with both of its runs (`paired=True`), so a
    seed that is slow in both arms moves numerator and denominator together. With one seed, lo and hi are NaN.
    """
    b = np.asarray(base_steps, dtype=float)
    a = np.asarray(arm_steps, dtype=float)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {b.shape} and {a.shape}")
    lo, hi = _bootstrap((b, a), _median_ratio, n_boot, level, seed)
    return Speedup(ratio=float(_median_ratio(b, a)), lo=lo, hi=hi, p_value=wilcoxon_p(b, a), n=int(b.size))


def wilcoxon_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; 1.0 when every pair is tied."""
    from scipy.stats import wilcoxon

    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox").pvalue)


# ------------------------------------------------------------------------------------- curves and summaries
def curve_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Area under a validation curve divided by its step span: the curve's mean height (trapezoid rule).

    Normalising by the span makes runs of different lengths comparable; a curve that rises earlier scores higher.
    A single point returns that point's value.
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(
            f"steps and values must be 1-D of equal, non-zero length, got {s.shape} and {v.shape}"
        )
    if s.size == 1 or s[-1] == s[0]:
        return float(v[-1])
    return float(np.sum((v[1:] + v[:-1]) * np.diff(s)) / 2.0 / (s[-1] - s[0]))


@dataclass
class Summary:
    """Median of a sample with its BCa bootstrap confidence interval (NaN ends for fewer than 2 values)."""

    median: float
    lo: float
    hi: float
    n: int


def summarize(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Summary:
    """Median and BCa bootstrap CI of `values` (NaNs dropped; see `bootstrap_ci`); all NaN when nothing is left."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    lo, hi = bootstrap_ci(x, n_boot=n_boot, level=level, seed=seed)
    return Summary(float(np.median(x)), lo, hi, int(x.size))


def _oracle_fraction(b: np.ndarray, a: np.ndarray, o: np.ndarray, axis: int = -1) -> np.ndarray:
    """(med b - med a) / (med b - med o), NaN where the oracle saves nothing (med o >= med b)."""
    mb, ma, mo = np.median(b, axis=axis), np.median(a, axis=axis), np.median(o, axis=axis)
    gain = mb - mo
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gain > 0, (mb - ma) / np.where(gain > 0, gain, 1.0), np.nan)


def fraction_of_oracle(
    base_steps: Sequence[float],
    arm_steps: Sequence[float],
    oracle_steps: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """An arm's step saving as a fraction of the oracle's: (med base - med arm) / (med base - med oracle).

    1.0 means the arm saves as many steps as jumping to the run's own recorded future; 0 means it saves nothing;
    negative means it costs steps. The three lists are paired by seed; the BCa CI resamples seeds in triples.

    Returns:
        (value, lo, hi). The value is NaN where the oracle saves no steps (the ratio is undefined). lo and hi are
        NaN as well with one seed, and when the oracle saves nothing in some resamples: the ratio is unbounded
        there, so no finite interval covers it.
    """
    b, a, o = (np.asarray(x, dtype=float) for x in (base_steps, arm_steps, oracle_steps))
    if not (b.shape == a.shape == o.shape) or b.ndim != 1 or b.size == 0:
        raise ValueError(
            f"paired samples must be 1-D and of equal length, got {b.shape}, {a.shape}, {o.shape}"
        )
    value = float(_oracle_fraction(b, a, o))
    if np.isnan(value):
        return value, float("nan"), float("nan")
    lo, hi = _bootstrap((b, a, o), _oracle_fraction, n_boot, level, seed)
    return value, lo, hi


def align_curves(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Put several (steps, values) curves on one step grid: the first curve's steps, others interpolated.

    Runs of one arm validate at the same steps, so this is usually a plain stack; interpolation only covers
    curves with a different schedule. Points outside a curve's own range are NaN, never extrapolated.

    Returns:
        grid [G] and values [R, G].
    """
    if not curves:
        raise ValueError("align_curves needs at least one curve")
    grid = np.asarray(curves[0][0], dtype=float)
    rows = []
    for steps, values in curves:
        s = np.asarray(steps, dtype=float)
        v = np.asarray(values, dtype=float)
        if s.shape == grid.shape and np.array_equal(s, grid):
            rows.append(v)
        elif s.size == 0:
            rows.append(np.full(grid.shape, np.nan))
        else:
            rows.append(np.interp(grid, s, v, left=np.nan, right=np.nan))
    return grid, np.vstack(rows)


# ---------------------------------------------------------------------------------- training dynamics
def relative_spread(norms: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Per step, the relative spread of a layer's neuron norms: std / mean across neurons (coefficient of variation).

    It is scale-free, so a layer whose norms all grow together keeps its spread; it moves while neurons
    differentiate (some grow, some shrink) and flattens once the layer has settled.

    Args:
        norms: [T, N] per-neuron norms at T steps.

    Returns:
        [T] spread; NaN where the mean norm is 0.
    """
    x = np.asarray(norms, dtype=float)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"norms must be [T, N] with N >= 1, got shape {x.shape}")
    mean = x.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, x.std(axis=1) / np.where(mean > 0, mean, 1.0), np.nan)


def rate_of_change(steps: Sequence[float], values: Sequence[float], window: int = 5) -> np.ndarray:
    """The trailing least-squares slope of `values` over the last `window` points, per step.

    A least-squares slope over a window is less noisy than a one-step difference and is exact on a straight
    line. The first `window - 1` entries are NaN (not enough history).

    Args:
        steps: [T] increasing steps.
        values: [T] the series (for example `relative_spread`).
        window: points per slope, >= 2.
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"steps and values must be 1-D of equal length, got {s.shape} and {v.shape}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    out = np.full(s.shape, np.nan)
    if s.size < window:
        return out
    # Sliding windows [T - window + 1, window]; slope = cov(s, v) / var(s) in each window.
    sw = np.lib.stride_tricks.sliding_window_view(s, window)
    vw = np.lib.stride_tricks.sliding_window_view(v, window)
    sc = sw - sw.mean(axis=1, keepdims=True)
    vc = vw - vw.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[window - 1 :] = (sc * vc).sum(axis=1) / (sc * sc).sum(axis=1)
    return out


def settled_step(steps: Sequence[float], rate: Sequence[float], tol: float) -> float | None:
    """The first step from which |rate| stays at or below `tol` until the end (NaN rates are not settled).

    Returns None when the series never settles (its last rate is above `tol` or NaN).
    """
    s = np.asarray(steps, dtype=float)
    r = np.abs(np.asarray(rate, dtype=float))
    ok = np.nan_to_num(r, nan=np.inf) <= tol
    if s.size == 0 or not ok[-1]:
        return None
    bad = np.nonzero(~ok)[0]
    first = 0 if bad.size == 0 else int(bad[-1]) + 1
    return float(s[first])


@dataclass
class LayerDynamics:
    """The settling signal of one layer: relative norm spread, its rate of change and when it settled."""

    layer: str
    steps: np.ndarray  # [T]
    spread: np.ndarray  # [T]
    rate: np.ndarray  # [T], per step
    settled_step: float | None


def layer_dynamics(run, window: int = 20, tol: float = 1e-4, layers: Sequence[str] | None = None):
    """Per-layer norm-spread dynamics of a recorded run.

    Args:
        run: anything with `.steps` [T], `.layers` and `.norms(layer)` [T, N] (a `RunFile`).
        window: points per slope of the spread (norms are recorded every step, so 20 points is 20 steps).
        tol: |d spread / d step| at or below which a layer counts as settled.
        layers: a subset of layers; None takes all.

    Returns:
        {layer: LayerDynamics}, in the run's layer order.
    """
    steps = np.asarray(run.steps, dtype=float)
    out = {}
    for layer in layers if layers is not None else run.layers:
        spread = relative_spread(run.norms(layer))
        rate = rate_of_change(steps, spread, window=min(window, max(2, steps.size)))
        out[layer] = LayerDynamics(layer, steps, spread, rate, settled_step(steps, rate, tol))
    return out


@dataclass
class Asymptote:
    """A saturating fit acc(t) = value - gain * exp(-t / tau) to a validation curve.

    `saturation_step` is where the fitted curve comes within `tol` of `value`; `saturated` says whether the
    run got there within its recorded steps. `r2` is the fit's coefficient of determination.
    """

    value: float
    gain: float
    tau: float
    saturation_step: float
    saturated: bool
    r2: float


def fit_asymptote(
    steps: Sequence[float], values: Sequence[float], tol: float = 0.01, cap: float | None = 1.0
) -> Asymptote:
    """Estimate where a validation curve is heading and the step at which it gets there.

    The model acc(t) = a - b * exp(-t / tau) is linear in (a, b) for a fixed tau, so the fit solves least squares
    for (a, b) on a log-spaced grid of tau and refines the best tau with a bounded scalar search: no initial
    guess, no divergence, the same answer every time. An accuracy cannot exceed 1, so `a` is capped at `cap`
    (None: no cap).

    Args:
        steps: [T] validation steps (T >= 3).
        values: [T] validation accuracy.
        tol: distance to the asymptote at which the run counts as saturated (accuracy units).
        cap: upper bound of the asymptote.
    """
    from scipy.optimize import minimize_scalar

    t = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    if t.shape != y.shape or t.ndim != 1 or t.size < 3:
        raise ValueError(f"need at least 3 (step, value) points of equal length, got {t.shape} and {y.shape}")
    span = max(t[-1] - t[0], 1.0)

    def solve(log_tau: float) -> tuple[float, float, float]:
        e = np.exp(-(t - t[0]) / np.exp(log_tau))  # measured from the first step, for conditioning
        design = np.stack([np.ones_like(e), -e], axis=1)  # [T, 2]
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        if cap is not None and a > cap:
            a = cap
            b = float(np.dot(e, a - y) / max(np.dot(e, e), 1e-300))
        sse = float(np.sum((a - b * e - y) ** 2))
        return sse, float(a), float(b)

    grid = np.linspace(np.log(span / 200.0), np.log(span * 20.0), 60)
    sses = [solve(g)[0] for g in grid]
    k = int(np.argmin(sses))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    res = minimize_scalar(lambda g: solve(g)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    log_tau = float(res.x) if res.fun <= sses[k] else float(grid[k])
    sse, a, b = solve(log_tau)
    tau = float(np.exp(log_tau))
    # Back to absolute steps: a - b * exp(-(t - t0) / tau); within tol of a once b * exp(-(t - t0)/tau) <= tol.
    sat = float(t[0]) if b <= tol else float(t[0] + tau * np.log(b / tol))
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    return Asymptote(value=a, gain=b, tau=tau, saturation_step=sat, saturated=bool(sat <= t[-1]), r2=r2)
