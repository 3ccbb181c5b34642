"""One tiny real comparison shared by test_compare, test_report and test_viz (built once per session).

Digits, 256 training examples, 40 steps, 2 seeds; the lr tuned on a 2-point grid with 1 seed; arms none,
linear and oracle. Trained in-process (workers=1): about 7 short runs.
"""

from __future__ import annotations

from pathlib import Path

TINY = {
    "seeds": 2,
    "seed_start": 5,
    "base": {
        "data": {"name": "digits", "train_subset": 256},
        "trainer": {"max_steps": 40, "val_every_n_steps": 10},
    },
    "tune": {"lrs": [3e-3, 1e-2], "seeds": 1},
    "arms": [
        "none",
        {"name": "linear", "strategy": "linear", "every_n_steps": 20, "horizon": 2, "context": 2},
        {"name": "oracle", "strategy": "oracle", "every_n_steps": 20, "horizon": 2},
    ],
}

_CACHE: dict[str, Path] = {}


def tiny_comparison(tmp_path_factory) -> Path:
    """The output directory of the tiny comparison (results.json, results.csv, runs/)."""
    if "out" not in _CACHE:
        from sleepbot.compare import compare, parse_compare_config

        out = tmp_path_factory.mktemp("tiny_compare")
        compare(parse_compare_config(TINY), out, workers=1, progress=False)
        _CACHE["out"] = out
    return _CACHE["out"]
