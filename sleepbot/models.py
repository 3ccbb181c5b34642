"""Base networks in a registry, by name, and the `Classifier` LightningModule that trains them.

An architecture is a function `(input_shape, num_classes) -> nn.Module`; `input_shape` is (channels, *spatial)
as given by the data module, so every architecture builds for 1-D (mnist1d) and 2-D inputs alike.
To add one: write the function and decorate it with `@register_arch("name")` (and add the name to
`sleepbot.config.ARCHS`, which the CLI checks before importing torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from sleepbot.errors import unknown_name

ArchFn = Callable[[tuple[int, ...], int], nn.Module]
ARCHS: dict[str, ArchFn] = {}


def register_arch(name: str) -> Callable[[ArchFn], ArchFn]:
    def deco(fn: ArchFn) -> ArchFn:
        ARCHS[name] = fn
        return fn

    return deco


def build_arch(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the registered architecture `name`; unknown names raise a one-line SleepbotError."""
    if name not in ARCHS:
        raise unknown_name("architecture", name, ARCHS)
    return ARCHS[name](tuple(input_shape), num_classes)


def _ops(input_shape: tuple[int, ...]):
    """Conv, pooling and norm classes matching the input's spatial rank (1-D or 2-D)."""
    if len(input_shape) == 2:
        return nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d, nn.BatchNorm1d
    if len(input_shape) == 3:
        return nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d
    raise ValueError(f"input shape {input_shape} is neither (C, L) nor (C, H, W)")


def _flat_dim(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


@register_arch("small_cnn")
def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3-wide convolutions (16, 32 channels), adaptive average pooling to 2 (per axis), a linear head."""
    conv, _, apool, _ = _ops(input_shape)
    c = input_shape[0]
    features = nn.Sequential(
        conv(c, 16, 3, padding=1), nn.ReLU(), conv(16, 32, 3, padding=1), nn.ReLU(), apool(2), nn.Flatten()
    )
    return nn.Sequential(features, nn.Linear(_flat_dim(features, input_shape), num_classes))


@register_arch("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 (6 and 16 5-wide convolutions, each followed by 2x max pooling; fully connected 120-84-classes).

    Padding 2 keeps small inputs (8x8 digits) from shrinking to nothing; on 28x28 it is the usual LeNet-5.
    """
    conv, pool, _, _ = _ops(input_shape)
    c = input_shape[0]
    features = nn.Sequential(
        conv(c, 6, 5, padding=2),
        nn.ReLU(),
        pool(2),
        conv(6, 16, 5, padding=2),
        nn.ReLU(),
        pool(2),
        nn.Flatten(),
    )
    flat = _flat_dim(features, input_shape)
    head = nn.Sequential(
        nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
    )
    return nn.Sequential(features, head)


class _ResBlock(nn.Module):
    def __init__(self, conv, norm, channels: int) -> None:
        super().__init__()
        self.conv1 = conv(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


@register_arch("resnet_tiny")
def resnet_tiny(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A 16-channel stem and two residual blocks (conv-BN-ReLU-conv-BN + identity), global pooling, linear."""
    conv, _, apool, norm = _ops(input_shape)
    return nn.Sequential(
        conv(input_shape[0], 16, 3, padding=1, bias=False),
        norm(16),
        nn.ReLU(),
        _ResBlock(conv, norm, 16),
        _ResBlock(conv, norm, 16),
        apool(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


@register_arch("cnn1d")
def cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """For 1-D signals such as MNIST-1D: three 1-D convolutions (16, 32, 32 channels, strides 1, 2, 2), linear."""
    if len(input_shape) != 2:
        raise ValueError(f"cnn1d needs 1-D inputs (C, L), got shape {input_shape}")
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv1d(c, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    return nn.Sequential(features, nn.Linear(_flat_dim(features, input_shape), num_classes))


@register_arch("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers of 128 ReLU units over the flattened input: a non-convolutional reference."""
    flat = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def build_optimizer(
    name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """`sgd`, `momentum` (SGD with momentum), `adam` or `adamw` by name."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise unknown_name("optimizer", name, ("sgd", "momentum", "adam", "adamw"))


def lr_factor(schedule: str, step: int, max_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at `step` (linear warm-up, then the schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.01 if step >= 0.75 * max_steps else 0.1 if step >= 0.5 * max_steps else 1.0
    raise unknown_name("schedule", schedule, ("constant", "cosine", "step"))


class Classifier(pl.LightningModule):
    """A registered architecture trained with cross-entropy.

    Logs `train_loss` and `train_acc` every step, `val_loss` and `val_acc` at every validation (the Trainer's
    `val_check_interval`, in steps) and `test_acc`. It also keeps the validation history in `self.history`
    (lists `step`, `loss`, `acc`) so that callers get the curve without parsing a log.
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        optimizer: str = "adam",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        schedule: str = "constant",
        warmup_steps: int = 0,
        max_steps: int = 500,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_arch(arch, tuple(input_shape), num_classes)
        self.history: dict[str, list[float]] = {"step": [], "loss": [], "acc": []}
        self.test_acc: float | None = None
        self._val_sums = torch.zeros(3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", acc)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._val_sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=self.device),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        sums = self.all_gather(self._val_sums)
        sums = sums.reshape(-1, 3).sum(0) if sums.ndim > 1 else sums
        loss, acc = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.history["step"].append(int(self.global_step))
            self.history["loss"].append(loss)
            self.history["acc"].append(acc)

    def on_test_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        sums = self.all_gather(self._val_sums)
        sums = sums.reshape(-1, 3).sum(0) if sums.ndim > 1 else sums
        self.test_acc = float(sums[1] / sums[2])
        self.log("test_acc", self.test_acc)
        self.log("test_loss", float(sums[0] / sums[2]))

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(hp.optimizer, self.parameters(), hp.lr, hp.weight_decay, hp.momentum)
        if hp.schedule == "constant" and hp.warmup_steps == 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(hp.schedule, s, hp.max_steps, hp.warmup_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
