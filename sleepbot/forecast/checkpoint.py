"""Forecaster checkpoints: weights, constructor config, normalisation and metadata in one torch file.

The file holds only tensors, numbers, strings, lists and dicts, and is read with `torch.load(weights_only=True)`, so
a downloaded checkpoint cannot run code. Layout (FORMAT_VERSION 1):

    {"format": "sleepbot-forecaster", "format_version": 1, "sleepbot_version": str,
     "forecaster": {"name": str, "config": {constructor kwargs}, "state_dict": {str: Tensor}},
     "normalisation": {"kind": "neuron-motion-rms", ...},   # how inputs/losses are scaled (see base.neuron_scale)
     "baselines": {name: {"name", "config", "state_dict"}},  # learned baselines trained on the same split
     "meta": {...}}                                         # split, data, training settings, validation scores
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from sleepbot._version import __version__
from sleepbot.errors import SleepbotError
from sleepbot.forecast.base import FORECASTERS, Forecaster, build_forecaster

FORMAT = "sleepbot-forecaster"
FORMAT_VERSION = 1
NORMALISATION = {
    "kind": "neuron-motion-rms",
    "doc": "inputs and losses in units of each neuron's RMS weight step over the context (scale-free)",
}
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "forecaster.pt"


def _plain(value: Any) -> Any:
    """Metadata as the types weights_only loading accepts (tuples become lists, paths strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None or isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _entry(model: Forecaster) -> dict[str, Any]:
    if model.name not in FORECASTERS:
        raise SleepbotError(f"cannot save a {type(model).__name__}: it is not a registered forecaster")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"name": model.name, "config": _plain(model.config()), "state_dict": state}


def save_forecaster(
    model: Forecaster,
    path: str | Path,
    *,
    overwrite: bool = False,
    baselines: dict[str, Forecaster] | None = None,
    **meta: Any,
) -> None:
    """Write `model` (and optional learned `baselines`) to `path`; existing files need `overwrite=True`.

    The file is written next to the target and renamed into place, so a crash never leaves half a checkpoint.

    Args:
        model: a registered forecaster.
        path: the .pt file to write.
        overwrite: replace an existing file.
        baselines: other forecasters trained on the same data (the evaluation compares against them).
        **meta: plain metadata (split, data, training settings, scores).
    """
    path = Path(path)
    if path.is_dir():
        raise SleepbotError(f"{str(path)!r} is a directory; give a file name such as forecaster.pt")
    if path.exists() and not overwrite:
        raise SleepbotError(f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sleepbot_version": __version__,
        "forecaster": _entry(model),
        "normalisation": dict(NORMALISATION),
        "baselines": {name: _entry(b) for name, b in (baselines or {}).items()},
        "meta": _plain(meta),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(blob, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checked checkpoint dict; anything that is not a sleepbot forecaster is a one-line SleepbotError."""
    path = Path(path)
    if not path.is_file():
        raise SleepbotError(f"forecaster checkpoint {str(path)!r} does not exist")
    what = f"{str(path)!r} is not a sleepbot forecaster checkpoint"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers: a pickle of other objects lands here.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SleepbotError(
            f"{what} (it holds objects that weights_only loading refuses: {first[:120]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any file torch cannot read (text, truncated, random bytes) lands here
        raise SleepbotError(f"{what} (not a readable torch file: {type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SleepbotError(f"{what} (a torch file without the {FORMAT!r} marker)")
    version = blob.get("format_version")
    if version != FORMAT_VERSION:
        raise SleepbotError(
            f"{str(path)!r} is a forecaster checkpoint of format version {version}; this sleepbot reads "
            f"version {FORMAT_VERSION}"
        )
    entry = blob.get("forecaster")
    if not isinstance(entry, dict) or not {"name", "config", "state_dict"} <= set(entry):
        raise SleepbotError(f"{str(path)!r} is a damaged forecaster checkpoint (no forecaster entry)")
    return blob


def _build(entry: dict[str, Any], path: Path) -> Forecaster:
    config = dict(entry["config"])
    if entry["name"] == "lstm" and "read_progress" not in config:
        config["read_progress"] = True  # written before the option existed: those LSTMs read step / max_steps
    model = build_forecaster(str(entry["name"]), **config)
    try:
        model.load_state_dict(entry["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise SleepbotError(
            f"{str(path)!r}: the {entry['name']} weights do not fit its config ({first})"
        ) from None
    return model.eval()


def load_forecaster(path: str | Path | None = None) -> Forecaster:
    """The forecaster stored in `path` (None: the default shipped with sleepbot), in eval mode on the CPU."""
    path = DEFAULT_PATH if path is None else Path(path)
    if path == DEFAULT_PATH and not path.is_file():
        raise SleepbotError(
            f"the default forecaster {str(path)!r} is missing from this install; train one with "
            f"`sleepbot train-forecaster` and pass its path"
        )
    blob = read_checkpoint(path)
    return _build(blob["forecaster"], path)


def load_baselines(path: str | Path | None = None) -> dict[str, Forecaster]:
    """Every baseline to compare a checkpoint's forecaster with: persistence, linear extrapolation, and the
    learned baselines stored with it (trained on the same split), all with its context and horizons."""
    path = DEFAULT_PATH if path is None else Path(path)
    blob = read_checkpoint(path)
    cfg = blob["forecaster"]["config"]
    common = {k: cfg[k] for k in ("context", "horizons", "snapshot_every") if k in cfg}
    out: dict[str, Forecaster] = {
        "persistence": build_forecaster("persistence", **common),
        "linear": build_forecaster("linear", **common),
    }
    for name, entry in (blob.get("baselines") or {}).items():
        out[str(name)] = _build(entry, path)
    return out


def checkpoint_meta(path: str | Path | None = None) -> dict[str, Any]:
    """The metadata stored with a checkpoint (split, data, training settings, scores)."""
    blob = read_checkpoint(DEFAULT_PATH if path is None else path)
    return dict(blob.get("meta") or {})
