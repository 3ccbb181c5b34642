"""The delayed verdict (`Sleep(verify_after=k)`): a jump is judged k steps after it, on the training batches held
at the jump; a jump whose held loss is then higher than before it is undone, module and optimizer state bit for
bit, and one that is kept leaves no trace of the verdict."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_sleep_batchnorm import BigNoise, _loader, _model
from test_sleep_callback import StepKeyedNet
from test_sleep_helpers import TinyNet, digits_loader, trainer, weights

from sleepbot.errors import SleepbotError
from sleepbot.sleep import Sleep, SleepStrategy


class Stay(SleepStrategy):
    """Proposes the weights as they are: a jump that changes nothing, so training after it lowers the loss."""

    def propose(self, history, horizon, ctx):
        return history[-1].clone()


def _sleep(strategy, **kw):
    opts = dict(every_n_steps=10, snapshot_every=2, context=3, horizon=1, check_batches=2, verify_after=4)
    opts.update(kw)
    return Sleep(strategy, **opts)


def _fit(callbacks, max_steps, net=TinyNet, loader=None):
    pl.seed_everything(0, verbose=False)
    module = net()
    t = trainer(max_steps, callbacks)
    t.fit(module, loader or digits_loader())
    return module, t


def _optimizer_state(t: pl.Trainer) -> list[torch.Tensor]:
    state = t.optimizers[0].state_dict()["state"]
    return [v for i in sorted(state) for _, v in sorted(state[i].items())]


def test_a_jump_that_hurts_is_undone_k_steps_later_bit_for_bit():
    cb = _sleep(BigNoise())
    module, t = _fit([cb], max_steps=14)  # jump at 10, verdict at 14
    jump, verdict = cb.events
    assert jump["step"] == 10 and jump["accepted"] and jump["kept"] is False
    assert (
        verdict["step"] == 14
        and not verdict["accepted"]
        and verdict["reason"].startswith("verify: rolled back")
    )
    assert verdict["loss_after"] > verdict["loss_before"] == jump["loss_before"]
    # back where the run was before the jump: a run without sleep stopped at step 10
    ref_module, ref = _fit([], max_steps=10)
    for k, v in weights(ref_module).items():
        assert torch.equal(weights(module)[k], v), k
    for a, b in zip(_optimizer_state(t), _optimizer_state(ref), strict=True):
        assert torch.equal(a, b)
    assert cb._jumped == 0  # the undone jump skipped nothing
    assert [s for s, _ in cb._buffer] == [14]  # the history restarts at the restored weights
    # the held-batch forward passes at the jump and at the verdict are counted
    assert jump["forwards"] == 2 and verdict["forwards"] == 2


def test_a_kept_jump_leaves_no_trace_of_its_verdict():
    cb = _sleep(Stay())
    module, t = _fit([cb], max_steps=16)
    jump, verdict = cb.events
    assert jump["kept"] is True and verdict["reason"].startswith("verify: kept")
    assert verdict["loss_after"] <= verdict["loss_before"]
    ref_module, ref = _fit([], max_steps=16)
    for k, v in weights(ref_module).items():
        assert torch.equal(weights(module)[k], v), k
    for a, b in zip(_optimizer_state(t), _optimizer_state(ref), strict=True):
        assert torch.equal(a, b)


class BNState(pl.Callback):
    """Every BatchNorm buffer at `step`, seen by a callback placed before or after Sleep."""

    def __init__(self, step):
        self.step, self.state = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.state = {
                k: v.clone() for k, v in pl_module.state_dict().items() if "running" in k or "batches" in k
            }


def test_the_verdict_leaves_batchnorm_statistics_as_training_left_them():
    pre, post = BNState(14), BNState(14)
    cb = _sleep(Stay())
    pl.seed_everything(0, verbose=False)
    trainer(15, [pre, cb, post]).fit(_model(), train_dataloaders=_loader())
    assert cb.events[-1]["reason"].startswith("verify: kept") and cb.events[-1]["step"] == 14
    assert cb.events[-1]["forwards"] == 2 * 2  # re-estimate + loss, per held batch
    assert pre.state and pre.state.keys() == post.state.keys()
    for k, v in pre.state.items():
        assert torch.equal(post.state[k], v), k


def test_no_jump_whose_verdict_would_fall_after_the_last_step():
    cb = _sleep(Stay())
    _fit([cb], max_steps=13)  # a jump at 10 would be judged at 14
    assert cb.events == []


def test_resume_while_a_verdict_is_pending_equals_uninterrupted(tmp_path):
    def sleep():
        # jumps at 6 and 12, verdicts at 10 and 16; after the rollback at 10 the history (context 2) is 10, 12
        return _sleep(BigNoise(), every_n_steps=6, context=2, verify_after=4)

    # the uninterrupted run leaves a checkpoint at step 7, with the jump of step 6 awaiting its verdict
    full_cb = sleep()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    pl.seed_everything(0, verbose=False)
    full = StepKeyedNet()
    trainer(18, [full_cb, ckpt], enable_checkpointing=True).fit(full, digits_loader())
    assert [e["reason"].split(" (")[0] for e in full_cb.events if not e["accepted"]] == [
        "verify: rolled back the jump of step 6",
        "verify: rolled back the jump of step 12",
    ]
    path = next(tmp_path.glob("*step=7.ckpt"))
    (state,) = [v for v in torch.load(path, weights_only=True)["callbacks"].values() if "pending" in v]
    assert state["pending"]["jump_step"] == 6  # the pending jump travels in a plain checkpoint
    resumed_cb = sleep()
    pl.seed_everything(123, verbose=False)  # everything must come from the checkpoint
    module = StepKeyedNet()
    trainer(18, [resumed_cb]).fit(module, digits_loader(), ckpt_path=path)
    assert [e["reason"] for e in resumed_cb.events] == [e["reason"] for e in full_cb.events]
    for k, v in weights(full).items():
        assert torch.equal(weights(module)[k], v), k


def test_after_a_rollback_off_the_snapshot_grid_the_history_stays_on_it():
    cb = _sleep(BigNoise(), every_n_steps=6, verify_after=3)  # snapshots every 2 steps; verdict at 9
    _fit([cb], max_steps=15)
    assert [(e["step"], e["reason"].split(" (")[0]) for e in cb.events] == [
        (6, "ok"),
        (9, "verify: rolled back the jump of step 6"),
        (12, "history: 2 of 3 snapshots"),  # 10 and 12: the grid of the jump at 6, not 9, 11
    ]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(check_batches=0), "set check_batches >= 1"),
        (dict(jump_scales=[0.5, 1.0]), "pass one"),
        (dict(verify_after=10), "smaller than every_n_steps"),
        (dict(verify_after=-1), "must be >= 0"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, message):
    with pytest.raises(SleepbotError, match=message):
        _sleep(Stay(), **kw)
