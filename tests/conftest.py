"""Shared fixtures: tiny real configs on the embedded digits data, written under tmp_path."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("PYTHONWARNINGS", "ignore")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


@pytest.fixture
def tiny_config(tmp_path):
    """A RunConfig for a ~30-step digits run that finishes in a second or two."""
    from sleepbot.config import RunConfig

    cfg = RunConfig(seed=0, out_dir=str(tmp_path / "runs"))
    cfg.data.train_subset = 256
    cfg.trainer.max_steps = 30
    cfg.trainer.val_every_n_steps = 10
    cfg.trainer.logger = "none"
    cfg.trainer.progress_bar = False
    return cfg
