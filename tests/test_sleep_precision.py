"""Every registered strategy through the Sleep callback on weights that are not plain contiguous float32: a
channels_last conv model and a bf16 model (Lightning's `bf16-true`). The jump must be computed in float32 and land
in each parameter exactly as proposed (rounded once to its dtype), keeping its memory format."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from test_sleep_helpers import TinyNet, digits_tensors, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sleepbot.neurons import neuron_layers, neuron_matrix
from sleepbot.sleep import STRATEGIES, Sleep

# The package's own strategies (test modules register their own, e.g. tests/test_compare_cli.py).
BUILTIN = sorted(n for n, c in STRATEGIES.items() if c.__module__.startswith("sleepbot."))


class ConvNet(pl.LightningModule):
    """Two 3x3 convolutions and a linear head on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _channels_last() -> tuple[pl.LightningModule, DataLoader, dict]:
    pl.seed_everything(0, verbose=False)
    model = ConvNet().to(memory_format=torch.channels_last)
    x, y = digits_tensors(256)
    data = TensorDataset(x.view(-1, 1, 8, 8).contiguous(memory_format=torch.channels_last), y)
    return model, DataLoader(data, batch_size=32), {}


def _bf16() -> tuple[pl.LightningModule, DataLoader, dict]:
    pl.seed_everything(0, verbose=False)
    x, y = digits_tensors(256)
    return TinyNet(), DataLoader(TensorDataset(x, y), batch_size=32), {"precision": "bf16-true"}


MODELS = {"channels_last": _channels_last, "bf16": _bf16}


def _recorded_run(tmp_path, model_name: str) -> str:
    """A real no-sleep TrajectoryRecorder run of the same model (snapshots every 2 steps, 16 steps)."""
    from sleepbot.recording import TrajectoryRecorder

    path = tmp_path / f"{model_name}-plain.h5"
    model, loader, kw = MODELS[model_name]()
    trainer(16, [TrajectoryRecorder(path, snapshot_every=2)], **kw).fit(model, loader)
    return str(path)


def _nino_checkpoint(tmp_path) -> str:
    from test_sleep_nino import random_state_dict

    path = tmp_path / "wnn.pt"
    torch.save({"state_dict": random_state_dict(), "model_args": {"gnn": False}}, path)
    return str(path)


# name -> (tmp_path, model name) -> (Sleep arguments, max_steps); each sleeps at least once with a full history
SETUPS = {
    "none": lambda tmp, m: ({}, 13),
    "linear": lambda tmp, m: ({"every_n_steps": 6, "snapshot_every": 2, "context": 3, "horizon": 2}, 13),
    "noise": lambda tmp, m: ({"every_n_steps": 6, "alpha": 0.05}, 13),
    "square_normalize": lambda tmp, m: ({"every_n_steps": 6, "mix": 0.5}, 13),
    "lookahead": lambda tmp, m: ({"k": 3}, 13),
    "average": lambda tmp, m: ({"every_n_steps": 6, "snapshot_every": 2, "k": 3}, 13),
    "dmd": lambda tmp, m: ({"every_n_steps": 6, "snapshot_every": 2, "context": 3, "min_context": 3}, 13),
    "learned": lambda tmp, m: ({"every_n_steps": 40}, 41),  # the shipped forecaster: 5 snapshots 10 apart
    "oracle": lambda tmp, m: (
        {"run": _recorded_run(tmp, m), "every_n_steps": 6, "horizon": 2, "snapshot_every": 2},
        13,
    ),
    "random": lambda tmp, m: ({"every_n_steps": 6, "snapshot_every": 2, "context": 3}, 13),
    "nino": lambda tmp, m: (
        {"checkpoint": _nino_checkpoint(tmp), "every_n_steps": 10, "snapshot_every": 2, "horizon": 2},
        13,
    ),
}


def test_every_registered_strategy_has_a_setup():
    assert set(SETUPS) == set(BUILTIN)


class AfterEveryStep(pl.Callback):
    """Each step's neuron matrices and parameter layouts, read after Sleep (placed after it)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.layouts: list[tuple[str, torch.dtype, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = neuron_layers(pl_module)
        self.weights[trainer.global_step] = {n: neuron_matrix(m) for n, m in layers.items()}
        for n, m in layers.items():
            w = m.weight
            fmt = w.dim() != 4 or w.is_contiguous(memory_format=torch.channels_last)
            self.layouts.append((n, w.dtype, fmt))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", BUILTIN)
def test_strategy_on_channels_last_and_bf16_weights(name, model_name, tmp_path):
    if name == "oracle":
        pytest.importorskip("h5py")
    options, max_steps = SETUPS[name](tmp_path, model_name)
    # the held loss runs in the model's precision; the proposal as it is (no adaptive scale), to compare with
    cb = Sleep(name, check_batches=1, tolerance=1e9, jump_scales=None, **options)
    proposals: dict[tuple[int, str], tuple[torch.dtype, torch.Tensor]] = {}
    propose = cb.strategy.propose

    def recording_propose(history, horizon, ctx):  # the real strategy, its answers kept to compare with
        out = propose(history, horizon, ctx)
        proposals[(ctx.step, ctx.layer)] = (history.dtype, out.detach().clone())
        return out

    cb.strategy.propose = recording_propose
    after = AfterEveryStep()
    model, loader, kw = MODELS[model_name]()
    param_dtype = torch.bfloat16 if model_name == "bf16" else torch.float32
    trainer(max_steps, [cb, after], **kw).fit(model, loader)

    assert all(dtype == param_dtype and fmt for _, dtype, fmt in after.layouts)
    if name == "none":
        assert cb.events == [] and proposals == {}
        return
    accepted = [e["step"] for e in cb.events if e["accepted"]]
    assert accepted, cb.events
    assert all(math.isfinite(e["loss_before"]) and math.isfinite(e["loss_after"]) for e in cb.events)
    for step in accepted:
        for layer, got in after.weights[step].items():
            history_dtype, want = proposals[(step, layer)]
            assert history_dtype == torch.float32  # computed in float32 whatever the parameters hold
            assert got.dtype == param_dtype
            assert torch.equal(got, want.to(param_dtype)), (step, layer)  # written as proposed, rounded once
