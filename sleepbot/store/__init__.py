"""The HDF5 run format: write (`RunWriter`), read (`RunFile`), list (`TrajectoryStore`).

This package is the only place that imports h5py. The format is a contract written down in
`trajectories/README.md`; anything that changes the layout must bump `SCHEMA_VERSION` and that README together.

Crash safety rests on SWMR (single writer, multiple readers): the writer creates every dataset first, then
switches the file to SWMR mode and only appends (resize + write + flush) from then on. A reader can follow a live
run, and a run killed with SIGKILL leaves a file that opens and holds every block flushed before the kill. Its
`status` attribute stays `running`; `complete` and `failed` are written only by a clean close.

Modules: `format` (schema constants, event dtype, chunk shapes, StoreError), `writer`, `reader`, `repair` (a
killed run into a closed file: `repair_run`, `sleepbot repair`).
"""

from __future__ import annotations

from sleepbot.store.format import (
    CHUNK_BYTES,
    EVENT_DTYPE,
    EVENT_FIELDS,
    SCHEMA_VERSION,
    STATUSES,
    STRATEGY_BYTES,
    LayerSpec,
    StoreError,
    _event_row,
    _weight_chunks,
)
from sleepbot.store.reader import RunFile, TrajectoryStore
from sleepbot.store.repair import clear_open_flags, repair_run
from sleepbot.store.writer import RunWriter, stamp_status

__all__ = [
    "CHUNK_BYTES",
    "EVENT_DTYPE",
    "EVENT_FIELDS",
    "SCHEMA_VERSION",
    "STATUSES",
    "STRATEGY_BYTES",
    "LayerSpec",
    "RunFile",
    "RunWriter",
    "StoreError",
    "TrajectoryStore",
    "_event_row",
    "_weight_chunks",
    "clear_open_flags",
    "repair_run",
    "stamp_status",
]
