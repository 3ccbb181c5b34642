"""The windows dataset: (context past snapshots -> weights h snapshots ahead) from recorded runs.

A window is one neuron at one time: its `context` snapshots ending at snapshot `t` ([C, F]) and its weights at
`t + h` for each horizon h ([H, F], masked where the run ends before). Windows are served in GROUPS: several
neurons of one layer at a few times, flattened along the neuron axis, so that a forecaster runs on `[C, B*N, F]`
exactly as it does at prediction time and one HDF5 read serves a whole group.

Runs are split into train / val / test by RUN (`split_runs`), never by window, so no test window shares a run
with a training window. The dataset streams from the HDF5 files: each DataLoader worker (and each DDP rank) opens
the files itself, lazily, and reads only the group it is building, so a store larger than memory still trains.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sleepbot.errors import SleepbotError

SPLITS = ("train", "val", "test")
# Runs are split within each group of runs sharing these attributes, so every split holds every kind of run. Not
# the lr: a corpus spans several lrs per optimizer with one or two runs each, and a group of one or two runs sends
# none to val or test; the split then also scores lrs a forecaster was not trained on.
GROUP_KEYS = ("dataset", "arch", "optimizer")
# The run attributes kept for holdouts and per-attribute tables (`--holdout`, `--by`).
ATTR_KEYS = ("dataset", "arch", "optimizer", "lr", "batch_size", "max_steps", "seed")


@dataclass
class LayerRecord:
    """One recorded layer as the dataset needs it."""

    name: str
    kind: str
    n_kept: int
    fan_in: int


@dataclass
class RunInfo:
    """What the dataset knows about one run without keeping its file open (files are opened per worker).

    Attributes:
        path: the run file.
        run_id: `<file stem>@<config hash>` (see `run_id`): the identity recorded in a checkpoint's split.
        layers: recorded layers, in definition order.
        snapshot_steps: [S] steps of the usable snapshots (the regular grid; see `scan_runs`).
        snapshot_rows: [S] their row positions in the file.
        max_steps: the run's configured step budget (for progress), or None.
        group: the run's GROUP_KEYS values: runs are split within each group.
    """

    path: str
    run_id: str
    layers: list[LayerRecord]
    snapshot_steps: np.ndarray
    snapshot_rows: np.ndarray
    max_steps: int | None
    group: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def snapshot_every(self) -> int:
        return int(self.snapshot_steps[1] - self.snapshot_steps[0])


def run_id(path: str | Path, attrs: dict[str, Any]) -> str:
    """A run's identity: `<file stem>@<hash of its config>`.

    The same config and seed give the same trajectory (runs are deterministic on CPU), so a run re-collected into
    another directory keeps its identity and a checkpoint's split still recognises its training runs there; two
    different runs that happen to share a file name do not. Where the run was written (out_dir, record.path) and
    how it was logged are left out of the hash.
    """
    import hashlib
    import json

    cfg = json.loads(json.dumps(attrs.get("config") or {}, default=str))
    cfg.pop("out_dir", None)
    cfg.pop("name", None)
    for section, keys in (("record", ("path", "overwrite")), ("trainer", ("logger", "progress_bar"))):
        for key in keys:
            (cfg.get(section) or {}).pop(key, None)
    if not cfg:  # no config recorded: fall back on the creation time
        return f"{Path(path).stem}@{attrs.get('created', '')}"
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return f"{Path(path).stem}@{digest}"


def resolve_paths(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """Run files from a directory (searched recursively for *.h5), a file, or a list of either."""
    if isinstance(data, (str, Path)):
        data = [data]
    paths: list[Path] = []
    for item in data:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(q for q in p.rglob("*.h5") if q.is_file()))
        elif p.is_file():
            paths.append(p)
        else:
            raise SleepbotError(
                f"trajectory data {str(p)!r} does not exist (give a directory of runs or .h5 files)"
            )
    if not paths:
        raise SleepbotError(f"no run files (*.h5) found in {', '.join(str(d) for d in data)}")
    return paths


def scan_runs(paths: Sequence[str | Path], min_snapshots: int = 2) -> list[RunInfo]:
    """Read the metadata of every run once (then close it).

    Only snapshots on the run's regular grid (steps 0, e, 2e, ... with e the most common spacing) are used: a final
    snapshot off the grid, or gaps, would mix horizons. Runs with fewer than `min_snapshots` usable snapshots are
    left out. Runs recorded with different snapshot spacings cannot be mixed (a horizon is counted in snapshots).
    """
    from sleepbot.store import RunFile

    infos = []
    for path in paths:
        with RunFile(path) as run:
            steps = np.asarray(run.snapshot_steps, dtype=np.int64)
            if len(steps) < 2:
                continue
            every = int(np.bincount(np.diff(steps).clip(min=0)).argmax())
            if every <= 0:
                continue
            # The longest run of consecutive snapshots exactly `every` apart, from the first.
            rows = [0]
            for i in range(1, len(steps)):
                if steps[i] - steps[rows[-1]] == every:
                    rows.append(i)
                elif steps[i] - steps[rows[-1]] > every:
                    break
            if len(rows) < min_snapshots:
                continue
            cfg = run.attrs.get("config") or {}
            max_steps = run.attrs.get("max_steps") or (cfg.get("trainer") or {}).get("max_steps")
            layers = []
            for name in run.layers:
                info = run.layer_info(name)
                layers.append(LayerRecord(name, str(info["kind"]), int(info["n_kept"]), int(info["fan_in"])))
            group = tuple(str(run.attrs.get(k, "")) for k in GROUP_KEYS)
            infos.append(
                RunInfo(
                    path=str(path),
                    run_id=run_id(path, run.attrs),
                    layers=layers,
                    snapshot_steps=steps[rows],
                    snapshot_rows=np.asarray(rows, dtype=np.int64),
                    max_steps=int(max_steps) if max_steps else None,
                    group=group,  # type: ignore[arg-type]
                    attrs={**{k: run.attrs.get(k) for k in ATTR_KEYS}, **_config_attrs(cfg)},
                )
            )
    spacings = sorted({r.snapshot_every for r in infos})
    if len(spacings) > 1:
        raise SleepbotError(
            f"runs have snapshots every {spacings} steps; a forecaster counts horizons in snapshots, so train "
            f"and evaluate on one spacing at a time"
        )
    return infos


def _config_attrs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Settings of a run's config that holdouts and tables may name: batch_size, max_steps, schedule."""
    out = {}
    for section, key in (("data", "batch_size"), ("trainer", "max_steps"), ("model", "schedule")):
        value = (cfg.get(section) or {}).get(key)
        if value is not None:
            out[key] = value
    return out


def split_runs(
    runs: Sequence[RunInfo],
    fractions: tuple[float, float] = (0.15, 0.15),
    seed: int = 0,
    holdout: dict[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Assign whole runs to train / val / test; returns run ids per split.

    Within each group of runs with the same dataset, arch and optimizer, the runs are shuffled by `seed` and
    `fractions` (val, test) of
    them go to val and test, at least one each when the group has three runs or more, so every split sees every
    kind of run. `holdout` ({'arch': 'mlp'} or {'dataset': ['mnist1d']}) sends every matching run to test
    instead (an architecture or dataset left out of training).
    """
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    groups: dict[tuple, list[RunInfo]] = {}
    for run in sorted(runs, key=lambda r: r.run_id):
        held = holdout and all(
            str(run.attrs.get(k)) in ([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])
            for k, v in holdout.items()
        )
        if held:
            out["test"].append(run.run_id)
        else:
            groups.setdefault(run.group, []).append(run)
    rng = np.random.default_rng(seed)
    for key in sorted(groups):
        members = groups[key]
        order = rng.permutation(len(members))
        n = len(members)
        n_val = int(round(n * fractions[0]))
        n_test = int(round(n * fractions[1]))
        if n >= 3:
            n_val, n_test = max(1, n_val), max(1, n_test)
        n_val = min(n_val, max(0, n - 1))
        n_test = min(n_test, max(0, n - 1 - n_val))
        for rank, i in enumerate(order):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            out[split].append(members[i].run_id)
    for s in SPLITS:
        out[s].sort()
    return out


def _shard() -> tuple[int, int]:
    """(index, count) of this reader among DDP ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


class WindowDataset(IterableDataset):
    """Streams groups of windows from run files.

    Two modes:
        `random` (training): each group draws a run uniformly, then a layer of it uniformly (balanced over runs
            and layers, however many neurons they hold), a contiguous block of neurons and a few end times;
            `groups` groups per epoch, split evenly over workers and ranks, reproducible from (seed, epoch).
        `all` (validation, evaluation, tests): every (run, layer, neuron block, end time on a `stride` grid), in
            a fixed order, split over workers and ranks.

    Each group is a dict:
        history [C, M, F] float32 (M = positions x neurons, position-major), target [H, M, F] float32 (the weights
        h snapshots after the last context snapshot, 0 where masked), mask [H, M] bool, progress [M] float32
        (step / max_steps of the last context snapshot; NaN when unknown or dropped), kind (str), run (int, the
        position in `runs`), layer (str), neuron0 (int: the first neuron of the block), neurons (int),
        t_end [positions] int64 (snapshot index, among the run's usable snapshots, of each last context snapshot).

    Args:
        runs: from `scan_runs`.
        context: snapshots per window.
        horizons: snapshots ahead, increasing.
        min_context: random mode draws each group's history length uniformly from min_context..context (and its
            end times from the first snapshot that length allows), so that a forecaster that reads histories of
            several lengths is trained on each, early end times included (None: always `context`).
        mode: `random` or `all`.
        groups: groups per epoch in `random` mode.
        max_weights: about how many weights (positions x neurons x fan-in) per group.
        positions: end times per group (random mode; `all` mode packs up to this many).
        stride: spacing of end times in `all` mode.
        progress_dropout: probability (random mode) that a position's progress is hidden, so that a forecaster
            also works when the caller does not know max_steps.
        smooth: the target at horizon h is the mean of the snapshots t+h-smooth+1 .. t+h (1: the snapshot at t+h).
            A smoothed future loses nothing as a place to jump to (the oracle that jumps to the mean of the
            snapshots of the last 50 steps before its target is as fast as the point oracle) and holds less of
            the minibatch noise no forecaster can predict.
        seed: random mode's seed.
    """

    def __init__(
        self,
        runs: Sequence[RunInfo],
        context: int,
        horizons: Sequence[int],
        *,
        mode: str = "random",
        groups: int = 1000,
        max_weights: int = 16384,
        positions: int = 4,
        stride: int = 1,
        progress_dropout: float = 0.0,
        smooth: int = 1,
        seed: int = 0,
        min_context: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("random", "all"):
            raise SleepbotError(f"unknown window mode {mode!r}; valid: random, all")
        self.runs = list(runs)
        self.context = int(context)
        self.min_context = self.context if min_context is None else int(min_context)
        if not 2 <= self.min_context <= self.context:
            raise SleepbotError(
                f"min_context must be between 2 and context {self.context}, got {min_context}"
            )
        self.horizons = tuple(int(h) for h in horizons)
        self.mode = mode
        self.groups = int(groups)
        self.max_weights = int(max_weights)
        self.positions = max(1, int(positions))
        self.stride = max(1, int(stride))
        self.progress_dropout = float(progress_dropout)
        self.smooth = int(smooth)
        if not 1 <= self.smooth <= self.horizons[0]:
            raise SleepbotError(
                f"target smoothing must be between 1 and the smallest horizon {self.horizons[0]} snapshots "
                f"(the mean of snapshots after the context's last), got {smooth}"
            )
        self.seed = int(seed)
        self.epoch = 0
        self._files: dict[str, Any] = {}
        self._pid = -1
        usable = [r for r in self.runs if len(r.snapshot_steps) >= self.context + self.horizons[0]]
        if not usable:
            need = self.context + self.horizons[0]
            raise SleepbotError(
                f"no run has the {need} snapshots a window needs (context {self.context} + horizon "
                f"{self.horizons[0]}); record longer runs or use a shorter context"
            )
        self._usable = [
            i for i, r in enumerate(self.runs) if len(r.snapshot_steps) >= self.context + self.horizons[0]
        ]

    def set_epoch(self, epoch: int) -> None:
        """Random mode draws different groups each epoch (call before iterating; workers get a copy)."""
        self.epoch = int(epoch)

    # --------------------------------------------------------------------------------------------- files
    def _run(self, i: int):
        """The open RunFile of run i, opened in this process (h5py handles must not cross a fork)."""
        from sleepbot.store import RunFile

        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        path = self.runs[i].path
        if path not in self._files:
            self._files[path] = RunFile(path)
        return self._files[path]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, -1
        return state

    # ------------------------------------------------------------------------------------------- groups
    def _block(self, fan_in: int, n_kept: int) -> int:
        """Neurons per group: enough that `positions` end times fill about `max_weights`."""
        return int(min(n_kept, max(1, self.max_weights // (self.positions * fan_in))))

    def _ends(self, run: RunInfo, context: int | None = None) -> range:
        """Valid end snapshots: a full context (`context`, default the dataset's) behind, at least the smallest
        horizon ahead."""
        return range((context or self.context) - 1, len(run.snapshot_steps) - self.horizons[0])

    def build(
        self,
        ri: int,
        layer: LayerRecord,
        n0: int,
        nn: int,
        ends: np.ndarray,
        hide: np.ndarray,
        context: int | None = None,
    ) -> dict:
        """One group: run `ri`, neurons [n0, n0+nn) of `layer`, end snapshots `ends`; `hide` masks progress;
        `context` snapshots of history (default: the dataset's)."""
        run = self.runs[ri]
        c, hs = context or self.context, self.horizons
        s = len(run.snapshot_steps)
        lo = int(ends.min()) - (c - 1)
        hi = min(s, int(ends.max()) + hs[-1] + 1)
        rows = run.snapshot_rows[lo:hi]
        if rows[-1] - rows[0] == len(rows) - 1:
            traj = self._run(ri).weights(
                layer.name, slice(int(rows[0]), int(rows[-1]) + 1), slice(n0, n0 + nn)
            )
        else:
            traj = self._run(ri).weights(layer.name, rows, slice(n0, n0 + nn))
        traj = torch.from_numpy(np.ascontiguousarray(traj, dtype=np.float32))  # [hi-lo, nn, F]
        b, f = len(ends), traj.shape[-1]
        idx = torch.as_tensor(ends - lo)  # [B], positions in traj
        hist = traj[idx[:, None] + torch.arange(-(c - 1), 1)]  # [B, C, nn, F]
        target = torch.zeros(len(hs), b, nn, f)
        mask = torch.zeros(len(hs), b, dtype=torch.bool)
        for j, h in enumerate(hs):
            ok = (torch.as_tensor(ends) + h) < s  # [B]
            mask[j] = ok
            if ok.any():
                at = idx[ok] + h  # [B_ok]
                target[j, ok] = traj[at[:, None] - torch.arange(self.smooth)].mean(1)
        steps = run.snapshot_steps[ends].astype(np.float64)
        prog = steps / run.max_steps if run.max_steps else np.full(b, np.nan)
        prog = np.where(hide, np.nan, prog)
        m = b * nn
        return {
            "history": hist.transpose(0, 1).reshape(c, m, f),  # [C, B*nn, F], position-major
            "target": target.reshape(len(hs), m, f),  # [H, B*nn, F]
            "mask": mask[:, :, None].expand(len(hs), b, nn).reshape(len(hs), m),  # [H, B*nn]
            "progress": torch.as_tensor(np.repeat(prog, nn), dtype=torch.float32),  # [B*nn]
            "kind": layer.kind,
            "run": ri,
            "layer": layer.name,
            "neuron0": n0,
            "neurons": nn,
            "t_end": torch.as_tensor(ends, dtype=torch.int64),
        }

    def plan(self) -> list[tuple[int, int, int, int, np.ndarray]]:
        """`all` mode: every (run, layer index, neuron start, neuron count, end snapshots) group, in order."""
        items = []
        for ri in self._usable:
            run = self.runs[ri]
            ends = np.arange(self._ends(run).start, self._ends(run).stop, self.stride)
            for li, layer in enumerate(run.layers):
                nn = self._block(layer.fan_in, layer.n_kept)
                for n0 in range(0, layer.n_kept, nn):
                    for k in range(0, len(ends), self.positions):
                        items.append((ri, li, n0, min(nn, layer.n_kept - n0), ends[k : k + self.positions]))
        return items

    def __iter__(self) -> Iterator[dict]:
        shard, shards = _shard()
        if self.mode == "all":
            for k, (ri, li, n0, nn, ends) in enumerate(self.plan()):
                if k % shards == shard:
                    yield self.build(ri, self.runs[ri].layers[li], n0, nn, ends, np.zeros(len(ends), bool))
            return
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        for _ in range(math.ceil(self.groups / shards)):
            ri = self._usable[rng.integers(len(self._usable))]
            run = self.runs[ri]
            layer = run.layers[rng.integers(len(run.layers))]
            nn = self._block(layer.fan_in, layer.n_kept)
            n0 = int(rng.integers(layer.n_kept - nn + 1))
            c = self.context
            if self.min_context < self.context:
                c = int(rng.integers(self.min_context, self.context + 1))
            valid = self._ends(run, c)
            ends = np.sort(rng.integers(valid.start, valid.stop, size=self.positions))
            hide = rng.random(self.positions) < self.progress_dropout
            yield self.build(ri, layer, n0, nn, ends, hide, c)


def collate_groups(groups: list[dict]) -> list[dict]:
    """DataLoader collate: a batch is a list of groups (they differ in fan-in, so they are not stacked)."""
    return groups
