"""Sleep: between training batches, move the weights to where training would take them.

    import pytorch_lightning as pl
    from sleepbot import Sleep
    trainer = pl.Trainer(callbacks=[Sleep("learned", every_n_steps=100, horizon=10)])
    Sleep("linear"); Sleep("noise", alpha=0.01); Sleep(my_strategy)   # a SleepStrategy instance

base.py holds the strategy interface and registry, strategies.py the built-in strategies, callback.py the
Sleep callback, optim_state.py what a jump does to the optimizer's state.
"""

from __future__ import annotations

from typing import Any

from sleepbot.sleep import strategies as _strategies  # noqa: F401  (fills the registry)
from sleepbot.sleep.base import (
    STRATEGIES,
    EveryNSteps,
    LayerContext,
    SleepSettings,
    SleepStrategy,
    make_strategy,
    register_strategy,
)
from sleepbot.sleep.callback import Sleep, default_loss
from sleepbot.sleep.optim_state import OPTIMIZER_STATE_POLICIES, adjust_optimizer_state

__all__ = [
    "STRATEGIES",
    "OPTIMIZER_STATE_POLICIES",
    "EveryNSteps",
    "LayerContext",
    "Sleep",
    "SleepSettings",
    "SleepStrategy",
    "adjust_optimizer_state",
    "default_loss",
    "make_strategy",
    "register_strategy",
    "sleep_from_config",
]


def sleep_from_config(cfg: Any) -> Sleep:
    """The Sleep callback a RunConfig's `sleep` section describes (its seed is the run's seed).

    `forecaster` is passed to the `learned` strategy (and to `random` matched to `learned`); `options` go to the
    strategy's constructor.
    """
    s = cfg.sleep
    options = dict(s.options)
    if s.forecaster is not None:
        if s.strategy == "learned" or (s.strategy == "random" and options.get("base") == "learned"):
            options.setdefault("forecaster", s.forecaster)
    return Sleep(
        s.strategy,
        every_n_steps=s.every_n_steps,
        start_step=s.start_step,
        stop_step=s.stop_step,
        horizon=s.horizon,
        snapshot_every=s.snapshot_every,
        context=s.context,
        optimizer_state=s.optimizer_state,
        check_batches=s.check_batches,
        tolerance=s.tolerance,
        after_plateau=s.after_plateau,
        plateau_window=s.plateau_window,
        plateau_delta=s.plateau_delta,
        seed=cfg.seed,
        **options,
    )
