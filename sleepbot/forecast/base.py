"""The `Forecaster` base class, its registry, and the per-neuron scale every forecaster and loss share.

A forecaster reads the last `context` snapshots of one layer's neurons, `history` [C, N, F] (N neurons, F = fan_in
+ 1 with a bias, as `sleepbot.neurons.neuron_matrix` lays them out), and forecasts the displacement of every weight
`h` snapshots after the last one. To add a forecaster: subclass `Forecaster` (or `LearnedForecaster` when it has
parameters to train), implement `displacement` (or `forward`), decorate it with `@register_forecaster("name")`.
Nothing else: the CLI, the training module, the evaluation and the checkpoint format pick it up by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from sleepbot.errors import SleepbotError, unknown_name

# Layer kinds as `sleepbot.neurons.layer_kind` names them; the learned forecasters read them one-hot.
KINDS: tuple[str, ...] = ("conv1d", "conv2d", "conv3d", "linear")

FORECASTERS: dict[str, type[Forecaster]] = {}


def register_forecaster(name: str) -> Callable[[type[Forecaster]], type[Forecaster]]:
    """Class decorator: put a Forecaster subclass into `FORECASTERS` under `name`."""

    def deco(cls: type[Forecaster]) -> type[Forecaster]:
        cls.name = name
        FORECASTERS[name] = cls
        return cls

    return deco


def kind_index(kind: str) -> int:
    """Position of a layer kind in `KINDS`; an unknown kind is a one-line SleepbotError."""
    try:
        return KINDS.index(kind)
    except ValueError:
        raise unknown_name("layer kind", kind, KINDS) from None


def neuron_scale(history: torch.Tensor) -> torch.Tensor:
    """How far each neuron moves per snapshot: the RMS of its weight differences over the context, [N].

    This is the unit in which the learned forecasters read their inputs and in which every forecaster is trained
    (the loss divides errors by it), so that a forecaster is independent of a weight's scale and of the learning
    rate: multiplying a trajectory by k multiplies the forecast by k. A neuron that did not move at all gets a
    tiny floor relative to its weights' size (never 0, so nothing divides by zero).

    Args:
        history: [C, N, F], C >= 2.
    """
    d = history[1:] - history[:-1]  # [C-1, N, F]
    rms = d.pow(2).mean(dim=(0, 2)).sqrt()  # [N]
    size = history[-1].pow(2).mean(dim=1).sqrt()  # [N]
    return rms + 1e-6 * size + 1e-12


class Forecaster(nn.Module):
    """Forecasts one layer's weights some snapshots ahead from their recent snapshots.

    Attributes:
        name: the registry name (set by `register_forecaster`).
        learned: whether it has parameters to train (`LearnedForecaster`).
        context: snapshots it reads at most (the last `context` of the history it is given).
        min_context: snapshots it needs at least (a forecaster trained on histories of several lengths reads
            whatever it is given between `min_context` and `context`; by default min_context = context).
        horizons: the snapshots ahead it was trained to predict (the evaluation reports these).
        snapshot_every: optimizer steps between the snapshots of its training data, when known (a checkpoint
            carries it); a caller whose snapshots are spaced differently should know it is outside the training
            distribution.
        default_horizon: the horizon a caller should use when it has no reason to pick another (the sleep
            callback's default): 5 snapshots unless set, capped at the largest trained horizon. Five, because with
            a context of 5 the sleep callback sleeps every context x snapshot_every steps, and jumping as far
            ahead as it waited doubles the progress per sleep; and because it is the shortest trained horizon,
            where the forecast is best on the slow runs where jumping pays (see the README's table).

    Subclasses implement `displacement`; `predict` adds it to the last snapshot.
    """

    name: ClassVar[str] = "base"
    learned: ClassVar[bool] = False

    def __init__(
        self,
        context: int = 5,
        horizons: Sequence[int] = (5, 10, 20),
        snapshot_every: int | None = None,
        default_horizon: int | None = None,
        min_context: int | None = None,
    ) -> None:
        super().__init__()
        horizons = tuple(int(h) for h in horizons)
        if int(context) < 2:
            raise SleepbotError(f"context must be at least 2 snapshots, got {context}")
        min_context = int(context) if min_context is None else int(min_context)
        if not 2 <= min_context <= int(context):
            raise SleepbotError(f"min_context must be between 2 and context ({context}), got {min_context}")
        if not horizons or min(horizons) < 1 or list(horizons) != sorted(set(horizons)):
            raise SleepbotError(f"horizons must be increasing positive integers, got {list(horizons)}")
        self.context = int(context)
        self.min_context = min_context
        self.horizons = horizons
        self.snapshot_every = None if snapshot_every is None else int(snapshot_every)
        if default_horizon is None:
            default_horizon = min(5, horizons[-1]) if self.learned else 5
        if int(default_horizon) < 1 or (self.learned and int(default_horizon) > horizons[-1]):
            raise SleepbotError(
                f"default_horizon must be between 1 and the largest horizon {horizons[-1]}, got {default_horizon}"
            )
        self.default_horizon = int(default_horizon)

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this forecaster (stored in checkpoints)."""
        out = {
            "context": self.context,
            "horizons": list(self.horizons),
            "snapshot_every": self.snapshot_every,
            "default_horizon": self.default_horizon,
        }
        # Only when it differs: older checkpoints have no such key, and their config stays as it was.
        if self.min_context != self.context:
            out["min_context"] = self.min_context
        return out

    # ----------------------------------------------------------------------------------------- to implement
    def displacement(
        self,
        history: torch.Tensor,
        horizons: Sequence[int],
        kind: str = "linear",
        progress: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forecast w(t+h) - w(t) for each horizon h: [len(horizons), N, F].

        Args:
            history: [context, N, F], oldest first (already checked and cut to `context`).
            horizons: positive snapshot counts.
            kind: the layer kind (one of `KINDS`).
            progress: [N] step / max_steps of each neuron's last snapshot, NaN where unknown; or None.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- interface
    def check_history(self, history: torch.Tensor) -> torch.Tensor:
        """The last `context` snapshots (all of them when fewer, at least `min_context`) of a valid history as
        float32 [C, N, F], or a one-line error."""
        if not isinstance(history, torch.Tensor) or history.dim() != 3:
            shape = tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
            raise SleepbotError(
                f"history must be a tensor [C, N, F] (snapshots, neurons, weights), got {shape}"
            )
        if history.shape[0] < self.min_context:
            raise SleepbotError(
                f"history has {history.shape[0]} snapshots; the {self.name} forecaster needs at least "
                f"{self.min_context} (its {'min_' if self.min_context != self.context else ''}context)"
            )
        if history.shape[1] == 0 or history.shape[2] == 0:
            raise SleepbotError(f"history {tuple(history.shape)} holds no weights")
        history = history[-self.context :].float()
        # A finite sum means every weight is finite (one pass; NaN or inf anywhere makes it NaN or inf); only a
        # non-finite sum (or one that overflowed) pays for the element-wise check.
        if not torch.isfinite(history.sum()) and not torch.isfinite(history).all():
            raise SleepbotError(
                "history contains NaN or infinite weights; a forecast from them would be garbage"
            )
        return history

    def predict(
        self,
        history: torch.Tensor,
        horizon: int,
        *,
        kind: str = "linear",
        progress: float | None = None,
    ) -> torch.Tensor:
        """The predicted weights [N, F] `horizon` snapshots after the last snapshot of `history`.

        Args:
            history: [C, N, F] the last C snapshots of ONE layer's neurons, oldest first; C >= min_context (the
                last `context` are used).
            horizon: snapshots ahead (positive). Persistence and linear extrapolation take any horizon. The learned
                forecasters predict their trained horizons and interpolate the displacement linearly between
                them (and between 0 and the smallest); a horizon beyond the largest trained one is a
                SleepbotError, since extrapolating a learned forecast has no support in its training data.
            kind: the layer kind, `sleepbot.neurons.layer_kind(layer)`.
            progress: step / max_steps of the last snapshot when known (the learned forecasters were trained
                with it both known and unknown, so None is fine).
        """
        history = self.check_history(history)
        kind_index(kind)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise SleepbotError(f"horizon must be a positive number of snapshots, got {horizon!r}")
        prog = None
        if progress is not None:
            if not math.isfinite(float(progress)):
                raise SleepbotError(f"progress must be a finite step / max_steps, got {progress!r}")
            prog = torch.full((history.shape[1],), float(progress))
        with torch.no_grad():
            disp = self.displacement(history, [horizon], kind, prog)[0]  # [N, F]
        return history[-1] + disp

    def extra_repr(self) -> str:
        ctx = self.context if self.min_context == self.context else f"{self.min_context}..{self.context}"
        return f"context={ctx}, horizons={self.horizons}, snapshot_every={self.snapshot_every}"


class LearnedForecaster(Forecaster):
    """A forecaster with parameters, trained (by `ForecasterModule`) for a fixed set of horizons.

    Subclasses implement `forward(history, kind, progress) -> [len(self.horizons), N, F]`, the displacement in the
    same units as `history`; `displacement` interpolates it to other horizons (see `Forecaster.predict`).
    """

    learned: ClassVar[bool] = True

    def forward(self, history: torch.Tensor, kind: str, progress: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward_at(
        self, history: torch.Tensor, kind: str, progress: torch.Tensor | None, index: Sequence[int]
    ) -> torch.Tensor:
        """The displacement [len(index), N, F] at the trained horizons `self.horizons[i] for i in index`.

        This default runs `forward` for every trained horizon and keeps those asked for; a forecaster whose
        per-horizon work can be skipped overrides it with the same numbers for less work (a jump needs one
        horizon of three).
        """
        return self(history, kind, progress)[list(index)]

    def displacement(
        self,
        history: torch.Tensor,
        horizons: Sequence[int],
        kind: str = "linear",
        progress: torch.Tensor | None = None,
    ) -> torch.Tensor:
        trained = self.horizons
        if max(horizons) > trained[-1]:
            raise SleepbotError(
                f"horizon {max(horizons)} is beyond the largest horizon this {self.name} forecaster was trained "
                f"for ({trained[-1]}); valid: 1..{trained[-1]}"
            )
        if list(horizons) == list(trained):
            return self(history, kind, progress)  # [len(trained), N, F]
        # Piecewise-linear interpolation of the displacement over the trained horizons, anchored at (0, 0): knot
        # j is trained horizon j-1 (knot 0 is the zero displacement), and only the knots used are computed.
        knots = [0, *trained]
        brackets = []
        for h in horizons:
            j = next(i for i, k in enumerate(knots) if k >= h)
            brackets.append((j,) if knots[j] == h else (j - 1, j))
        used = sorted({j for b in brackets for j in b if j > 0})
        computed = dict(zip(used, self.forward_at(history, kind, progress, [j - 1 for j in used])))
        zero = torch.zeros_like(computed[used[0]])
        values = {0: zero, **computed}
        result = []
        for h, b in zip(horizons, brackets):
            if len(b) == 1:
                result.append(values[b[0]])
                continue
            lo, hi = b
            a = (h - knots[lo]) / (knots[hi] - knots[lo])
            result.append(values[lo] * (1 - a) + values[hi] * a)
        return torch.stack(result)


def build_forecaster(name: str, **kwargs: Any) -> Forecaster:
    """A forecaster from the registry by name; an unknown name is a one-line SleepbotError."""
    if name not in FORECASTERS:
        raise unknown_name("forecaster", name, FORECASTERS)
    return FORECASTERS[name](**kwargs)
