"""Readable text summaries of run files and directories of runs (what `sleepbot inspect` prints)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.store.reader import RunFile, TrajectoryStore


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: text left-aligned, numeric columns right-aligned, None as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            if v != 0 and abs(v) < 0.01:
                return f"{v:.3g}"  # learning rates
            return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _span(steps) -> str:
    return f"{int(steps[0])}..{int(steps[-1])}" if len(steps) else "none"


def describe_run(path: str | Path) -> str:
    """Attributes, status, layers (N, kept, F), T and S, metrics and events of one run file."""
    with RunFile(path) as run:
        a = run.attrs
        steps, snaps = run.steps, run.snapshot_steps
        status = run.status + (
            "" if run.status != "running" else " (being written, or its writer was killed)"
        )
        lines = [
            f"run file  {run.path}  ({_size(run.path.stat().st_size)})",
            f"status    {status}",
            f"schema    {a.get('schema_version')}, written by sleepbot {a.get('sleepbot_version')} on "
            f"{a.get('host')} (pid {a.get('pid')}), created {a.get('created')}"
            + (
                f", finished {a['finished']} after {a.get('wall_seconds', 0):.1f} s"
                if a.get("finished")
                else ""
            ),
            "run       "
            + ", ".join(
                f"{k} {a[k]}"
                for k in ("run_name", "dataset", "arch", "optimizer", "lr", "seed", "max_steps")
                if k in a
            ),
            f"recorded  T={len(steps)} steps ({_span(steps)}), S={len(snaps)} snapshots ({_span(snaps)}, "
            f"every {a.get('snapshot_every', a.get('every_n_steps'))} steps)",
            "",
        ]
        rows = []
        for name in run.layers:
            info = run.layer_info(name)
            rows.append(
                (
                    name,
                    info["kind"],
                    "x".join(str(s) for s in info["shape"]),
                    info["has_bias"],
                    info["n"],
                    info["n_kept"],
                    info["fan_in"],
                    ", ".join(info["arrays"]),
                )
            )
        lines.append(
            format_table(["layer", "kind", "weight shape", "bias", "N", "kept", "F", "arrays"], rows)
        )
        lines.append("")
        m = run.metrics
        loss, lr = m["train_loss"], m["lr"]
        finite = loss[~_isnan(loss)]
        lines.append(
            f"train     loss {len(loss)} values, last {float(finite[-1]) if len(finite) else float('nan'):.4f}; "
            f"lr last {float(lr[-1]) if len(lr) else float('nan'):g}"
        )
        vstep, vacc, vloss = m["val/step"], m["val/acc"], m["val/loss"]
        if len(vstep):
            best = int(vacc.argmax()) if not _isnan(vacc).all() else len(vacc) - 1
            lines.append(
                f"val       {len(vstep)} points ({_span(vstep)}); last acc {float(vacc[-1]):.4f}, loss "
                f"{float(vloss[-1]):.4f}; best acc {float(vacc[best]):.4f} at step {int(vstep[best])}"
            )
        else:
            lines.append("val       none recorded")
        tests = [f"{k.split('/')[1]} {float(m[k]):.4f}" for k in m if k.startswith("test/")]
        lines.append("test      " + (", ".join(tests) if tests else "not recorded"))
        events = run.events()
        accepted = sum(e["accepted"] for e in events)
        strategies = sorted({e["strategy"] for e in events})
        lines.append(
            f"events    {len(events)}"
            + (f" ({accepted} accepted; strategies: {', '.join(strategies)})" if events else "")
        )
        cfg = a.get("config") or {}
        if cfg:
            lines.append(f"config    {json.dumps(cfg, sort_keys=True)[:400]}")
    return "\n".join(lines)


def _isnan(x) -> np.ndarray:
    return np.isnan(np.asarray(x, dtype=np.float64))


def describe_dir(path: str | Path) -> str:
    """A table of the runs under a directory (recursively), unreadable files listed after it."""
    store = TrajectoryStore(path, errors="skip")
    rows = []
    for run in store:
        s = run.summary()
        rows.append(
            (
                str(run.path.relative_to(store.root)),
                s["status"],
                s["dataset"],
                s["arch"],
                s["optimizer"],
                s["lr"],
                s["seed"],
                s["T"],
                s["S"],
                s["val_acc"],
                s["test_acc"],
                s["events"],
            )
        )
    headers = [
        "file",
        "status",
        "dataset",
        "arch",
        "optimizer",
        "lr",
        "seed",
        "T",
        "S",
        "val_acc",
        "test_acc",
        "events",
    ]
    lines = [format_table(headers, rows)] if rows else [f"no readable run files under {store.root}"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[1]] = counts.get(r[1], 0) + 1
    total = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    lines.append(f"{len(rows)} runs" + (f" ({total})" if total else "") + f" in {store.root}")
    manifest = store.root / "manifest.json"
    if manifest.is_file():
        try:
            planned = len(json.loads(manifest.read_text()).get("runs", []))
            lines.append(f"manifest: {planned} runs planned")
        except (json.JSONDecodeError, AttributeError):
            lines.append("manifest: unreadable")
    for bad, why in store.bad.items():
        lines.append(f"unreadable: {bad.relative_to(store.root)}: {why}")
    return "\n".join(lines)


def describe(path: str | Path) -> str:
    """`describe_dir` for a directory, `describe_run` for a file."""
    return describe_dir(path) if Path(path).is_dir() else describe_run(path)
