"""Reading runs: `RunFile` (one run, lazily, live runs too) and `TrajectoryStore` (a directory of runs)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sleepbot._version import __version__
from sleepbot.store.format import _H5_ERRORS, SCHEMA_VERSION, StoreError, _py, _short


def _open_h5(path: Path) -> h5py.File:
    """Open read-only, refusing truncated files.

    A cleanly closed file opens normally, and HDF5 then checks it against truncation. A file still being written,
    or whose writer was killed, is marked as open for SWMR writing and opens only in SWMR mode, which skips that
    check; so the end of file HDF5 expects is compared with the size on disk here.
    """
    if not path.exists():
        raise StoreError(f"run file {str(path)!r} does not exist")
    if path.is_dir():
        raise StoreError(f"{str(path)!r} is a directory; use TrajectoryStore for a directory of runs")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{str(path)!r} is not an HDF5 file (not a sleepbot run, or its header is corrupt)")
    try:
        return h5py.File(path, "r")
    except _H5_ERRORS as e:
        if "truncated" in str(e):
            raise StoreError(f"run file {str(path)!r} is truncated: {_short(e)}") from None
        first = e
    try:
        f = h5py.File(path, "r", libver="latest", swmr=True)
    except _H5_ERRORS:
        raise StoreError(f"cannot read run file {str(path)!r} (corrupt?): {_short(first)}") from None
    expected, actual = f.id.get_filesize(), path.stat().st_size
    if actual < expected:
        f.close()
        raise StoreError(f"run file {str(path)!r} is truncated: {actual} bytes on disk, {expected} expected")
    return f


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
    except _H5_ERRORS as e:
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
        n = self._run._n_steps() if name in ("train_loss", "lr") else self._run._val_rows()
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
        self._layer_arrays: dict[str, list[str]] = {}
        try:
            self._validate()
        except BaseException:
            self._f.close()
            raise

    def _validate(self) -> None:
        try:
            attrs = dict(self._f.attrs)
        except _H5_ERRORS as e:
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
            except _H5_ERRORS:
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
        """`running` (being written, or killed before a clean close), `complete`, `failed`, or `killed` (a killed
        run that `repair_run` closed)."""
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
        """[T] int64: the steps at which norms, train loss and lr were recorded (in every per-step dataset)."""
        return _read(self.path, self._dataset("steps"), self._n_steps(), slice(None))

    @property
    def snapshot_steps(self) -> np.ndarray:
        """[S] int64: the steps of the weight snapshots (step 0 is the initial weights), in every snapshot array."""
        return _read(self.path, self._dataset("snapshot_steps"), self._n_snapshots(), slice(None))

    # ------------------------------------------------------------------------------------------ arrays
    def norms(self, layer: str, steps: Any = slice(None)) -> np.ndarray:
        """[T, N] float32 per-neuron L2 norms (weights and bias); `steps` selects rows (positions in `steps`)."""
        ds = self._dataset(f"layers/{self._check_layer(layer)}/norm")
        return _read(self.path, ds, self._n_steps(), steps)

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
        return _read(self.path, self._dataset(key), self._n_snapshots(), snapshots, neurons)

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
    # One HDF5 flush does not order its writes across datasets: a live or killed file may hold a row in /steps
    # and not yet in a layer's norm (or a snapshot in one layer and not another). Every read is clamped to the
    # rows that all datasets of its kind hold, so no caller indexes past data.
    def _n_steps(self) -> int:
        keys = ["steps", "metrics/train_loss", "metrics/lr", *(f"layers/{name}/norm" for name in self.layers)]
        return min(self._dataset(k).shape[0] for k in keys)

    def _n_snapshots(self) -> int:
        keys = ["snapshot_steps"]
        for name in self.layers:
            keys += [f"layers/{name}/{a}" for a in self._arrays(name)]
        return min(self._dataset(k).shape[0] for k in keys)

    def _arrays(self, layer: str) -> list[str]:
        arrays = self._layer_arrays.get(layer)
        if arrays is None:
            arrays = self._layer_arrays[layer] = self.layer_info(layer)["arrays"]
        return arrays

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
            except _H5_ERRORS as e:
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
