"""Record per-neuron weight trajectories while a network trains.

- `RecorderCore` (recording/core.py) is framework-free: a plain PyTorch loop drives it with
  `record_step(step, loss)`. Importing it does not import Lightning.
- `TrajectoryRecorder` (recording/callback.py) is the Lightning callback over it, and `recorder_from_config`
  builds one from a RunConfig.

Names are resolved lazily (PEP 562), so `from sleepbot.recording import RecorderCore` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RecorderCore": "sleepbot.recording.core",
    "sample_neurons": "sleepbot.recording.core",
    "optimizer_state_keys": "sleepbot.recording.core",
    "TrajectoryRecorder": "sleepbot.recording.callback",
    "recorder_from_config": "sleepbot.recording.callback",
    "VAL_LOSS_KEYS": "sleepbot.recording.callback",
    "VAL_ACC_KEYS": "sleepbot.recording.callback",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sleepbot.recording' has no attribute {name!r}")
