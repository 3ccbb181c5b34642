"""The held training batches on which Sleep judges a jump, and BatchNorm statistics that belong to the weights.

A jump is judged by the loss on the last `check_batches` training batches (never validation data), before and
after. A model with BatchNorm in eval mode would judge the new weights with the running statistics of the old
ones, so the statistics are first re-estimated for the weights being judged, on the same held batches; a rejected
jump restores the old statistics bit for bit (the callback saves and restores them with `norm_state` /
`set_norm_state`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device
from torch import nn

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def forward_held(
    trainer: pl.Trainer, pl_module: pl.LightningModule, held: Iterable[Any], loss_fn: LossFn
) -> list[float]:
    """The loss on each held batch, in the trainer's precision (bf16-true, 16-mixed, ... as in training)."""
    precision = trainer.precision_plugin
    losses = []
    with torch.no_grad(), precision.forward_context():
        for b in held:
            batch = precision.convert_input(move_data_to_device(b, pl_module.device))
            losses.append(float(loss_fn(pl_module, batch)))
    return losses


def norm_layers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[nn.Module]:
    """The BatchNorm layers whose running statistics training updates (in training mode, tracking stats).

    Under multi-process runs SyncBatchNorm is left out: its training-mode forward needs every rank, and only
    rank 0 judges a jump.
    """
    out = []
    for m in pl_module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            if isinstance(m, nn.SyncBatchNorm) and trainer.world_size > 1:
                continue
            out.append(m)
    return out


def norm_state(norms: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False)} for m in norms]


def set_norm_state(norms: list[nn.Module], state: list[dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for m, saved in zip(norms, state):
            for k, b in m.named_buffers(recurse=False):
                b.copy_(saved[k])


def recompute_norms(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    norms: list[nn.Module],
    held: Iterable[Any],
    loss_fn: LossFn,
) -> None:
    """Re-estimate the running statistics of `norms` for the weights now, on the held batches: each layer's
    running mean and variance become the average of its batch statistics over the held batches (momentum
    None for the pass), with everything else in eval mode (no dropout). Momentum, `num_batches_tracked` and
    every module's train/eval mode are restored afterwards."""
    modes = {m: m.training for m in pl_module.modules()}
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    pl_module.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the held batches
            m.train()
        forward_held(trainer, pl_module, held, loss_fn)
    finally:
        for m, (momentum, count) in zip(norms, kept):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        for m, mode in modes.items():
            m.training = mode


def held_loss(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    norms: list[nn.Module],
    held: Iterable[Any],
    loss_fn: LossFn,
) -> float:
    """Mean loss over the held batches, for the weights now: the BatchNorm statistics are first re-estimated
    for them on the same batches, then the loss is taken in eval mode (no dropout, no statistics updates)."""
    if norms:
        recompute_norms(trainer, pl_module, norms, held, loss_fn)
    modes = {m: m.training for m in pl_module.modules()}
    pl_module.eval()
    try:
        losses = forward_held(trainer, pl_module, held, loss_fn)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return sum(losses) / len(losses) if losses else math.nan
