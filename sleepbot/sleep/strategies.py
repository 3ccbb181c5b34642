"""The built-in sleep strategies, one SleepStrategy subclass and one registry line each.

Every strategy works on one layer: `history` [C, N, F] (oldest first, `history[-1]` = now) -> new weights [N, F].

| name               | what it proposes                                                                          |
|--------------------|-------------------------------------------------------------------------------------------|
| `none`             | nothing (the control; the callback never runs it)                                         |
| `linear`           | a least-squares line through each weight's C snapshots, read `horizon` snapshots ahead    |
| `learned`          | a forecaster checkpoint's prediction `horizon` snapshots ahead (sleepbot.forecast)        |
| `noise`            | w + alpha * abs(w) * eps, eps ~ N(0, 1) per weight                                         |
| `square_normalize` | per neuron: sign(w) * w^2, rescaled to the neuron's own L2 norm (bias included)           |
| `lookahead`        | Lookahead (Zhang et al. 2019): slow + alpha * (fast - slow), every k steps                |
| `average`          | the mean of each weight's C snapshots (tail averaging, as SWA / Polyak averaging do)      |
| `dmd`              | dynamic mode decomposition: the layer's C snapshots fitted by one low-rank linear map     |
| `oracle`           | the weights a recorded run (same seed, no sleep) had `horizon` snapshots further on       |
| `random`           | a jump of the same per-layer size as another strategy's (default linear), random direction |
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sleepbot.errors import SleepbotError
from sleepbot.sleep.base import LayerContext, SleepSettings, SleepStrategy, make_strategy, register_strategy


@register_strategy("none")
class NoSleep(SleepStrategy):
    """The control: never moves the weights. The Sleep callback does nothing at all with it."""

    moves_weights = False

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        return history[-1].clone()

    def defaults(self) -> dict[str, Any]:
        return {"context": 1}


@register_strategy("linear")
class LinearExtrapolation(SleepStrategy):
    """Fit a least-squares line to each weight's C snapshots and read it `horizon` snapshots after the last.

    Time is measured in snapshots from the last one, t_c = (steps_c - steps_{C-1}) / snapshot_every, so an
    unevenly spaced history (a custom schedule between grid points) is still fitted correctly. With C = 2 this is
    the secant through the last two snapshots.
    """

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        t = (ctx.steps.to(torch.float64) - float(ctx.steps[-1])) / ctx.snapshot_every  # [C]
        tc = (t - t.mean()).to(history.dtype).to(history.device)  # [C], centred
        mean = history.mean(0)  # [N, F]
        slope = torch.einsum("c,cnf->nf", tc, history - mean) / tc.pow(2).sum()  # [N, F], per snapshot
        return mean + slope * float(horizon - t.mean())

    def validate(self, settings: SleepSettings) -> None:
        if settings.context < 2:
            raise SleepbotError(f"linear extrapolation needs context >= 2 snapshots, got {settings.context}")


@register_strategy("noise")
class ProportionalNoise(SleepStrategy):
    """w <- w + alpha * |w| * eps with eps ~ N(0, 1), independently per weight (and bias).

    Args:
        alpha: the noise's standard deviation relative to each weight's magnitude.
    """

    def __init__(self, alpha: float = 0.01) -> None:
        if not alpha >= 0:
            raise SleepbotError(f"noise alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        w = history[-1]
        # Drawn on the CPU from the callback's generator, so the draw is the same on every device.
        eps = torch.randn(w.shape, generator=ctx.generator, dtype=w.dtype).to(w.device)
        return w + self.alpha * w.abs() * eps

    def defaults(self) -> dict[str, Any]:
        return {"context": 1}


@register_strategy("square_normalize")
class SquareNormalize(SleepStrategy):
    """Per neuron (a row of [N, F]: its incoming weights and its bias), square every weight keeping its sign, then
    rescale the row so that its L2 norm is the neuron's norm before the step:

        s = sign(w) * w^2;   w <- (1 - mix) * w + mix * s * ||w|| / ||s||

    Relative to the neuron's largest weights, weak weights shrink (a weight of 10% of the largest ends at 1%):
    synaptic down-scaling that keeps each neuron's overall strength. A neuron whose weights are all zero is left
    alone. `mix` = 1 (the default) is the rule exactly as the original Sleepbot describes it; smaller values move
    only part of the way.

    Args:
        mix: fraction of the way to the squared-and-normalised row, in [0, 1].
    """

    def __init__(self, mix: float = 1.0) -> None:
        if not 0.0 <= mix <= 1.0:
            raise SleepbotError(f"square_normalize mix must be in [0, 1], got {mix}")
        self.mix = float(mix)

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        w = history[-1]  # [N, F]
        s = w.sign() * w.pow(2)
        norm_w = w.norm(dim=1, keepdim=True)  # [N, 1]
        norm_s = s.norm(dim=1, keepdim=True)
        target = torch.where(norm_s > 0, s * (norm_w / norm_s.clamp_min(torch.finfo(w.dtype).tiny)), w)
        return (1.0 - self.mix) * w + self.mix * target

    def defaults(self) -> dict[str, Any]:
        return {"context": 1}


@register_strategy("lookahead")
class Lookahead(SleepStrategy):
    """Lookahead (Zhang et al., NeurIPS 2019) as a sleep: every k steps the slow weights move `alpha` of the way to
    the fast ones (the weights the optimizer reached), and the fast ones restart there.

    The slow weights are the weights right after the previous sleep: the callback clears its ring buffer after
    every accepted jump, so with snapshots every k steps and a context of 2, `history[0]` is exactly the slow
    weights and `history[-1]` the fast ones. The optimizer state is left to the callback (Lookahead keeps it).

    Args:
        alpha: the slow weights' step toward the fast ones.
        k: steps between synchronisations; sets the callback's every_n_steps and snapshot_every.
    """

    def __init__(self, alpha: float = 0.5, k: int = 5) -> None:
        if not 0.0 < alpha <= 1.0:
            raise SleepbotError(f"lookahead alpha must be in (0, 1], got {alpha}")
        if k < 1:
            raise SleepbotError(f"lookahead k must be >= 1, got {k}")
        self.alpha = float(alpha)
        self.k = int(k)

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        slow, fast = history[0], history[-1]
        return slow + self.alpha * (fast - slow)

    def defaults(self) -> dict[str, Any]:
        return {"every_n_steps": self.k, "snapshot_every": self.k, "context": 2}

    def validate(self, settings: SleepSettings) -> None:
        span = (settings.context - 1) * settings.snapshot_every
        if settings.context < 2 or (not settings.custom_schedule and span != settings.every_n_steps):
            raise SleepbotError(
                f"lookahead reads the slow weights every_n_steps ago: it needs context >= 2 and "
                f"(context - 1) * snapshot_every == every_n_steps, got context {settings.context}, "
                f"snapshot_every {settings.snapshot_every}, every_n_steps {settings.every_n_steps} "
                f"(leave them unset to use k={self.k})"
            )


@register_strategy("average")
class Average(SleepStrategy):
    """Tail averaging as a sleep: each weight moves to the mean of its last `k` snapshots (Polyak averaging, and
    SWA's running mean, restarted at every sleep), and training goes on from there. It looks back, not ahead: the
    mean lags the path by about half its span and drops the iterates' bounce across the valley. It is the control
    for `scripts/branch_ceiling.py`, where the mean of several futures of one state lands lower than any one of
    them: does averaging alone pay? (On development seeds it did not; README, "How predictable is a run's future
    at all?".) `horizon` is not read. The optimizer state is left to the callback.

    Args:
        k: snapshots averaged (the callback's context); with the default snapshot_every of 10, k = 5 averages the
            last 40 steps.
    """

    def __init__(self, k: int = 5) -> None:
        if k < 2:
            raise SleepbotError(f"average needs k >= 2 snapshots to average, got {k}")
        self.k = int(k)

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        return history.mean(0)

    def defaults(self) -> dict[str, Any]:
        return {"context": self.k, "carry_history": False}

    def validate(self, settings: SleepSettings) -> None:
        if settings.context < 2:
            raise SleepbotError(f"average needs context >= 2 snapshots, got {settings.context}")


@register_strategy("dmd")
class DMD(SleepStrategy):
    """Dynamic mode decomposition (Schmid 2010; as a training accelerator: Tano et al. 2020, Dogra & Redman 2020):
    the layer's C snapshots x_0 .. x_{C-1} (every weight of the layer as one vector) are fitted by one linear map
    x_{c+1} = A x_c restricted to the top `rank` left singular vectors U of [x_0 .. x_{C-2}], and the layer moves
    to x_{C-1} + U (A~^h - I) U^T x_{C-1}, h = `horizon` snapshots on, with A~ = U^T A U the fitted r x r map.

    Unlike the per-neuron strategies, it reads what the layer's weights do together: one map for the whole layer.
    A straight path and a geometric approach to a point are fitted exactly. Since
    A~^h can grow without bound where A~ has an eigenvalue above 1, the jump is capped at `max_ratio` times the
    length of the path's own net displacement per snapshot times h (the straight line's length; 1: never
    longer than the straight line). It works in float64 on the whole layer at once: C copies of the layer's
    weights in memory, one thin SVD of a [C - 1, weights] matrix per layer and sleep. Measured in steps, it is not
    faster than the learned default (README, "How predictable is a run's future at all?").

    Args:
        rank: the subspace's dimension at most (also at most C - 1 and the number of non-zero singular values).
        max_ratio: the cap on the jump's length, relative to the straight line's.
    """

    def __init__(self, rank: int = 8, max_ratio: float = 1.0) -> None:
        if rank < 1:
            raise SleepbotError(f"dmd rank must be >= 1, got {rank}")
        if not max_ratio > 0:
            raise SleepbotError(f"dmd max_ratio must be > 0, got {max_ratio}")
        self.rank = int(rank)
        self.max_ratio = float(max_ratio)

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        c = history.shape[0]
        if c < 2:  # nothing to fit a map to
            return history[-1].clone()
        x = history.reshape(c, -1).double()  # [C, P]
        cur = x[-1]
        # x[:-1] = W diag(s) Vh, so the snapshots' left singular vectors (P-space) are the rows of Vh.
        w, s, vh = torch.linalg.svd(x[:-1], full_matrices=False)
        keep = int(min(self.rank, int((s > s[0] * 1e-10).sum())))
        if keep == 0:
            return history[-1].clone()
        w, s, vh = w[:, :keep], s[:keep], vh[:keep]
        a = (vh @ x[1:].T) @ w / s  # [r, r]: U^T Y V S^-1
        z = vh @ cur
        step = vh.T @ (torch.linalg.matrix_power(a, int(horizon)) @ z - z)  # [P]
        line = (cur - x[0]).norm() / (c - 1) * horizon * self.max_ratio
        size = step.norm()
        if not torch.isfinite(size):
            return history[-1].clone()
        if size > line:
            step = step * (line / size)
        return (cur + step).to(history.dtype).reshape(history.shape[1:])

    def defaults(self) -> dict[str, Any]:
        return {"context": 20, "min_context": 5, "carry_history": True}

    def validate(self, settings: SleepSettings) -> None:
        if settings.min_context < 3:
            raise SleepbotError(
                f"dmd needs at least 3 snapshots to fit a map, got min_context={settings.min_context}"
            )


# How far `Sleep("learned")` jumps with the shipped forecaster, in snapshots (see Learned.defaults).
SHIPPED_HORIZON = 2


@register_strategy("learned")
class Learned(SleepStrategy):
    """A trained forecaster (sleepbot.forecast) moves every neuron `horizon` snapshots ahead.

    The forecaster fixes how many snapshots it reads (`context`) and, when its checkpoint records it, how far
    apart they were in its training data (`snapshot_every`); the callback takes those as its defaults and refuses
    settings that differ. A learned forecaster predicts horizons up to the largest it was trained for
    (interpolating between them); the default horizon is the forecaster's `default_horizon`, except for the
    shipped forecaster, which jumps SHIPPED_HORIZON = 2 snapshots (20 steps) ahead (measured, see `defaults`),
    and the default schedule sleeps every context * snapshot_every steps (50), so each jump reads a history
    recorded entirely after the previous one.

    Args:
        forecaster: path to a forecaster checkpoint; None loads the default one shipped with sleepbot.
        gain: multiplies the forecast displacement (1: the forecast as is). A forecaster trained to minimise
            squared error shrinks its displacements toward zero where it is unsure; gain > 1 undoes some of that.
        calibrate: trust the forecaster on this run only as far as it has been right on it. Before each jump,
            per layer, the forecaster forecasts from the history as it stood `horizon` snapshots ago, that
            forecast is compared with where the layer went, and the jump is the forecast displacement times
            lambda = <forecast, actual> / <forecast, forecast> (the least-squares shrink of the backtest) clipped
            to [0, 1]: a forecaster that has been pointing the wrong way, or too far, moves the layer little or
            not at all. Needs a history of min_context + horizon snapshots, so a forecaster with a long context
            that keeps its history across jumps (`carry_history`, the multiscale forecaster's default); before
            that much history there is nothing to judge by and the layer does not move. The history the
            backtest reads is the training path, translated by earlier jumps: it scores the forecaster on the
            motion training made, not on the jumps.
        along: `forecast` (the default) jumps along the forecast; `trend` jumps each neuron along the
            least-squares line through its history (as `linear` extrapolates), and `update` along the update the
            optimizer's state points to (`LayerContext.update`; Adam, AdamW, SGD with momentum), each with the
            forecast's length: ablations of the forecast's direction (`Oracle(combine=...)` showed that 200 steps
            ahead the forecasts fail in their direction, not their size).
    """

    ALONG = ("forecast", "trend", "update")

    def __init__(
        self,
        forecaster: str | None = None,
        gain: float = 1.0,
        calibrate: bool = False,
        along: str = "forecast",
    ) -> None:
        from sleepbot.forecast import load_forecaster

        if not gain > 0:
            raise SleepbotError(f"learned gain must be > 0, got {gain}")
        if along not in self.ALONG:
            raise SleepbotError(f"unknown learned along {along!r}; valid: {', '.join(self.ALONG)}")
        self.forecaster = None if forecaster is None else str(forecaster)
        self.gain = float(gain)
        self.calibrate = bool(calibrate)
        self.along = along
        self.reads_optimizer = along == "update"
        self.model = load_forecaster(forecaster)

    def options(self) -> dict[str, Any]:
        out = {"forecaster": self.forecaster, "gain": self.gain, "calibrate": self.calibrate}
        if self.along != "forecast":
            out["along"] = self.along
        return out

    def _is_shipped(self) -> bool:
        """Whether this is the forecaster shipped with sleepbot (no path given, or its path)."""
        from sleepbot.forecast.checkpoint import DEFAULT_PATH

        return self.forecaster is None or Path(self.forecaster).resolve() == Path(DEFAULT_PATH).resolve()

    def _min_context(self) -> int:
        """The fewest snapshots the forecaster reads (its context unless it reads several lengths)."""
        return int(getattr(self.model, "min_context", self.model.context))

    def _max_horizon(self) -> int | None:
        return max(int(h) for h in self.model.horizons) if getattr(self.model, "learned", False) else None

    def defaults(self) -> dict[str, Any]:
        f = self.model
        # The forecaster's `default_horizon` (5 snapshots for the shipped one: as far ahead as the schedule
        # waits), chosen by the worst case over five development settings (configs/compare_select_safety*.yaml,
        # seeds 800-809, speedup of the shipped forecaster over the base optimizer alone on digits/Adam 0.03,
        # mnist1d/Adam 0.01, digits-cnn3/SGD+momentum 0.1, and on Schedule-Free 0.06 for digits and mnist1d):
        # horizon 5: 1.26x, 1.05x, 1.14x, 0.93x, 1.00x (worst 0.93x); horizon 20, the largest trained horizon
        # and the default until then: 0.81x, 0.97x, 0.29x (5 misses in 10), 0.88x, 0.34x (5 misses); horizon 2:
        # 1.00x, 1.10x, 1.23x, 1.00x, 0.88x. (Horizon 20 had been chosen on seeds 0-9 of digits/Adam at lr 0.01,
        # where it gave 1.51x; at the lrs tuned here its first jump moved SGD+momentum weights by 0.4-0.5 of their
        # norm and wrecked runs.)
        horizon = int(getattr(f, "default_horizon", None) or 5)
        if self._is_shipped():
            # The shipped forecaster jumps SHIPPED_HORIZON snapshots ahead (its checkpoint says 5): on development
            # seeds 800-819 horizon 2 has the best worst case of 2, 5 and 20 over the five settings above
            # (configs/compare_select_horizon*.yaml, numbers below). A forecaster of your own keeps its own
            # default_horizon.
            horizon = SHIPPED_HORIZON
        top = self._max_horizon()
        if top is not None:
            horizon = min(horizon, top)
        # No check and no adaptive jump by default. With the check (check_batches=2, held_batches="reservoir":
        # roll back when the loss on held training batches rises), the same five settings: horizon 5 0.98x,
        # 0.99x, 0.98x, 0.92x, 0.92x; it saves a wrecked run (horizon 20: 1.03x, 0.99x, 0.98x, 0.92x, 0.98x)
        # but rolls back jumps that would have paid: the held loss right after a jump mostly rises even when the
        # jump pays off a few steps later. The probe (check_batches=LEARNED_CHECK_BATCHES,
        # jump_scales=LEARNED_JUMP_SCALES) measured 0.99x / 1.10x against 1.19x / 1.06x unprobed on digits /
        # mnist1d (configs/compare_select.yaml). Pass the settings to check or probe.
        # Two more ways to make the jump safe, measured on the same development seeds and not taken: a delayed
        # verdict (Sleep's verify_after=10 / 25: undo a jump whose held loss is still higher k steps later),
        # worst 0.85x / 0.88x, as it undoes a third to a half of the jumps (configs/compare_select_verify*.yaml);
        # and another optimizer-state policy than `keep` (configs/compare_select_state*.yaml): `reset` and
        # `rescale` lose on Adam and Schedule-Free, and on SGD+momentum over seeds 800-819 keep 1.13x, reset 1.04x,
        # rescale 0.96x.
        # On twice the seeds (800-819, configs/compare_select_horizon*.yaml) horizon 5 no longer had the best
        # worst case: horizon 5 1.20x, 1.01x, 1.13x, 0.94x, 0.78x; horizon 2 1.26x, 1.07x, 1.02x, 1.00x, 0.90x;
        # horizon 20 1.11x, 0.98x, 0.71x, 0.94x, 0.26x. So the shipped forecaster now jumps 2 snapshots ahead
        # (SHIPPED_HORIZON, above).
        out = {"context": int(f.context), "horizon": int(horizon)}
        least = self._min_context()
        if least < f.context:
            # A forecaster that reads histories of several lengths sleeps once it has its minimum, and keeps the
            # history across jumps (translated by each), so that later jumps read up to its full context.
            out.update(min_context=least, carry_history=True)
        if f.snapshot_every is not None:
            out["snapshot_every"] = int(f.snapshot_every)
            out["every_n_steps"] = least * int(f.snapshot_every)
        return out

    def validate(self, settings: SleepSettings) -> None:
        f = self.model
        if settings.context != int(f.context):
            raise SleepbotError(
                f"this forecaster reads context={f.context} snapshots; got context={settings.context} (leave it unset)"
            )
        least = self._min_context()
        if settings.min_context < least:
            raise SleepbotError(
                f"this forecaster needs at least {least} snapshots; got min_context={settings.min_context}"
            )
        if f.snapshot_every is not None and settings.snapshot_every != int(f.snapshot_every):
            raise SleepbotError(
                f"this forecaster was trained on snapshots {f.snapshot_every} steps apart; got "
                f"snapshot_every={settings.snapshot_every} (leave it unset)"
            )
        top = self._max_horizon()
        if top is not None and settings.horizon > top:
            raise SleepbotError(
                f"this forecaster predicts up to {top} snapshots ahead (trained horizons "
                f"{list(f.horizons)}); got horizon {settings.horizon}"
            )
        if self.calibrate and settings.context < least + settings.horizon:
            raise SleepbotError(
                f"learned calibrate backtests the forecaster horizon={settings.horizon} snapshots back, so it needs "
                f"a context of at least min_context + horizon = {least + settings.horizon} snapshots; this "
                f"forecaster reads {settings.context} (use one with a longer context, or a shorter horizon)"
            )

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        gaps = torch.diff(ctx.steps)
        if gaps.numel() and bool((gaps != ctx.snapshot_every).any()):
            raise SleepbotError(
                f"the learned strategy needs snapshots exactly {ctx.snapshot_every} steps apart; a custom "
                f"schedule slept at step {ctx.step}, between snapshot steps (history steps {ctx.steps.tolist()})"
            )
        out = torch.as_tensor(
            self.model.predict(history.cpu(), int(horizon), kind=ctx.kind, progress=ctx.progress)
        )
        out = out.to(dtype=history.dtype, device=history.device)
        if self.along != "forecast":
            cur = history[-1]
            if self.along == "trend":
                direction = LinearExtrapolation().propose(history, int(horizon), ctx) - cur
            else:
                direction = _optimizer_update(ctx, "learned along='update'")
            out = cur + along_with_length(direction, out - cur)
        scale = self.gain
        if self.calibrate:
            scale *= self.backtest(history, int(horizon), ctx)
            ctx.extra["calibration"] = scale
        if scale != 1.0:
            out = history[-1] + scale * (out - history[-1])
        return out

    def backtest(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> float:
        """The calibration factor lambda in [0, 1] of one layer (see `calibrate`); 0 without enough history."""
        if history.shape[0] < self._min_context() + horizon:
            return 0.0
        past = history[:-horizon].cpu()
        start = past[-1].double()
        forecast = torch.as_tensor(self.model.predict(past, horizon, kind=ctx.kind, progress=ctx.progress))
        d_fc = forecast.double() - start
        d_true = history[-1].cpu().double() - start
        denom = float(d_fc.pow(2).sum())
        if not denom > 0:
            return 0.0
        return min(1.0, max(0.0, float((d_fc * d_true).sum()) / denom))


# The adaptive jump measured for `learned` (off by default, see Learned.defaults):
# Sleep("learned", check_batches=LEARNED_CHECK_BATCHES, jump_scales=LEARNED_JUMP_SCALES). Candidate scales of the
# forecast displacement, judged on this many held training batches; 0 is always a candidate (the callback adds it).
LEARNED_JUMP_SCALES = (0.5, 1.0, 1.5, 2.0)
LEARNED_CHECK_BATCHES = 2


@register_strategy("oracle")
class Oracle(SleepStrategy):
    """The control with perfect foresight: at each sleep at step t, jump to the weights that a recorded run of the
    same config and seed without sleep had at step t + jumped + horizon * snapshot_every (its HDF5 run file, read
    through sleepbot.store), where `jumped` (LayerContext) counts the steps earlier accepted jumps skipped: after
    two jumps of 50 steps, at step 100 the weights are the recorded step 200's, not 150's.

    If that step was not recorded, the latest recorded snapshot before it is used (`jumped` still counts the
    nominal horizon * snapshot_every for that jump); a sleep past the end of the recording leaves the weights as
    they are. Neurons the recorder did not keep (layers wider than its
    `max_neurons_per_layer`) stay where they are.

    Args:
        run: path to the recorded no-sleep run (`sleepbot collect` or a TrajectoryRecorder).
        mode: `absolute` jumps to the recorded weights; `displacement` adds the recorded run's displacement from
            t to the target step to the current weights (it needs a snapshot at t in the recording).
        scale: a degraded oracle, to calibrate how good a forecast must be: the jump is `scale` x the true
            displacement D (per layer, from the weights now) ...
        noise: ... plus `noise` x the RMS of each neuron's D x N(0, 1) per weight. With scale 1 a forecast this
            noisy scores R2_disp = 1 - noise^2; with noise 0, R2_disp = 1 - (1 - scale)^2.
        project: the ceiling of a forecaster family: D replaced by its least-squares fit from the weights' own
            history, as the multiscale forecaster forecasts (a mix of the 9 trend features of
            `sleepbot.forecast.multiscale.trend_features`), with the best mix for this very jump: `neuron`, one mix
            per neuron (what the multiscale forecaster's per-neuron coefficients could at best reach), or `layer`,
            one per layer. It reads the history as the multiscale forecaster does (5 to 20 snapshots, carried
            across jumps).
        extra: one more column for the projection's fit, to ask whether an input beyond the history raises the
            ceiling: `state`, the update the optimizer's state points to now (`LayerContext.update`; Adam, AdamW,
            SGD with momentum), or `random`, a random direction per neuron (N(0, 1) per weight; its size does not
            change the fit): the control for the degree of freedom a column adds (a neuron with few inputs is fit
            better by any extra column).
        combine: where a forecast falls short, in direction or in size: `direction`, each neuron jumps along the
            forecaster's displacement with the length of the true one; `size`, along the true displacement with the
            length of the forecaster's. It reads the history as the forecaster does (its defaults).
        forecaster: the forecaster of `combine` (a checkpoint path; None: the one shipped with sleepbot).
    """

    PROJECTIONS = ("neuron", "layer")
    EXTRAS = ("state", "random")
    COMBINES = ("direction", "size")

    def __init__(
        self,
        run: str,
        mode: str = "absolute",
        scale: float = 1.0,
        noise: float = 0.0,
        project: str | None = None,
        extra: str | None = None,
        combine: str | None = None,
        forecaster: str | None = None,
    ) -> None:
        if mode not in ("absolute", "displacement"):
            raise SleepbotError(f"unknown oracle mode {mode!r}; valid: absolute, displacement")
        if not (scale >= 0 and noise >= 0):
            raise SleepbotError(f"oracle scale and noise must be >= 0, got {scale}, {noise}")
        if project is not None and project not in self.PROJECTIONS:
            raise SleepbotError(
                f"unknown oracle projection {project!r}; valid: {', '.join(self.PROJECTIONS)}, or none"
            )
        if extra is not None and extra not in self.EXTRAS:
            raise SleepbotError(
                f"unknown oracle extra column {extra!r}; valid: {', '.join(self.EXTRAS)}, or none"
            )
        if extra is not None and project is None:
            raise SleepbotError("the oracle's extra column is a column of its projection: give project too")
        if combine is not None and combine not in self.COMBINES:
            raise SleepbotError(
                f"unknown oracle combine {combine!r}; valid: {', '.join(self.COMBINES)}, or none"
            )
        if combine is not None and project is not None:
            raise SleepbotError("the oracle combines a forecast with the true jump or projects it, not both")
        if forecaster is not None and combine is None:
            raise SleepbotError("the oracle reads a forecaster only to combine it: give combine too")
        self.run = str(run)
        self.mode = mode
        self.scale = float(scale)
        self.noise = float(noise)
        self.project = project
        self.extra = extra
        self.reads_optimizer = extra == "state"
        self.combine = combine
        self.forecaster = None if forecaster is None else str(forecaster)
        self._learned = Learned(forecaster) if combine else None
        self._file: Any = None
        self._steps: list[int] = []

    def defaults(self) -> dict[str, Any]:
        if self._learned is not None:  # the forecaster's reading of the history
            return self._learned.defaults()
        if self.project:  # the multiscale forecaster's reading of the history
            return {"context": 20, "min_context": 5, "carry_history": True}
        return {"context": 1}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = (
            None  # an open HDF5 file does not pickle (ddp_spawn, worker processes): setup reopens
        )
        return state

    def validate(self, settings: SleepSettings) -> None:
        if self._learned is not None:
            self._learned.validate(settings)

    def setup(self, model: torch.nn.Module, max_steps: int) -> None:
        from sleepbot.store import RunFile

        self._file = RunFile(self.run)
        self._steps = [int(s) for s in self._file.snapshot_steps]

    def _index_at_or_before(self, step: int) -> int | None:
        best = None
        for i, s in enumerate(self._steps):
            if s <= step:
                best = i
        return best

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        if self._file is None:
            raise SleepbotError(
                "the oracle strategy was used before setup(); use it through the Sleep callback"
            )
        cur = history[-1]
        now_step = ctx.step + ctx.jumped  # the recorded run's step that the weights now stand for
        target = self._index_at_or_before(now_step + horizon * ctx.snapshot_every)
        if target is None or self._steps[target] <= now_step:
            return cur.clone()
        if ctx.layer not in self._file.layers:
            raise SleepbotError(
                f"oracle run {self.run!r} has no layer {ctx.layer!r}; it has {', '.join(self._file.layers)}"
            )
        rows = _kept_neurons(self._file, ctx.layer, cur.shape[0])  # [N_kept]
        future = torch.as_tensor(self._file.weights(ctx.layer, snapshots=[target]))[0]  # [N_kept, F]
        if future.shape[-1] != cur.shape[-1]:
            raise SleepbotError(
                f"oracle run {self.run!r} layer {ctx.layer!r} has {future.shape[-1]} inputs per neuron, "
                f"the model has {cur.shape[-1]}: it is not a run of this model"
            )
        future = future.to(dtype=cur.dtype, device=cur.device)
        out = cur.clone()
        if self.mode == "absolute":
            out[rows] = future
        else:
            now = self._index_at_or_before(now_step)
            if now is None or self._steps[now] != now_step:
                raise SleepbotError(
                    f"oracle mode 'displacement' needs a recorded snapshot at step {now_step} "
                    f"(step {ctx.step} + {ctx.jumped} skipped by earlier jumps)"
                )
            present = torch.as_tensor(self._file.weights(ctx.layer, snapshots=[now]))[0]
            out[rows] = cur[rows] + future - present.to(dtype=cur.dtype, device=cur.device)
        if self.scale != 1.0 or self.noise:
            d = out - cur  # [N, F]
            eps = torch.randn(d.shape, generator=ctx.generator, dtype=d.dtype).to(d.device)
            rms = d.pow(2).mean(1, keepdim=True).sqrt()  # [N, 1]
            out = cur + self.scale * d + self.noise * rms * eps
        if self.project:
            columns = []
            if self.extra == "state":
                columns.append(_optimizer_update(ctx, "oracle extra 'state'"))
            elif self.extra == "random":
                from sleepbot.forecast.base import neuron_scale

                eps = torch.randn(cur.shape, generator=ctx.generator, dtype=torch.float64).to(cur.device)
                columns.append(eps * neuron_scale(history.double())[:, None])
            out = cur + project_on_history(out - cur, history, per=self.project, extra=columns)
        if self._learned is not None:
            true, forecast = out - cur, self._learned.propose(history, horizon, ctx) - cur
            out = cur + (
                along_with_length(forecast, true)
                if self.combine == "direction"
                else along_with_length(true, forecast)
            )
        return out


def _optimizer_update(ctx: LayerContext, who: str) -> torch.Tensor:
    """`ctx.update`, or a one-line error naming `who` needs it when the optimizer's update is not known."""
    if ctx.update is None:
        raise SleepbotError(
            f"{who} reads the optimizer's update, which is known for Adam, AdamW and SGD with momentum only"
        )
    return ctx.update


def along_with_length(along: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Per neuron (rows of [N, F]), the direction of `along` with the length of `length`; a neuron whose direction
    is undefined (zero) does not move."""
    norm = along.norm(dim=1, keepdim=True)  # [N, 1]
    unit = torch.where(
        norm > 0, along / norm.clamp_min(torch.finfo(along.dtype).tiny), torch.zeros_like(along)
    )
    return unit * length.norm(dim=1, keepdim=True)


def project_on_history(
    d: torch.Tensor, history: torch.Tensor, per: str = "neuron", extra: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """The least-squares fit of displacements d [N, F] by the 9 trend features of `history` [C, N, F] (the
    multiscale forecaster's inputs) and the `extra` columns ([N, F] each, in weight units), with one mix per neuron
    (`neuron`) or one for the whole layer (`layer`). Solved by SVD (gelsd): the features are linearly dependent."""
    from sleepbot.forecast.base import neuron_scale
    from sleepbot.forecast.multiscale import trend_features

    h = history.double()
    scale = neuron_scale(h)
    cols = [f * scale[:, None] for f in trend_features(h, scale)] + [e.double().to(h.device) for e in extra]
    x = torch.stack(cols, -1)  # [N, F, 9 + len(extra)], in weight units
    y = d.double()
    if per == "layer":
        x, y = x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1)
    coef = torch.linalg.lstsq(x.cpu(), y.cpu()[..., None], driver="gelsd").solution  # [N or 1, 9, 1]
    fit = (x.cpu() @ coef)[..., 0].reshape(d.shape)
    return fit.to(dtype=d.dtype, device=d.device)


def _kept_neurons(run_file: Any, layer: str, n: int) -> torch.Tensor:
    """Indices of the layer's neurons that the run file kept, [N_kept] (all N when it did not subsample)."""
    idx = torch.as_tensor(run_file.layer_info(layer)["neurons"], dtype=torch.long)
    if idx.numel() and int(idx.max()) >= n:
        raise SleepbotError(
            f"the oracle run keeps neuron {int(idx.max())} of layer {layer!r}; the model has {n}"
        )
    return idx


@register_strategy("random")
class RandomJump(SleepStrategy):
    """The matched random control: a jump of the same per-layer size (Frobenius norm of the displacement) as
    another strategy's jump, in a uniformly random direction.

    Args:
        base: the strategy whose jump size is matched (a registry name or an instance); default `linear`.
        **base_options: options for `base` when it is given by name (e.g. `forecaster` for `learned`).
    """

    def __init__(self, base: str | SleepStrategy = "linear", **base_options: Any) -> None:
        if base == "random" or isinstance(base, RandomJump):
            raise SleepbotError("the random strategy cannot match the size of another random jump")
        self.base = make_strategy(base, **base_options)
        self.base_options = base_options

    def options(self) -> dict[str, Any]:
        return {"base": self.base.describe()}

    def defaults(self) -> dict[str, Any]:
        # The base's schedule, not its adaptive jump: the control's size is the base's proposal, unprobed.
        return {k: v for k, v in self.base.defaults().items() if k not in ("check_batches", "jump_scales")}

    def validate(self, settings: SleepSettings) -> None:
        self.base.validate(settings)

    def setup(self, model: torch.nn.Module, max_steps: int) -> None:
        self.base.setup(model, max_steps)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        cur = history[-1]
        size = (self.base.propose(history, horizon, ctx) - cur).norm()
        eps = torch.randn(cur.shape, generator=ctx.generator, dtype=cur.dtype).to(cur.device)
        return cur + eps * (size / eps.norm().clamp_min(torch.finfo(cur.dtype).tiny))
