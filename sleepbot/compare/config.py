"""The compare YAML: workloads x arms x seeds, the lr grid, the statistics' knobs; checked before anything trains."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.config import ModelConfig, RunConfig, SleepConfig, build_config, load_yaml, merge
from sleepbot.errors import ConfigError

SLEEP_KEYS = {f.name for f in dataclasses.fields(SleepConfig)}


# --------------------------------------------------------------------------------------------- config
@dataclass
class BaseOptimizer:
    """A base optimizer of a comparison: ModelConfig settings (optimizer, schedule, warmup, momentum, ...) and the
    lr grid it is tuned on. Every base optimizer of a comparison gets the same tuning budget (grid size x seeds).

    Attributes:
        name: how tables name it (`adam`, `adam_cosine`, `schedulefree`, ...).
        model: `model:` section values merged over the workload's.
        lrs: the grid; None: not tuned (the workload's lr is used).
    """

    name: str
    model: dict[str, Any]
    lrs: list[float] | None = None


@dataclass
class Arm:
    """One arm: a sleep strategy with its settings (SleepConfig fields; `strategy` defaults to the arm's name) on
    a base optimizer. `none` on the reference optimizer is the baseline every speedup is measured against; `none`
    on another base optimizer is that optimizer alone, a tuned alternative.

    Attributes:
        chosen_on: which seeds (or which experiment) chose this arm's settings; tables print it, and they must not
            be seeds of the table itself.
    """

    name: str
    sleep: dict[str, Any]
    optimizer: str = ""
    chosen_on: str | None = None


@dataclass
class Workload:
    """One kind of run: a RunConfig dict (data, model, trainer), the same for every arm."""

    name: str
    run: dict[str, Any]


@dataclass
class CompareConfig:
    """A comparison: workloads x arms x seeds; each base optimizer tuned on its own grid; the statistics' knobs."""

    workloads: list[Workload]
    arms: list[Arm]
    seeds: list[int]
    optimizers: list[BaseOptimizer] = field(default_factory=list)
    reference: str = ""  # the base optimizer whose `none` arm is the baseline (and defines the target)
    tune_seeds: list[int] = field(default_factory=list)  # never among `seeds`
    target: float | None = None  # None: the baseline's median final validation accuracy
    miss_factor: float = 2.0
    snapshot_every: int = 10  # snapshot interval of every recorded run (the oracle reads the no-sleep ones)
    n_boot: int = 2000
    # (arm, against): the speedup of one arm over another, paired by seed, beside the table (e.g. two variants)
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def optimizer(self, name: str) -> BaseOptimizer:
        return next(o for o in self.optimizers if o.name == name)

    @property
    def baseline(self) -> Arm:
        return next(a for a in self.arms if a.sleep["strategy"] == "none" and a.optimizer == self.reference)


_TOP_KEYS = (
    "seeds",
    "seed_start",
    "base",
    "workloads",
    "optimizers",
    "reference",
    "arms",
    "tune",
    "target",
    "miss_factor",
    "snapshot_every",
    "pairs",
)
_TUNE_KEYS = ("lrs", "low", "high", "num", "seeds", "seed_start")
_OPT_KEYS = ("name", "model", "lrs", "low", "high", "num")
# Development seeds: lrs are tuned on these, never on a table's seeds (1000-... in the shipped configs; the
# forecaster's data uses 0-3).
DEFAULT_TUNE_SEED_START = 900


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
    seed_list = _seed_list(
        values.get("seeds", 10) if seeds is None else seeds, values.get("seed_start", 0), "seeds"
    )
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

    tune = values.get("tune") or {}
    _check_keys(tune, _TUNE_KEYS, "tune")
    optimizers = _parse_optimizers(values, tune, base)
    names = [o.name for o in optimizers]
    reference = values.get("reference", names[0])
    if reference not in names:
        raise ConfigError(
            f"reference optimizer {reference!r} is not among the optimizers; valid: {', '.join(names)}"
        )
    for o in optimizers:  # the optimizer's settings must make a valid run config with every workload
        for w in workloads:
            build_config(RunConfig, merge(w.run, {"model": o.model}))
    sizes = {o.name: len(o.lrs) for o in optimizers if o.lrs}
    if len(set(sizes.values())) > 1:
        raise ConfigError(
            f"every base optimizer gets the same tuning budget, but the lr grids have sizes {sizes}; "
            f"give each the same number of lrs"
        )

    raw_arms = values.get("arms") or [{"name": "none"}]
    if not isinstance(raw_arms, list):
        raise ConfigError(f"compare config 'arms' must be a list, got {raw_arms!r}")
    arms: list[Arm] = []
    for i, a in enumerate(raw_arms):
        if isinstance(a, str):
            a = {"name": a}
        _check_keys(a, {"name", "optimizer", "chosen_on", *SLEEP_KEYS}, f"arms[{i}]")
        if "name" not in a:
            raise ConfigError(f"arms[{i}] needs a 'name'")
        _check_name(str(a["name"]), "arm")
        opt = a.get("optimizer", reference)
        if opt not in names:
            raise ConfigError(f"arm {a['name']!r}: unknown optimizer {opt!r}; valid: {', '.join(names)}")
        sleep = {k: v for k, v in a.items() if k not in ("name", "optimizer", "chosen_on")}
        sleep.setdefault("strategy", a["name"])
        build_config(RunConfig, {"sleep": sleep})  # type-check the sleep settings and the strategy name
        chosen = a.get("chosen_on")
        arms.append(
            Arm(
                name=str(a["name"]),
                sleep=sleep,
                optimizer=opt,
                chosen_on=None if chosen is None else str(chosen),
            )
        )
    # Every base optimizer runs alone (`none`): the reference's is the baseline, the others are the alternatives.
    for o in optimizers:
        if not any(a.sleep["strategy"] == "none" and a.optimizer == o.name for a in arms):
            name = "none" if o.name == reference else o.name
            arms.insert(
                len([a for a in arms if a.sleep["strategy"] == "none"]),
                Arm(name, {"strategy": "none"}, o.name),
            )
    seen: set[str] = set()
    for a in arms:
        if a.name in seen:
            raise ConfigError(f"arm name {a.name!r} appears twice; give each arm its own name")
        seen.add(a.name)

    tune_seeds: list[int] = []
    if any(o.lrs for o in optimizers):
        tune_seeds = _seed_list(
            tune.get("seeds", 3), tune.get("seed_start", DEFAULT_TUNE_SEED_START), "tune.seeds"
        )
        overlap = sorted(set(tune_seeds) & set(seed_list))
        if overlap:
            raise ConfigError(
                f"tuning seeds {overlap} are also seeds of the comparison; settings are chosen on other seeds "
                f"than the ones judged (set tune.seed_start, e.g. {DEFAULT_TUNE_SEED_START})"
            )

    target = values.get("target")
    if target is not None:
        target = _float_list([target], "target")[0]
    miss = _float_list([values.get("miss_factor", 2.0)], "miss_factor")[0]
    snapshot_every = values.get("snapshot_every", 10)
    if not isinstance(snapshot_every, int) or snapshot_every < 1:
        raise ConfigError(f"snapshot_every must be an int >= 1, got {snapshot_every!r}")
    pairs = _parse_pairs(values.get("pairs") or [], [a.name for a in arms])
    return CompareConfig(
        pairs=pairs,
        workloads=workloads,
        arms=arms,
        seeds=seed_list,
        optimizers=optimizers,
        reference=reference,
        tune_seeds=tune_seeds,
        target=target,
        miss_factor=miss,
        snapshot_every=snapshot_every,
    )


def _parse_pairs(raw: Any, arms: list[str]) -> list[tuple[str, str]]:
    """`pairs: [[arm, against], ...]`: two different arms of this config each."""
    if not isinstance(raw, list):
        raise ConfigError(f"compare config 'pairs' must be a list of [arm, against] pairs, got {raw!r}")
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ConfigError(f"pairs[{i}] must be [arm, against], got {pair!r}")
        for name in pair:
            if name not in arms:
                raise ConfigError(f"pairs[{i}]: unknown arm {name!r}; valid: {', '.join(arms)}")
        if pair[0] == pair[1]:
            raise ConfigError(f"pairs[{i}] compares arm {pair[0]!r} with itself; give two different arms")
        out.append((str(pair[0]), str(pair[1])))
    return out


def _seed_list(spec: Any, start: Any, where: str) -> list[int]:
    if isinstance(spec, bool) or not isinstance(start, int) or isinstance(start, bool):
        raise ConfigError(f"{where} must be a count or a list of ints (with an int seed_start), got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ConfigError(f"{where} must be >= 1, got {spec}")
        return list(range(start, start + spec))
    if isinstance(spec, list) and spec and all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
        return list(dict.fromkeys(spec))
    raise ConfigError(f"{where} must be a count or a list of ints, got {spec!r}")


def _grid(d: dict[str, Any], where: str) -> list[float] | None:
    if "lrs" in d:
        return _float_list(d["lrs"], f"{where}.lrs")
    if any(k in d for k in ("low", "high", "num")):
        lo = _float_list([d.get("low", 1e-3)], f"{where}.low")[0]
        hi = _float_list([d.get("high", 3e-2)], f"{where}.high")[0]
        return log_grid(lo, hi, int(d.get("num", 4)))
    return None


def _parse_optimizers(
    values: dict[str, Any], tune: dict[str, Any], base: dict[str, Any]
) -> list[BaseOptimizer]:
    """The base optimizers: the `optimizers:` list, or one made of the workloads' own `model.optimizer`."""
    raw = values.get("optimizers")
    if raw is None:  # one base optimizer: the one the workloads name, tuned on `tune`'s grid (if any)
        model = base.get("model") or {}
        name = str(model.get("optimizer", "adam"))
        return [BaseOptimizer(name=_check_name(name, "optimizer"), model={}, lrs=_grid(tune, "tune"))]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"compare config 'optimizers' must be a non-empty list, got {raw!r}")
    out: list[BaseOptimizer] = []
    for i, o in enumerate(raw):
        _check_keys(o, _OPT_KEYS, f"optimizers[{i}]")
        if "name" not in o:
            raise ConfigError(f"optimizers[{i}] needs a 'name'")
        name = _check_name(str(o["name"]), "optimizer")
        if any(x.name == name for x in out):
            raise ConfigError(f"optimizer name {name!r} appears twice; give each its own name")
        model = _check_keys(
            o.get("model") or {}, {f.name for f in dataclasses.fields(ModelConfig)}, f"optimizers[{i}].model"
        )
        if "lr" in model:
            raise ConfigError(f"optimizers[{i}].model sets lr; give the grid as optimizers[{i}].lrs instead")
        out.append(
            BaseOptimizer(
                name=name, model=dict(model), lrs=_grid(o, f"optimizers[{i}]") or _grid(tune, "tune")
            )
        )
    return out


def load_compare_config(path: str | Path, seeds: int | None = None) -> CompareConfig:
    """Read and check a compare YAML file."""
    return parse_compare_config(load_yaml(path), seeds=seeds)
