"""Sleep under a 2-process CPU DDP run (gloo): rank 0 decides and its jump reaches every replica."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from test_sleep_helpers import TinyNet, digits_loader, trainer

from sleepbot.sleep import Sleep, SleepStrategy


class RankShift(SleepStrategy):
    """Proposes a different jump on every rank (+0.01 on rank 0, +0.02 on rank 1): only rank 0's may land."""

    def propose(self, history, horizon, ctx):
        rank = dist.get_rank() if dist.is_initialized() else 0
        return history[-1] + 0.01 * (rank + 1)


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


@pytest.mark.slow
def test_replicas_stay_identical_after_jumps(tmp_path):
    sleep = Sleep(RankShift(), every_n_steps=5, context=1, check_batches=1, tolerance=1.0)
    pl.seed_everything(0, verbose=False)
    t = trainer(11, [Dump(tmp_path, "pre"), sleep, Dump(tmp_path, "post")], devices=2, strategy="ddp_spawn")
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
