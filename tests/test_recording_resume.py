"""Recorder resume: crash after a checkpoint, resume, and get the file an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sleepbot.config import RunConfig
from sleepbot.data import make_datamodule
from sleepbot.recording import RecorderCore, TrajectoryRecorder
from sleepbot.store import RunFile, StoreError
from sleepbot.training import make_module, make_trainer

CRASH_AT = 10  # after the checkpoint at step 8; the crashed run records steps 9, 10 and the snapshot at 9


class _Crash(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == CRASH_AT:
            raise RuntimeError("planned crash")


def _fit(tmp: Path, path: Path, *, crash: bool = False, ckpt_path: Path | None = None) -> None:
    cfg = RunConfig(seed=0, out_dir=str(tmp))
    cfg.data.train_subset = 64  # two steps per epoch, so every checkpoint (every 4 steps) ends an epoch
    cfg.data.batch_size = 32
    cfg.trainer.max_steps = 16
    cfg.trainer.val_every_n_steps = 5
    cfg.trainer.deterministic = True
    cfg.trainer.logger = "none"
    cfg.trainer.progress_bar = False
    pl.seed_everything(0, verbose=False)
    dm = make_datamodule(cfg.data, seed=0)
    module = make_module(cfg, dm.input_shape, dm.num_classes)
    # Lightning does not fast-forward a plain DataLoader, and a shuffled one restarts its generator on resume:
    # a fixed order keeps the resumed run's batches those of the uninterrupted one.
    train = DataLoader(TensorDataset(*dm.tensors["train"]), batch_size=32, shuffle=False)
    callbacks: list[pl.Callback] = [TrajectoryRecorder(path, snapshot_every=3)]
    if crash:
        callbacks.append(_Crash())
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(cfg, [*callbacks, ckpt], enable_checkpointing=True)
    trainer.fit(module, train, dm.val_dataloader(), ckpt_path=ckpt_path)


def _contents(path: Path) -> dict[str, np.ndarray]:
    with RunFile(path) as run:
        out = {"steps": run.steps, "snapshot_steps": run.snapshot_steps}
        for name in run.metrics:
            out[name] = run.metrics[name]
        for name in run.layers:
            out[f"{name}/norm"] = run.norms(name)
            out[f"{name}/weight"] = run.weights(name)
        out["events"] = np.asarray(len(run.events()))
    return out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """(uninterrupted run file, crashed run dir): the crash left rows after the step-8 checkpoint."""
    tmp = tmp_path_factory.mktemp("resume")
    _fit(tmp / "ref", tmp / "ref" / "run.h5")
    with pytest.raises(RuntimeError, match="planned crash"):
        _fit(tmp / "crash", tmp / "crash" / "run.h5", crash=True)
    with RunFile(tmp / "crash" / "run.h5") as run:
        assert run.status == "failed" and run.steps[-1] == CRASH_AT and 9 in run.snapshot_steps
    return tmp / "ref" / "run.h5", tmp / "crash"


def _copy(src: Path, dst: Path) -> tuple[Path, Path]:
    shutil.copytree(src, dst)
    return dst / "run.h5", next((dst / "ckpt").glob("*step=8.ckpt"))


def test_resume_matches_an_uninterrupted_run(crashed, tmp_path):
    ref, crash = crashed
    path, ckpt = _copy(crash, tmp_path / "run")
    _fit(tmp_path / "run", path, ckpt_path=ckpt)
    want, got = _contents(ref), _contents(path)
    assert want.keys() == got.keys()
    np.testing.assert_array_equal(got["steps"], np.arange(17))  # each step once, in order
    np.testing.assert_array_equal(got["snapshot_steps"], np.arange(0, 17, 3))
    np.testing.assert_array_equal(got["val/step"], [5, 10, 15])
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with h5py.File(path, "r") as f:  # closed cleanly: plain h5py opens it
        assert f.attrs["status"] == "complete"
        assert json.loads(f.attrs["resumed_at"]) == [8]


def test_resume_without_the_file_or_into_another_run_is_a_one_line_error(crashed, tmp_path):
    _ref, crash = crashed
    path, ckpt = _copy(crash, tmp_path / "missing")
    path.unlink()
    with pytest.raises(StoreError, match="does not exist") as e:
        _fit(tmp_path / "missing", path, ckpt_path=ckpt)
    assert "\n" not in str(e.value) and str(path) in str(e.value)

    path, ckpt = _copy(crash, tmp_path / "other")
    model = nn.Sequential(nn.Linear(3, 2))
    RecorderCore(path, model, overwrite=True).close()  # another run now holds this name
    before = path.read_bytes()
    with pytest.raises(StoreError, match="belongs to run") as e:
        _fit(tmp_path / "other", path, ckpt_path=ckpt)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == before  # the other run's file is left alone


# ------------------------------------------------------------------------------------------ after SIGKILL
_KILLED_WRITER = textwrap.dedent(
    """
    import json, os, signal, sys, torch
    from torch import nn
    from sleepbot.recording import RecorderCore

    model = nn.Sequential(nn.Linear(3, 2))
    core = RecorderCore(sys.argv[1], model, snapshot_every=2, flush_every=2, flush_seconds=1e9)
    for step in range(40):
        with torch.no_grad():  # weights that encode the step
            model[0].weight.fill_(step)
            model[0].bias.fill_(-step)
        core.record_step(step, loss=float(step))
        if step == 20:
            print(json.dumps(core.state_dict()), flush=True)  # what a checkpoint at step 20 would hold
    os.kill(os.getpid(), signal.SIGKILL)  # rows after step 20 flushed, some still in memory
    """
)


def test_resume_a_killed_run_with_the_core(tmp_path):
    """A run SIGKILLed after its checkpoint: the resumed core cuts the file back to the checkpoint and appends."""
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    path = tmp_path / "killed.h5"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = json.loads(proc.stdout.splitlines()[-1])
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with RunFile(path) as run:
        assert run.steps[-1] > 20  # the killed run got past its checkpoint
    model = nn.Sequential(nn.Linear(3, 2))
    with RecorderCore(path, model, snapshot_every=2, flush_every=2, resume=state) as core:
        for step in range(21, 31):
            with torch.no_grad():
                model[0].weight.fill_(step)
                model[0].bias.fill_(-step)
            core.record_step(step, loss=float(step))
    with RunFile(path) as run:
        assert run.status == "complete"
        np.testing.assert_array_equal(run.steps, np.arange(31))
        np.testing.assert_array_equal(run.metrics["train_loss"], np.arange(31, dtype=np.float32))
        np.testing.assert_array_equal(run.snapshot_steps, np.arange(0, 31, 2))
        w = run.weights(run.layers[0])  # [S, 2, 4]: weights = step, bias = -step
        np.testing.assert_array_equal(w[:, 0, 0], np.arange(0, 31, 2))
        np.testing.assert_array_equal(w[:, 0, 3], -np.arange(0, 31, 2))
    with pytest.raises(StoreError, match="snapshot_every=2, this recorder has snapshot_every=3"):
        RecorderCore(path, model, snapshot_every=3, resume=state)
