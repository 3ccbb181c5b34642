"""Sleep: between training batches, move the weights to where training would take them.

    import pytorch_lightning as pl
    from sleepbot import Sleep
    trainer = pl.Trainer(callbacks=[Sleep("learned", every_n_steps=100, horizon=10)])
    Sleep("linear"); Sleep("noise", alpha=0.01); Sleep(my_strategy)   # a SleepStrategy instance

base.py holds the strategy interface and registry, strategies.py the built-in strategies, callback.py the
Sleep callback, optim_state.py what a jump does to the optimizer's state.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from sleepbot.errors import SleepbotError
from sleepbot.registry import is_import_path
from sleepbot.sleep import nino as _nino  # noqa: F401
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
    "import_strategy",
    "make_strategy",
    "register_strategy",
    "sleep_from_config",
]


def sleep_from_config(cfg: Any) -> Sleep:
    """The Sleep callback a RunConfig's `sleep` section describes (its seed is the run's seed).

    Every setting of the section is a `Sleep` constructor argument of the same name (SleepConfig is built from
    that signature); `options` go to the strategy's constructor. A strategy given as an import path
    (`mypkg.module.MyStrategy` or `mypkg.module:MyStrategy`) is imported and built with the options.
    """
    s = cfg.sleep
    settings = {
        f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in ("strategy", "options")
    }
    strategy: str | SleepStrategy = s.strategy
    options = dict(s.options)
    if s.strategy not in STRATEGIES and is_import_path(s.strategy):
        cls = import_strategy(s.strategy)
        try:
            strategy = cls(**options)
        except TypeError as e:
            raise SleepbotError(f"sleep strategy {s.strategy!r}: {e}") from None
        options = {}
    return Sleep(strategy, seed=cfg.seed, **settings, **options)


def import_strategy(path: str) -> type[SleepStrategy]:
    """The SleepStrategy subclass at `pkg.module.Class` or `pkg.module:Class`; a one-line error otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SleepbotError(
            f"sleep strategy {path!r} could not be imported ({type(e).__name__}: {e})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, SleepStrategy)):
        raise SleepbotError(f"sleep strategy {path!r} is {cls!r}, not a SleepStrategy subclass")
    return cls
