"""sleepbot: record, forecast and jump ahead neural-network weight trajectories during training.

The public API is re-exported here lazily (PEP 562), so that `import sleepbot` and `sleepbot --help` do not pay for
importing torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from sleepbot._version import __version__

_EXPORTS = {
    "RunConfig": "sleepbot.config",
    "SleepbotError": "sleepbot.errors",
    "make_datamodule": "sleepbot.data",
    "Classifier": "sleepbot.models",
    "build_arch": "sleepbot.models",
    "run_training": "sleepbot.training",
    "TrajectoryRecorder": "sleepbot.recording",
    "RecorderCore": "sleepbot.recording",
    "RunFile": "sleepbot.store",
    "TrajectoryStore": "sleepbot.store",
    "Sleep": "sleepbot.sleep",
    "SleepStrategy": "sleepbot.sleep",
    "Forecaster": "sleepbot.forecast",
    "load_forecaster": "sleepbot.forecast",
    "SaturationStopping": "sleepbot.stopping",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sleepbot' has no attribute {name!r}")
