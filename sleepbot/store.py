"""The HDF5 run format: write (`RunWriter`), read (`RunFile`), list (`TrajectoryStore`).

This is the only module that imports h5py. The format is a contract written down in `trajectories/README.md`;
anything that changes the layout must bump `SCHEMA_VERSION` and that README together.

Crash safety rests on SWMR (single writer, multiple readers): the writer creates every dataset first, then
switches the file to SWMR mode and only appends (resize + write + flush) from then on. A reader can follow a live
run, and a run killed with SIGKILL leaves a file that opens and holds every block flushed before the kill. Its
`status` attribute stays `running`; `complete` and `failed` are written only by a clean close.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sleepbot._version import __version__
from sleepbot.errors import SleepbotError

SCHEMA_VERSION = 1
STATUSES = ("running", "complete", "failed")

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

    @property
    def fan_in(self) -> int:
        """Columns of one neuron row: the flattened kernel, plus one for the bias."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) + int(self.has_bias)

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


class RunWriter:
    """Appends one run to a new HDF5 file, in blocks, under SWMR.

    The recorder core writes snapshots straight into `snapshot_buffers` (no extra copy), then calls
    `commit_snapshot(step)`; norms, loss and lr arrive as blocks through `write_steps`. Nothing reaches the disk
    until `flush()`, which writes every pending block, the step indices last (a reader that sees a step also
    sees its data), and flushes HDF5. `close(status)` flushes, leaves SWMR mode and stamps the status.

    Args:
        path: the file to create; its directory is created too.
        layers: the recorded layers, in definition order.
        attrs: root attributes (`config`, `seed`, `dataset`, `arch`, `optimizer`, ...); containers become JSON.
        snapshot_arrays: per-layer arrays saved at each snapshot, all [N_kept, F]: `weight`, and optionally
            `grad` and `optim/<state key>` (e.g. `optim/exp_avg`).
        overwrite: replace an existing file; without it an existing file raises StoreError.
        buffer_snapshots: snapshots held in memory between writes (64: see trajectories/README.md).
        buffer_steps: rows per chunk of the per-step datasets (norms, loss, lr).
        compression: h5py filter for the per-step and snapshot datasets (None, "lzf" or "gzip").
    """

    def __init__(
        self,
        path: str | Path,
        layers: Sequence[LayerSpec],
        *,
        attrs: Mapping[str, Any] | None = None,
        snapshot_arrays: Sequence[str] = ("weight",),
        overwrite: bool = False,
        buffer_snapshots: int = 64,
        buffer_steps: int = 640,
        compression: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.layers = list(layers)
        self.snapshot_arrays = list(snapshot_arrays)
        self.buffer_snapshots = max(1, int(buffer_snapshots))
        if compression not in (None, "lzf", "gzip"):
            raise StoreError(f"unknown compression {compression!r}; valid: none, lzf, gzip")
        if self.path.exists() and not overwrite:
            raise StoreError(f"{str(self.path)!r} exists; pass overwrite=True (--overwrite) to replace it")
        if self.path.is_dir():
            raise StoreError(f"{str(self.path)!r} is a directory, not a run file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            self.path.unlink()
        try:
            # "w-" fails if another process created the file since the check above.
            self._f = h5py.File(self.path, "w-", libver="latest")
        except OSError as e:
            raise StoreError(f"cannot create run file {str(self.path)!r}: {_short(e)}") from None
        self.closed = False
        self.status = "running"
        self._t0 = time.time()
        self._pending_test: dict[str, float] = {}
        self._val: list[tuple[int, float, float]] = []
        self._events: list[tuple] = []
        self._snap_steps: list[int] = []
        try:
            self._create(attrs or {}, buffer_steps, compression)
        except BaseException:
            self._f.close()
            self.path.unlink(missing_ok=True)
            raise
        # [B, N_kept, F] per (layer, array): the recorder core copies each snapshot into row `snapshot_index`.
        self.snapshot_buffers: dict[tuple[str, str], np.ndarray] = {
            (spec.name, arr): np.zeros((self.buffer_snapshots, spec.n_kept, spec.fan_in), np.float32)
            for spec in self.layers
            for arr in self.snapshot_arrays
        }
        self._f.swmr_mode = True  # from here on: no new objects or attributes, only appends

    # ------------------------------------------------------------------------------------------ creation
    def _create(self, attrs: Mapping[str, Any], buffer_steps: int, compression: str | None) -> None:
        f = self._f
        root = {
            "schema_version": SCHEMA_VERSION,
            "sleepbot_version": __version__,
            "config": "{}",
            "seed": 0,
            "dataset": "",
            "arch": "",
            "optimizer": "",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        root.update({k: v for k, v in attrs.items() if v is not None})
        root["status"] = "running"
        # HDF5 lists a group's members alphabetically ("net.10" before "net.2"): keep definition order here.
        root["layer_order"] = [spec.name for spec in self.layers]
        for key, value in root.items():
            f.attrs[key] = _attr_value(value)
        # Attributes cannot be added under SWMR, so the ones `close` stamps exist from the start.
        f.attrs["finished"] = ""
        f.attrs["wall_seconds"] = 0.0
        comp = {"compression": compression} if compression else {}
        bs = self.buffer_snapshots
        f.create_dataset("steps", (0,), maxshape=(None,), dtype="<i8", chunks=(buffer_steps,))
        f.create_dataset("snapshot_steps", (0,), maxshape=(None,), dtype="<i8", chunks=(bs,))
        g = f.create_group("layers")
        for spec in self.layers:
            lg = g.create_group(spec.name)
            lg.attrs["kind"] = spec.kind
            lg.attrs["shape"] = np.asarray(spec.shape, dtype=np.int64)
            lg.attrs["neurons"] = np.asarray(spec.neurons, dtype=np.int64)
            lg.attrs["has_bias"] = bool(spec.has_bias)
            lg.create_dataset(
                "norm",
                (0, spec.n),
                maxshape=(None, spec.n),
                dtype="<f4",
                chunks=_row_chunks(buffer_steps, spec.n),
                **comp,
            )
            for arr in self.snapshot_arrays:
                lg.create_dataset(
                    arr,
                    (0, spec.n_kept, spec.fan_in),
                    maxshape=(None, spec.n_kept, spec.fan_in),
                    dtype="<f4",
                    chunks=_weight_chunks(bs, spec.n_kept, spec.fan_in),
                    **comp,
                )
        m = f.create_group("metrics")
        for name in ("train_loss", "lr"):
            m.create_dataset(name, (0,), maxshape=(None,), dtype="<f4", chunks=(buffer_steps,), **comp)
        v = m.create_group("val")
        v.create_dataset("step", (0,), maxshape=(None,), dtype="<i8", chunks=(SMALL_CHUNK,))
        v.create_dataset("loss", (0,), maxshape=(None,), dtype="<f4", chunks=(SMALL_CHUNK,))
        v.create_dataset("acc", (0,), maxshape=(None,), dtype="<f4", chunks=(SMALL_CHUNK,))
        f.create_dataset("events", (0,), maxshape=(None,), dtype=EVENT_DTYPE, chunks=(SMALL_CHUNK,))

    # ------------------------------------------------------------------------------------------ appends
    @property
    def snapshot_index(self) -> int:
        """The buffer row the next snapshot goes into."""
        return len(self._snap_steps)

    @property
    def snapshots_full(self) -> bool:
        return len(self._snap_steps) >= self.buffer_snapshots

    def commit_snapshot(self, step: int) -> None:
        """Mark buffer row `snapshot_index` (already filled by the caller) as the snapshot of `step`."""
        self._check_open()
        if self.snapshots_full:
            raise StoreError(f"{str(self.path)!r}: snapshot buffer is full; flush() before the next snapshot")
        self._snap_steps.append(int(step))

    def write_snapshot(self, step: int, arrays: Mapping[tuple[str, str], np.ndarray]) -> None:
        """Copy one snapshot ({(layer, array): [N_kept, F]}) into the buffer and commit it; flushes when full."""
        if self.snapshots_full:
            self.flush()
        i = self.snapshot_index
        for key, buf in self.snapshot_buffers.items():
            buf[i] = arrays[key]
        self.commit_snapshot(step)

    def write_steps(
        self,
        steps: np.ndarray,
        norms: Mapping[str, np.ndarray],
        loss: np.ndarray,
        lr: np.ndarray,
    ) -> None:
        """Append a block of per-step rows: steps [B], norms {layer: [B, N]}, loss [B], lr [B].

        The rows go to the HDF5 chunk cache now (the caller may reuse its arrays) and reach the disk at `flush()`.
        The step indices are written last so that a concurrent reader never sees a step without its norms.
        """
        self._check_open()
        b = len(steps)
        if b == 0:
            return
        f = self._f
        t0 = f["steps"].shape[0]
        for spec in self.layers:
            _append(f[f"layers/{spec.name}/norm"], norms[spec.name], t0)
        _append(f["metrics/train_loss"], np.asarray(loss, np.float32), t0)
        _append(f["metrics/lr"], np.asarray(lr, np.float32), t0)
        _append(f["steps"], np.asarray(steps, np.int64), t0)

    def write_val(self, step: int, loss: float, acc: float) -> None:
        self._check_open()
        self._val.append((int(step), float(loss), float(acc)))

    def write_event(
        self,
        step: int,
        strategy: str,
        horizon: int,
        accepted: bool,
        loss_before: float,
        loss_after: float,
    ) -> None:
        """Append one sleep event (written at the next flush)."""
        self._check_open()
        self._events.append(_event_row(self.path, step, strategy, horizon, accepted, loss_before, loss_after))

    def write_test(self, **metrics: float) -> None:
        """Test metrics (`acc`, `loss`), written as /metrics/test/<name> when the file is closed."""
        self._pending_test.update({k: float(v) for k, v in metrics.items()})

    def flush(self) -> None:
        """Write every pending block and flush the file, so that readers and a later crash see it."""
        self._check_open()
        f = self._f
        n = len(self._snap_steps)
        if n:
            s0 = f["snapshot_steps"].shape[0]
            for (layer, arr), buf in self.snapshot_buffers.items():
                _append(f[f"layers/{layer}/{arr}"], buf[:n], s0)
            _append(f["snapshot_steps"], np.asarray(self._snap_steps, np.int64), s0)
            self._snap_steps.clear()
        if self._val:
            rows = np.asarray(self._val, dtype=np.float64)
            v0 = f["metrics/val/step"].shape[0]
            _append(f["metrics/val/loss"], rows[:, 1].astype(np.float32), v0)
            _append(f["metrics/val/acc"], rows[:, 2].astype(np.float32), v0)
            _append(f["metrics/val/step"], rows[:, 0].astype(np.int64), v0)
            self._val.clear()
        if self._events:
            _append(f["events"], np.array(self._events, dtype=EVENT_DTYPE), f["events"].shape[0])
            self._events.clear()
        f.flush()

    def close(self, status: str = "complete") -> None:
        """Flush, leave SWMR mode and stamp `status` (`complete` or `failed`), `finished` and test metrics.

        Safe to call twice; the second call does nothing.
        """
        if self.closed:
            return
        if status not in STATUSES:
            raise StoreError(f"unknown run status {status!r}; valid: {', '.join(STATUSES)}")
        try:
            self.flush()
        finally:
            self._f.close()
            self.closed = True
        self.status = status
        # The status is stamped outside SWMR mode: changing attributes is not part of what SWMR guarantees.
        stamp_status(self.path, status, wall_seconds=time.time() - self._t0, test=self._pending_test)

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError(f"run file {str(self.path)!r} is closed")


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


def stamp_status(
    path: str | Path,
    status: str | None,
    *,
    wall_seconds: float | None = None,
    test: Mapping[str, float] | None = None,
    val: Sequence[tuple[int, float, float]] = (),
    events: Sequence[tuple] = (),
) -> None:
    """Amend a closed run file: set its status (None keeps it), add test metrics, append validation rows or events.

    Used by `RunWriter.close` and by the recorder for what happens after `fit` (a final validation, the test).
    """
    path = Path(path)
    try:
        with h5py.File(path, "r+", libver="latest") as f:
            if status is not None:
                if status not in STATUSES:
                    raise StoreError(f"unknown run status {status!r}; valid: {', '.join(STATUSES)}")
                f.attrs["status"] = status
                if status != "running":
                    f.attrs["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if wall_seconds is not None:
                f.attrs["wall_seconds"] = float(wall_seconds)
            for name, value in (test or {}).items():
                key = f"metrics/test/{name}"
                if key in f:
                    del f[key]
                f.create_dataset(key, data=np.float32(value))
            if val:
                rows = np.asarray(val, dtype=np.float64)
                v0 = f["metrics/val/step"].shape[0]
                _append(f["metrics/val/loss"], rows[:, 1].astype(np.float32), v0)
                _append(f["metrics/val/acc"], rows[:, 2].astype(np.float32), v0)
                _append(f["metrics/val/step"], rows[:, 0].astype(np.int64), v0)
            if events:
                _append(f["events"], np.array(list(events), dtype=EVENT_DTYPE), f["events"].shape[0])
    except OSError as e:
        raise StoreError(f"cannot update run file {str(path)!r}: {_short(e)}") from None


# ============================================================================================== reading
def _open_h5(path: Path) -> h5py.File:
    """Open read-only; SWMR first (a live or killed writer leaves the file marked as open for SWMR writing)."""
    if not path.exists():
        raise StoreError(f"run file {str(path)!r} does not exist")
    if path.is_dir():
        raise StoreError(f"{str(path)!r} is a directory; use TrajectoryStore for a directory of runs")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{str(path)!r} is not an HDF5 file (not a sleepbot run, or its header is corrupt)")
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError:
        pass
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise StoreError(f"cannot read run file {str(path)!r} (truncated or corrupt?): {_short(e)}") from None


def _index(sel: Any, n: int) -> tuple[Any, np.ndarray | None]:
    """Turn a user selection over n rows into something h5py reads, plus the reordering to apply afterwards.

    Slices are clipped to n (a live file may have more rows in one dataset than in /steps). Integer arrays may be
    unsorted, negative or repeated: h5py needs increasing unique indices, so they are read sorted and reordered.
    """
    if isinstance(sel, slice):
        start, stop, step = sel.indices(n)
        if step < 0:
            idx = np.arange(start, stop, step)
            return _index(idx, n)
        return slice(start, stop, step), None
    if isinstance(sel, (int, np.integer)):
        i = int(sel)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} rows")
        return slice(i % n, i % n + 1), None
    idx = np.asarray(sel)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean selection of length {len(idx)} for {n} rows")
        idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).ravel()
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"indices out of range for {n} rows")
    idx = idx % max(n, 1)
    uniq, inverse = np.unique(idx, return_inverse=True)
    return uniq, inverse


def _read(path: Path, ds: h5py.Dataset, n_rows: int, sel0: Any, sel1: Any = slice(None)) -> np.ndarray:
    """Read ds[sel0, sel1, ...] with selections over the first `n_rows` rows and ds.shape[1] columns."""
    i0, r0 = _index(sel0, n_rows)
    i1, r1 = _index(sel1, ds.shape[1]) if ds.ndim > 1 else (slice(None), None)
    try:
        if isinstance(i0, np.ndarray) and isinstance(i1, np.ndarray):
            out = ds[i0][:, i1]  # h5py takes one index list per read
        elif isinstance(i0, np.ndarray) and len(i0) == 0:
            out = np.zeros((0, *ds.shape[1:]), ds.dtype)[:, i1]
        elif ds.ndim > 1:
            out = ds[i0, i1]
        else:
            out = ds[i0]
    except (OSError, RuntimeError, ValueError) as e:
        raise StoreError(f"cannot read {ds.name} from {str(path)!r} (corrupt?): {_short(e)}") from None
    if r0 is not None:
        out = out[r0]
    if r1 is not None:
        out = out[:, r1]
    if isinstance(sel0, (int, np.integer)):
        out = out[0]
    if isinstance(sel1, (int, np.integer)) and ds.ndim > 1:
        out = out[:, 0] if not isinstance(sel0, (int, np.integer)) else out[0]
    return out


class _Metrics(Mapping):
    """`run.metrics[name]` reads one metric lazily: 'train_loss', 'lr' [T]; 'val/step', 'val/loss', 'val/acc';
    'test/acc' and 'test/loss' (0-d) when they were recorded."""

    def __init__(self, run: RunFile) -> None:
        self._run = run

    def _names(self) -> list[str]:
        names: list[str] = []
        self._run._f["metrics"].visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        return sorted(names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names():
            raise KeyError(name)
        ds = self._run._dataset(f"metrics/{name}")
        if ds.ndim == 0:
            return np.asarray(ds[()])
        n = len(self._run.steps) if name in ("train_loss", "lr") else self._run._val_rows()
        return _read(self._run.path, ds, min(n, ds.shape[0]), slice(None))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class RunFile:
    """One recorded run, read lazily: nothing but the metadata is read until an array is asked for.

    Opens a live run too (SWMR): call `refresh()` to see rows appended since. A run whose writer was killed reads
    as far as its last flush, and its `status` stays `running` (`complete` is False).

    Args:
        path: the run's .h5 file.

    Raises:
        StoreError: the file is missing, not HDF5, truncated or corrupt, not a sleepbot run, or of another
            schema version.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = _open_h5(self.path)
        self._cache: dict[str, h5py.Dataset] = {}
        try:
            self._validate()
        except BaseException:
            self._f.close()
            raise

    def _validate(self) -> None:
        try:
            attrs = dict(self._f.attrs)
        except (OSError, RuntimeError) as e:
            raise StoreError(
                f"cannot read the attributes of {str(self.path)!r} (corrupt?): {_short(e)}"
            ) from None
        if "schema_version" not in attrs:
            raise StoreError(f"{str(self.path)!r} is an HDF5 file but not a sleepbot run (no schema_version)")
        version = _py(attrs["schema_version"])
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{str(self.path)!r} has schema version {version}; this sleepbot ({__version__}) reads version "
                f"{SCHEMA_VERSION}"
            )
        for key in ("steps", "snapshot_steps", "layers", "metrics/train_loss", "metrics/val/step", "events"):
            try:
                ok = key in self._f
            except (OSError, RuntimeError):
                ok = False
            if not ok:
                raise StoreError(f"{str(self.path)!r} is incomplete or corrupt: /{key} is missing")
        self.attrs: dict[str, Any] = {k: _py(v) for k, v in attrs.items()}
        try:
            self.attrs["config"] = json.loads(self.attrs.get("config") or "{}")
        except json.JSONDecodeError:
            raise StoreError(f"{str(self.path)!r}: the 'config' attribute is not valid JSON") from None
        try:
            self.layers: list[str] = list(json.loads(self.attrs.pop("layer_order", None) or "[]"))
        except json.JSONDecodeError:
            raise StoreError(f"{str(self.path)!r}: the 'layer_order' attribute is not valid JSON") from None
        if not self.layers:
            self.layers = list(self._f["layers"].keys())
        self.metrics = _Metrics(self)

    # ------------------------------------------------------------------------------------------ metadata
    @property
    def status(self) -> str:
        """`running` (being written, or killed before a clean close), `complete` or `failed`."""
        return str(self.attrs.get("status", "running"))

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def layer_info(self, layer: str) -> dict[str, Any]:
        """kind, shape (the weight's own), neurons (indices kept in snapshots), has_bias, n, n_kept, fan_in,
        arrays (per-snapshot arrays stored: `weight`, maybe `grad`, `optim/<key>`)."""
        g = self._group(layer)
        shape = tuple(int(s) for s in g.attrs["shape"])
        w = g["weight"]
        arrays: list[str] = []
        g.visititems(lambda name, obj: arrays.append(name) if isinstance(obj, h5py.Dataset) else None)
        return {
            "kind": _py(g.attrs["kind"]),
            "shape": shape,
            "neurons": np.asarray(g.attrs["neurons"], dtype=np.int64),
            "has_bias": bool(g.attrs["has_bias"]),
            "n": shape[0],
            "n_kept": int(w.shape[1]),
            "fan_in": int(w.shape[2]),
            "arrays": sorted(a for a in arrays if a != "norm"),
        }

    @property
    def steps(self) -> np.ndarray:
        """[T] int64: the steps at which norms, train loss and lr were recorded."""
        return _read(self.path, self._dataset("steps"), self._dataset("steps").shape[0], slice(None))

    @property
    def snapshot_steps(self) -> np.ndarray:
        """[S] int64: the steps of the weight snapshots (step 0 is the initial weights)."""
        ds = self._dataset("snapshot_steps")
        return _read(self.path, ds, ds.shape[0], slice(None))

    # ------------------------------------------------------------------------------------------ arrays
    def norms(self, layer: str, steps: Any = slice(None)) -> np.ndarray:
        """[T, N] float32 per-neuron L2 norms (weights and bias); `steps` selects rows (positions in `steps`)."""
        ds = self._dataset(f"layers/{self._check_layer(layer)}/norm")
        return _read(self.path, ds, min(self._dataset("steps").shape[0], ds.shape[0]), steps)

    def weights(self, layer: str, snapshots: Any = slice(None), neurons: Any = slice(None)) -> np.ndarray:
        """[S, N_kept, F] float32 snapshots; `snapshots` selects positions in `snapshot_steps`, `neurons` positions
        among the kept neurons (`layer_info(layer)['neurons']` maps them to the layer's neuron indices)."""
        return self.array(layer, "weight", snapshots, neurons)

    def array(
        self, layer: str, name: str, snapshots: Any = slice(None), neurons: Any = slice(None)
    ) -> np.ndarray:
        """A per-snapshot array by name (`weight`, `grad`, `optim/exp_avg`, ...), [S, N_kept, F]."""
        key = f"layers/{self._check_layer(layer)}/{name}"
        if key not in self._f:
            have = self.layer_info(layer)["arrays"]
            raise StoreError(f"{str(self.path)!r} has no array {name!r} for layer {layer!r}; it has: {have}")
        ds = self._dataset(key)
        n = min(self._dataset("snapshot_steps").shape[0], ds.shape[0])
        return _read(self.path, ds, n, snapshots, neurons)

    def events(self) -> list[dict[str, Any]]:
        """Sleep events: dicts with step, strategy, horizon, accepted, loss_before, loss_after."""
        ds = self._dataset("events")
        rows = _read(self.path, ds, ds.shape[0], slice(None))
        return [
            {
                "step": int(r["step"]),
                "strategy": r["strategy"].decode("ascii", "replace"),
                "horizon": int(r["horizon"]),
                "accepted": bool(r["accepted"]),
                "loss_before": float(r["loss_before"]),
                "loss_after": float(r["loss_after"]),
            }
            for r in rows
        ]

    # ------------------------------------------------------------------------------------------ live runs
    def refresh(self) -> None:
        """See rows a live writer appended since the file was opened (SWMR)."""
        for ds in self._cache.values():
            try:
                ds.refresh()
            except (OSError, RuntimeError, ValueError):
                pass  # a file not opened in SWMR mode has nothing to refresh

    # ------------------------------------------------------------------------------------------ helpers
    def _val_rows(self) -> int:
        return min(self._dataset(f"metrics/val/{k}").shape[0] for k in ("step", "loss", "acc"))

    def _check_layer(self, layer: str) -> str:
        if layer not in self.layers:
            raise StoreError(f"{str(self.path)!r} has no layer {layer!r}; layers: {', '.join(self.layers)}")
        return layer

    def _group(self, layer: str) -> h5py.Group:
        return self._f[f"layers/{self._check_layer(layer)}"]

    def _dataset(self, key: str) -> h5py.Dataset:
        ds = self._cache.get(key)
        if ds is None:
            try:
                ds = self._cache[key] = self._f[key]
            except (KeyError, OSError, RuntimeError) as e:
                raise StoreError(
                    f"cannot open /{key} in {str(self.path)!r} (corrupt?): {_short(e)}"
                ) from None
        return ds

    def summary(self) -> dict[str, Any]:
        """A small dict for tables: name, status, dataset, arch, optimizer, lr, seed, T, S, last step, val acc."""
        steps = self.steps
        val_acc = self.metrics["val/acc"]
        cfg = self.attrs.get("config") or {}
        test = self.metrics["test/acc"] if "test/acc" in self.metrics else None
        return {
            "file": self.path.name,
            "status": self.status,
            "dataset": self.attrs.get("dataset", ""),
            "arch": self.attrs.get("arch", ""),
            "optimizer": self.attrs.get("optimizer", ""),
            "lr": self.attrs.get("lr", (cfg.get("model") or {}).get("lr")),
            "seed": self.attrs.get("seed"),
            "T": len(steps),
            "S": len(self.snapshot_steps),
            "last_step": int(steps[-1]) if len(steps) else None,
            "val_acc": float(val_acc[-1]) if len(val_acc) else None,
            "test_acc": float(test) if test is not None else None,
            "events": self._dataset("events").shape[0],
        }

    def close(self) -> None:
        self._cache.clear()
        self._f.close()

    def __enter__(self) -> RunFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunFile({str(self.path)!r}, status={self.status!r}, layers={len(self.layers)})"


def _match(value: Any, wanted: Any) -> bool:
    if callable(wanted):
        return bool(wanted(value))
    if isinstance(wanted, (list, tuple, set, frozenset)):
        return any(_match(value, w) for w in wanted)
    if isinstance(wanted, float) or isinstance(value, float):
        try:
            return bool(np.isclose(float(value), float(wanted), rtol=1e-9, atol=0.0))
        except (TypeError, ValueError):
            return False
    return value == wanted


def _lookup(attrs: Mapping[str, Any], key: str) -> Any:
    """A root attribute, or a dotted path into the run config (`model.lr`, `trainer.max_steps`)."""
    if key in attrs:
        return attrs[key]
    node: Any = attrs.get("config") or {}
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


class TrajectoryStore:
    """A directory of run files (searched recursively for *.h5): list, filter by metadata, iterate.

    Args:
        root: the directory.
        errors: "raise" (default): an unreadable file raises StoreError when it is opened; "skip": it is left out
            of `filter` and iteration and its one-line reason is kept in `bad`.
    """

    def __init__(self, root: str | Path, errors: str = "raise") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"trajectory directory {str(self.root)!r} does not exist")
        if errors not in ("raise", "skip"):
            raise StoreError(f"unknown errors mode {errors!r}; valid: raise, skip")
        self.errors = errors
        self.paths: list[Path] = sorted(p for p in self.root.rglob("*.h5") if p.is_file())
        self.bad: dict[Path, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, path: Path) -> RunFile | None:
        try:
            return RunFile(path)
        except StoreError as e:
            if self.errors == "raise":
                raise
            self.bad[path] = str(e)
            return None

    def __iter__(self) -> Iterator[RunFile]:
        """Yield each run open; it is closed when the loop moves on."""
        for path in self.paths:
            run = self._open(path)
            if run is None:
                continue
            try:
                yield run
            finally:
                run.close()

    def filter(self, **attrs: Any) -> list[Path]:
        """Paths of the runs whose metadata match every keyword.

        Keys are root attributes (`dataset`, `arch`, `optimizer`, `seed`, `status`, `lr`, ...) or dotted paths into
        the run config (pass them as `**{"model.lr": 1e-3}`). A value may be a list (any of) or a predicate.
        Floats compare with a relative tolerance of 1e-9.
        """
        out = []
        for path in self.paths:
            run = self._open(path)
            if run is None:
                continue
            try:
                if all(
                    (v := _lookup(run.attrs, k)) is not _MISSING and _match(v, want)
                    for k, want in attrs.items()
                ):
                    out.append(path)
            finally:
                run.close()
        return out

    def __repr__(self) -> str:
        return f"TrajectoryStore({str(self.root)!r}, runs={len(self.paths)})"
