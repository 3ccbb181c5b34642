"""`SaturationStopping`: stop training once the validation curve has reached its estimated asymptote and,
optionally, every layer's neuron-norm spread has stopped moving.

The statistics live in `sleepbot.analysis` (pure NumPy, no Lightning); this module wraps them in a Lightning
callback, kept apart so that reading results and writing reports never pays for importing Lightning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl

from sleepbot.analysis import Asymptote, fit_asymptote, rate_of_change, relative_spread
from sleepbot.errors import SleepbotError
from sleepbot.neurons import neuron_layers, neuron_norms


class SaturationStopping(pl.Callback):
    """Stop when training has saturated, judged by the two signals of the original Sleepbot write-up.

    At every validation the callback appends the monitored metric and fits `fit_asymptote` to the curve so far.
    The run counts as saturated when the fitted curve is within `tol` of its asymptote at the current step
    (and the fit explains the curve: R^2 >= `min_r2`). With `spread_tol` set, every neuron layer's relative
    norm spread must also have settled: |d spread / d step| <= `spread_tol` over the last `spread_window`
    validations. Both must hold for `patience` validations in a row.

    Works in any Trainer with any LightningModule that logs `monitor`. Under DDP, rank 0 decides and broadcasts
    its decision, so every replica stops at the same step.

    Args:
        monitor: the logged validation metric (`val_acc` for sleepbot's Classifier).
        mode: `max` for an accuracy, `min` for a loss (the fit then runs on the negated metric).
        tol: distance to the asymptote, in the metric's units, that counts as reached.
        min_points: validations needed before the first fit (a saturating curve needs a few points).
        min_r2: the fit's minimum coefficient of determination; a poor fit never stops training.
        spread_tol: per-step rate below which a layer's norm spread counts as settled; None ignores norms.
        spread_window: validations per rate estimate.
        patience: consecutive saturated validations required.
    """

    def __init__(
        self,
        monitor: str = "val_acc",
        mode: str = "max",
        tol: float = 0.01,
        min_points: int = 8,
        min_r2: float = 0.5,
        spread_tol: float | None = None,
        spread_window: int = 5,
        patience: int = 2,
    ) -> None:
        if mode not in ("max", "min"):
            raise SleepbotError(f"unknown SaturationStopping mode {mode!r}; valid: max, min")
        if min_points < 3:
            raise SleepbotError(f"SaturationStopping min_points must be >= 3, got {min_points}")
        self.monitor = monitor
        self.mode = mode
        self.tol = tol
        self.min_points = min_points
        self.min_r2 = min_r2
        self.spread_tol = spread_tol
        self.spread_window = max(2, spread_window)
        self.patience = max(1, patience)
        self.steps: list[int] = []
        self.values: list[float] = []
        self.spreads: dict[str, list[float]] = {}
        self.count = 0
        self.stopped_step: int | None = None
        self.asymptote: Asymptote | None = None

    # ------------------------------------------------------------------------------------------ signals
    def curve_saturated(self) -> bool:
        """Whether the fitted validation curve has reached its asymptote at the last recorded step."""
        if len(self.values) < self.min_points:
            return False
        y = np.asarray(self.values, dtype=float)
        if not np.all(np.isfinite(y)):
            return False
        sign = 1.0 if self.mode == "max" else -1.0
        fit = fit_asymptote(self.steps, sign * y, tol=self.tol, cap=1.0 if self.mode == "max" else None)
        self.asymptote = fit
        return fit.saturated and fit.r2 >= self.min_r2

    def layers_settled(self) -> bool:
        """Whether every layer's relative norm spread moved by at most `spread_tol` per step lately."""
        if self.spread_tol is None:
            return True
        if not self.spreads or len(self.steps) < self.spread_window:
            return False
        steps = self.steps[-self.spread_window :]
        for series in self.spreads.values():
            rate = rate_of_change(steps, series[-self.spread_window :], window=self.spread_window)[-1]
            if not np.isfinite(rate) or abs(rate) > self.spread_tol:
                return False
        return True

    # ------------------------------------------------------------------------------------------ hooks
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            raise SleepbotError(
                f"SaturationStopping monitors {self.monitor!r}, which the module does not log; "
                f"logged: {', '.join(sorted(trainer.callback_metrics)) or 'nothing'}"
            )
        step = int(trainer.global_step)
        if self.steps and self.steps[-1] == step:  # a repeated validation at the same step adds nothing
            return
        self.steps.append(step)
        self.values.append(float(metric))
        if self.spread_tol is not None:
            for name, layer in neuron_layers(pl_module).items():
                norms = neuron_norms(layer).double().cpu().numpy()[None]  # [1, N]
                self.spreads.setdefault(name, []).append(float(relative_spread(norms)[0]))
        saturated = self.curve_saturated() and self.layers_settled()
        self.count = self.count + 1 if saturated else 0
        should_stop = bool(trainer.strategy.broadcast(self.count >= self.patience, src=0))
        if should_stop and self.stopped_step is None:
            self.stopped_step = step
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "values": list(self.values),
            "spreads": {k: list(v) for k, v in self.spreads.items()},
            "count": self.count,
            "stopped_step": self.stopped_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict["steps"])
        self.values = list(state_dict["values"])
        self.spreads = {k: list(v) for k, v in state_dict["spreads"].items()}
        self.count = int(state_dict["count"])
        self.stopped_step = state_dict["stopped_step"]
