"""The Sleep callback in real Lightning Trainers, on a tiny LightningModule that is not sleepbot's."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from test_sleep_helpers import TinyNet, digits_loader, digits_tensors, trainer, weights
from torch import nn
from torch.utils.data import DataLoader

from sleepbot.errors import SleepbotError
from sleepbot.neurons import neuron_matrix
from sleepbot.sleep import Sleep, SleepStrategy, adjust_optimizer_state


class Recorder(SleepStrategy):
    """Remembers what it was shown; moves every weight by +delta (or returns NaN / blows up on request)."""

    def __init__(self, delta: float = 0.0, mode: str = "shift") -> None:
        self.delta = delta
        self.mode = mode
        self.seen: list[tuple[str, list[int], tuple[int, ...]]] = []
        self.model: nn.Module | None = None

    def setup(self, model, max_steps):
        self.model = model

    def propose(self, history, horizon, ctx):
        self.seen.append((ctx.layer, ctx.steps.tolist(), tuple(history.shape)))
        # the last row of the history is always the weights the layer holds now
        torch.testing.assert_close(history[-1], neuron_matrix(self.model.get_submodule(ctx.layer)))
        if self.mode == "nan" and ctx.layer == "head":
            return torch.full_like(history[-1], math.nan)
        if self.mode == "blowup":
            return history[-1] * 50.0
        return history[-1] + self.delta


def _fit(callbacks, max_steps=24, seed=0, net=TinyNet, **kw):
    pl.seed_everything(seed, verbose=False)
    module = net()  # built after seeding: same initial weights in every run
    trainer(max_steps, callbacks, **kw).fit(module, digits_loader())
    return module


def test_schedule_ring_buffer_and_history():
    rec = Recorder(delta=0.01)
    cb = Sleep(rec, every_n_steps=6, snapshot_every=2, context=3, start_step=6, stop_step=20)
    _fit([cb])
    assert [e["step"] for e in cb.events] == [6, 12, 18]
    assert all(e["accepted"] and e["reason"] == "ok" for e in cb.events)
    by_layer = {}
    for layer, steps, shape in rec.seen:
        by_layer.setdefault(layer, []).append(steps)
        assert shape[0] == 3
    # the ring buffer restarts after each accepted jump: the snapshot right after a jump starts the next history
    assert by_layer["head"] == [[2, 4, 6], [8, 10, 12], [14, 16, 18]]
    assert list(by_layer) == ["body.0", "head"]


class Snapshots(Recorder):
    """A Recorder that keeps a copy of every history it was shown."""

    def __init__(self, delta: float = 0.0) -> None:
        super().__init__(delta)
        self.histories: list[tuple[str, list[int], torch.Tensor]] = []

    def propose(self, history, horizon, ctx):
        self.histories.append((ctx.layer, ctx.steps.tolist(), history.clone()))
        return super().propose(history, horizon, ctx)


def test_carry_history_translates_the_buffer_by_each_jump():
    rec = Snapshots(delta=0.25)
    cb = Sleep(rec, every_n_steps=4, snapshot_every=2, context=5, min_context=3, carry_history=True)
    _fit([cb], max_steps=17)
    assert [e["step"] for e in cb.events] == [4, 8, 12, 16]
    assert all(e["accepted"] for e in cb.events)
    head = [(steps, h) for layer, steps, h in rec.histories if layer == "head"]
    # min_context: the first sleep reads the 3 snapshots it has; later ones up to 5, across the jumps
    assert [steps for steps, _ in head] == [
        [0, 2, 4],
        [0, 2, 4, 6, 8],
        [4, 6, 8, 10, 12],
        [8, 10, 12, 14, 16],
    ]
    # every snapshot before a jump is translated by it (+0.25 per weight here): at step 8 the rows of steps
    # 0-4 are what the first sleep saw, plus 0.25, and the row of step 4 is the weights the jump wrote
    first, second = head[0][1], head[1][1]
    torch.testing.assert_close(second[:2], first[:2] + 0.25)
    torch.testing.assert_close(second[2], first[2] + 0.25)
    # without it the history restarts at each jump, and a sleep waits for min_context new snapshots
    rec2 = Snapshots(delta=0.25)
    cb2 = Sleep(rec2, every_n_steps=4, snapshot_every=2, context=5, min_context=3)
    _fit([cb2], max_steps=17)
    assert [s for layer, s, _ in rec2.histories if layer == "head"] == [
        [0, 2, 4],
        [4, 6, 8],
        [8, 10, 12],
        [12, 14, 16],
    ]


def test_min_context_is_checked():
    with pytest.raises(SleepbotError, match="min_context must be between 1 and context"):
        Sleep("linear", context=3, min_context=4)


def test_reservoir_holds_a_uniform_sample_of_seen_batches_and_resumes():
    seen = []

    class Spy(Sleep):
        def _hold(self, batch):
            seen.append(batch[1].clone())
            super()._hold(batch)

    cb = Spy("noise", every_n_steps=40, check_batches=3, held_batches="reservoir", alpha=0.0)
    _fit([cb], max_steps=30)
    assert len(cb._held) == 3 and cb._seen == 30
    positions = [next(i for i, b in enumerate(seen) if torch.equal(b, h[1])) for h in cb._held]
    # not simply the last three batches, and the same draw from the same seed
    assert sorted(positions) != [27, 28, 29]
    again = Spy("noise", every_n_steps=40, check_batches=3, held_batches="reservoir", alpha=0.0)
    seen.clear()
    _fit([again], max_steps=30)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(cb._held, again._held))
    state = cb.state_dict()
    assert state["seen"] == 30
    with pytest.raises(SleepbotError, match="held_batches"):
        Sleep("noise", held_batches="latest")


def test_should_sleep_override_and_short_history():
    class Twice(Sleep):
        def should_sleep(self, step):
            return step in (3, 9)

    rec = Recorder()
    cb = Twice(rec, snapshot_every=4, context=3)
    _fit([cb], max_steps=12)
    assert [e["step"] for e in cb.events] == [3, 9]
    first, second = cb.events
    assert not first["accepted"] and first["reason"].startswith("history: 2 of 3")  # snapshots 0 and now (3)
    assert second["accepted"]
    assert [s for layer, s, _ in rec.seen if layer == "head"] == [[0, 4, 8, 9][-3:]]


def test_a_schedule_callable_replaces_every_n_steps():
    cb = Sleep("noise", schedule=lambda s: s in (2, 5, 7), alpha=0.01)
    _fit([cb], max_steps=8)
    assert [e["step"] for e in cb.events] == [2, 5, 7]


def test_nan_jump_is_rejected_and_training_is_untouched():
    plain = weights(_fit([], max_steps=20))
    rec = Recorder(mode="nan")
    # optimizer_state="reset" would change training if a rejected jump touched the optimizer
    cb = Sleep(rec, every_n_steps=5, snapshot_every=5, context=2, optimizer_state="reset")
    slept = weights(_fit([cb], max_steps=20))
    assert [e["reason"] for e in cb.events] == ["nonfinite: layer head"] * 3  # not at the last step, 20
    assert not any(e["accepted"] for e in cb.events)
    for k in plain:
        assert torch.equal(plain[k], slept[k]), k


def test_rollback_on_held_batches():
    plain = weights(_fit([], max_steps=20))
    cb = Sleep(Recorder(mode="blowup"), every_n_steps=5, context=1, check_batches=2, tolerance=0.1)
    slept = weights(_fit([cb], max_steps=20))
    assert len(cb.events) == 3
    for e in cb.events:
        assert not e["accepted"] and e["reason"].startswith("loss:")
        assert e["loss_after"] > e["loss_before"] * 1.1
    for k in plain:
        assert torch.equal(plain[k], slept[k]), k
    # a harmless jump passes the same check and is applied
    cb = Sleep(Recorder(delta=1e-6), every_n_steps=5, context=1, check_batches=2, tolerance=0.1)
    _fit([cb], max_steps=20)
    assert all(e["accepted"] for e in cb.events)
    assert all(math.isfinite(e["loss_before"]) and math.isfinite(e["loss_after"]) for e in cb.events)


def test_check_batches_needs_a_loss_for_unusual_batches():
    class DictNet(TinyNet):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    x, y = digits_tensors(64)
    data = [{"x": x[i : i + 16], "y": y[i : i + 16]} for i in range(0, 64, 16)]
    cb = Sleep("noise", every_n_steps=2, check_batches=1, alpha=0.01)
    with pytest.raises(SleepbotError, match="pass Sleep\\(loss_fn="):
        trainer(4, [cb]).fit(DictNet(), DataLoader(data, batch_size=None))
    cb = Sleep(
        "noise",
        every_n_steps=2,
        check_batches=1,
        tolerance=1.0,
        alpha=0.01,
        loss_fn=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]),
    )
    trainer(4, [cb]).fit(DictNet(), DataLoader(data, batch_size=None))
    assert [e["accepted"] for e in cb.events] == [True]  # step 2 (4 is the last step)


def test_optimizer_state_policies_against_a_loop():
    layer = nn.Linear(3, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    old = neuron_matrix(layer)  # [2, 4]
    new = old.clone()
    new[0] *= 2.0
    new[1] *= 0.5
    saved = {k: v.clone() for k, v in opt.state[layer.weight].items()}

    adjust_optimizer_state([opt], {"l": layer}, {"l": old}, {"l": new}, "keep")
    assert torch.equal(opt.state[layer.weight]["exp_avg"], saved["exp_avg"])

    adjust_optimizer_state([opt], {"l": layer}, {"l": old}, {"l": new}, "rescale")
    for i, r in enumerate((2.0, 0.5)):
        for j in range(3):
            assert opt.state[layer.weight]["exp_avg"][i, j].item() == pytest.approx(
                saved["exp_avg"][i, j] * r
            )
            assert opt.state[layer.weight]["exp_avg_sq"][i, j].item() == pytest.approx(
                saved["exp_avg_sq"][i, j] * r * r
            )
    assert opt.state[layer.weight]["step"] == saved["step"]

    adjust_optimizer_state([opt], {"l": layer}, {"l": old}, {"l": new}, "reset")
    assert layer.weight not in opt.state and layer.bias not in opt.state


def test_decisions_reach_the_lightning_logger(tmp_path):
    cb = Sleep("linear", every_n_steps=10, snapshot_every=2, context=3, check_batches=1, tolerance=10.0)
    logger = CSVLogger(tmp_path, name="log", version="")
    _fit([cb], max_steps=20, logger=logger)
    text = (tmp_path / "log" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    for key in ("sleep/accepted", "sleep/rel_jump", "sleep/loss_before", "sleep/loss_after"):
        assert key in header


def test_decisions_reach_the_recorders_events(tmp_path):
    from sleepbot.recording import TrajectoryRecorder
    from sleepbot.store import RunFile

    path = tmp_path / "run.h5"
    cb = Sleep(Recorder(mode="nan"), every_n_steps=5, context=1)
    ok = Sleep("linear", every_n_steps=10, snapshot_every=2, context=3)
    _fit([TrajectoryRecorder(path, snapshot_every=5), cb, ok], max_steps=20)
    with RunFile(path) as run:
        events = run.events()
    got = sorted((e["step"], e["strategy"], bool(e["accepted"])) for e in events)
    assert got == [(5, "custom", False), (10, "custom", False), (10, "linear", True), (15, "custom", False)]


def test_after_plateau_waits_for_flat_validation():
    class ValNet(TinyNet):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    cb = Sleep("noise", every_n_steps=2, after_plateau=True, plateau_window=2, plateau_delta=1.0, alpha=0.01)
    pl.seed_everything(0, verbose=False)
    t = trainer(20, [cb], val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    t.fit(ValNet(), digits_loader(), digits_loader(64))
    # validations at 4, 8, 12: the third makes a window of 2 after one earlier value, so sleep starts after 12
    assert [e["step"] for e in cb.events] == [14, 16, 18]


class StepKeyedNet(TinyNet):
    """Trains on the batch chosen by the global step, not by the loader's position: Lightning restarts a plain
    DataLoader from its first batch when it resumes mid-epoch, which would change the data, not the callback."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = digits_tensors(256)
        i = self.trainer.global_step % 8 * 32
        return x[i : i + 32], y[i : i + 32]


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    def sleep():
        # sleeps at 6, 12, 18; the checkpoint at 17 holds snapshots 12-16 and held batches 15-17, and the
        # sleep at 18 reads snapshots 14-18 and batches 16-18
        return Sleep(
            "linear", every_n_steps=6, snapshot_every=2, context=3, horizon=2, check_batches=3, tolerance=5
        )

    full_cb = sleep()
    full = weights(_fit([full_cb], max_steps=24, net=StepKeyedNet))

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=17, save_top_k=-1)
    first_cb = sleep()
    _fit([first_cb, ckpt], max_steps=17, net=StepKeyedNet, enable_checkpointing=True)
    (path,) = tmp_path.glob("*step=17.ckpt")
    resumed_cb = sleep()
    pl.seed_everything(123, verbose=False)  # a different seed: everything must come from the checkpoint
    module = StepKeyedNet()
    trainer(24, [resumed_cb]).fit(module, digits_loader(), ckpt_path=path)
    resumed = weights(module)
    assert [e["step"] for e in resumed_cb.events] == [6, 12, 18]  # none at the last step
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in full_cb.events]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in resumed_cb.events] == strip
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_sleep_from_config_in_run_training(tiny_config):
    from sleepbot.training import run_training

    tiny_config.sleep.strategy = "linear"
    tiny_config.sleep.every_n_steps = 10
    tiny_config.sleep.snapshot_every = 5
    result = run_training(tiny_config, test=False, quiet=True)
    # 5 snapshots wanted, 5 steps apart: 3 at step 10 (0, 5, 10), 5 at step 20; none at 30, the last step
    assert [(e["step"], e["reason"]) for e in result.events] == [
        (10, "history: 3 of 5 snapshots"),
        (20, "ok"),
    ]


class LossNet(TinyNet):
    """Logs a val_loss fixed by the step of the validation: it falls from 4 to 1 by step 16, then stays flat."""

    def validation_step(self, batch, batch_idx):
        value = {4: 4.0, 8: 3.0, 12: 2.0}.get(self.trainer.global_step, 1.0)
        self.log("val_loss", torch.tensor(value))


@pytest.mark.parametrize(
    ("mode", "first"),
    # min: the loss still falls by >= 1 per window until step 24 (windows [2, 1] after [4, 3] ...; flat from
    # [1, 1] after [..., 1]); max reads the falling loss as getting worse, flat from the third validation (12)
    [("min", 26), ("max", 14)],
)
def test_after_plateau_reads_a_loss_with_monitor_mode_min(mode, first):
    cb = Sleep(
        "noise",
        every_n_steps=2,
        after_plateau=True,
        monitor="val_loss",
        monitor_mode=mode,
        plateau_window=2,
        plateau_delta=0.5,
        alpha=0.01,
    )
    pl.seed_everything(0, verbose=False)
    t = trainer(30, [cb], val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    t.fit(LossNet(), digits_loader(), digits_loader(64))
    assert [e["step"] for e in cb.events] == list(range(first, 30, 2))


def test_bad_monitor_mode_and_buffer_device_are_one_line_errors():
    with pytest.raises(SleepbotError, match="unknown sleep monitor_mode 'up'; valid: max, min") as e:
        Sleep("linear", monitor_mode="up")
    assert "\n" not in str(e.value)
    with pytest.raises(SleepbotError, match="unknown sleep buffer_device 'gpu0'; valid: None, cpu") as e:
        Sleep("linear", buffer_device="gpu0")
    assert "\n" not in str(e.value)


def _linear_sleep(**kw) -> Sleep:
    settings = dict(every_n_steps=6, snapshot_every=2, context=3, horizon=2, check_batches=2)
    return Sleep("linear", **{**settings, **kw})


def test_buffer_device_keeps_history_and_held_batches_there_and_changes_nothing():
    plain_cb = _linear_sleep()
    plain = weights(_fit([plain_cb], max_steps=20))
    host_cb = _linear_sleep(buffer_device="cpu")

    class Look(pl.Callback):  # after Sleep: where its ring buffer and held batches live
        devices: set = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for _, snap in host_cb._buffer:
                self.devices |= {v.device for v in snap.values()}
            for b in host_cb._held:
                self.devices |= {t.device for t in b}

    look = Look()
    host = weights(_fit([host_cb, look], max_steps=20))
    assert look.devices == {torch.device("cpu")}
    assert [e["accepted"] for e in host_cb.events] == [True, True, True]
    for k in plain:
        assert torch.equal(plain[k], host[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffer_device_cpu_for_a_model_on_cuda():
    def fit(cb):
        pl.seed_everything(0, verbose=False)
        module = TinyNet()
        trainer(20, [cb], accelerator="cuda", deterministic=False).fit(module, digits_loader())
        return module, {k: v.cpu() for k, v in weights(module).items()}

    host_cb = _linear_sleep(buffer_device="cpu", tolerance=10.0)
    module, host = fit(host_cb)
    assert next(module.parameters()).is_cuda
    assert {v.device.type for _, snap in host_cb._buffer for v in snap.values()} == {"cpu"}
    assert {t.device.type for b in host_cb._held for t in b} == {"cpu"}
    assert [e["accepted"] for e in host_cb.events] == [True, True, True]
    _, plain = fit(_linear_sleep(tolerance=10.0))
    for k in plain:
        torch.testing.assert_close(plain[k], host[k], rtol=1e-5, atol=1e-6)


@pytest.fixture
def checkpoint_at_8(tmp_path):
    """A checkpoint at step 8 of a run with `_linear_sleep()` (one jump, at 6, before it), and that run's Sleep."""
    cb = _linear_sleep()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    _fit([cb, ckpt], max_steps=8, net=StepKeyedNet, enable_checkpointing=True)
    (path,) = tmp_path.glob("*step=8.ckpt")
    return path, cb


def _resume(path, cb, max_steps=14):
    pl.seed_everything(0, verbose=False)
    trainer(max_steps, [cb]).fit(StepKeyedNet(), digits_loader(), ckpt_path=path)


def test_resume_with_a_changed_setting_that_shapes_the_state_fails_naming_it(checkpoint_at_8):
    path, _ = checkpoint_at_8
    with pytest.raises(
        SleepbotError, match="sleep setting context changed since the checkpoint: 3 there, 4 now"
    ) as e:
        _resume(
            path, Sleep("linear", every_n_steps=6, snapshot_every=2, context=4, horizon=2, check_batches=2)
        )
    assert "\n" not in str(e.value)
    with pytest.raises(
        SleepbotError, match="sleep setting strategy changed since the checkpoint: linear"
    ) as e:
        _resume(path, Sleep("noise", every_n_steps=6, check_batches=2))
    assert "\n" not in str(e.value)
    with pytest.raises(SleepbotError, match="sleep setting check_batches changed .*: 2 there, 3 now"):
        _resume(
            path, Sleep("linear", every_n_steps=6, snapshot_every=2, context=3, horizon=2, check_batches=3)
        )


def test_resume_with_changed_schedule_settings_keeps_the_state(checkpoint_at_8):
    path, first = checkpoint_at_8
    assert [e["step"] for e in first.events] == [6]
    cb = _linear_sleep(tolerance=0.5, every_n_steps=5)  # free to change: only the future depends on them
    _resume(path, cb, max_steps=14)
    # the state came with it: the event before the checkpoint, and a full history at 10 (snapshots 6, 8, 10 on
    # the grid that the jump at 6 restarted; a fresh start would have only 8 and 10)
    assert [e["step"] for e in cb.events] == [6, 10]
    assert cb.events[0] == first.events[0]
    assert cb.events[1]["reason"] == "ok"
