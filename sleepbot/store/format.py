"""The run format's constants and shared helpers: schema version, event table dtype, chunk shapes, errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sleepbot.errors import SleepbotError

SCHEMA_VERSION = 1
# What h5py raises for a damaged file depends on where the damage is (superblock, object header, chunk index).
_H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError)
# `killed`: set by `repair_run` on a run whose writer died without closing it (SIGKILL, power loss).
STATUSES = ("running", "complete", "failed", "killed")

# One sleep event per row. `strategy` is fixed-length ASCII so that the table is a plain compound dataset that
# any HDF5 reader understands and that can grow under SWMR (variable-length strings live on the global heap).
STRATEGY_BYTES = 64
EVENT_DTYPE = np.dtype(
    [
        ("step", "<i8"),
        ("strategy", f"S{STRATEGY_BYTES}"),
        ("horizon", "<i8"),
        ("accepted", "?"),
        ("loss_before", "<f8"),
        ("loss_after", "<f8"),
    ]
)
EVENT_FIELDS = EVENT_DTYPE.names

# Chunks of about 512 KiB: inside h5py's advice (10 KiB - 1 MiB), large enough that a block of 64 snapshots of a
# small CNN is a handful of chunks, small enough that reading one neuron's window does not pull megabytes.
CHUNK_BYTES = 1 << 19
SMALL_CHUNK = 256  # rows per chunk of the tiny 1-D tables (validation metrics, events)


class StoreError(SleepbotError):
    """A run file that is missing, corrupt, truncated, of another schema, or would be overwritten."""


@dataclass
class LayerSpec:
    """What the writer needs to know about one recorded layer.

    Attributes:
        name: module name (`net.0.0`), also the HDF5 group name under `/layers`.
        kind: `conv1d`, `conv2d`, `conv3d` or `linear`.
        shape: the weight parameter's own shape, e.g. (32, 16, 3, 3).
        has_bias: whether a bias column is appended to each neuron.
        neurons: indices of the neurons whose full weights are snapshotted (all of them unless sampled).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    has_bias: bool
    neurons: np.ndarray

    @property
    def n(self) -> int:
        return int(self.shape[0])

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.neurons = np.asarray(self.neurons, dtype=np.int64)
        # Columns of one neuron row: the flattened kernel, plus one for the bias.
        self.fan_in = int(np.prod(self.shape[1:], dtype=np.int64)) + int(self.has_bias)

    @property
    def n_kept(self) -> int:
        return len(self.neurons)


def _weight_chunks(rows: int, n: int, f: int, itemsize: int = 4) -> tuple[int, int, int]:
    """Chunk shape for a [S, N, F] dataset: whole snapshots along time while they fit, else split N, then F."""
    per_snapshot = max(1, n * f * itemsize)
    if per_snapshot <= CHUNK_BYTES:
        return (max(1, min(rows, CHUNK_BYTES // per_snapshot)), n, f)
    per_neuron = f * itemsize
    if per_neuron <= CHUNK_BYTES:
        return (1, max(1, CHUNK_BYTES // per_neuron), f)
    return (1, 1, max(1, CHUNK_BYTES // itemsize))


def _row_chunks(rows: int, n: int, itemsize: int = 4) -> tuple[int, int]:
    return (max(1, min(rows, CHUNK_BYTES // max(1, n * itemsize))), n)


def _attr_value(value: Any) -> Any:
    """A Python value as an HDF5 attribute: str/int/float/bool as is, containers as JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _py(value: Any) -> Any:
    """An attribute read back from h5py as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _event_row(path: Path, step, strategy, horizon, accepted, loss_before, loss_after) -> tuple:
    name = str(strategy).encode("ascii", "replace")
    if len(name) > STRATEGY_BYTES:
        raise StoreError(f"{str(path)!r}: strategy name {strategy!r} is longer than {STRATEGY_BYTES} bytes")
    return (int(step), name, int(horizon), bool(accepted), float(loss_before), float(loss_after))


def _append(ds: h5py.Dataset, rows: np.ndarray, start: int) -> None:
    """Write `rows` at `start` along axis 0, growing the dataset to fit."""
    end = start + len(rows)
    if ds.shape[0] < end:
        ds.resize(end, axis=0)
    ds[start:end] = rows


def _short(e: BaseException) -> str:
    """The first line of an h5py/HDF5 error, which are otherwise long multi-line stacks."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
