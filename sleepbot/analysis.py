"""Statistics of training runs: steps to a target, bootstrap confidence intervals, paired tests, saturation.

Conventions (the protocol of AlgoPerf and NiNo, see PRIOR_ART.md):
- steps to target: the first validation step whose accuracy is >= the target; a run that never reaches it counts
  as `miss_factor` (2) times the step budget, so a miss is penalised rather than dropped;
- speedup of an arm over the baseline: median baseline steps / median arm steps (> 1 is faster), with a bootstrap
  CI over seeds resampled in pairs (the same seeds run in every arm);
- the paired test is Wilcoxon's signed-rank test on per-seed step differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = np.median,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of `stat(values)`; deterministic for a given seed."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    boots = np.array([stat(x[i]) for i in idx])
    alpha = (1.0 - level) / 2
    return float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


@dataclass
class Speedup:
    """Median-steps ratio baseline / arm with a paired bootstrap CI, and the Wilcoxon p-value."""

    ratio: float
    lo: float
    hi: float
    p_value: float
    n: int


def paired_speedup(
    base_steps: Sequence[float],
    arm_steps: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Speedup:
    """Speedup of an arm over the baseline on the same seeds (index i of both lists is the same seed)."""
    b = np.asarray(base_steps, dtype=float)
    a = np.asarray(arm_steps, dtype=float)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {b.shape} and {a.shape}")
    ratio = float(np.median(b) / np.median(a))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, b.size, size=(n_boot, b.size))
    boots = np.median(b[idx], axis=1) / np.median(a[idx], axis=1)
    alpha = (1.0 - level) / 2
    return Speedup(
        ratio=ratio,
        lo=float(np.quantile(boots, alpha)),
        hi=float(np.quantile(boots, 1 - alpha)),
        p_value=wilcoxon_p(b, a),
        n=int(b.size),
    )


def wilcoxon_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; 1.0 when every pair is tied."""
    from scipy.stats import wilcoxon

    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox").pvalue)
