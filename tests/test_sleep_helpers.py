"""Shared pieces of the sleep tests: a tiny LightningModule that is not sleepbot's, on real (digits) data."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` scikit-learn digits, flattened to 64 features in [0, 1]."""
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:n], dtype=torch.long)
    return x, y


def digits_loader(n: int = 256, batch_size: int = 32) -> DataLoader:
    """Unshuffled, so a resumed run sees the same batches as an uninterrupted one."""
    x, y = digits_tensors(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyNet(pl.LightningModule):
    """A two-layer perceptron written the plain Lightning way (no sleepbot base class)."""

    def __init__(self, lr: float = 1e-2, optimizer: str = "adam") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.Tanh())
        self.head = nn.Linear(16, 10)
        self.lr = lr
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def trainer(max_steps: int = 20, callbacks=None, **kwargs) -> pl.Trainer:
    opts = dict(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks or [], **opts)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
