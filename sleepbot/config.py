"""Typed run configuration: YAML files and dotted command-line overrides map onto these dataclasses.

This module is imported by the CLI before any heavy library, so it must stay light (no torch, no Lightning):
bad names and bad types are caught here, in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sleepbot.errors import ConfigError

# Registry names (datasets, architectures, optimizers, sleep strategies) are not listed here: sleepbot.registry
# reads them from the registry lines in the source, so that a bad name fails before torch is imported and a new
# registry entry is usable from YAML and the CLI with no other edit. These are the config's own fixed choices.
SCHEDULES = ("constant", "cosine", "step")
LOGGERS = ("auto", "csv", "tensorboard", "none")


@dataclass
class DataConfig:
    """Which dataset and how it is batched. The split is a fixed function of `split_seed` (see data.py)."""

    name: str = "digits"
    batch_size: int = 32
    num_workers: int = 0
    data_dir: str = "data"
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    train_subset: int | None = None  # keep only this many training examples (tests, quick runs)


@dataclass
class ModelConfig:
    """Base-CNN architecture and its optimizer."""

    arch: str = "small_cnn"
    optimizer: str = "adam"
    lr: float = 1e-2  # the tuned lr of small_cnn/Adam on digits (configs/compare_digits.yaml)
    weight_decay: float = 0.0
    momentum: float = 0.9  # used by `momentum` (SGD with momentum) only
    schedule: str = "constant"  # constant | cosine (to 0 at max_steps) | step (x0.1 at 50% and 75%)
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    """Options passed to the Lightning Trainer. Validation runs every `val_every_n_steps` optimizer steps."""

    max_steps: int = 500
    val_every_n_steps: int = 10
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    logger: str = "auto"  # auto: CSV, plus TensorBoard when it is installed
    progress_bar: bool | None = None  # None: on an interactive terminal only
    deterministic: bool = True


@dataclass
class RecordConfig:
    """TrajectoryRecorder options (see recording.py); `enabled: false` records nothing."""

    enabled: bool = False
    path: str | None = None  # default: <out_dir>/<name>.h5
    snapshot_every: int = 10  # steps between full weight snapshots
    max_neurons_per_layer: int = 256
    gradients: bool = False
    optimizer_state: bool = False
    overwrite: bool = False


# The Sleep callback's settings are defined once, by its constructor's signature (sleepbot/sleep/callback.py);
# SleepConfig is built from that signature, read statically so the CLI stays light. Parameters that a YAML file
# cannot hold (a schedule or loss callable) or that come from elsewhere (the run's seed) are left out; the
# strategy's own options go in `options`, as keyword arguments do in `Sleep(strategy, **options)`.
_SLEEP_SIGNATURE = ("sleep/callback.py", "Sleep")
_SLEEP_NOT_CONFIGURABLE = ("schedule", "loss_fn", "seed", "options")
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": None, "list": list, "dict": dict}


def _annotation_type(text: str) -> Any:
    """A type from annotation text such as 'int | None' or 'list[str] | None'; None if not a YAML-able type."""
    try:
        return eval(text, {"__builtins__": {}}, _TYPES)  # names restricted to the table above
    except Exception:
        return None


def _sleep_config_class() -> type:
    from sleepbot.registry import signature_params

    fields: list[tuple[str, Any, Any]] = [("strategy", str, field(default="none"))]
    for p in signature_params(*_SLEEP_SIGNATURE):
        if p.name == "strategy" or p.name in _SLEEP_NOT_CONFIGURABLE:
            continue
        tp = _annotation_type(p.annotation)
        if tp is None:
            continue
        default = (
            field(default_factory=lambda v=p.default: type(v)(v))
            if isinstance(p.default, (list, dict))
            else field(default=p.default)
        )
        fields.append((p.name, tp, default))
    fields.append(("options", dict, field(default_factory=dict)))
    cls = dataclasses.make_dataclass("SleepConfig", fields)
    cls.__module__ = __name__  # pickling and repr name it as sleepbot.config.SleepConfig
    cls.__doc__ = (
        "The Sleep callback's settings (built from `Sleep.__init__`, see its docstring for each); `strategy` "
        "`none` is the control (no callback), a registry name or an import path `pkg.module.Class`; `options` "
        "are the strategy's constructor arguments (alpha, forecaster, checkpoint, ...)."
    )
    return cls


SleepConfig = _sleep_config_class()


@dataclass
class RunConfig:
    """One training run: data, model, trainer and the optional recorder and sleep callbacks."""

    seed: int = 0
    out_dir: str = "runs"
    name: str | None = None  # default: <dataset>-<arch>-<optimizer>-s<seed>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.data.name}-{self.model.arch}-{self.model.optimizer}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# (section, key) -> the registry kind (sleepbot.registry) or the fixed tuple of valid values.
_CHOICES: dict[tuple[str, str], str | tuple[str, ...]] = {
    ("data", "name"): "dataset",
    ("model", "arch"): "arch",
    ("model", "optimizer"): "optimizer",
    ("model", "schedule"): SCHEDULES,
    ("trainer", "logger"): LOGGERS,
    ("sleep", "strategy"): "strategy",
}


def _check_choice(section: str, key: str, value: Any) -> None:
    choices = _CHOICES.get((section, key))
    if choices is None:
        return
    extra = ""
    if isinstance(choices, str):
        from sleepbot.registry import is_import_path, names

        kind = choices
        choices = names(kind)
        if kind == "strategy":
            choices = ("none", *[c for c in choices if c != "none"])  # `none`: the control, no callback
            if isinstance(value, str) and is_import_path(value):
                return  # a user's own SleepStrategy subclass, imported when the run is built
            extra = ", or the import path of a SleepStrategy subclass (mypkg.module.MyStrategy)"
    if value not in choices:
        raise ConfigError(f"unknown {section}.{key} {value!r}; valid: {', '.join(choices)}{extra}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against a simple type annotation, converting where it is lossless (int -> float, '1e-3')."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-3' as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp) or (None,)
            return [v if item is None else _coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - a new annotation kind needs a branch here
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key {key!r} must be {name}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}; valid keys: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} must be a mapping, got {value!r}")
            kwargs[key] = _build(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    obj = cls(**kwargs)
    for name in fields:
        _check_choice(prefix.rstrip("."), name, getattr(obj, name))
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Turn `['--model.arch', 'lenet5', '--trainer.max_steps=500']` into a nested dict of raw values."""
    import yaml

    tree: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg!r} needs a value")
            raw = argv[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with one-line errors for a missing or malformed file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def build_config(cls: type, values: dict[str, Any] | None = None) -> Any:
    """Build a (nested) config dataclass from a plain dict, checking keys, types and registry names."""
    return _build(cls, values or {})


def resolve_run_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> RunConfig:
    """A RunConfig from an optional YAML file plus overrides (a list of CLI tokens or a nested dict)."""
    values: dict[str, Any] = load_yaml(path) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values = merge(values, overrides or {})
    return build_config(RunConfig, values)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
