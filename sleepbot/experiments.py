"""Grids of independent runs in parallel worker processes (the engine under `collect`, `sleep --vs` and `compare`).

Workers are started by a forkserver that has already imported torch and Lightning, so each worker pays that
import once (about 10 s on a small machine) rather than once per run, and each worker uses one torch thread:
on a machine with P cores, P workers with one thread each finish a grid faster than one run with P threads.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any


def default_workers() -> int:
    """One worker per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


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
    in this process, one after another, which keeps tracebacks and debuggers usable.
    """
    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
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
        for i, ok, out in iter_parallel(fn, tasks, workers):
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
