"""Killed runs: readers clamp to rows every dataset holds; `repair_run` / `sleepbot repair` close the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from sleepbot.cli import main as cli_main
from sleepbot.recording import RecorderCore
from sleepbot.store import LayerSpec, RunFile, RunWriter, StoreError, repair_run
from sleepbot.store.repair import _lookup3

_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    from sleepbot.recording import RecorderCore

    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    core = RecorderCore(sys.argv[1], model, snapshot_every=1, flush_every=4, flush_seconds=1e9)
    for step in range(30):
        with torch.no_grad():  # weights that encode the step
            for m in model:
                m.weight.fill_(step)
                m.bias.fill_(-step)
        core.record_step(step, loss=float(step))
    os.kill(os.getpid(), signal.SIGKILL)  # 28 snapshots flushed (7 blocks of 4), 2 in memory
    """
)


@pytest.fixture
def killed(tmp_path) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    path = tmp_path / "killed.h5"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return path


def test_lookup3_matches_hdf5s_superblock_checksum(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f["x"] = np.arange(3)
    head = path.read_bytes()[:48]  # superblock v3 with 8-byte addresses: 44 bytes, then the checksum
    assert head[8] == 3 and _lookup3(head[:44]) == int.from_bytes(head[44:48], "little")


def test_repair_keeps_every_flushed_snapshot_and_closes_the_file(killed, capsys):
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(killed, "r")
    with RunFile(killed) as run:
        steps, snaps = run.steps, run.snapshot_steps
        weights = {name: run.weights(name) for name in run.layers}
        loss = run.metrics["train_loss"]
    assert len(snaps) == 28 and len(steps) == 28
    before = killed.read_bytes()

    out = repair_run(killed)
    assert out == killed.with_name("killed.repaired.h5")
    assert killed.read_bytes() == before  # the killed file is left as it was
    with h5py.File(out, "r") as f:  # plain h5py opens it now
        assert f.attrs["status"] == "killed" and f.attrs["repaired"]
    with RunFile(out) as run:
        assert run.status == "killed" and not run.complete
        np.testing.assert_array_equal(run.steps, steps)
        np.testing.assert_array_equal(run.snapshot_steps, np.arange(28))
        np.testing.assert_array_equal(run.metrics["train_loss"], loss)
        for name, w in weights.items():
            np.testing.assert_array_equal(run.weights(name), w)
            np.testing.assert_array_equal(run.weights(name)[:, 0, 0], np.arange(28))

    with pytest.raises(StoreError, match="exists; pass overwrite=True") as e:
        repair_run(killed)
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match="closed cleanly .*nothing to repair"):
        repair_run(out)

    # the CLI, in place: --overwrite replaces FILE atomically
    assert cli_main(["repair", str(killed), "--overwrite"]) == 0
    assert "status killed, 28 steps, 28 snapshots" in capsys.readouterr().out
    with h5py.File(killed, "r") as f:
        assert f.attrs["status"] == "killed"
    assert sorted(p.name for p in killed.parent.glob("*.h5")) == ["killed.h5", "killed.repaired.h5"]
    assert cli_main(["repair", str(killed.parent / "nope.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_readers_clamp_to_rows_every_dataset_holds(tmp_path):
    """A live or killed file may hold a row in /steps (or a snapshot in one layer) before the rest."""
    path = tmp_path / "run.h5"
    specs = [
        LayerSpec("a", "linear", (3, 2), True, np.arange(3)),
        LayerSpec("b", "linear", (2, 3), False, [0, 1]),
    ]
    w = RunWriter(path, specs, buffer_snapshots=2, buffer_steps=4)
    for t in range(6):
        norms = {s.name: np.full((1, s.n), t, np.float32) for s in specs}
        w.write_steps(np.array([t]), norms, np.array([t], np.float32), np.zeros(1, np.float32))
        if t % 2 == 0:
            w.write_snapshot(
                t, {(s.name, "weight"): np.full((s.n_kept, s.fan_in), t, np.float32) for s in specs}
            )
    w.close()
    with h5py.File(path, "r+") as f:  # what an unordered flush can leave: ahead in some datasets only
        f["steps"].resize(9, axis=0)
        f["metrics/train_loss"].resize(8, axis=0)
        f["layers/a/norm"].resize(7, axis=0)
        f["snapshot_steps"].resize(5, axis=0)
        f["layers/a/weight"].resize(4, axis=0)
    with RunFile(path) as run:
        np.testing.assert_array_equal(run.steps, np.arange(6))
        assert run.norms("a").shape == (6, 3) and run.norms("b", -1)[0] == 5
        assert len(run.metrics["train_loss"]) == 6 and len(run.metrics["lr"]) == 6
        np.testing.assert_array_equal(run.snapshot_steps, [0, 2, 4])
        assert run.weights("a").shape[0] == 3 and run.weights("a", -1)[0, 0] == 4
        assert run.summary()["T"] == 6 and run.summary()["S"] == 3


def test_snapshot_blocks_stay_within_the_byte_budget(tmp_path):
    """A large layer flushes after fewer snapshots; what is written does not depend on the block size."""
    budget = 20_000
    paths = {}
    for name, kw in {"budget": {"buffer_bytes": budget}, "count": {"buffer_bytes": None}}.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32))  # a snapshot: 32 x 65 float32 = 8,320 bytes
        paths[name] = tmp_path / f"{name}.h5"
        core = RecorderCore(paths[name], model, snapshot_every=1, flush_every=64, flush_seconds=1e9, **kw)
        held = sum(b.nbytes for b in core.writer.snapshot_buffers.values())
        held += sum(b.numel() * 4 for b in core._norms.values()) + core._rows * (4 + 4 + 8)
        if name == "budget":
            assert core.writer.buffer_snapshots == 1 and held <= budget
        else:
            assert core.writer.buffer_snapshots == 64 and held > 64 * 8320
        for step in range(12):
            with torch.no_grad():
                model[0].weight.add_(0.5)
            core.record_step(step, loss=float(step))
        core.close()
    with RunFile(paths["budget"]) as a, RunFile(paths["count"]) as b:
        np.testing.assert_array_equal(a.snapshot_steps, np.arange(12))
        np.testing.assert_array_equal(a.weights("0"), b.weights("0"))
        np.testing.assert_array_equal(a.norms("0"), b.norms("0"))
