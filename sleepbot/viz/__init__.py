"""Plots of training runs (matplotlib, headless). They read files or live objects; they never train.

Every plot function takes a run file, a directory of runs (a comparison's output directory too) or a live
object (an open RunFile, RunResults, a torch module), returns the matplotlib Figure, and saves it when given
`out`:

    from sleepbot.viz import plot_learning_curves, plot_norms, plot_response_grid, animate_response, plot_forecast
    plot_learning_curves("compare_out/", "curves.png")        # median + IQR per arm, sleeps marked
    plot_norms("run.h5", "norms.png")                         # per-neuron norms, heatmap, spread signal
    plot_response_grid("run.h5", "response.png")              # all-ones response per snapshot
    animate_response("run.h5", "response.gif")                # ... over training (.mp4 with ffmpeg)
    plot_forecast("run.h5", "forecast.png", forecaster="f.pt")  # forecast against actual, sample weights

Submodules are imported on first use, so `import sleepbot.viz` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "plot_learning_curves": "sleepbot.viz.curves",
    "arm_colors": "sleepbot.viz.curves",
    "plot_steps_to_target": "sleepbot.viz.curves",
    "plot_norms": "sleepbot.viz.norms",
    "compute_responses": "sleepbot.viz.response",
    "plot_response_grid": "sleepbot.viz.response",
    "animate_response": "sleepbot.viz.response",
    "rebuild_model": "sleepbot.viz.response",
    "plot_forecast": "sleepbot.viz.forecast",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sleepbot.viz' has no attribute {name!r}")
