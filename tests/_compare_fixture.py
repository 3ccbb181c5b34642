"""One tiny real comparison shared by test_compare, test_report and test_viz (built once per session).

Digits, 256 training examples, 40 steps, 2 seeds; two base optimizers (Adam, the reference, and SGD+momentum,
the alternative), each tuned on its own 2-point grid with 1 development seed; arms none, momentum (alone), linear
and oracle on Adam, linear on momentum; the oracle paired against linear. Trained in-process (workers=1): 14 short runs.
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
    "tune": {"seeds": 1, "seed_start": 100},
    "optimizers": [
        {"name": "adam", "model": {"optimizer": "adam"}, "lrs": [3e-3, 1e-2]},
        {"name": "momentum", "model": {"optimizer": "momentum"}, "lrs": [3e-2, 1e-1]},
    ],
    "arms": [
        "none",
        {
            "name": "linear",
            "strategy": "linear",
            "every_n_steps": 20,
            "horizon": 2,
            "context": 2,
            "check_batches": 1,
        },
        {"name": "oracle", "strategy": "oracle", "every_n_steps": 20, "horizon": 2},
        {
            "name": "linear+momentum",
            "strategy": "linear",
            "optimizer": "momentum",
            "every_n_steps": 20,
            "horizon": 2,
            "context": 2,
            "chosen_on": "nothing (a test)",
        },
    ],
    "pairs": [["oracle", "linear"]],
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
