"""One training run from a RunConfig: data module, Classifier, Trainer, and the optional recorder and sleep
callbacks. `collect`, `sleep` and `compare` all train through `run_training`, so a run means the same everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from sleepbot.config import RunConfig
from sleepbot.data import make_datamodule
from sleepbot.models import Classifier

# Two messages Lightning prints on every run that say nothing about the run: an advertisement, and a deprecation
# inside Lightning's own pytree helper.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda r: "litlogger" not in r.getMessage()
)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

# Wall-clock origin for start-up measurements: the time this module was first imported is close enough to the
# process start for a CLI run (the CLI imports it first thing when it trains).
_PROCESS_T0 = time.time()


@dataclass
class RunResult:
    """What one run produced: the validation curve, test accuracy and timings (seconds)."""

    name: str
    seed: int
    config: dict[str, Any]
    val_step: list[int] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    # Training wall-clock (seconds since fit start, validation excluded, sleeping included) at each validation.
    val_train_seconds: list[float] = field(default_factory=list)
    test_acc: float | None = None
    steps: int = 0
    fit_seconds: float = 0.0
    startup_seconds: float = 0.0  # this module's import (about process start for the CLI) to the first step
    first_step_unix: float = 0.0  # wall-clock time of the first training step (for start-up benchmarks)
    record_path: str | None = None
    log_dir: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # sleep decisions, when a Sleep callback ran

    @property
    def final_val_acc(self) -> float | None:
        return self.val_acc[-1] if self.val_acc else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Timing(pl.Callback):
    """Fit wall-clock, and the training time (validation excluded) at each validation: the wall-clock axis of a
    time-to-target figure. It is the last callback, so the others' work at a validation counts as validation."""

    def __init__(self) -> None:
        self.first_step: float | None = None
        self.fit_start = 0.0
        self.fit_end = 0.0
        self.val_seconds = 0.0  # spent validating so far
        self._val_start = 0.0
        self.train_seconds_at_val: list[tuple[int, float]] = []
        self.train_seconds = 0.0  # at the end of fit

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.time()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.time()
        if not trainer.sanity_checking and not self.fit_end:  # not the closing validation after fit
            elapsed = self._val_start - self.fit_start - self.val_seconds
            self.train_seconds_at_val.append((int(trainer.global_step), elapsed))

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_seconds += time.time() - self._val_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step is None:
            self.first_step = time.time()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_end = time.time()
        self.train_seconds = self.fit_end - self.fit_start - self.val_seconds


def make_logger(cfg: RunConfig):
    """CSV always (unless `none`); TensorBoard too with `auto` when it is installed, or with `tensorboard`."""
    import importlib.util

    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    kind = cfg.trainer.logger
    if kind == "none":
        return False
    loggers = [CSVLogger(cfg.out_dir, name=cfg.run_name, version="")]
    has_tb = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX")
    if kind == "tensorboard" or (kind == "auto" and has_tb):
        loggers.append(TensorBoardLogger(cfg.out_dir, name=cfg.run_name, version="tb"))
    return loggers


class ReleaseProcessGroup(pl.Callback):
    """Destroys the process group at teardown in a rank that Lightning spawned (`ddp_spawn`, `ddp_fork`), where the
    fit is over and the process is about to exit. Left to the interpreter's exit handlers, a spawned gloo rank
    sometimes aborts after a finished fit ("terminate called without an active exception", SIGABRT; about 1 run in
    10 on a 2-core machine), and the launcher then fails the whole fit. In the launching process, or under a
    launcher that runs scripts (`ddp`, torchrun), the group is left alone: the caller may still use it. Callbacks'
    teardowns run after the strategy's, and in list order: put it last."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import multiprocessing

        if multiprocessing.parent_process() is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def make_trainer(cfg: RunConfig, callbacks: list[pl.Callback] | None = None, **overrides: Any) -> pl.Trainer:
    """A Trainer that validates every `val_every_n_steps` optimizer steps, across epoch boundaries."""
    t = cfg.trainer
    progress = t.progress_bar
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    kwargs: dict[str, Any] = dict(
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        logger=make_logger(cfg),
        log_every_n_steps=1,
        enable_progress_bar=bool(progress),
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[*(callbacks or []), ReleaseProcessGroup()],
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def make_module(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    m = cfg.model
    return Classifier(
        arch=m.arch,
        input_shape=input_shape,
        num_classes=num_classes,
        optimizer=m.optimizer,
        lr=m.lr,
        weight_decay=m.weight_decay,
        momentum=m.momentum,
        schedule=m.schedule,
        warmup_steps=m.warmup_steps,
        max_steps=cfg.trainer.max_steps,
    )


def config_callbacks(cfg: RunConfig) -> list[pl.Callback]:
    """The recorder and sleep callbacks a config asks for (imported only when asked for)."""
    callbacks: list[pl.Callback] = []
    if cfg.record.enabled:
        from sleepbot.recording import recorder_from_config

        callbacks.append(recorder_from_config(cfg))
    if cfg.sleep.strategy != "none":
        from sleepbot.sleep import sleep_from_config

        callbacks.append(sleep_from_config(cfg))
    return callbacks


def run_training(
    cfg: RunConfig, callbacks: list[pl.Callback] | None = None, *, test: bool = True, quiet: bool = False
) -> RunResult:
    """Train one run as `cfg` describes; return its validation curve, test accuracy and timings.

    Args:
        cfg: the resolved run config.
        callbacks: extra callbacks, added after the ones the config asks for.
        test: evaluate on the test split at the end.
        quiet: silence Lightning's informational logging (used by parallel workers).
    """
    if quiet:
        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
    pl.seed_everything(cfg.seed, workers=True, verbose=not quiet)
    dm = make_datamodule(cfg.data, seed=cfg.seed)
    module = make_module(cfg, dm.input_shape, dm.num_classes)
    timing = _Timing()
    all_callbacks = [*config_callbacks(cfg), *(callbacks or []), timing]
    trainer = make_trainer(cfg, all_callbacks)
    trainer.fit(module, datamodule=dm)
    # Validation runs every `val_every_n_steps`; make sure the curve ends at the last step.
    if not module.history["step"] or module.history["step"][-1] != trainer.global_step:
        trainer.validate(module, datamodule=dm, verbose=False)
    if test:
        trainer.test(module, datamodule=dm, verbose=False)
    record_path = None
    events: list[dict[str, Any]] = []
    for cb in all_callbacks:
        if record_path is None and getattr(cb, "path", None) is not None:
            record_path = str(cb.path)  # a TrajectoryRecorder
        events.extend(getattr(cb, "events", None) or [])  # a Sleep callback
    log_dir = None
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        log_dir = str(Path(trainer.logger.log_dir))
    return RunResult(
        name=cfg.run_name,
        seed=cfg.seed,
        config=cfg.to_dict(),
        val_step=list(module.history["step"]),
        val_acc=list(module.history["acc"]),
        val_loss=list(module.history["loss"]),
        val_train_seconds=_seconds_at(
            timing.train_seconds_at_val, module.history["step"], timing.train_seconds
        ),
        test_acc=module.test_acc,
        steps=int(trainer.global_step),
        fit_seconds=timing.fit_end - timing.fit_start,
        startup_seconds=(timing.first_step or time.time()) - _PROCESS_T0,
        first_step_unix=timing.first_step or 0.0,
        record_path=record_path,
        log_dir=log_dir,
        events=events,
    )


def _seconds_at(at_val: list[tuple[int, float]], steps: list[int], end: float) -> list[float]:
    """The training seconds at each validation step of the curve (the closing validation after fit: `end`)."""
    seen = dict(at_val)
    return [float(seen.get(int(s), end)) for s in steps]


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (parallel worker processes use 1 each on a small machine)."""
    if n:
        torch.set_num_threads(n)
