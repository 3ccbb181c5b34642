"""The compare YAML: workloads x arms x seeds, the lr grid, the statistics' knobs; checked before anything trains."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.config import RunConfig, SleepConfig, build_config, load_yaml, merge
from sleepbot.errors import ConfigError

_SLEEP_KEYS = {f.name for f in dataclasses.fields(SleepConfig)}


# --------------------------------------------------------------------------------------------- config
@dataclass
class Arm:
    """One strategy with its sleep settings (SleepConfig fields; `strategy` defaults to the arm's name)."""

    name: str
    sleep: dict[str, Any]


@dataclass
class Workload:
    """One kind of run: a RunConfig dict (data, model, trainer), the same for every arm."""

    name: str
    run: dict[str, Any]


@dataclass
class CompareConfig:
    """A comparison: workloads x arms x seeds, the lr grid that tunes the baseline and the statistics' knobs."""

    workloads: list[Workload]
    arms: list[Arm]
    seeds: list[int]
    tune_lrs: list[float] | None = None  # None: no tuning, each workload's own lr
    tune_seeds: list[int] = field(default_factory=list)
    target: float | None = None  # None: the no-sleep arm's median final validation accuracy
    miss_factor: float = 2.0
    record_every: int = 10  # snapshot interval of every recorded run (the oracle reads the no-sleep ones)
    n_boot: int = 2000

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TOP_KEYS = (
    "seeds",
    "seed_start",
    "base",
    "workloads",
    "arms",
    "tune",
    "target",
    "miss_factor",
    "record_every",
)
_TUNE_KEYS = ("lrs", "low", "high", "num", "seeds")


def _check_keys(d: Any, valid: tuple[str, ...] | set[str], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    for key in d:
        if key not in valid:
            raise ConfigError(f"unknown {where} key {key!r}; valid keys: {', '.join(sorted(valid))}")
    return d


def _float_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of numbers, got {value!r}")
    out = []
    for v in value:
        try:
            out.append(float(v))  # YAML 1.1 reads 1e-3 as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must hold numbers, got {v!r}") from None
        if not math.isfinite(out[-1]) or out[-1] <= 0:
            raise ConfigError(f"{where} must hold positive numbers, got {v!r}")
    return out


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check_name(name: str, what: str) -> str:
    # Names become parts of file names: no path separators, no spaces.
    if not _NAME.match(name):
        raise ConfigError(
            f"{what} name {name!r} must be letters, digits and _ . + - (it becomes part of file names)"
        )
    return name


def log_grid(low: float, high: float, num: int) -> list[float]:
    """`num` log-spaced learning rates from `low` to `high`, rounded to 3 significant digits for readable names."""
    if not (0 < low <= high) or num < 1:
        raise ConfigError(
            f"lr grid needs 0 < low <= high and num >= 1, got low={low}, high={high}, num={num}"
        )
    if num == 1:
        return [float(f"{low:.3g}")]
    return [float(f"{x:.3g}") for x in np.geomspace(low, high, num)]


def parse_compare_config(values: dict[str, Any], seeds: int | None = None) -> CompareConfig:
    """Build and check a CompareConfig from a YAML mapping (see configs/compare_*.yaml for the layout).

    Every run config is built once here, so a bad dataset name or key fails before anything trains.

    Args:
        values: the YAML mapping.
        seeds: override the number of seeds (keeps `seed_start`).
    """
    _check_keys(values, _TOP_KEYS, "compare config")
    seed_spec = values.get("seeds", 10) if seeds is None else seeds
    start = values.get("seed_start", 0)
    if isinstance(seed_spec, bool) or not isinstance(start, int):
        raise ConfigError(f"compare config 'seeds' must be a count or a list of ints, got {seed_spec!r}")
    if isinstance(seed_spec, int):
        if seed_spec < 1:
            raise ConfigError(f"compare config 'seeds' must be >= 1, got {seed_spec}")
        seed_list = list(range(start, start + seed_spec))
    elif isinstance(seed_spec, list) and seed_spec and all(isinstance(s, int) for s in seed_spec):
        seed_list = list(dict.fromkeys(seed_spec))
    else:
        raise ConfigError(f"compare config 'seeds' must be a count or a list of ints, got {seed_spec!r}")

    base = _check_keys(values.get("base", {}) or {}, {f.name for f in dataclasses.fields(RunConfig)}, "base")
    raw_workloads = values.get("workloads") or [{"name": "default", "run": {}}]
    if not isinstance(raw_workloads, list):
        raise ConfigError(f"compare config 'workloads' must be a list, got {raw_workloads!r}")
    workloads = []
    for i, w in enumerate(raw_workloads):
        _check_keys(w, ("name", "run"), f"workloads[{i}]")
        run = merge(base, w.get("run") or {})
        run_cfg = build_config(RunConfig, run)  # checks names and types now
        name = str(w.get("name") or f"{run_cfg.data.name}-{run_cfg.model.arch}-{run_cfg.model.optimizer}")
        _check_name(name, "workload")
        if any(name == x.name for x in workloads):
            raise ConfigError(f"workload name {name!r} appears twice; give each workload its own name")
        workloads.append(Workload(name=name, run=run))

    raw_arms = values.get("arms") or [{"name": "none"}]
    if not isinstance(raw_arms, list):
        raise ConfigError(f"compare config 'arms' must be a list, got {raw_arms!r}")
    arms = []
    for i, a in enumerate(raw_arms):
        if isinstance(a, str):
            a = {"name": a}
        _check_keys(a, {"name", *_SLEEP_KEYS}, f"arms[{i}]")
        if "name" not in a:
            raise ConfigError(f"arms[{i}] needs a 'name'")
        _check_name(str(a["name"]), "arm")
        sleep = {k: v for k, v in a.items() if k != "name"}
        sleep.setdefault("strategy", a["name"])
        build_config(RunConfig, {"sleep": sleep})  # type-check the sleep settings
        if any(a["name"] == x.name for x in arms):
            raise ConfigError(f"arm name {a['name']!r} appears twice; give each arm its own name")
        arms.append(Arm(name=str(a["name"]), sleep=sleep))
    if not any(a.sleep["strategy"] == "none" for a in arms):
        arms.insert(0, Arm(name="none", sleep={"strategy": "none"}))  # the baseline every statistic needs

    tune = values.get("tune")
    tune_lrs = None
    tune_seeds: list[int] = []
    if tune:
        _check_keys(tune, _TUNE_KEYS, "tune")
        if "lrs" in tune:
            tune_lrs = _float_list(tune["lrs"], "tune.lrs")
        else:
            lo = _float_list([tune.get("low", 1e-3)], "tune.low")[0]
            hi = _float_list([tune.get("high", 3e-2)], "tune.high")[0]
            tune_lrs = log_grid(lo, hi, int(tune.get("num", 4)))
        n_tune = tune.get("seeds", 3)
        if not isinstance(n_tune, int) or isinstance(n_tune, bool) or n_tune < 1:
            raise ConfigError(f"tune.seeds must be a count >= 1, got {n_tune!r}")
        # The first seeds of the comparison: their no-sleep runs at the chosen lr are reused by the none arm.
        tune_seeds = seed_list[: min(n_tune, len(seed_list))]

    target = values.get("target")
    if target is not None:
        target = _float_list([target], "target")[0]
    miss = _float_list([values.get("miss_factor", 2.0)], "miss_factor")[0]
    record_every = values.get("record_every", 10)
    if not isinstance(record_every, int) or record_every < 1:
        raise ConfigError(f"record_every must be an int >= 1, got {record_every!r}")
    return CompareConfig(
        workloads=workloads,
        arms=arms,
        seeds=seed_list,
        tune_lrs=tune_lrs,
        tune_seeds=tune_seeds,
        target=target,
        miss_factor=miss,
        record_every=record_every,
    )


def load_compare_config(path: str | Path, seeds: int | None = None) -> CompareConfig:
    """Read and check a compare YAML file."""
    return parse_compare_config(load_yaml(path), seeds=seeds)
