"""The weight forecaster: learns from recorded runs how weights move, and forecasts a jump ahead.

    from sleepbot.forecast import load_forecaster
    f = load_forecaster()                                    # the default shipped with sleepbot
    w_next = f.predict(history, horizon=5, kind="conv2d")    # history [C, N, F] -> [N, F]

Modules: `base` (the Forecaster interface and registry), `baselines` (persistence, linear, WNN-style MLP), `lstm`
(the LSTM forecaster), `multiscale` (the long-history LSTM forecaster), `windows` (the windows dataset over run files, split by run), `module` (ForecasterModule,
train_forecaster), `evaluate` (R2_disp and cosine tables), `checkpoint` (save/load, weights_only), `state`
(what the optimizer's recorded state adds to a linear forecast: scripts/state_ablation.py).
"""

from __future__ import annotations

from sleepbot.forecast.base import (
    FORECASTERS,
    KINDS,
    Forecaster,
    LearnedForecaster,
    build_forecaster,
    neuron_scale,
    register_forecaster,
)
from sleepbot.forecast.baselines import LinearForecaster, MLPForecaster, PersistenceForecaster
from sleepbot.forecast.checkpoint import (
    DEFAULT_PATH,
    checkpoint_meta,
    load_baselines,
    load_forecaster,
    read_checkpoint,
    save_forecaster,
)
from sleepbot.forecast.lstm import LSTMForecaster
from sleepbot.forecast.multiscale import MultiScaleForecaster

__all__ = [
    "DEFAULT_PATH",
    "FORECASTERS",
    "KINDS",
    "Forecaster",
    "LSTMForecaster",
    "LearnedForecaster",
    "MultiScaleForecaster",
    "LinearForecaster",
    "MLPForecaster",
    "PersistenceForecaster",
    "build_forecaster",
    "checkpoint_meta",
    "load_baselines",
    "load_forecaster",
    "neuron_scale",
    "read_checkpoint",
    "register_forecaster",
    "save_forecaster",
]
