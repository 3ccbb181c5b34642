"""Killed runs: clear HDF5's "open for writing" mark (`clear_open_flags`) and `repair_run` into a closed file.

A writer in SWMR mode sets status flags in the file's superblock; a clean close clears them. A writer killed with
SIGKILL leaves them set, and plain `h5py.File(path)` then refuses the file ("file is already open for write (may
use <h5clear file> ...)"); only an SWMR reader opens it. `h5clear -s` clears the flags, and h5py does not expose
the property it uses, so `clear_open_flags` does what `h5clear -s` does: zero the flag byte of the version 2/3
superblock and rewrite the superblock's checksum (Jenkins' lookup3, as HDF5 computes it).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import h5py

from sleepbot.store.format import _H5_ERRORS, StoreError, _short
from sleepbot.store.reader import RunFile
from sleepbot.store.writer import _publish

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_M32 = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 `hashlittle`, the checksum of HDF5 metadata (H5_checksum_lookup3)."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M32
    i = 0
    while n > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _M32
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _M32
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _M32
        a = (a - c) & _M32
        a ^= _rot(c, 4)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rot(a, 6)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rot(b, 8)
        b = (b + a) & _M32
        a = (a - c) & _M32
        a ^= _rot(c, 16)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rot(a, 19)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rot(b, 4)
        b = (b + a) & _M32
        n -= 12
        i += 12
    if n == 0:
        return c
    tail = data[i:] + b"\0" * (12 - n)  # the last 1-12 bytes, zero-padded
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    c ^= b
    c = (c - _rot(b, 14)) & _M32
    a ^= c
    a = (a - _rot(c, 11)) & _M32
    b ^= a
    b = (b - _rot(a, 25)) & _M32
    c ^= b
    c = (c - _rot(b, 16)) & _M32
    a ^= c
    a = (a - _rot(c, 4)) & _M32
    b ^= a
    b = (b - _rot(a, 14)) & _M32
    c ^= b
    c = (c - _rot(b, 24)) & _M32
    return c


def clear_open_flags(path: str | Path) -> bool:
    """Clear the superblock's "open for (SWMR) writing" flags in place, as `h5clear -s` does; True if any was set.

    Only for a file whose writer is gone: clearing the flags of a live writer's file lets a second writer in.
    """
    path = Path(path)
    with open(path, "r+b") as fh:
        head = fh.read(12)
        # Superblock v2/v3 at offset 0: signature (8), version, size of offsets, size of lengths, status flags,
        # four addresses (base, extension, end of file, root group), then a checksum of everything before it.
        if len(head) < 12 or head[:8] != _SIGNATURE:
            raise StoreError(f"{str(path)!r} is not an HDF5 file with its superblock at the start")
        version, offsets, flags = head[8], head[9], head[11]
        if version not in (2, 3):
            raise StoreError(
                f"{str(path)!r} has HDF5 superblock version {version}; only 2 and 3 carry open flags"
            )
        if not flags:
            return False
        body = bytearray(head + fh.read(4 * offsets))
        stored = int.from_bytes(fh.read(4), "little")
        if _lookup3(bytes(body)) != stored:
            raise StoreError(f"{str(path)!r}: the superblock checksum does not match (corrupt header)")
        body[11] = 0
        fh.seek(0)
        fh.write(bytes(body) + _lookup3(bytes(body)).to_bytes(4, "little"))
    return True


def live_writer(attrs: dict) -> str | None:
    """Why a `running` run's writer may still be alive (None if it is surely gone): same host and pid alive."""
    host, pid = attrs.get("host"), attrs.get("pid")
    if host != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    return f"is still being written by pid {pid} on {host}"


def _opens_plainly(path: Path) -> bool:
    try:
        h5py.File(path, "r").close()
    except _H5_ERRORS:
        return False
    return True


def repair_run(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Turn a killed run into a closed file that plain `h5py.File(path)` opens; return the repaired file's path.

    Every row a reader of the killed file sees is kept: per-step datasets are cut to the rows all of them have,
    snapshot arrays to the snapshots all of them (and /snapshot_steps) have. The status becomes `killed` and the
    root attribute `repaired` holds the time of the repair.

    Args:
        path: the killed run (its writer must be gone).
        out: where to write the repaired run; None: `<stem>.repaired.h5` next to it, or `path` itself with
            `overwrite`.
        overwrite: replace an existing `out`; with `out=None`, replace `path` itself (atomically: the repaired copy
            is built under a temporary name and renamed over it).

    Raises:
        StoreError: the file is missing, not a run, truncated, cleanly closed (nothing to repair), still being
            written, or `out` exists without `overwrite`.
    """
    path = Path(path)
    with RunFile(path) as run:  # checks: exists, HDF5, a sleepbot run of this schema, not truncated
        attrs = dict(run.attrs)
    if _opens_plainly(path):
        raise StoreError(
            f"{str(path)!r} was closed cleanly (status {attrs.get('status')!r}); there is nothing to repair"
        )
    why = live_writer(attrs)
    if why:
        raise StoreError(f"{str(path)!r} {why}; repair it only once its writer is gone")
    if out is not None:
        dest = Path(out)
    elif overwrite:
        dest = path
    else:
        dest = path.with_name(f"{path.stem}.repaired.h5")
    if dest.exists() and not overwrite:
        raise StoreError(f"{str(dest)!r} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.repairing")
    try:
        shutil.copyfile(path, tmp)
        clear_open_flags(tmp)
        try:
            with h5py.File(tmp, "r+", libver="latest") as f:
                truncate_to_consistent(f)
                f.attrs["status"] = "killed"
                f.attrs["repaired"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        except _H5_ERRORS as e:
            raise StoreError(f"cannot repair {str(path)!r}: {_short(e)}") from None
        _publish(tmp, dest, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def consistent_rows(f: h5py.File) -> dict[str, int]:
    """Rows that every dataset of a kind holds: `steps` (per-step), `snapshots`, `val`, `events`.

    One HDF5 flush does not order its writes across datasets, so a killed (or live) file may hold a row in one
    dataset and not yet in another.
    """
    layers = [f[f"layers/{name}"] for name in f["layers"]]
    per_step = [f["steps"], f["metrics/train_loss"], f["metrics/lr"], *(g["norm"] for g in layers)]
    snaps = [f["snapshot_steps"]]
    for g in layers:
        g.visititems(
            lambda name, obj: snaps.append(obj) if isinstance(obj, h5py.Dataset) and name != "norm" else None
        )
    return {
        "steps": min(ds.shape[0] for ds in per_step),
        "snapshots": min(ds.shape[0] for ds in snaps),
        "val": min(f[f"metrics/val/{k}"].shape[0] for k in ("step", "loss", "acc")),
        "events": f["events"].shape[0],
    }


def truncate_to_consistent(f: h5py.File, rows: dict[str, int] | None = None) -> dict[str, int]:
    """Cut every growing dataset of a file open for writing to `rows` (default: `consistent_rows(f)`)."""
    rows = dict(rows or consistent_rows(f))
    groups = {
        "steps": ["steps", "metrics/train_loss", "metrics/lr"],
        "snapshots": ["snapshot_steps"],
        "val": ["metrics/val/step", "metrics/val/loss", "metrics/val/acc"],
        "events": ["events"],
    }
    for name in f["layers"]:
        g = f[f"layers/{name}"]
        groups["steps"].append(g["norm"].name)
        g.visititems(
            lambda key, obj: (
                groups["snapshots"].append(obj.name)
                if isinstance(obj, h5py.Dataset) and key != "norm"
                else None
            )
        )
    for kind, keys in groups.items():
        for key in keys:
            ds = f[key]
            if ds.shape[0] < rows[kind]:
                raise StoreError(
                    f"{f.filename!r}: {key} holds {ds.shape[0]} rows, fewer than the {rows[kind]} expected"
                )
            if ds.shape[0] > rows[kind]:
                ds.resize(rows[kind], axis=0)
    return rows
