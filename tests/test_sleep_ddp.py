"""Sleep under a 2-process CPU DDP run (gloo): rank 0 decides and its jump reaches every replica, the ranks talk
only at scheduled steps, and a failure on rank 0 ends the run promptly."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from test_sleep_helpers import TinyNet, digits_loader, trainer

from sleepbot.sleep import Sleep, SleepStrategy
from sleepbot.training import ReleaseProcessGroup


class RankShift(SleepStrategy):
    """Proposes a different jump on every rank (+0.01 on rank 0, +0.02 on rank 1): only rank 0's may land."""

    def propose(self, history, horizon, ctx):
        rank = dist.get_rank() if dist.is_initialized() else 0
        return history[-1] + 0.01 * (rank + 1)


class FailOnRankZero(SleepStrategy):
    """Raises on rank 0 only; the other ranks would propose nothing (they never propose: rank 0 decides)."""

    def propose(self, history, horizon, ctx):
        if dist.get_rank() == 0:
            raise RuntimeError(f"boom on rank 0 at step {ctx.step}")
        return history[-1]


class CountingDDP(DDPStrategy):
    """Lightning's ddp_spawn, noting the global step of every broadcast (who talks when)."""

    def __init__(self) -> None:
        super().__init__(start_method="spawn")
        self.broadcast_steps: list[int] = []

    def broadcast(self, obj, src=0):
        module = self._lightning_module
        if module is not None and module._trainer is not None:
            self.broadcast_steps.append(int(module.trainer.global_step))
        return super().broadcast(obj, src)


class Dump(pl.Callback):
    """Saves each rank's parameters at the sleep steps (`tag` pre / post: placed before or after Sleep)."""

    def __init__(self, out, tag: str) -> None:
        self.out = out
        self.tag = tag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 5 == 0:
            params = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(
                params, self.out / f"{self.tag}-step{trainer.global_step}-rank{trainer.global_rank}.pt"
            )

    def on_train_end(self, trainer, pl_module):
        sleep = next(cb for cb in trainer.callbacks if isinstance(cb, Sleep))
        if self.tag == "post":
            torch.save(sleep.events, self.out / f"events-rank{trainer.global_rank}.pt")
            steps = getattr(trainer.strategy, "broadcast_steps", [])
            torch.save(steps, self.out / f"broadcasts-rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_replicas_stay_identical_after_jumps(tmp_path):
    sleep = Sleep(RankShift(), every_n_steps=5, context=1, check_batches=1, tolerance=1.0)
    pl.seed_everything(0, verbose=False)
    callbacks = [Dump(tmp_path, "pre"), sleep, Dump(tmp_path, "post"), ReleaseProcessGroup()]
    t = trainer(11, callbacks, devices=2, strategy=CountingDDP())
    t.fit(TinyNet(), digits_loader())
    for step in (5, 10):
        pre = [torch.load(tmp_path / f"pre-step{step}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        post = [torch.load(tmp_path / f"post-step{step}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        for k in pre[0]:
            assert torch.equal(pre[0][k], pre[1][k]), (step, k)  # DDP kept them equal before the jump
            assert torch.equal(post[0][k], post[1][k]), (step, k)  # and the jump kept them equal
            torch.testing.assert_close(
                post[1][k] - pre[1][k], torch.full_like(pre[1][k], 0.01)
            )  # rank 0's jump
    events = [torch.load(tmp_path / f"events-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [e["step"] for e in events[0]] == [5, 10]
    assert all(e["accepted"] for e in events[0])
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in ev] for ev in events]
    assert strip[0] == strip[1]
    # the ranks exchanged the decision (and then the jump) at the scheduled steps 5 and 10 only, not at every step
    for r in (0, 1):
        during_training = Counter(s for s in torch.load(tmp_path / f"broadcasts-rank{r}.pt") if s > 0)
        assert during_training == {5: 2, 10: 2}, r


@pytest.mark.slow
def test_a_failure_on_rank_zero_ends_the_run_promptly():
    sleep = Sleep(FailOnRankZero(), every_n_steps=3, context=1)
    pl.seed_everything(0, verbose=False)
    t = trainer(8, [sleep, ReleaseProcessGroup()], devices=2, strategy="ddp_spawn")
    start = time.monotonic()
    with pytest.raises(Exception, match="boom on rank 0 at step 3"):
        t.fit(TinyNet(), digits_loader())
    # rank 1 is told by rank 0 and fails too, instead of waiting in a collective (gloo's timeout is 30 minutes);
    # the run takes about as long as starting the two processes (~9 s on an idle CPU, ~30 s on a loaded one)
    assert time.monotonic() - start < 120


class BigShift(SleepStrategy):
    """Moves every weight by +5 (by rank 0's proposal): a jump that training cannot repair in a few steps."""

    def propose(self, history, horizon, ctx):
        return history[-1] + 5.0


class DumpAt(pl.Callback):
    """Saves each rank's state at `steps` (`tag` pre / post: placed before or after Sleep)."""

    def __init__(self, out, tag: str, steps) -> None:
        self.out, self.tag, self.steps = out, tag, set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            opt = trainer.optimizers[0].state_dict()["state"]
            state.update({f"opt.{i}.{k}": v for i in opt for k, v in opt[i].items()})
            torch.save(state, self.out / f"{self.tag}-step{trainer.global_step}-rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_a_jump_undone_by_its_verdict_is_undone_on_every_replica(tmp_path):
    # jump at 5, verdict at 8: rolled back on both ranks to the state before the jump
    sleep = Sleep(BigShift(), every_n_steps=5, context=1, check_batches=1, verify_after=3)
    pl.seed_everything(0, verbose=False)
    callbacks = [DumpAt(tmp_path, "pre", [5]), sleep, DumpAt(tmp_path, "post", [8]), ReleaseProcessGroup()]
    trainer(9, callbacks, devices=2, strategy="ddp_spawn").fit(TinyNet(), digits_loader())
    pre = [torch.load(tmp_path / f"pre-step5-rank{r}.pt", weights_only=True) for r in (0, 1)]
    post = [torch.load(tmp_path / f"post-step8-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert pre[0].keys() == post[0].keys() and any(k.startswith("opt.") for k in pre[0])
    for k in pre[0]:
        assert torch.equal(post[0][k], post[1][k]), k  # identical replicas after the verdict
        assert torch.equal(post[0][k], pre[0][k]), k  # back to the state before the jump


def _release_in_child(queue, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ReleaseProcessGroup().teardown(None, None, "fit")
    queue.put(dist.is_initialized())


def test_the_process_group_is_released_in_spawned_ranks_only(tmp_path):
    """A rank Lightning spawned destroys its group at teardown; the launching process keeps its own."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_release_in_child, args=(queue, str(tmp_path / "child_store")))
    child.start()
    child.join(120)
    assert child.exitcode == 0 and queue.get() is False
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ReleaseProcessGroup().teardown(None, None, "fit")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
