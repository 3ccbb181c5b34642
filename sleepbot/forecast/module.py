"""Training a forecaster: `ForecasterModule` (a LightningModule) and `train_forecaster`, what the CLI calls.

Every forecaster is trained on the same loss: the unexplained displacement of each group of windows (1 - R2_disp
of one layer at a few times, see `group_errors`), which is what the evaluation reports and does not depend on the
scale of the weights or the learning rate of the runs. Trainer options (devices, strategy, precision, max_steps, ...)
pass straight through `trainer_kwargs`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from sleepbot.errors import SleepbotError, unknown_name
from sleepbot.forecast.base import FORECASTERS, Forecaster, build_forecaster, neuron_scale
from sleepbot.forecast.jumploss import JumpDataset, jump_log_ratio, landing_log_ratio, replay_dataset
from sleepbot.forecast.windows import (
    RunInfo,
    WindowDataset,
    collate_groups,
    resolve_paths,
    scan_runs,
    split_runs,
)

# As in sleepbot.training: Lightning's advertisement and its own pytree deprecation say nothing about the run.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda r: "litlogger" not in r.getMessage()
)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


OBJECTIVES = ("r2", "loss")


def group_errors(model: Forecaster, group: dict) -> dict[str, torch.Tensor]:
    """A forecaster's errors on one group of windows (one layer, a few end times), per horizon.

    The loss is the group's unexplained displacement, sum ||w_hat - w(t+h)||^2 / sum ||w(t+h) - w(t)||^2 (1 - R2_disp
    of the group), averaged over horizons: the quantity the evaluation reports, made scale-free per group (per layer,
    as NiNo scales per layer) so that a layer that moves 100x further does not drown the others. A per-neuron
    normalisation was tried first and failed: a neuron frozen over its context (a dead ReLU) that starts moving gets
    a target of 1e6 motion units and its windows take over the loss.

    Returns:
        `loss_sum` (sum over horizons of 1 - R2 of the group), `count` (horizons with windows), and per horizon
        [H]: `sse`, `sst` (raw units) and `n` (windows).
    """
    history, target, mask = group["history"], group["target"], group["mask"]  # [C,M,F], [H,M,F], [H,M]
    if model.learned:
        pred = model(history, group["kind"], group["progress"])  # [H, M, F]
    else:
        pred = model.displacement(history, model.horizons, group["kind"], group["progress"])
    true = target - history[-1]  # [H, M, F]
    m = mask[..., None].to(pred.dtype)  # [H, M, 1]
    sse = ((pred - true) * m).pow(2).sum(dim=(1, 2))  # [H]
    sst = (true * m).pow(2).sum(dim=(1, 2))  # [H]
    # A floor for a layer that does not move at all: one snapshot step of the context's motion per weight.
    floor = 1e-3 * neuron_scale(history).pow(2).sum() * history.shape[-1] + 1e-30
    has = mask.any(1)  # [H]
    return {
        "loss_sum": (sse / (sst + floor))[has].sum(),
        "count": has.sum().to(pred.dtype),
        "sse": sse.detach(),
        "sst": sst.detach(),
        "n": mask.sum(1).detach(),
    }


class ForecasterModule(pl.LightningModule):
    """Trains a registered forecaster on one of two objectives.

    `r2` (default): groups of windows (see `windows.WindowDataset`), the unexplained displacement of each group.
    Logs `train_loss` every step; at each validation `val_loss` and `val_r2_h<h>` (explained displacement on the
    validation runs, per horizon).

    `loss`: (run, time) samples (see `jumploss.JumpDataset`), log(L(w + jump) / L(w)), the base network's
    training loss where the jump of the last trained horizon lands relative to where it is. The caller sets
    `run_models` ({"train": [...], "val": [...]}, a `jumploss.RunModel` per run of each dataset). Logs
    `train_loss`; at each validation `val_loss` (the mean log ratio), `val_improved` (the share of samples where
    the jump lowered the loss) and `val_oracle` (the mean log ratio of jumping to the run's own weights
    `horizon` snapshots later, where it has them: the true future's gain, for scale).

    Args:
        name: registry name of the forecaster.
        config: its constructor keyword arguments (context, horizons, ...).
        lr: AdamW learning rate, decayed to 0 along a cosine over the Trainer's max_steps.
        weight_decay: AdamW weight decay.
        objective: `r2` or `loss`.
    """

    def __init__(
        self,
        name: str = "lstm",
        config: dict | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        objective: str = "r2",
    ):
        super().__init__()
        self.save_hyperparameters()
        if objective not in OBJECTIVES:
            raise SleepbotError(f"unknown forecaster objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        self.objective = objective
        self.model = build_forecaster(name, **(config or {}))
        if not self.model.learned:
            raise SleepbotError(f"the {name} forecaster has nothing to train")
        self.val_scores: dict[str, float] = {}
        self._val: torch.Tensor | None = None
        self.run_models: dict[str, list[Any]] = {}

    def forward(self, history: torch.Tensor, kind: str, progress: torch.Tensor | None) -> torch.Tensor:
        return self.model(history, kind, progress)

    def _batch_errors(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        parts = [group_errors(self.model, _to(g, self.device)) for g in batch]
        return {k: torch.stack([p[k] for p in parts]).sum(0) for k in parts[0]}

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        if self.objective == "loss":
            models = self.run_models["train"]
            terms = [jump_log_ratio(self.model, models[s["run"]], s)[0] for s in batch]
            # A run that diverged (weights of 1e16: the loss overflows) or a wild jump scores NaN or Inf; it
            # says nothing about where to jump and would poison every parameter, so it is left out.
            finite = [t for t in terms if torch.isfinite(t)]
            if not finite:
                return None  # Lightning skips the step
            loss = torch.stack(finite).mean()
        else:
            e = self._batch_errors(batch)
            loss = e["loss_sum"] / e["count"].clamp_min(1)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def on_validation_epoch_start(self) -> None:
        n = 5 if self.objective == "loss" else 2 + 2 * len(self.model.horizons)
        self._val = torch.zeros(n, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        if self.objective == "loss":
            models = self.run_models["val"]
            for s in batch:
                ratio, base = jump_log_ratio(self.model, models[s["run"]], s)
                if not (torch.isfinite(ratio) and torch.isfinite(base)):
                    continue
                oracle = [0.0, 0.0]
                if s["future"] is not None:
                    oracle = [float(landing_log_ratio(models[s["run"]], s, s["future"], base)), 1.0]
                self._val += torch.tensor(
                    [float(ratio), 1.0, float(ratio < 0), *oracle], dtype=torch.float64, device=self.device
                )
            return
        e = self._batch_errors(batch)
        self._val += torch.cat(
            [e["loss_sum"][None].double(), e["count"][None].double(), e["sse"].double(), e["sst"].double()]
        )

    def on_validation_epoch_end(self) -> None:
        sums = self.all_gather(self._val)
        sums = sums.reshape(-1, sums.shape[-1]).sum(0) if sums.ndim > 1 else sums
        scores = {"val_loss": float(sums[0] / sums[1].clamp_min(1))}
        if self.objective == "loss":
            scores["val_improved"] = float(sums[2] / sums[1].clamp_min(1))
            scores["val_oracle"] = float(sums[3] / sums[4]) if sums[4] > 0 else float("nan")
        n_h = len(self.model.horizons)
        for j, h in enumerate(self.model.horizons if self.objective == "r2" else ()):
            sse, sst = sums[2 + j], sums[2 + n_h + j]
            scores[f"val_r2_h{h}"] = float(1 - sse / sst) if sst > 0 else float("nan")
        for k, v in scores.items():
            self.log(k, v, prog_bar=k == "val_loss")
        if not self.trainer.sanity_checking:
            self.val_scores = scores

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        ds = getattr(loader, "dataset", None)
        if isinstance(ds, (WindowDataset, JumpDataset)):
            ds.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = (
            max(1, int(self.trainer.max_steps))
            if self.trainer.max_steps and self.trainer.max_steps > 0
            else 0
        )
        if not total:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _to(group: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in group.items()}


@dataclass
class ForecasterTrainConfig:
    """What `train_forecaster` trains and on which windows (the Trainer's own options go in `trainer_kwargs`).

    Attributes:
        model: registry name of the forecaster.
        context: snapshots read (at most, when min_context is set).
        min_context: a forecaster that reads histories of several lengths is trained on each length from this
            to `context` (None: `context` only).
        horizons: snapshots ahead, trained all at once.
        model_options: extra constructor arguments (hidden, head_hidden, ...).
        baselines: learned baselines trained after it with the same data, split and steps, stored with it.
        lr, weight_decay: AdamW.
        groups_per_step: groups of windows per optimizer step.
        max_weights: about how many weights per group.
        positions: end times per group.
        groups_per_epoch: groups drawn per epoch (an epoch ends with a validation).
        progress_dropout: fraction of windows whose training progress is hidden (only a forecaster that reads
            it, e.g. lstm with read_progress, sees it at all).
        target_smooth: train on the mean of the last `target_smooth` snapshots up to each horizon
            (`WindowDataset.smooth`); validation scores against the same target.
        val_fraction, test_fraction: of each (dataset, arch, optimizer) group of runs.
        holdout: runs whose attributes match go to test only (e.g. {'arch': 'mlp'}).
        val_stride: spacing of end snapshots in validation.
        objective: `r2` (the unexplained displacement of windows of weights) or `loss` (the base network's
            training loss where the jump lands, log(L(w + jump) / L(w)); see `jumploss`). With `loss`,
            groups_per_step and groups_per_epoch count (run, time) samples.
        jump_examples: training examples of the base network that score each sample of the `loss` objective.
        settle_steps: with the `loss` objective, score each jump after this many further updates of the run's own
            optimizer from its recorded state (`jumploss.RunModel.settle`), against the same updates without the
            jump; 0 scores where the jump lands. Needs runs collected with `record.optimizer_state: true`.
        split_seed: seed of the run split; seed: of the model init and window sampling.
        num_workers: DataLoader workers (each opens the HDF5 files itself). Part of the numbers: each worker draws
            its own share of the windows, so another count trains on other windows in another order.
        threads: torch intra-op threads while training (None: leave torch's setting). The count changes how MKL
            splits matrix products, so the default 1 gives the same forecaster on every machine; more threads train
            faster but their forecaster differs in the last bits, and so do the runs that sleep with it.
    """

    model: str = "lstm"
    context: int = 5
    min_context: int | None = None
    horizons: tuple[int, ...] = (5, 10, 20)
    model_options: dict[str, Any] = field(default_factory=dict)
    baselines: tuple[str, ...] = ("mlp",)
    lr: float = 3e-3
    weight_decay: float = 0.0
    groups_per_step: int = 4
    max_weights: int = 16384
    positions: int = 4
    groups_per_epoch: int = 4000
    progress_dropout: float = 0.2
    target_smooth: int = 1
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    holdout: dict[str, Any] | None = None
    val_stride: int = 5
    objective: str = "r2"
    jump_examples: int = 256
    settle_steps: int = 0
    split_seed: int = 0
    seed: int = 0
    num_workers: int = 0
    threads: int | None = 1


@dataclass
class TrainedForecaster:
    """What `train_forecaster` returns."""

    model: Forecaster
    baselines: dict[str, Forecaster]
    split: dict[str, list[str]]
    runs: list[RunInfo]
    val_scores: dict[str, dict[str, float]]
    seconds: dict[str, float]
    path: str | None = None


def default_trainer_kwargs() -> dict[str, Any]:
    progress = sys.stderr.isatty() and not os.environ.get("CI")
    return {
        "max_steps": 2000,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": progress,
        "num_sanity_val_steps": 0,
    }


def _loader(ds: WindowDataset, cfg: ForecasterTrainConfig) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=cfg.groups_per_step,
        collate_fn=collate_groups,
        num_workers=cfg.num_workers,
        persistent_workers=False,
    )


def _jump_datasets(
    module: ForecasterModule,
    cfg: ForecasterTrainConfig,
    train_runs: Sequence[RunInfo],
    val_runs: Sequence[RunInfo],
    min_context: int,
) -> tuple[JumpDataset, JumpDataset | None]:
    """The `loss` objective's samples, and each run's network and data on the module (runs with BatchNorm, whose
    statistics at jumped weights are unknown, are left out with a warning)."""
    out = []
    for split, runs in (("train", train_runs), ("val", val_runs)):
        ds, models, left_out = replay_dataset(
            runs,
            cfg.context,
            min_context,
            mode="random" if split == "train" else "all",
            samples=cfg.groups_per_epoch,
            examples=cfg.jump_examples,
            stride=cfg.val_stride,
            horizon=max(cfg.horizons),
            seed=cfg.seed,
            settle_steps=cfg.settle_steps,
        )
        for reason in left_out:
            warnings.warn(f"left out of the loss objective: {reason}", stacklevel=2)
        module.run_models[split] = models
        out.append(ds)
    if out[0] is None:
        raise SleepbotError("no training run can be replayed for the loss objective")
    return out[0], out[1]


def fit_one(
    name: str,
    cfg: ForecasterTrainConfig,
    train_runs: Sequence[RunInfo],
    val_runs: Sequence[RunInfo],
    snapshot_every: int | None,
    trainer_kwargs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Forecaster, dict[str, float]]:
    """Train one learned forecaster; returns it (on the CPU, eval mode) and its last validation scores."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    config = {"context": cfg.context, "horizons": list(cfg.horizons), "snapshot_every": snapshot_every}
    # Only a forecaster that reads histories of several lengths gets them (a baseline trained beside it may not).
    min_context = (
        cfg.min_context if "min_context" in inspect.signature(FORECASTERS[name]).parameters else None
    )
    if min_context is not None:
        config["min_context"] = min_context
    config.update(options or {})
    module = ForecasterModule(name, config, lr=cfg.lr, weight_decay=cfg.weight_decay, objective=cfg.objective)
    kwargs = {**default_trainer_kwargs(), **(trainer_kwargs or {})}
    from sleepbot.training import ReleaseProcessGroup

    given = kwargs.get("callbacks") or []
    kwargs["callbacks"] = [*(given if isinstance(given, list | tuple) else [given]), ReleaseProcessGroup()]
    if cfg.objective == "loss":
        train, val = _jump_datasets(module, cfg, train_runs, val_runs, min_context or cfg.context)
        kwargs.setdefault("gradient_clip_val", 1.0)  # a wild early jump can make the base loss huge
    else:
        train = WindowDataset(
            train_runs,
            cfg.context,
            cfg.horizons,
            mode="random",
            groups=cfg.groups_per_epoch,
            max_weights=cfg.max_weights,
            positions=cfg.positions,
            progress_dropout=cfg.progress_dropout,
            smooth=cfg.target_smooth,
            seed=cfg.seed,
            min_context=min_context,
        )
        val = (
            WindowDataset(
                val_runs,
                cfg.context,
                cfg.horizons,
                mode="all",
                max_weights=cfg.max_weights * 4,
                stride=cfg.val_stride,
                smooth=cfg.target_smooth,
            )
            if val_runs
            else None
        )
    val_loader = None
    if val is not None:
        val_loader = _loader(val, cfg)
    else:
        kwargs["limit_val_batches"] = 0
    trainer = pl.Trainer(**kwargs)
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        trainer.fit(module, train_dataloaders=_loader(train, cfg), val_dataloaders=val_loader)
    finally:
        torch.set_num_threads(before)

    def scores() -> dict[str, float]:
        # callback_metrics, not module.val_scores: under ddp_spawn the module that validated lived in a child
        # process, and Lightning carries only the weights and the callback metrics back.
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}

    if val_loader is not None and not scores():
        trainer.validate(module, dataloaders=val_loader, verbose=False)
    model = module.model.cpu().eval()
    return model, scores()


def train_forecaster(
    data: str | Path | Sequence[str | Path],
    cfg: ForecasterTrainConfig | None = None,
    *,
    trainer_kwargs: dict[str, Any] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> TrainedForecaster:
    """Train a forecaster (and its learned baselines) on the runs in `data`, split by run; optionally save it.

    Args:
        data: a directory of runs (a TrajectoryStore), run files, or a list of either.
        cfg: what to train (defaults: the LSTM forecaster, context 5, horizons 5/10/20, with an MLP baseline).
        trainer_kwargs: Lightning Trainer options over `default_trainer_kwargs()` (max_steps, devices, ...).
        out: checkpoint to write (with the split, data and scores in its metadata).
        overwrite: replace an existing checkpoint.
    """
    cfg = cfg or ForecasterTrainConfig()
    learned = [n for n in FORECASTERS if FORECASTERS[n].learned]
    for name in (cfg.model, *cfg.baselines):
        if name not in FORECASTERS:
            raise unknown_name("forecaster", name, FORECASTERS)
        if not FORECASTERS[name].learned:
            raise SleepbotError(
                f"the {name} forecaster has nothing to train; trainable: {', '.join(learned)}"
            )
    if cfg.settle_steps and cfg.objective != "loss":
        raise SleepbotError(
            f"settle_steps {cfg.settle_steps} scores jumps by the loss; it needs objective 'loss', not "
            f"{cfg.objective!r}"
        )
    if out is not None and Path(out).exists() and not overwrite:
        raise SleepbotError(f"{str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    paths = resolve_paths(data)
    # A window needs its context and a future; a jump scored by the loss only the history it reads.
    need, why = cfg.context + cfg.horizons[0], f"context {cfg.context} + horizon {cfg.horizons[0]}"
    if cfg.objective == "loss":
        need, why = cfg.min_context or cfg.context, "the least history a jump reads"
    runs = scan_runs(paths, min_snapshots=need)
    if not runs:
        raise SleepbotError(f"none of the {len(paths)} run files has {need} regular snapshots ({why})")
    split = split_runs(runs, (cfg.val_fraction, cfg.test_fraction), cfg.split_seed, cfg.holdout)
    by_id = {r.run_id: r for r in runs}
    train_runs = [by_id[i] for i in split["train"]]
    val_runs = [by_id[i] for i in split["val"]]
    if not train_runs:
        raise SleepbotError(f"no training runs left after the split of {len(runs)} runs; collect more runs")
    every = runs[0].snapshot_every
    names = [cfg.model, *[b for b in cfg.baselines if b != cfg.model]]
    models: dict[str, Forecaster] = {}
    scores: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t0 = time.time()
        if build_forecaster(name, context=cfg.context, horizons=cfg.horizons).learned:
            options = cfg.model_options if name == cfg.model else {}
            models[name], scores[name] = fit_one(
                name, cfg, train_runs, val_runs, every, trainer_kwargs, options
            )
        else:
            models[name] = build_forecaster(
                name, context=cfg.context, horizons=cfg.horizons, snapshot_every=every
            )
        seconds[name] = time.time() - t0
    model = models.pop(cfg.model)
    result = TrainedForecaster(model, models, split, runs, scores, seconds)
    if out is not None:
        from sleepbot.forecast.checkpoint import save_forecaster

        train_cfg = dataclasses.asdict(cfg)
        save_forecaster(
            model,
            out,
            overwrite=overwrite,
            baselines=models,
            split=split,
            data=[str(p) for p in paths],
            snapshot_every=every,
            train=train_cfg,
            trainer={
                k: v
                for k, v in {**default_trainer_kwargs(), **(trainer_kwargs or {})}.items()
                if isinstance(v, (int, float, str, bool)) or v is None
            },
            val_scores=scores,
            seconds=seconds,
        )
        result.path = str(out)
    return result
