"""The baselines every learned forecaster must beat: persistence, linear extrapolation and a WNN-style MLP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sleepbot.forecast.base import Forecaster, LearnedForecaster, register_forecaster


def line_fit(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares line through each weight's C snapshots at times 0..C-1.

    Returns:
        (slope, offset): slope per snapshot [N, F], and offset = line(C-1) - w(C-1), the fitted line's value at
        the last snapshot minus the last snapshot [N, F]. The line's forecast h snapshots ahead of the last one
        is then w(C-1) + offset + slope * h.
    """
    c = history.shape[0]
    t = torch.arange(c, dtype=history.dtype, device=history.device) - (c - 1) / 2  # centred times, sum 0
    mean = history.mean(0)  # [N, F]
    slope = torch.tensordot(t, history, dims=([0], [0])) / t.pow(2).sum()  # [N, F]
    offset = mean + slope * t[-1] - history[-1]
    return slope, offset


@register_forecaster("persistence")
class PersistenceForecaster(Forecaster):
    """No change: w(t+h) = w(t). Scores R2_disp = 0 by definition; the floor every forecaster is measured from."""

    def displacement(
        self,
        history: torch.Tensor,
        horizons: Sequence[int],
        kind: str = "linear",
        progress: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return torch.zeros(len(horizons), *history.shape[1:], dtype=history.dtype)


@register_forecaster("linear")
class LinearForecaster(Forecaster):
    """Linear extrapolation: a least-squares line through each weight's context, followed `h` snapshots ahead.

    Any horizon works. It is what a learned forecaster has to beat to be worth its cost (PRIOR_ART.md: a plain linear
    fit got 1.33x where WNN got 2.09x).
    """

    def displacement(
        self,
        history: torch.Tensor,
        horizons: Sequence[int],
        kind: str = "linear",
        progress: torch.Tensor | None = None,
    ) -> torch.Tensor:
        slope, offset = line_fit(history)
        return torch.stack([offset + slope * h for h in horizons])


@register_forecaster("mlp")
class MLPForecaster(LearnedForecaster):
    """An Introspection/WNN-style MLP, applied to every weight on its own with shared parameters.

    Input, per weight: its context values min-max scaled over the context and shifted so that the last is 0, and
    their C-1 differences in the same units (WNN: 5 values + 4 differences). Output: the displacement for each
    trained horizon in the same units, multiplied back by the weight's min-max range. It sees neither the
    neuron, the layer kind nor the training progress: that is what makes it the WNN baseline.

    Args:
        hidden: width of the two hidden layers (64: about 5k parameters, WNN's size).
    """

    def __init__(
        self,
        context: int = 5,
        horizons: Sequence[int] = (5, 10, 20),
        snapshot_every: int | None = None,
        default_horizon: int | None = None,
        hidden: int = 64,
    ) -> None:
        super().__init__(context, horizons, snapshot_every, default_horizon)
        self.hidden = int(hidden)
        self.net = nn.Sequential(
            nn.Linear(2 * (self.context - 1), hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, len(self.horizons)),
        )

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden}

    def forward(self, history: torch.Tensor, kind: str, progress: torch.Tensor | None) -> torch.Tensor:
        last = history[-1]  # [N, F]
        rng = history.amax(0) - history.amin(0)  # [N, F]
        rng = rng + 1e-6 * last.abs() + 1e-12  # a weight that never moved: tiny, not zero
        x = (history[:-1] - last) / rng  # [C-1, N, F], in [-1, 1]
        d = (history[1:] - history[:-1]) / rng  # [C-1, N, F]
        feats = torch.cat([x, d]).permute(1, 2, 0)  # [N, F, 2(C-1)]
        out = self.net(feats)  # [N, F, H]
        return (out * rng[..., None]).permute(2, 0, 1)  # [H, N, F]
