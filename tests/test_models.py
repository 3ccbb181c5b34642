"""Every registered architecture trains a few steps in a real Trainer (one parametrized test, timm-style)."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from sleepbot.errors import SleepbotError
from sleepbot.models import ARCHS, OPTIMIZERS, build_arch, build_optimizer, lr_factor
from sleepbot.neurons import neuron_layers, neuron_matrix, neuron_norms, neuron_rows, set_neuron_matrix
from sleepbot.training import run_training


class TestAccuracy(pl.Callback):
    """Recomputes the test accuracy from the module's own predictions, as the test loop leaves it."""

    acc: float | None = None

    @torch.no_grad()
    def on_test_end(self, trainer, pl_module) -> None:
        correct = total = 0
        for x, y in trainer.datamodule.test_dataloader():
            correct += int((pl_module(x.to(pl_module.device)).argmax(1).cpu() == y).sum())
            total += len(y)
        self.acc = correct / total


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_trains_in_a_trainer(arch, tiny_config):
    cfg = tiny_config
    cfg.model.arch = arch
    if arch == "cnn1d":
        cfg.data.name = "mnist1d"
        cfg.data.data_dir = str(cfg.out_dir) + "/data"
    check = TestAccuracy()
    result = run_training(cfg, callbacks=[check])
    assert result.steps == cfg.trainer.max_steps
    assert result.val_step == [10, 20, 30]
    assert all(np.isfinite(result.val_loss))
    # It learned something: better than chance (10 classes) after 30 steps on the training distribution.
    assert result.val_acc[-1] > 0.2
    assert result.test_acc == pytest.approx(check.acc, abs=1e-12)
    assert result.test_acc > 0.2


# SGD without momentum needs a larger step to learn anything in 30 steps.
_LR = {"sgd": 0.6, "momentum": 0.05}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_trains_in_a_trainer(optimizer, tiny_config):
    tiny_config.model.optimizer = optimizer
    tiny_config.model.lr = _LR.get(optimizer, tiny_config.model.lr)
    result = run_training(tiny_config, test=False)
    assert result.val_acc[-1] > 0.2  # 10 classes: chance is 0.1


def test_unknown_optimizer():
    with pytest.raises(
        SleepbotError, match="unknown optimizer 'lion'; valid: adam, adamw, momentum, schedulefree"
    ):
        build_optimizer("lion", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_same_seed_same_metrics(tiny_config):
    a = run_training(tiny_config)
    b = run_training(tiny_config)
    assert a.val_acc == b.val_acc and a.val_loss == b.val_loss and a.test_acc == b.test_acc
    tiny_config.seed = 1
    c = run_training(tiny_config)
    assert c.val_loss != a.val_loss


def test_unknown_arch():
    with pytest.raises(
        SleepbotError, match="unknown architecture 'vgg'; valid: cnn1d, cnn3, deep_cnn, lenet5"
    ):
        build_arch("vgg", (1, 8, 8), 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_archs_build_for_input_shapes(shape):
    for arch in ("small_cnn", "lenet5", "resnet_tiny", "mlp"):
        net = build_arch(arch, shape, 10)
        assert net(torch.zeros(2, *shape)).shape == (2, 10)


def test_neuron_matrix_round_trip():
    net = build_arch("small_cnn", (1, 8, 8), 10)
    layers = neuron_layers(net)
    conv = layers["0.0"]
    m = neuron_matrix(conv)
    assert m.shape == (16, 1 * 3 * 3 + 1)
    torch.testing.assert_close(m[:, -1], conv.bias)
    torch.testing.assert_close(neuron_norms(conv), m.norm(dim=1))
    set_neuron_matrix(conv, m * 2)
    torch.testing.assert_close(neuron_matrix(conv), m * 2)
    set_neuron_matrix(conv, m[:2] * 0, rows=torch.tensor([3, 5]))
    assert neuron_matrix(conv)[[3, 5]].abs().sum() == 0
    assert neuron_matrix(conv)[4].abs().sum() > 0


def test_neuron_rows_lay_out_tensors_as_a_module_would():
    conv = torch.nn.Conv2d(2, 3, 2)
    torch.testing.assert_close(neuron_rows(conv.weight, conv.bias), neuron_matrix(conv))
    rows = neuron_rows(conv.weight)  # no bias: the weights alone, a copy
    assert rows.shape == (3, 8) and not rows.requires_grad
    rows += 1
    torch.testing.assert_close(neuron_matrix(conv)[:, :-1], rows - 1)


def test_schedules():
    assert lr_factor("constant", 10, 100) == 1.0
    assert lr_factor("cosine", 0, 100) == pytest.approx(1.0)
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert lr_factor("step", 60, 100) == pytest.approx(0.1)
    assert lr_factor("constant", 0, 100, warmup_steps=4) == pytest.approx(0.25)
