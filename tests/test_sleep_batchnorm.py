"""Sleep on a BatchNorm network (sleepbot's resnet_tiny): a jump is judged, and kept, with running statistics
that belong to the weights being judged; a rejected jump leaves the old statistics exactly."""

from __future__ import annotations

from collections import deque

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from test_sleep_helpers import digits_tensors, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sleepbot.models import Classifier
from sleepbot.sleep import Sleep, SleepStrategy

HELD = 3
SLEEPS = (5, 10)


def _model() -> Classifier:
    return Classifier(arch="resnet_tiny", input_shape=(1, 8, 8), lr=1e-2)


def _loader() -> DataLoader:
    x, y = digits_tensors(256)
    return DataLoader(TensorDataset(x.view(-1, 1, 8, 8), y), batch_size=32)


def _norms(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class Capture(pl.Callback):
    """The module's full state (weights and BN buffers) at the sleep steps, and the last HELD training batches.
    Placed before Sleep it sees the weights a jump starts from; after Sleep, what the jump left."""

    def __init__(self) -> None:
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, list] = {}
        self.momentum: dict[int, list] = {}
        self._last: deque = deque(maxlen=HELD)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last.append([t.clone() for t in batch])
        step = trainer.global_step
        if step in SLEEPS:
            self.state[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.batches[step] = list(self._last)
            self.momentum[step] = [m.momentum for m in _norms(pl_module).values()]


class BigNoise(SleepStrategy):
    """Adds N(0, 1) noise to every weight: a jump the held-batch check must reject."""

    def propose(self, history, horizon, ctx):
        return history[-1] + torch.randn(history[-1].shape, generator=ctx.generator)


def reference_stats(
    state: dict[str, torch.Tensor], batches: list
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: the mean over `batches` of its input's per-channel batch mean and unbiased variance, in a
    training-mode forward of a fresh model holding `state` (read with forward hooks, not with running stats)."""
    model = _model()
    model.load_state_dict(state)
    model.train()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, m in _norms(model).items():

        def hook(mod, inputs, output, name=name):
            x = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1)  # [C, batch * H * W]
            seen.setdefault(name, []).append((x.mean(1), x.var(1, unbiased=True)))

        hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {
        n: (torch.stack([m for m, _ in v]).mean(0), torch.stack([v_ for _, v_ in v]).mean(0))
        for n, v in seen.items()
    }


def reference_loss(state: dict[str, torch.Tensor], batches: list) -> float:
    """The eval-mode loss on `batches` of a model holding `state`'s weights and the reference statistics."""
    model = _model()
    model.load_state_dict(state)
    for name, (mean, var) in reference_stats(state, batches).items():
        bn = model.get_submodule(name)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    model.eval()
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)


def _fit(strategy, tolerance: float) -> tuple[Sleep, Capture, Capture]:
    pre, post = Capture(), Capture()
    cb = Sleep(
        strategy,
        every_n_steps=5,
        snapshot_every=1,
        context=3,
        horizon=1,
        check_batches=HELD,
        tolerance=tolerance,
    )
    pl.seed_everything(0, verbose=False)
    trainer(11, [pre, cb, post]).fit(_model(), _loader())
    assert [e["step"] for e in cb.events] == list(SLEEPS)
    return cb, pre, post


def test_rejected_jump_leaves_bn_statistics_bit_identical():
    cb, pre, post = _fit(BigNoise(), tolerance=0.0)
    for event in cb.events:
        assert not event["accepted"] and event["reason"].startswith("loss:")
    for step in SLEEPS:
        for key, value in pre.state[step].items():
            assert torch.equal(post.state[step][key], value), (step, key)  # weights and every BN buffer
        assert post.momentum[step] == pre.momentum[step]


def test_accepted_jump_is_judged_and_kept_with_statistics_of_its_weights():
    cb, pre, post = _fit("linear", tolerance=1e9)
    assert all(e["accepted"] for e in cb.events)
    for event in cb.events:
        step = event["step"]
        before, after, batches = pre.state[step], post.state[step], post.batches[step]
        moved = [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]
        assert moved  # the jump happened
        for name, (mean, var) in reference_stats(after, batches).items():
            torch.testing.assert_close(after[f"{name}.running_mean"], mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(after[f"{name}.running_var"], var, rtol=1e-4, atol=1e-5)
            # training's batch count and momentum are as they were
            assert torch.equal(after[f"{name}.num_batches_tracked"], before[f"{name}.num_batches_tracked"])
        assert post.momentum[step] == pre.momentum[step] == [0.1] * len(post.momentum[step])
        # both sides of the check used statistics of their own weights, on the held batches
        assert abs(event["loss_before"] - reference_loss(before, batches)) < 1e-4 * max(
            1.0, event["loss_before"]
        )
        assert abs(event["loss_after"] - reference_loss(after, batches)) < 1e-4 * max(
            1.0, event["loss_after"]
        )
        # and the old weights' running statistics (training's moving average) would not have given that loss
        stale = _model()
        stale.load_state_dict(before)
        stale.eval()
        with torch.no_grad():
            stale_loss = sum(float(F.cross_entropy(stale(x), y)) for x, y in batches) / len(batches)
        assert abs(stale_loss - event["loss_before"]) > 1e-3
