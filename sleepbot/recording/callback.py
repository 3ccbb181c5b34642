"""`TrajectoryRecorder`: the Lightning callback over RecorderCore, and `recorder_from_config`.

It works with any LightningModule (it finds the Conv/Linear layers itself); under DDP only global rank 0 writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from sleepbot.errors import SleepbotError
from sleepbot.recording.core import BUFFER_BYTES, RecorderCore, _as_float, _check_options
from sleepbot.store import _event_row, stamp_status

# Metric names the callback looks for in trainer.callback_metrics, in order, when no key is given.
VAL_LOSS_KEYS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "loss/val")
VAL_ACC_KEYS = ("val_acc", "val/acc", "val_accuracy", "valid_acc", "validation_acc", "acc/val")
TEST_ACC_KEYS = ("test_acc", "test/acc", "test_accuracy")
TEST_LOSS_KEYS = ("test_loss", "test/loss")


def _metric(metrics: Mapping[str, Any], key: str | None, candidates: Sequence[str]) -> float | None:
    for k in [key] if key else candidates:
        if k in metrics:
            return _as_float(metrics[k])
    return None


class TrajectoryRecorder(pl.Callback):
    """Lightning callback: record per-neuron weight trajectories of any LightningModule into one HDF5 file.

    The file is created when training starts (step 0, the initial weights, is recorded then) and closed when it
    ends (`complete`) or fails (`failed`). Validation results are read from `trainer.callback_metrics`
    (`val_loss`/`val_acc` or `val/loss`/`val/acc`, or the keys given); a validation or test run after `fit`
    amends the closed file. Under DDP only global rank 0 writes; the other ranks do nothing.

    A Sleep callback finds the recorder in `trainer.callbacks` and reports each jump with `log_event`.

    Resume. The recorder's `state_dict` (saved in every Lightning checkpoint) flushes the file and says what it
    holds. `trainer.fit(..., ckpt_path=...)` with a recorder on the same path appends to that file: rows a crashed
    run wrote after the checkpoint are cut off, so every step and snapshot appears once, in order. A file that is
    missing, or that belongs to another run (its `run_id`), is a one-line error.

    Args:
        path: the .h5 file to create.
        snapshot_every, max_neurons_per_layer, layers, gradients, optimizer_state, overwrite, seed, flush_every,
            flush_seconds, compression, buffer_bytes: as in RecorderCore.
        attrs: root attributes; when `config` is missing, the module's hyperparameters are stored as the config.
        val_loss_key, val_acc_key: metric names to read (None: try the usual names).
    """

    def __init__(
        self,
        path: str | Path,
        snapshot_every: int = 10,
        max_neurons_per_layer: int | None = 256,
        layers: Sequence[str] | None = None,
        gradients: bool = False,
        optimizer_state: bool = False,
        overwrite: bool = False,
        *,
        seed: int = 0,
        attrs: Mapping[str, Any] | None = None,
        flush_every: int = 64,
        flush_seconds: float = 10.0,
        compression: str | None = None,
        buffer_bytes: int | None = BUFFER_BYTES,
        val_loss_key: str | None = None,
        val_acc_key: str | None = None,
    ) -> None:
        _check_options(snapshot_every, max_neurons_per_layer, flush_every, buffer_bytes)
        self.path = Path(path)
        self.options = dict(
            snapshot_every=snapshot_every,
            max_neurons_per_layer=max_neurons_per_layer,
            layers=list(layers) if layers is not None else None,
            gradients=gradients,
            optimizer_state=optimizer_state,
            overwrite=overwrite,
            seed=seed,
            flush_every=flush_every,
            flush_seconds=flush_seconds,
            compression=compression,
            buffer_bytes=buffer_bytes,
        )
        self.attrs = dict(attrs or {})
        self.val_loss_key = val_loss_key
        self.val_acc_key = val_acc_key
        self.core: RecorderCore | None = None
        self.writes = True  # False on ranks other than global 0
        self.written = False  # the file was created by this recorder (so a closed file may be amended)
        self._lr: float | None = None
        self._resume: dict[str, Any] | None = None  # a checkpoint's state, used by the next on_train_start

    # ------------------------------------------------------------------------------------------ resume state
    @property
    def state_key(self) -> str:
        # One state per file name: two recorders can coexist, and a run directory moved elsewhere still resumes.
        return self._generate_state_key(file=self.path.name)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to append to this file (flushes it first); empty on ranks that do not write."""
        if self.core is None:
            return {}
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.writes = bool(trainer.is_global_zero)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.writes:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        attrs = {
            "arch": type(pl_module).__name__,
            "optimizer": type(optimizer).__name__.lower() if optimizer is not None else "",
            "seed": self.options["seed"],
            "world_size": int(trainer.world_size),
            "writer_rank": int(trainer.global_rank),
            "config": _hparams_json(pl_module),
            **self.attrs,
        }
        if optimizer is not None and "lr" not in attrs:
            attrs["lr"] = _as_float(optimizer.param_groups[0]["lr"])
        opts = dict(self.options)
        resume, self._resume = self._resume, None
        if resume is not None:
            if int(resume.get("last_step", -1)) != trainer.global_step:
                raise SleepbotError(
                    f"cannot resume recording into {str(self.path)!r}: the checkpoint is at step "
                    f"{trainer.global_step}, the recorder's state at step {resume.get('last_step')!r}"
                )
            self.core = RecorderCore(
                self.path, pl_module, optimizer=optimizer, attrs=attrs, resume=resume, **opts
            )
            self.written = True
            self._lr = None
            return  # the checkpoint's step is in the file already
        if self.written:
            opts["overwrite"] = True  # a second fit with the same recorder replaces the file it wrote
        self.core = RecorderCore(self.path, pl_module, optimizer=optimizer, attrs=attrs, **opts)
        self.written = True
        self._lr = None
        self.core.record_step(trainer.global_step)  # the weights training starts from

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.core is not None and trainer.optimizers and optimizer is trainer.optimizers[0]:
            self._lr = optimizer.param_groups[0][
                "lr"
            ]  # the lr of this update (a step scheduler moves it later)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        core = self.core
        if core is None or core.closed:
            return
        step = trainer.global_step
        if step == core.last_step:
            return  # gradient accumulation: no update in this batch
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        lr = self._lr
        if lr is None and trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        core.record_step(step, loss=loss, lr=lr)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.writes:
            return
        metrics = trainer.callback_metrics
        loss = _metric(metrics, self.val_loss_key, VAL_LOSS_KEYS)
        acc = _metric(metrics, self.val_acc_key, VAL_ACC_KEYS)
        if loss is None and acc is None:
            return
        row = (int(trainer.global_step), _nan(loss), _nan(acc))
        if self.core is not None and not self.core.closed:
            self.core.log_val(*row)
        elif self.written and self.path.exists():
            stamp_status(self.path, None, val=[row])

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.writes:
            return
        acc = _metric(trainer.callback_metrics, None, TEST_ACC_KEYS)
        loss = _metric(trainer.callback_metrics, None, TEST_LOSS_KEYS)
        test = {k: v for k, v in (("acc", acc), ("loss", loss)) if v is not None}
        if not test:
            return
        if self.core is not None and not self.core.closed:
            self.core.log_test(**test)
        elif self.written and self.path.exists():
            stamp_status(self.path, None, test=test)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core is not None:
            self.core.close("complete")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.core is not None:
            self.core.close("failed")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.core is not None and not self.core.closed:
            self.core.close("failed")  # fit ended without on_train_end: it did not complete

    # ------------------------------------------------------------------------------------------ for Sleep
    def log_event(
        self,
        step: int,
        strategy: str,
        horizon: int,
        accepted: bool,
        loss_before: float,
        loss_after: float,
    ) -> None:
        """Record one sleep event (a jump tried at `step`); a no-op on ranks that do not write."""
        if not self.writes:
            return
        if self.core is not None and not self.core.closed:
            self.core.log_event(step, strategy, horizon, accepted, loss_before, loss_after)
        elif self.written and self.path.exists():
            row = _event_row(self.path, step, strategy, horizon, accepted, loss_before, loss_after)
            stamp_status(self.path, None, events=[row])
        else:
            raise SleepbotError(
                f"TrajectoryRecorder({str(self.path)!r}) is not recording yet (training not started)"
            )

    def __repr__(self) -> str:
        return f"TrajectoryRecorder({str(self.path)!r}, snapshot_every={self.options['snapshot_every']})"


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def _hparams_json(module: pl.LightningModule) -> str:
    """The module's saved hyperparameters as JSON (best effort: unknown objects become their repr)."""
    try:
        return json.dumps(dict(getattr(module, "hparams", {}) or {}), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return "{}"


def recorder_from_config(cfg) -> TrajectoryRecorder:
    """The recorder a RunConfig asks for (`cfg.record`); the file defaults to `<out_dir>/<run_name>.h5`.

    The whole config is stored as JSON in the `config` attribute, with seed, dataset, arch, optimizer and lr as
    their own attributes so that a TrajectoryStore can filter on them without parsing JSON.
    """
    r = cfg.record
    path = Path(r.path) if r.path else Path(cfg.out_dir) / f"{cfg.run_name}.h5"
    attrs = {
        "config": cfg.to_json(),
        "run_name": cfg.run_name,
        "seed": int(cfg.seed),
        "dataset": cfg.data.name,
        "arch": cfg.model.arch,
        "optimizer": cfg.model.optimizer,
        "lr": float(cfg.model.lr),
        "batch_size": int(cfg.data.batch_size),
        "max_steps": int(cfg.trainer.max_steps),
    }
    return TrajectoryRecorder(
        path,
        snapshot_every=r.snapshot_every,
        max_neurons_per_layer=r.max_neurons_per_layer,
        gradients=r.gradients,
        optimizer_state=r.optimizer_state,
        overwrite=r.overwrite,
        seed=int(cfg.seed),
        attrs=attrs,
    )
