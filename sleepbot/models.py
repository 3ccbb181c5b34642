"""Base networks in a registry, by name, and the `Classifier` LightningModule that trains them.

An architecture is a function `(input_shape, num_classes) -> nn.Module`; `input_shape` is (channels, *spatial)
as given by the data module, so every architecture builds for 1-D (mnist1d) and 2-D inputs alike.
To add one: write the function and decorate it with `@register_arch("name")`; the CLI and configs read the
name from that line (sleepbot.registry). Optimizers are a registry the same way (`@register_optimizer`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from sleepbot.errors import SleepbotError, unknown_name

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


def _gap_cnn(
    input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...], strides: tuple[int, ...]
) -> nn.Module:
    """3-wide convolutions (padding 1) of `channels` with `strides`, each with a ReLU, then global average pooling
    and a linear head: the shape wide_cnn and cnn3 share."""
    conv, _, apool, _ = _ops(input_shape)
    layers: list[nn.Module] = []
    c = input_shape[0]
    for width, stride in zip(channels, strides):
        layers += [conv(c, width, 3, stride=stride, padding=1), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, apool(1), nn.Flatten(), nn.Linear(c, num_classes))


@register_arch("wide_cnn")
def wide_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A wide, shallow CNN with a global-average-pool head: 3-wide convolutions of 64 and 128 channels (the second
    with stride 2), global average pooling, a linear head. Conv neurons with 576-1,152 inputs, a head of 128."""
    return _gap_cnn(input_shape, num_classes, (64, 128), (1, 2))


@register_arch("deep_cnn")
def deep_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A deeper plain CNN: six 3-wide convolutions of 16 channels (no normalisation, no skips; the fourth with
    stride 2), adaptive average pooling to 2 per axis, a linear head. Narrow layers, long gradient paths."""
    conv, _, apool, _ = _ops(input_shape)
    layers: list[nn.Module] = []
    c = input_shape[0]
    for i in range(6):
        layers += [conv(c, 16, 3, stride=2 if i == 3 else 1, padding=1), nn.ReLU()]
        c = 16
    features = nn.Sequential(*layers, apool(2), nn.Flatten())
    return nn.Sequential(features, nn.Linear(_flat_dim(features, input_shape), num_classes))


@register_arch("cnn3")
def cnn3(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Three 3-wide convolutions (8, 16, 32 channels; strides 1, 2, 2), global average pooling, a linear head.

    Kept out of configs/collect_meta.yaml on purpose: the held-out architecture of the SGD+momentum workload
    (configs/compare_momentum.yaml), a kind of run the shipped forecaster never saw."""
    return _gap_cnn(input_shape, num_classes, (8, 16, 32), (1, 2, 2))


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


OptimizerFn = Callable[..., torch.optim.Optimizer]  # (params, lr, weight_decay, momentum, warmup_steps)
OPTIMIZERS: dict[str, OptimizerFn] = {}
# Optimizers that bring their own schedule (Schedule-Free): the Classifier applies no LambdaLR to them, passes
# them `warmup_steps`, and accepts only the `constant` schedule.
SCHEDULE_FREE_OPTIMIZERS: set[str] = set()


def register_optimizer(name: str, *, schedule_free: bool = False) -> Callable[[OptimizerFn], OptimizerFn]:
    """Register a builder `(params, lr, weight_decay, momentum, warmup_steps) -> Optimizer` under `name`.

    A builder takes all five arguments and uses those that mean something to it. `schedule_free=True` marks an
    optimizer that replaces the learning-rate schedule and needs `train()`/`eval()` (see `Classifier`).
    """

    def deco(fn: OptimizerFn) -> OptimizerFn:
        OPTIMIZERS[name] = fn
        if schedule_free:
            SCHEDULE_FREE_OPTIMIZERS.add(name)
        return fn

    return deco


@register_optimizer("sgd")
def _sgd(params, lr: float, weight_decay: float, momentum: float, warmup_steps: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


@register_optimizer("momentum")
def _momentum(
    params, lr: float, weight_decay: float, momentum: float, warmup_steps: int
) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@register_optimizer("adam")
def _adam(
    params, lr: float, weight_decay: float, momentum: float, warmup_steps: int
) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@register_optimizer("adamw")
def _adamw(
    params, lr: float, weight_decay: float, momentum: float, warmup_steps: int
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@register_optimizer("schedulefree_adamw", schedule_free=True)
def _schedulefree_adamw(
    params, lr: float, weight_decay: float, momentum: float, warmup_steps: int
) -> torch.optim.Optimizer:
    """Schedule-Free AdamW (Defazio et al. 2024) with its own linear warm-up over `warmup_steps`."""
    import schedulefree

    return schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)


def build_optimizer(
    name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, warmup_steps: int = 0
) -> torch.optim.Optimizer:
    """The registered optimizer `name` (sgd, momentum, adam, adamw, schedulefree_adamw, ...).

    `warmup_steps` reaches only the optimizers that warm up by themselves (Schedule-Free); for the others the
    Classifier warms up with a LambdaLR. Unknown names raise a one-line SleepbotError.
    """
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, OPTIMIZERS)
    return OPTIMIZERS[name](params, lr, weight_decay, momentum, warmup_steps)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is a Schedule-Free one (schedulefree's AdamW, SGD, RAdam...): it has `train()` and
    `eval()` and a `train_mode` flag in its parameter groups."""
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(optimizer, "eval", None))


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

    With a Schedule-Free optimizer (`schedulefree_adamw`) the parameters hold one of two points: in train mode
    the point y where gradients are taken, in eval mode the averaged point x that is evaluated. The module
    switches the optimizer the way the schedulefree README asks:

    - train mode from `on_train_start`, so every training step, and every callback hook between steps (a
      TrajectoryRecorder's snapshots, a Sleep jump and its held-batch check), sees y;
    - eval mode for every validation and test, from before any callback's `on_validation_start` to after every
      callback's `on_validation_end` (so a ModelCheckpoint saving there stores x), then back to train mode;
    - eval mode from `on_train_end` on, so `on_fit_end` callbacks and `trainer.validate` / `trainer.test` after
      `fit` evaluate x;
    - a checkpoint saved while in train mode (e.g. every n training steps) is written as in eval mode: x as the
      weights and `train_mode=False` in the optimizer's groups, so loading it for inference gives x and resuming
      it gives y back (`on_train_start` calls `train()` on the restored optimizer).

    BatchNorm running statistics accumulated during training describe y, not x, so before each evaluation a
    model with BatchNorm layers recomputes them at x: the statistics are reset and, with `momentum=None` (a
    cumulative average), the last `bn_recompute_batches` training inputs are passed forward with only the
    BatchNorm layers in train mode, under no_grad. Those inputs are held by `training_step` (a bounded deque, on
    the batch's device); using them rather than a fresh pass over the train loader keeps evaluation from
    consuming random numbers or data-loader state, so training is the same with or without validation. The
    statistics of y are put back when training resumes (train-mode BatchNorm never reads them, but their
    running average continues). A model evaluated without ever being trained here (loaded from a checkpoint)
    holds no batches and keeps the checkpoint's statistics.
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
        bn_recompute_batches: int = 8,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", optimizer, OPTIMIZERS)
        if optimizer in SCHEDULE_FREE_OPTIMIZERS and schedule != "constant":
            raise SleepbotError(
                f"schedule {schedule!r} cannot be used with optimizer {optimizer!r} (Schedule-Free replaces the "
                f"schedule; its warm-up is warmup_steps); valid: constant"
            )
        if bn_recompute_batches < 1:
            raise SleepbotError(f"bn_recompute_batches must be >= 1, got {bn_recompute_batches}")
        self.save_hyperparameters()
        self.net = build_arch(arch, tuple(input_shape), num_classes)
        self.history: dict[str, list[float]] = {"step": [], "loss": [], "acc": []}
        self.test_acc: float | None = None
        self._val_sums = torch.zeros(3, dtype=torch.float64)
        # Schedule-Free bookkeeping. The optimizer is kept here too, since a Trainer that only validates or
        # tests (not the one that fitted) has no optimizers of its own.
        self._sf_opt: torch.optim.Optimizer | None = None
        # True while an evaluation that switched the optimizer out of train mode runs: switch it back after.
        self._sf_resume = False
        self._bn_layers = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        hold = optimizer in SCHEDULE_FREE_OPTIMIZERS and bool(self._bn_layers)
        self._bn_inputs: deque[torch.Tensor] = deque(maxlen=bn_recompute_batches if hold else 0)
        self._bn_train_stats: list[dict[str, torch.Tensor]] | None = None  # y's, kept while evaluating x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self._bn_inputs.maxlen:
            self._bn_inputs.append(x.detach())
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", acc)
        return loss

    # ------------------------------------------------------------------------------- Schedule-Free modes
    @torch.no_grad()
    def recompute_bn_stats(self) -> None:
        """Recompute every BatchNorm layer's running statistics at the current weights, as a cumulative average
        over the held training inputs (see the class docstring). Does nothing without BatchNorm or inputs."""
        if not self._bn_layers or not self._bn_inputs:
            return
        modes = [(m, m.training, m.momentum) for m in self._bn_layers]
        for m in self._bn_layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below, not an EMA
            m.train()
        # Under the Trainer's precision (autocast for bf16/fp16), as the training forward passes were.
        trainer = self._trainer
        context = trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()
        try:
            with context:
                for x in self._bn_inputs:
                    self.net(x)
        finally:
            for m, training, momentum in modes:
                m.momentum = momentum
                m.train(training)

    def _bn_stats(self) -> list[dict[str, torch.Tensor]]:
        return [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in self._bn_layers]

    def _sf_eval(self) -> None:
        """Schedule-Free to eval mode (weights to x, BatchNorm statistics to x's); no-op if already there."""
        opt = self._sf_opt
        if opt is None or not opt.param_groups[0]["train_mode"]:
            return
        if self._bn_inputs:
            self._bn_train_stats = self._bn_stats()
        opt.eval()
        self.recompute_bn_stats()

    def _sf_train(self) -> None:
        """Schedule-Free to train mode (weights to y, y's BatchNorm statistics back); no-op if already there."""
        opt = self._sf_opt
        if opt is None or opt.param_groups[0]["train_mode"]:
            return
        opt.train()
        if self._bn_train_stats is not None:
            with torch.no_grad():
                for m, saved in zip(self._bn_layers, self._bn_train_stats):
                    for k, b in m.named_buffers(recurse=False):
                        b.copy_(saved[k])
            self._bn_train_stats = None

    def _eval_start(self) -> None:
        self._sf_resume = self._sf_opt is not None and bool(self._sf_opt.param_groups[0]["train_mode"])
        self._sf_eval()

    def _eval_end(self) -> None:
        if self._sf_resume:
            self._sf_resume = False
            self._sf_train()

    def on_train_start(self) -> None:
        self._sf_train()

    def on_train_end(self) -> None:
        self._sf_eval()

    def on_validation_model_eval(self) -> None:
        self._eval_start()  # before every callback's on_validation_start
        super().on_validation_model_eval()

    def on_validation_end(self) -> None:
        self._eval_end()  # after every callback's on_validation_end

    def on_test_model_eval(self) -> None:
        self._eval_start()
        super().on_test_model_eval()

    def on_test_end(self) -> None:
        self._eval_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write a checkpoint taken in train mode as if in eval mode: x as weights, `train_mode=False`.

        The live run is untouched (it goes on from y). BatchNorm statistics in such a checkpoint are the training
        ones; a checkpoint saved during validation (ModelCheckpoint's default) holds x's recomputed ones.
        """
        opt = self._sf_opt
        if opt is None or not opt.param_groups[0]["train_mode"] or self._trainer is None:
            return
        names = {id(p): n for n, p in self.named_parameters()}
        index = next((i for i, o in enumerate(self.trainer.optimizers) if o is opt), None)
        for g, group in enumerate(opt.param_groups):
            beta1 = group["betas"][0] if "betas" in group else group["momentum"]
            for p in group["params"]:
                z = opt.state[p].get("z")
                if z is not None and id(p) in names:
                    # x = y + (1 - 1/beta1) (z - y): the same lerp as the optimizer's eval(), out of place
                    checkpoint["state_dict"][names[id(p)]] = p.detach().lerp(z.to(p.device), 1 - 1 / beta1)
            if index is not None:
                checkpoint["optimizer_states"][index]["param_groups"][g]["train_mode"] = False

    # ------------------------------------------------------------------------------------ evaluation
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
        opt = build_optimizer(
            hp.optimizer, self.parameters(), hp.lr, hp.weight_decay, hp.momentum, hp.warmup_steps
        )
        self._sf_opt = opt if is_schedule_free(opt) else None
        if self._sf_opt is not None or (hp.schedule == "constant" and hp.warmup_steps == 0):
            return opt  # Schedule-Free warms up by itself and has no schedule to apply
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(hp.schedule, s, hp.max_steps, hp.warmup_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
