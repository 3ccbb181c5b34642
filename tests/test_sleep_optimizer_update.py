"""`optimizer_update`: the update a layer's optimizer state points to, as strategies read it (LayerContext.update)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from test_sleep_helpers import TinyNet, digits_loader, digits_tensors, trainer
from torch import nn

from sleepbot.neurons import neuron_layers, neuron_matrix
from sleepbot.sleep import Sleep
from sleepbot.sleep.base import SleepStrategy, register_strategy
from sleepbot.sleep.optim_state import optimizer_update


def _steps(opt_factory, n=4):
    """A conv + linear net stepped n times on digits; (layers, optimizer, neuron matrices before the last step)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    opt = opt_factory(net.parameters())
    if hasattr(opt, "train"):  # Schedule-Free steps in train mode only
        opt.train()
    x, y = digits_tensors(64)
    layers = neuron_layers(net)
    before = {}
    for _ in range(n):
        before = {k: neuron_matrix(m) for k, m in layers.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(net(x.reshape(-1, 1, 8, 8)), y).backward()
        opt.step()
    return layers, opt, before


@pytest.mark.parametrize(
    ("factory", "rtol"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-2), 1e-4),
        (
            lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
            1e-4,
        ),  # L2 in the gradient: the Adam rule
        # AdamW decays the weights before its step; the update is recomputed at the weights after it, which
        # differ by the step itself: a relative error of lr * weight_decay = 1e-3
        (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), 2e-3),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3), 1e-4),
    ],
    ids=["adam", "adam-l2", "adamw", "momentum"],
)
def test_the_update_is_the_step_the_optimizer_just_took(factory, rtol):
    layers, opt, before = _steps(factory)
    for name, module in layers.items():
        taken = neuron_matrix(module) - before[name]  # [N, F], bias last
        torch.testing.assert_close(optimizer_update([opt], module), taken, rtol=rtol, atol=1e-7)


def test_no_update_for_optimizers_it_cannot_read():
    schedulefree = pytest.importorskip("schedulefree")
    for factory in (
        lambda p: torch.optim.SGD(p, lr=0.1),  # no state
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
        lambda p: schedulefree.AdamWScheduleFree(p, lr=1e-2),
    ):
        layers, opt, _ = _steps(factory, n=2)
        assert all(optimizer_update([opt], m) is None for m in layers.values())
    layers, opt, _ = _steps(lambda p: torch.optim.Adam(p, lr=1e-2), n=0)  # never stepped
    assert all(optimizer_update([opt], m) is None for m in layers.values())


@register_strategy("_test_reads_update")
class ReadsUpdate(SleepStrategy):
    """Moves nothing; keeps what the callback told it about the optimizer's update."""

    reads_optimizer = True

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, torch.Tensor | None]] = {}

    def propose(self, history, horizon, ctx):
        self.seen.setdefault(ctx.step, {})[ctx.layer] = ctx.update
        return history[-1].clone()


class LastStep(pl.Callback):
    """Each layer's neuron matrix before and after every optimizer step."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.taken: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = {n: neuron_matrix(m) for n, m in neuron_layers(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.taken[trainer.global_step] = {
            n: neuron_matrix(m) - self.before[n] for n, m in neuron_layers(pl_module).items()
        }


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_callback_hands_the_update_to_strategies_that_read_it(optimizer):
    steps, cb = (
        LastStep(),
        Sleep(
            "_test_reads_update", every_n_steps=5, snapshot_every=1, context=2, min_context=2, check_batches=0
        ),
    )
    pl.seed_everything(0, verbose=False)
    trainer(12, [steps, cb]).fit(TinyNet(optimizer=optimizer), digits_loader())
    seen = cb.strategy.seen
    assert sorted(seen) == [5, 10]
    for step, layers in seen.items():
        assert sorted(layers) == ["body.0", "head"]
        for name, update in layers.items():
            torch.testing.assert_close(update, steps.taken[step][name], rtol=1e-4, atol=1e-7)
    # a strategy that does not read it is not given it
    assert Sleep("linear").strategy.reads_optimizer is False
