"""The recorder: a plain loop against an in-memory reference, any LightningModule, failure, SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sleepbot.errors import SleepbotError
from sleepbot.neurons import neuron_matrix, neuron_norms
from sleepbot.recording import RecorderCore, TrajectoryRecorder, recorder_from_config, sample_neurons
from sleepbot.store import RunFile, StoreError
from sleepbot.training import ReleaseProcessGroup


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 12, bias=False),
        nn.ReLU(),
        nn.Linear(12, 10),
    )


@pytest.mark.parametrize("flush_every", [1, 3, 64])
def test_core_matches_in_memory_reference(tmp_path, flush_every):
    """Everything the core writes equals what the model held at that step, whatever the block size."""
    model = _toy_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    layers = ["0", "3", "5"]
    ref_norms, ref_loss, ref_lr, ref_snap, ref_grad, ref_state = [], [], [], [], [], []
    path = tmp_path / "run.h5"
    g = torch.Generator().manual_seed(1)
    with RecorderCore(
        path,
        model,
        optimizer=opt,
        snapshot_every=4,
        max_neurons_per_layer=8,
        gradients=True,
        optimizer_state=True,
        seed=5,
        flush_every=flush_every,
    ) as core:
        mods = dict(model.named_modules())
        idx = {n: sample_neurons(n, mods[n].weight.shape[0], 8, 5) for n in layers}

        def remember(step, loss, lr):
            ref_norms.append({n: neuron_norms(mods[n]).numpy() for n in layers})
            ref_loss.append(loss)
            ref_lr.append(lr)
            if step % 4 == 0:
                ref_snap.append({n: neuron_matrix(mods[n]).numpy()[idx[n]] for n in layers})
                grads = {}
                states = {}
                for n in layers:
                    m = mods[n]
                    gw = m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)
                    st = opt.state.get(m.weight, {}).get("exp_avg_sq", torch.zeros_like(m.weight))
                    if m.bias is not None:
                        gb = m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
                        sb = opt.state.get(m.bias, {}).get("exp_avg_sq", torch.zeros_like(m.bias))
                        grads[n] = torch.cat([gw.reshape(len(gw), -1), gb[:, None]], 1).numpy()[idx[n]]
                        states[n] = torch.cat([st.reshape(len(st), -1), sb[:, None]], 1).numpy()[idx[n]]
                    else:
                        grads[n] = gw.reshape(len(gw), -1).numpy()[idx[n]]
                        states[n] = st.reshape(len(st), -1).numpy()[idx[n]]
                ref_grad.append(grads)
                ref_state.append(states)

        core.record_step(0)
        remember(0, np.nan, 0.01)
        for step in range(1, 31):
            x = torch.randn(16, 1, 8, 8, generator=g)
            y = torch.randint(0, 10, (16,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            core.record_step(step, loss=loss, lr=lr)
            remember(step, loss.item(), lr)
        core.log_val(30, 0.5, 0.75)

    with RunFile(path) as run:
        assert run.complete and run.layers == layers
        np.testing.assert_array_equal(run.steps, np.arange(31))
        np.testing.assert_array_equal(run.snapshot_steps, np.arange(0, 31, 4))
        np.testing.assert_allclose(run.metrics["train_loss"], np.float32(ref_loss), rtol=1e-6)
        np.testing.assert_allclose(run.metrics["lr"], np.float32(ref_lr))
        assert run.metrics["lr"][-1] < run.metrics["lr"][1]  # the scheduler's decay is there
        for n in layers:
            np.testing.assert_allclose(run.norms(n), np.stack([r[n] for r in ref_norms]), rtol=1e-5)
            np.testing.assert_array_equal(run.weights(n), np.stack([r[n] for r in ref_snap]))
            np.testing.assert_array_equal(run.array(n, "grad"), np.stack([r[n] for r in ref_grad]))
            np.testing.assert_array_equal(
                run.array(n, "optim/exp_avg_sq"), np.stack([r[n] for r in ref_state])
            )
            np.testing.assert_array_equal(run.layer_info(n)["neurons"], idx[n])
        assert (
            run.layer_info("3")["n"] == 12 and run.layer_info("3")["n_kept"] == 8
        )  # sampled, seeded, stored
        assert run.layer_info("0")["n_kept"] == 4  # fewer than the cap: all kept
        assert run.attrs["neuron_seed"] == 5 and run.attrs["gradients"] and run.attrs["optimizer_state"]
        np.testing.assert_array_equal(run.metrics["val/step"], [30])


def test_neuron_sample_is_seeded():
    a = sample_neurons("fc", 1000, 50, seed=3)
    assert np.array_equal(a, sample_neurons("fc", 1000, 50, seed=3)) and len(np.unique(a)) == 50
    assert not np.array_equal(a, sample_neurons("fc", 1000, 50, seed=4))
    assert not np.array_equal(a, sample_neurons("fc2", 1000, 50, seed=3))
    np.testing.assert_array_equal(sample_neurons("fc", 120, 256, seed=3), np.arange(120))


def test_core_errors(tmp_path):
    model = _toy_model()
    with pytest.raises(SleepbotError, match="no neuron layer named 'nope'"):
        RecorderCore(tmp_path / "a.h5", model, layers=["nope"])
    with pytest.raises(SleepbotError, match="snapshot_every must be"):
        RecorderCore(tmp_path / "a.h5", model, snapshot_every=0)
    with pytest.raises(SleepbotError, match="SGD has no per-parameter state"):
        RecorderCore(
            tmp_path / "a.h5", model, optimizer_state=True, optimizer=torch.optim.SGD(model.parameters(), 0.1)
        )
    with pytest.raises(SleepbotError, match="no Conv1d/2d/3d or Linear"):
        RecorderCore(tmp_path / "a.h5", nn.ReLU())
    core = RecorderCore(tmp_path / "a.h5", model)
    core.record_step(3)
    with pytest.raises(SleepbotError, match="steps must increase"):
        core.record_step(3)
    core.close()
    with pytest.raises(StoreError, match="exists"):
        RecorderCore(tmp_path / "a.h5", model)


# ------------------------------------------------------------------------------------------ Lightning
class PlainModule(pl.LightningModule):
    """Not sleepbot's Classifier: logs `val/loss` and `val/acc`, returns a dict from training_step, steps an lr
    scheduler every step, and may fail on purpose."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at is not None and self.global_step == self.hparams.fail_at:
            raise RuntimeError("planned failure")
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _digits_loader(n: int = 256, batch_size: int = 32) -> DataLoader:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:n])
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _trainer(**kw) -> pl.Trainer:
    base = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**base, **kw})


def test_recorder_in_a_foreign_lightning_module(tmp_path):
    path = tmp_path / "plain.h5"
    rec = TrajectoryRecorder(path, snapshot_every=5)
    module = PlainModule()
    trainer = _trainer(max_steps=20, val_check_interval=10, check_val_every_n_epoch=None, callbacks=[rec])
    trainer.fit(module, _digits_loader(), _digits_loader(64))
    with RunFile(path) as run:
        assert run.complete
        assert run.layers == ["body.0", "head"]
        np.testing.assert_array_equal(run.steps, np.arange(21))
        np.testing.assert_array_equal(run.snapshot_steps, [0, 5, 10, 15, 20])
        np.testing.assert_array_equal(run.metrics["val/step"], [10, 20])
        assert np.all(np.isfinite(run.metrics["val/acc"])) and np.all(np.isfinite(run.metrics["val/loss"]))
        # lr of update k is 0.1 / k under LambdaLR(1 / (1 + s)) stepped after each update
        np.testing.assert_allclose(run.metrics["lr"][1:], 0.1 / np.arange(1, 21), rtol=1e-6)
        loss = run.metrics["train_loss"]
        assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))
        final = torch.cat([module.head.weight.detach(), module.head.bias.detach()[:, None]], 1).numpy()
        np.testing.assert_array_equal(run.weights("head", -1), final)
        assert run.attrs["arch"] == "PlainModule" and run.attrs["optimizer"] == "sgd"
        assert run.attrs["config"] == {"fail_at": None}
        assert run.layer_info("head")["arrays"] == ["weight"]


def test_gradient_accumulation_records_each_update_once(tmp_path):
    path = tmp_path / "acc.h5"
    trainer = _trainer(
        max_steps=6, accumulate_grad_batches=2, callbacks=[TrajectoryRecorder(path, snapshot_every=3)]
    )
    trainer.fit(PlainModule(), _digits_loader())
    with RunFile(path) as run:
        np.testing.assert_array_equal(run.steps, np.arange(7))
        np.testing.assert_array_equal(run.snapshot_steps, [0, 3, 6])


def test_failed_run_is_marked_failed(tmp_path):
    path = tmp_path / "fail.h5"
    trainer = _trainer(max_steps=30, callbacks=[TrajectoryRecorder(path, snapshot_every=5)])
    with pytest.raises(RuntimeError, match="planned failure"):
        trainer.fit(PlainModule(fail_at=12), _digits_loader())
    with RunFile(path) as run:
        assert run.status == "failed" and not run.complete
        np.testing.assert_array_equal(run.steps, np.arange(13))  # everything up to the failure was flushed
        np.testing.assert_array_equal(run.snapshot_steps, [0, 5, 10])


def test_recorder_from_config_through_run_training(tiny_config):
    from sleepbot.training import run_training

    cfg = tiny_config
    cfg.record.enabled = True
    cfg.trainer.max_steps = 25
    result = run_training(cfg, quiet=True)
    assert result.record_path == str(cfg.record.path or f"{cfg.out_dir}/{cfg.run_name}.h5")
    with RunFile(result.record_path) as run:
        assert run.complete
        assert run.attrs["config"] == cfg.to_dict()
        assert (run.attrs["dataset"], run.attrs["arch"], run.attrs["optimizer"]) == (
            "digits",
            "small_cnn",
            "adam",
        )
        assert run.attrs["seed"] == 0 and run.attrs["lr"] == pytest.approx(cfg.model.lr)
        assert len(run.steps) == 26 and list(run.snapshot_steps) == [0, 10, 20]
        # the validation run after fit (step 25 is not a multiple of 10) and the test both amend the closed file
        np.testing.assert_array_equal(run.metrics["val/step"], result.val_step)
        np.testing.assert_allclose(run.metrics["val/acc"], result.val_acc, rtol=1e-6)
        assert float(run.metrics["test/acc"]) == pytest.approx(result.test_acc, rel=1e-6)
        for name in run.layers:  # every neuron of small_cnn is kept by default
            info = run.layer_info(name)
            assert info["n_kept"] == info["n"]
    # a second run into the same file is refused before training starts
    with pytest.raises(StoreError, match="exists"):
        run_training(cfg, quiet=True)
    assert recorder_from_config(cfg).path == recorder_from_config(cfg).path


# ------------------------------------------------------------------------------------------ SIGKILL
_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from sleepbot.recording import RecorderCore

    model = nn.Sequential(nn.Linear(3, 2))
    core = RecorderCore(sys.argv[1], model, snapshot_every=1, flush_every=4, flush_seconds=1e9)
    step = 0
    while True:
        with torch.no_grad():  # weights that encode the step, so the reader can check every snapshot
            model[0].weight.fill_(step)
            model[0].bias.fill_(-step)
        core.record_step(step, loss=float(step))
        if step % 4 == 3:  # the core flushes when its 4-snapshot buffer is full
            print(step, flush=True)
        step += 1
        time.sleep(0.002)
    """
)


def test_sigkill_leaves_a_readable_file(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    path = tmp_path / "killed.h5"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        flushed = -1
        deadline = time.monotonic() + 60
        while flushed < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            flushed = int(line)
        time.sleep(0.005)  # kill it mid-block, with unflushed snapshots in memory
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert flushed >= 40, "the writer did not get far enough"
    with RunFile(path) as run:
        assert run.status == "running" and not run.complete
        steps = run.snapshot_steps
        assert len(steps) >= flushed + 1 and len(steps) % 4 == 0  # every flushed block, nothing half-written
        np.testing.assert_array_equal(steps, np.arange(len(steps)))
        layer = run.layers[0]
        w = run.weights(layer)  # [S, 2, 4]: 3 weights (= step) and the bias (= -step)
        np.testing.assert_array_equal(w[:, :, :3], np.broadcast_to(steps[:, None, None], (len(steps), 2, 3)))
        np.testing.assert_array_equal(w[:, :, 3], -np.broadcast_to(steps[:, None], (len(steps), 2)))
        np.testing.assert_array_equal(run.metrics["train_loss"], run.steps.astype(np.float32))


# ------------------------------------------------------------------------------------------ DDP
class _RankProbe(TrajectoryRecorder):
    """Leaves a note per rank saying whether it wrote, so the parent process can see what each rank did."""

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        note = self.path.parent / f"rank{trainer.global_rank}.txt"
        note.write_text(f"writes={self.writes} core={self.core is not None}")


@pytest.mark.slow
def test_ddp_only_rank_zero_writes(tmp_path):
    path = tmp_path / "ddp.h5"
    torch.manual_seed(0)
    module = PlainModule()
    trainer = _trainer(
        max_steps=10,
        devices=2,
        strategy="ddp_spawn",
        callbacks=[_RankProbe(path, snapshot_every=5), ReleaseProcessGroup()],
        use_distributed_sampler=True,
    )
    trainer.fit(module, _digits_loader(256, 16))
    assert (tmp_path / "rank0.txt").read_text() == "writes=True core=True"
    assert (tmp_path / "rank1.txt").read_text() == "writes=False core=False"
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["ddp.h5"]
    with RunFile(path) as run:
        assert run.complete
        assert run.attrs["world_size"] == 2 and run.attrs["writer_rank"] == 0
        np.testing.assert_array_equal(run.steps, np.arange(11))
        np.testing.assert_array_equal(run.snapshot_steps, [0, 5, 10])
        # ddp_spawn hands rank 0's final weights back to this process: they are the last snapshot
        final = torch.cat([module.head.weight.detach(), module.head.bias.detach()[:, None]], 1).numpy()
        np.testing.assert_allclose(run.weights("head", -1), final, rtol=0, atol=0)


def test_bench_script_runs_at_toy_size(tmp_path):
    """scripts/bench_recording.py end to end on a few steps: its JSON has every number the README quotes."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_recording", root / "scripts" / "bench_recording.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(
        [
            "--steps",
            "25",
            "--warmup",
            "5",
            "--repeats",
            "1",
            "--arms",
            "default",
            "--archs",
            "small_cnn",
            "tiny_cnn3",
            "--memory-steps",
            "2",
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["arms"].keys() == {"none", "default"} and out["steps"] == 25
    assert saved["by_arch"].keys() == {"small_cnn", "tiny_cnn3"}
    assert saved["by_arch"]["tiny_cnn3"]["default"]["in_recorder_ms_per_step"] > 0
    memory = saved["memory"]  # a ~10M-weight model: the byte budget holds one 40 MB snapshot, not 64
    assert memory["weights"] > 9e6 and memory["snapshots_buffered"] == 1
    assert 0 < memory["tracemalloc_peak_MB"] < 200 and memory["maxrss_growth_MB"] < 1000
    default = saved["arms"]["default"]
    assert default["bytes_per_1000_steps"] > 0 and default["in_recorder_ms_per_step"] > 0
    assert set(saved["write"]["filters"]) == {"none", "lzf", "gzip"}
    assert all(w["MB_per_s"] > 0 for w in saved["write"]["filters"].values())
