"""Writing a run: `RunWriter` appends blocks under SWMR; `stamp_status` amends a closed file."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sleepbot._version import __version__
from sleepbot.store.format import (
    EVENT_DTYPE,
    SCHEMA_VERSION,
    SMALL_CHUNK,
    STATUSES,
    LayerSpec,
    StoreError,
    _append,
    _attr_value,
    _event_row,
    _row_chunks,
    _short,
    _weight_chunks,
)


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
        if self.path.is_dir():
            raise StoreError(f"{str(self.path)!r} is a directory, not a run file")
        if self.path.exists() and not overwrite:
            raise StoreError(f"{str(self.path)!r} exists; pass overwrite=True (--overwrite) to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The file is built under a hidden temporary name and appears under its own name only once it is a valid
        # SWMR file, so a crash while creating it leaves no half-made run file (only the temporary one).
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.creating")
        try:
            self._f = h5py.File(tmp, "w", libver="latest")
        except OSError as e:
            raise StoreError(f"cannot create run file {str(self.path)!r}: {_short(e)}") from None
        self.run_id = uuid.uuid4().hex
        try:
            self._init_state()
            self._create({**(attrs or {}), "run_id": self.run_id}, buffer_steps, compression)
            self._f.swmr_mode = True  # from here on: no new objects or attributes, only appends
            self._f.flush()
            _publish(tmp, self.path, overwrite)
        except BaseException:
            self._f.close()
            tmp.unlink(missing_ok=True)
            raise

    def _init_state(self) -> None:
        self.closed = False
        self.status = "running"
        self._t0 = time.time()
        self._pending_test: dict[str, float] = {}
        self._val: list[tuple[int, float, float]] = []
        self._events: list[tuple] = []
        self._snap_steps: list[int] = []
        # Rows on disk (after the last flush) per kind: what a resume truncates the file back to.
        self.rows = {"steps": 0, "snapshots": 0, "val": 0, "events": 0}
        # [B, N_kept, F] per (layer, array): the recorder core copies each snapshot into row `snapshot_index`.
        self.snapshot_buffers: dict[tuple[str, str], np.ndarray] = {
            (spec.name, arr): np.zeros((self.buffer_snapshots, spec.n_kept, spec.fan_in), np.float32)
            for spec in self.layers
            for arr in self.snapshot_arrays
        }

    @classmethod
    def reopen(
        cls,
        path: str | Path,
        layers: Sequence[LayerSpec],
        *,
        run_id: str,
        rows: Mapping[str, int],
        snapshot_arrays: Sequence[str] = ("weight",),
        buffer_snapshots: int = 64,
        wall_seconds: float = 0.0,
        last_step: int | None = None,
        expect: Mapping[str, Any] | None = None,
    ) -> RunWriter:
        """Reopen the run `run_id` at `path` to append to it, cut back to `rows` (a writer's `rows` at a checkpoint).

        Rows a crashed writer added after that point are dropped. A killed run (open-for-writing flags still set)
        is reopened too once its writer is gone. The file's layers and arrays must be the ones given, its root
        attributes those in `expect`, and its last step row `last_step`, which is appended to `resumed_at`.

        Raises:
            StoreError: the file is missing, of another run (run_id), of another layout or settings, holds fewer
                rows than `rows`, or is still being written.
        """
        from sleepbot.store.reader import RunFile
        from sleepbot.store.repair import clear_open_flags, live_writer, truncate_to_consistent

        self = cls.__new__(cls)
        self.path = Path(path)
        self.layers = list(layers)
        self.snapshot_arrays = list(snapshot_arrays)
        self.buffer_snapshots = max(1, int(buffer_snapshots))
        if not self.path.exists():
            raise StoreError(f"cannot resume recording: run file {str(self.path)!r} does not exist")
        with RunFile(self.path) as run:
            attrs = dict(run.attrs)
            have_layers = {name: run.layer_info(name) for name in run.layers}
        if attrs.get("run_id") != run_id:
            raise StoreError(
                f"cannot resume recording: {str(self.path)!r} belongs to run {attrs.get('run_id')!r}, "
                f"not to the checkpoint's run {run_id!r}"
            )
        want = {s.name: (s.n_kept, s.fan_in) for s in self.layers}
        have = {k: (v["n_kept"], v["fan_in"]) for k, v in have_layers.items()}
        arrays = {a for v in have_layers.values() for a in v["arrays"]}
        if want != have or arrays != set(self.snapshot_arrays):
            raise StoreError(
                f"cannot resume recording: {str(self.path)!r} records layers {have} and arrays {sorted(arrays)}, "
                f"this recorder {want} and {sorted(self.snapshot_arrays)}"
            )
        for key, value in (expect or {}).items():
            if attrs.get(key) != value:
                raise StoreError(
                    f"cannot resume recording: {str(self.path)!r} was recorded with {key}={attrs.get(key)!r}, "
                    f"this recorder has {key}={value!r}"
                )
        why = live_writer(attrs) if attrs.get("status") == "running" else None
        if why:
            raise StoreError(f"cannot resume recording: {str(self.path)!r} {why}")
        clear_open_flags(self.path)  # a killed writer's file: its writer is gone (checked above)
        self._init_state()
        self.run_id = run_id
        self._t0 = time.time() - float(wall_seconds)
        try:
            self._f = h5py.File(self.path, "r+", libver="latest")
        except OSError as e:
            raise StoreError(f"cannot reopen run file {str(self.path)!r}: {_short(e)}") from None
        try:
            self.rows = truncate_to_consistent(self._f, rows)
            f = self._f
            t = self.rows["steps"]
            if last_step is not None and t and int(f["steps"][t - 1]) != int(last_step):
                raise StoreError(
                    f"cannot resume recording: {str(self.path)!r} has step {int(f['steps'][t - 1])} in row {t - 1}, "
                    f"the checkpoint's last step is {last_step}"
                )
            f.attrs["status"] = "running"
            f.attrs["finished"] = ""
            f.attrs["host"] = socket.gethostname()
            f.attrs["pid"] = os.getpid()
            resumed = json.loads(_text(f.attrs.get("resumed_at", "[]")))
            f.attrs["resumed_at"] = json.dumps([*resumed, last_step] if last_step is not None else resumed)
            f.swmr_mode = True
            f.flush()
        except BaseException:
            self._f.close()
            raise
        return self

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
        f.attrs["resumed_at"] = "[]"
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
        self.rows["steps"] = t0 + b

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
            self.rows["snapshots"] = s0 + n
            self._snap_steps.clear()
        if self._val:
            rows = np.asarray(self._val, dtype=np.float64)
            v0 = f["metrics/val/step"].shape[0]
            _append(f["metrics/val/loss"], rows[:, 1].astype(np.float32), v0)
            _append(f["metrics/val/acc"], rows[:, 2].astype(np.float32), v0)
            _append(f["metrics/val/step"], rows[:, 0].astype(np.int64), v0)
            self.rows["val"] = v0 + len(rows)
            self._val.clear()
        if self._events:
            e0 = f["events"].shape[0]
            _append(f["events"], np.array(self._events, dtype=EVENT_DTYPE), e0)
            self.rows["events"] = e0 + len(self._events)
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give the finished temporary file its name; without `overwrite`, never replace a file that appeared."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists, unlike rename: no race with another writer
    except FileExistsError:
        raise StoreError(f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise StoreError(
                f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it"
            ) from None
        os.rename(tmp, path)
        return
    tmp.unlink()


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
