"""Grids of independent runs in parallel worker processes (the engine under `collect`, `sleep --vs` and `compare`).

Workers are started by a forkserver that has already imported torch and Lightning, so each worker pays that
import once (about 10 s on a small machine) rather than once per run, and each worker uses one torch thread:
on a machine with P cores, P workers with one thread each finish a grid faster than one run with P threads.

The thread count is part of a run's numbers: MKL splits a matrix product (the Linear layers' weight gradient)
differently for 1 and 2 threads, so the same run trained with 2 threads drifts from its 1-thread twin by an ulp
in a few steps and can end on another validation step. Every task therefore runs with `threads_per_worker` torch
threads (1), in a worker process or, with `workers=1` or a single task, in this process (pinned for the task's
duration, then restored), so a grid's numbers do not depend on the worker count or the machine's core count.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sleepbot.errors import ConfigError


def default_workers() -> int:
    """One worker per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with `n` torch intra-op threads, then restore the previous count (None: leave it alone)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """Run one task; an exception comes back as a one-line message instead of killing the grid."""
    try:
        return True, fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - reported per run by the caller
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        return False, f"{type(e).__name__}: {e} ({tb[-3].strip() if len(tb) >= 3 else ''})"


def iter_parallel(
    fn: Callable[..., Any],
    tasks: Sequence[dict[str, Any]],
    workers: int | None = None,
    threads_per_worker: int = 1,
) -> Iterator[tuple[int, bool, Any]]:
    """Run `fn(**task)` for every task; yield `(index, ok, result_or_error)` as each finishes.

    `fn` must be a module-level function (it is pickled by name). With `workers=1` (or a single task) the tasks run
    in this process, one after another, which keeps tracebacks and debuggers usable. Either way a task sees
    `threads_per_worker` torch threads, so its result does not depend on where it ran (see the module docstring).
    """
    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            with torch_threads(threads_per_worker):
                ok, out = _call(fn, task)
            yield i, ok, out
        return
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["torch", "pytorch_lightning", "sleepbot.training"])
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(threads_per_worker,),
    ) as pool:
        pending = {pool.submit(_call, fn, task): i for i, task in enumerate(tasks)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                ok, out = fut.result()
                yield i, ok, out


def run_parallel(
    fn: Callable[..., Any],
    tasks: Sequence[dict[str, Any]],
    workers: int | None = None,
    desc: str = "runs",
    progress: bool | None = None,
    threads_per_worker: int = 1,
) -> list[tuple[bool, Any]]:
    """Like `iter_parallel`, collected in task order, with a progress bar over tasks on an interactive terminal."""
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    results: list[tuple[bool, Any]] = [(False, "not run")] * len(tasks)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=desc, unit="run", file=sys.stderr)
    try:
        for i, ok, out in iter_parallel(fn, tasks, workers, threads_per_worker):
            results[i] = (ok, out)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def train_task(config: dict[str, Any]) -> dict[str, Any]:
    """A worker task: train one run from a RunConfig dict, quietly; return `RunResult.to_dict()`."""
    from sleepbot.config import RunConfig, build_config
    from sleepbot.training import run_training

    cfg = build_config(RunConfig, config)
    cfg.trainer.progress_bar = False
    return run_training(cfg, quiet=True).to_dict()


# ================================================================================================ collect
# A collection is a grid of runs, each recorded to one HDF5 file in one output directory with a manifest. The grid
# is the union of GROUPS, each a product of axes (datasets x archs x optimizers x lrs x batch sizes x budgets x
# seeds) with its own shared RunConfig values; a config without `groups:` is one group. Groups let a corpus give
# every optimizer its own lr band and schedule without multiplying every axis by every other. It is resumable:
# complete files are skipped, incomplete ones redone.

COLLECT_GRID_KEYS = ("datasets", "archs", "optimizers", "lrs", "batch_sizes", "budgets", "seeds")
_AXIS_KINDS = {
    "datasets": str,
    "archs": str,
    "optimizers": str,
    "lrs": float,
    "batch_sizes": int,
    "budgets": int,
    "seeds": int,
}
MANIFEST = "manifest.json"
LIVE_SECONDS = 120.0  # a `running` file written to this recently, by a process we cannot check, may be live


@dataclass
class CollectConfig:
    """A grid of recorded runs. Each list may also be given as a single value in YAML.

    Attributes:
        datasets, archs, optimizers, lrs, seeds: grid axes (their product is the set of runs of a group).
        batch_sizes, budgets: optional axes for `data.batch_size` and `trainer.max_steps` (None: from `run`);
            when given, run names carry `-b<batch size>` / `-n<budget>`.
        run: RunConfig values shared by every run (trainer.max_steps, record.snapshot_every, data.batch_size, ...).
        groups: optional list of groups, each a mapping with any of the axis keys, `run` (merged over the
            top-level `run`) and `name` (a prefix of its runs' names, required when groups would otherwise give
            two runs one name, e.g. Adam with and without a schedule). An axis a group leaves out is the
            top-level one. Without groups, the top level is the one group.
    """

    datasets: list[str] = field(default_factory=lambda: ["digits"])
    archs: list[str] = field(default_factory=lambda: ["small_cnn"])
    optimizers: list[str] = field(default_factory=lambda: ["adam"])
    lrs: list[float] = field(default_factory=lambda: [3e-3])
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_sizes: list[int] | None = None
    budgets: list[int] | None = None
    run: dict[str, Any] = field(default_factory=dict)
    groups: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_list(key: str, value: Any, kind: type) -> list:
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if kind is float and isinstance(v, str):
            try:
                v = float(v)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ConfigError(f"collect config {key!r} must be a list of {kind.__name__}, got {v!r}")
        if kind is int and key.endswith(("batch_sizes", "budgets")) and v < 1:
            raise ConfigError(f"collect config {key!r} must hold positive integers, got {v!r}")
        if v not in out:
            out.append(v)
    if not out:
        raise ConfigError(f"collect config {key!r} is empty")
    return out


def _axes(data: dict[str, Any], where: str) -> dict[str, Any]:
    return {k: _as_list(f"{where}{k}", data[k], _AXIS_KINDS[k]) for k in COLLECT_GRID_KEYS if k in data}


def load_collect_config(path: str | Path) -> CollectConfig:
    """Read and check a collect YAML file (see configs/collect_digits.yaml, configs/collect_meta.yaml); every grid
    point is validated."""
    from sleepbot.config import load_yaml

    # Top-level keys starting with "_" hold YAML anchors for the groups to share; they are not read otherwise.
    data = {k: v for k, v in load_yaml(path).items() if not str(k).startswith("_")}
    valid = (*COLLECT_GRID_KEYS, "run", "groups")
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"unknown collect config key {key!r} in {str(path)!r}; valid keys: {', '.join(valid)}"
            )
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise ConfigError(f"collect config 'run' must be a mapping of RunConfig values, got {run!r}")
    groups = data.get("groups")
    if groups is not None:
        if not isinstance(groups, list) or not groups:
            raise ConfigError(f"collect config 'groups' must be a non-empty list of mappings, got {groups!r}")
        checked = []
        for i, g in enumerate(groups):
            if not isinstance(g, dict):
                raise ConfigError(f"collect config groups[{i}] must be a mapping, got {g!r}")
            for key in g:
                if key not in (*COLLECT_GRID_KEYS, "run", "name"):
                    raise ConfigError(
                        f"unknown key {key!r} in collect config groups[{i}]; valid keys: "
                        f"{', '.join((*COLLECT_GRID_KEYS, 'run', 'name'))}"
                    )
            if "run" in g and not isinstance(g["run"], dict):
                raise ConfigError(f"collect config groups[{i}].run must be a mapping, got {g['run']!r}")
            if "name" in g and (not isinstance(g["name"], str) or not g["name"] or "/" in g["name"]):
                raise ConfigError(
                    f"collect config groups[{i}].name must be a non-empty word, got {g['name']!r}"
                )
            checked.append(
                {
                    **_axes(g, f"groups[{i}]."),
                    **({"run": g["run"]} if "run" in g else {}),
                    **({"name": g["name"]} if "name" in g else {}),
                }
            )
        groups = checked
    cfg = CollectConfig(**_axes(data, ""), run=run, groups=groups)
    # Bad names and keys, and clashing run names, fail here, before any worker starts.
    collect_grid(cfg, "check")
    return cfg


def collect_grid(cfg: CollectConfig, out: str | Path) -> list[dict[str, Any]]:
    """The grid's runs, in a fixed order (group by group): [{'name', 'file', 'config' (a RunConfig dict)}].

    Every run records to `<out>/<name>.h5` with `name = [<group>-]<dataset>-<arch>-<optimizer>-lr<lr>
    [-b<batch size>][-n<budget>]-s<seed>`; Lightning's own logs are off unless `run.trainer.logger` asks for them.
    Two grid points with one name are a ConfigError (name the groups).
    """
    from sleepbot.config import RunConfig, build_config, merge

    top = {k: getattr(cfg, k) for k in COLLECT_GRID_KEYS}
    runs: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for gi, group in enumerate(cfg.groups or [{}]):
        axes = {k: group.get(k, top[k]) for k in COLLECT_GRID_KEYS}
        base = merge(merge({"trainer": {"logger": "none"}}, cfg.run), group.get("run") or {})
        prefix = f"{group['name']}-" if group.get("name") else ""
        for dataset, arch, optimizer, lr, bs, budget, seed in itertools.product(
            *(axes[k] or [None] for k in COLLECT_GRID_KEYS)
        ):
            name = (
                f"{prefix}{dataset}-{arch}-{optimizer}-lr{lr:g}"
                + (f"-b{bs}" if bs is not None else "")
                + (f"-n{budget}" if budget is not None else "")
                + f"-s{seed}"
            )
            if name in seen:
                raise ConfigError(
                    f"collect config groups {seen[name]} and {gi} both make run {name!r}; give the groups "
                    f"distinct names (groups[i].name) or disjoint axes"
                )
            seen[name] = gi
            file = f"{name}.h5"
            point: dict[str, Any] = {
                "seed": seed,
                "name": name,
                "out_dir": str(out),
                "data": {"name": dataset},
                "model": {"arch": arch, "optimizer": optimizer, "lr": lr},
                "record": {"enabled": True, "path": str(Path(out) / file), "overwrite": False},
            }
            if bs is not None:
                point["data"]["batch_size"] = bs
            if budget is not None:
                point["trainer"] = {"max_steps": budget}
            run_cfg = build_config(RunConfig, merge(base, point))
            runs.append({"name": name, "file": file, "config": run_cfg.to_dict()})
    return runs


def parse_shard(text: str | None) -> tuple[int, int]:
    """`K/N` (1 <= K <= N) -> (K, N); None -> (1, 1). Shard K takes grid points K-1, K-1+N, K-1+2N, ..."""
    if text is None:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like K/N (e.g. 2/8), got {text!r}") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {text!r}: need 1 <= K <= N")
    return k, n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_state(path: Path) -> tuple[str, str]:
    """What a run file left by an earlier attempt means for this one: (state, why).

    States: `missing`; `complete`; `incomplete` (`failed`, or `running` with its writer gone: redo it);
    `live` (`running` and its writer still alive, or written to within LIVE_SECONDS by a process on another host:
    leave it alone); `unreadable` (truncated or corrupt).
    """
    import socket

    from sleepbot.store import RunFile, StoreError

    if not path.exists():
        return "missing", ""
    try:
        with RunFile(path) as run:
            status, host, pid = run.status, run.attrs.get("host"), run.attrs.get("pid")
    except StoreError as e:
        return "unreadable", str(e)
    if status == "complete":
        return "complete", ""
    if status == "failed":
        return "incomplete", "failed"
    if host == socket.gethostname() and isinstance(pid, int):
        if pid != os.getpid() and _pid_alive(pid):
            return "live", f"being written by pid {pid}"
        return "incomplete", f"its writer (pid {pid}) is gone"
    if time.time() - path.stat().st_mtime < LIVE_SECONDS:
        return "live", f"written by {host} in the last {LIVE_SECONDS:.0f} s"
    return "incomplete", f"stale since {time.ctime(path.stat().st_mtime)}"


def collect_task(config: dict[str, Any]) -> dict[str, Any]:
    """A worker task: train and record one grid point; return its numbers for the summary."""
    from sleepbot.config import RunConfig, build_config
    from sleepbot.training import run_training

    cfg = build_config(RunConfig, config)
    cfg.trainer.progress_bar = False
    r = run_training(cfg, quiet=True)
    return {
        "steps": r.steps,
        "val_acc": r.final_val_acc,
        "test_acc": r.test_acc,
        "seconds": r.fit_seconds,
        "file": r.record_path,
    }


def _signature(runs: Any) -> Any:
    """A grid as compared on resume: names and run configs, without where the output directory lives."""
    if not isinstance(runs, list):
        return runs
    out = []
    for r in runs:
        cfg = json.loads(json.dumps(r.get("config", {})))
        cfg.pop("out_dir", None)
        for key in ("path", "overwrite"):
            cfg.get("record", {}).pop(key, None)
        out.append((r.get("name"), cfg))
    return out


def _write_manifest(out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Write the manifest, or check that the one there describes the same grid (resume) unless overwriting."""
    path = out / MANIFEST
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{str(path)!r} is not valid JSON; fix it, or pass --overwrite") from None
        if _signature(old.get("runs")) != _signature(manifest["runs"]):
            raise ConfigError(
                f"{str(out)!r} holds a different collection (its {MANIFEST} lists other runs or settings); "
                "use another --out, or --overwrite to redo every run there"
            )
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic, so concurrent shards never see half a manifest


def _set_aside(path: Path) -> Path:
    """Rename an unreadable file to <name>.bad (or .bad2, ...) instead of deleting it."""
    for i in itertools.count(1):
        target = path.with_name(path.name + (".bad" if i == 1 else f".bad{i}"))
        if not target.exists():
            path.rename(target)
            return target
    raise AssertionError("unreachable")


@dataclass
class CollectRow:
    """One grid point in the summary: `status` is trained, skipped, failed or live."""

    name: str
    status: str
    note: str = ""
    steps: int | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    seconds: float | None = None


def collect(
    config: CollectConfig | str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    config_file: str | None = None,
) -> list[CollectRow]:
    """Record every run of a grid (or of its shard K/N) into `out`, in parallel worker processes.

    Complete files are skipped (redone with `overwrite`). Incomplete ones (failed, or left `running` by a writer
    that is gone) are redone; an unreadable one is renamed to `.bad` and redone; one that another live process is
    writing is left alone. The manifest lists the whole grid, so every shard writes the same one.

    Returns:
        one row per grid point of this shard, in grid order.
    """
    if not isinstance(config, CollectConfig):
        config_file = config_file or str(config)
        config = load_collect_config(config)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    k, n = parse_shard(shard)
    grid = collect_grid(config, out)
    out.mkdir(parents=True, exist_ok=True)
    from sleepbot._version import __version__

    manifest = {
        "sleepbot_version": __version__,
        "config_file": config_file,
        "collect": config.to_dict(),
        "runs": grid,
    }
    _write_manifest(out, manifest, overwrite)
    mine = grid[k - 1 :: n]
    rows: dict[str, CollectRow] = {}
    tasks: list[dict[str, Any]] = []
    names: list[str] = []
    for point in mine:
        path = out / point["file"]
        state, why = run_state(path)
        config_dict = json.loads(json.dumps(point["config"]))  # a private copy for the worker
        if state == "complete" and not overwrite:
            rows[point["name"]] = CollectRow(point["name"], "skipped", "complete already")
            continue
        if state == "live":
            rows[point["name"]] = CollectRow(point["name"], "live", why)
            continue
        note = ""
        if state == "unreadable":
            note = f"unreadable file moved to {_set_aside(path).name}"
        elif state in ("incomplete", "complete"):
            config_dict["record"]["overwrite"] = (
                True  # an incomplete (or, with --overwrite, any) file is replaced
            )
            note = f"redone ({why})" if state == "incomplete" else "overwritten"
        rows[point["name"]] = CollectRow(point["name"], "pending", note)
        tasks.append({"config": config_dict})
        names.append(point["name"])
    for (ok, result), name in zip(
        run_parallel(collect_task, tasks, workers, desc="collect", progress=progress), names
    ):
        row = rows[name]
        if ok:
            row.status = "trained"
            row.steps, row.val_acc, row.test_acc, row.seconds = (
                result["steps"],
                result["val_acc"],
                result["test_acc"],
                result["seconds"],
            )
        else:
            row.status, row.note = "failed", str(result)
    return [rows[p["name"]] for p in mine]


def collect_summary(rows: Sequence[CollectRow], out: str | Path) -> str:
    """The table printed at the end of `sleepbot collect`, with a one-line total."""
    from sleepbot.store.summary import format_table

    table = format_table(
        ["run", "status", "steps", "val_acc", "test_acc", "sec", "note"],
        [(r.name, r.status, r.steps, r.val_acc, r.test_acc, r.seconds, r.note) for r in rows],
    )
    counts = {s: sum(r.status == s for r in rows) for s in ("trained", "skipped", "failed", "live")}
    total = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "nothing to do"
    return f"{table}\n{len(rows)} runs: {total}; files and {MANIFEST} in {out}"
