"""`Sleep`: a Lightning callback that, between training batches, moves the weights where a strategy says training
would take them.

What happens at each optimizer step (on_train_batch_end, after the optimizer has stepped):

1. every `snapshot_every` steps since the last accepted jump (or the start), the neuron matrices of every layer go
   into a ring buffer of `context` snapshots (sleepbot.neurons: [N, fan_in (+1 bias)] per layer);
2. if `should_sleep(step)`: the strategy proposes new weights for each layer from its history [C, N, F];
   a proposal with NaN or Inf is rejected; with `check_batches > 0` the loss on the last `check_batches` training
   batches is compared before and after, and the jump is rolled back if it rose by more than `tolerance`
   (relative: loss_after > loss_before * (1 + tolerance));
3. an accepted jump is written in place under torch.no_grad(), the optimizer state is kept / reset / rescaled
   (sleep/optim_state.py), and the ring buffer restarts from the new weights (the trajectory is discontinuous
   there, so older snapshots would mislead an extrapolation);
4. the decision goes to `self.events`, to the Lightning loggers (`sleep/*` metrics) and, when a
   TrajectoryRecorder is among the trainer's callbacks, to its run file's `/events`.

Under DDP, global rank 0 computes the decision and the new weights and broadcasts them, so replicas stay
identical. `state_dict()` holds the ring buffer, the held batches and the schedule's progress, so a run resumed
from a checkpoint sleeps exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import move_data_to_device

from sleepbot.errors import SleepbotError
from sleepbot.neurons import layer_kind, neuron_layers, neuron_matrix, set_neuron_matrix
from sleepbot.sleep.base import EveryNSteps, LayerContext, SleepSettings, SleepStrategy, make_strategy
from sleepbot.sleep.optim_state import adjust_optimizer_state, check_policy

log = logging.getLogger(__name__)

# Used when neither the user nor the strategy sets them (see SleepConfig): 5 snapshots 10 steps apart, a jump
# 5 snapshots (50 steps) ahead every 50 steps, the setting measured in PRIOR_ART.md.
DEFAULTS = {"every_n_steps": 50, "horizon": 5, "snapshot_every": 10, "context": 5}

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def default_loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The held-batch loss: `module.sleep_loss(batch)` if the module defines it, else cross-entropy of
    `module(batch[0])` against `batch[1]` (a classifier fed (inputs, targets) batches)."""
    if hasattr(module, "sleep_loss"):
        return module.sleep_loss(batch)
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and torch.is_tensor(batch[0]):
        return F.cross_entropy(module(batch[0]), batch[1])
    raise SleepbotError(
        f"check_batches needs a loss, and a batch of type {type(batch).__name__} is not an (inputs, targets) "
        f"pair; pass Sleep(loss_fn=lambda module, batch: ...) or define sleep_loss(batch) on the module"
    )


class Sleep(pl.Callback):
    """Jump the weights ahead between training batches, with a named or custom strategy.

    Args:
        strategy: a registry name (`linear`, `learned`, `noise`, `square_normalize`, `lookahead`, `oracle`,
            `random`, `none`; see sleepbot.sleep.STRATEGIES) or a SleepStrategy instance.
        every_n_steps: sleep every this many optimizer steps (default: the strategy's, else 50).
        start_step: no sleep before this step.
        stop_step: no sleep at or after this step (None: until the end).
        schedule: a callable step -> bool that replaces the every_n_steps/start/stop schedule.
        horizon: how far ahead to jump, in snapshots (default: the strategy's, else 5).
        snapshot_every: steps between ring-buffer snapshots (default: the strategy's, else 10).
        context: snapshots the strategy reads (default: the strategy's, else 5).
        optimizer_state: `keep`, `reset` or `rescale` the moved parameters' optimizer state (optim_state.py).
        check_batches: held training batches on which the loss is compared before and after a jump (0: none).
        tolerance: relative loss rise allowed before a jump is rolled back.
        loss_fn: `(module, batch) -> loss` for the check (default: see `default_loss`).
        layers: module names of the layers to move (default: every Conv/Linear layer).
        after_plateau: sleep only once `monitor` has flattened: its best value over the last `plateau_window`
            validations improves on the best before them by less than `plateau_delta` (then stays on).
        monitor: the logged validation metric the plateau test reads.
        plateau_window: validations in the plateau test's window.
        plateau_delta: the improvement below which the metric counts as flat.
        seed: seeds the strategies' random draws, together with the step.
        **options: the strategy's own options when it is given by name (e.g. alpha=0.01 for `noise`).
    """

    def __init__(
        self,
        strategy: str | SleepStrategy = "linear",
        *,
        every_n_steps: int | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
        schedule: Callable[[int], bool] | None = None,
        horizon: int | None = None,
        snapshot_every: int | None = None,
        context: int | None = None,
        optimizer_state: str = "keep",
        check_batches: int = 0,
        tolerance: float = 0.0,
        loss_fn: LossFn | None = None,
        layers: list[str] | None = None,
        after_plateau: bool = False,
        monitor: str = "val_acc",
        plateau_window: int = 5,
        plateau_delta: float = 0.005,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        self.strategy = make_strategy(strategy, **options)
        preferred = {**DEFAULTS, **self.strategy.defaults()}
        given = {
            "every_n_steps": every_n_steps,
            "horizon": horizon,
            "snapshot_every": snapshot_every,
            "context": context,
        }
        resolved = {k: int(v if v is not None else preferred[k]) for k, v in given.items()}
        for key, value in resolved.items():
            if value < 1:
                raise SleepbotError(f"sleep {key} must be >= 1, got {value}")
        if check_batches < 0 or not tolerance >= 0:
            raise SleepbotError(f"check_batches and tolerance must be >= 0, got {check_batches}, {tolerance}")
        self.settings = SleepSettings(
            start_step=int(start_step), stop_step=stop_step, custom_schedule=schedule is not None, **resolved
        )
        self.schedule: Callable[[int], bool] = schedule or EveryNSteps(
            resolved["every_n_steps"], int(start_step), stop_step
        )
        self.strategy.validate(self.settings)
        self.optimizer_state = check_policy(optimizer_state)
        self.check_batches = int(check_batches)
        self.tolerance = float(tolerance)
        self.loss_fn = loss_fn or default_loss
        self.layer_names = layers
        self.after_plateau = after_plateau
        self.monitor = monitor
        self.plateau_window = int(plateau_window)
        self.plateau_delta = float(plateau_delta)
        self.seed = int(seed)
        self.events: list[dict[str, Any]] = []
        self._layers: dict[str, torch.nn.Module] = {}
        self._final_step = 0  # the Trainer's max_steps (0: unknown), set at fit start
        self._state_key: str | None = None
        self._reset_state()

    # ---------------------------------------------------------------------------------------------- state
    def _reset_state(self) -> None:
        self._buffer: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=self.settings.context)
        self._held: deque[Any] = deque(maxlen=max(1, self.check_batches))
        self._origin = 0  # the step the snapshot grid counts from: the start or the last accepted jump
        self._last_step = -1
        self._val_history: list[float] = []
        self._plateau = False
        self._restored = False

    @property
    def every_n_steps(self) -> int:
        return self.settings.every_n_steps

    @property
    def horizon(self) -> int:
        return self.settings.horizon

    @property
    def snapshot_every(self) -> int:
        return self.settings.snapshot_every

    @property
    def context(self) -> int:
        return self.settings.context

    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call (profiler names), so it is computed once: describe() inspects
        # the strategy's signature, which cost ~30% of a small model's step time when done per hook.
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                strategy=self.strategy.describe(), settings=repr(self.settings)
            )
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to sleep exactly as an uninterrupted one (plain tensors and lists)."""
        return {
            "version": 1,
            "origin": self._origin,
            "last_step": self._last_step,
            "buffer_steps": [s for s, _ in self._buffer],
            "buffer": [{k: v.cpu() for k, v in snap.items()} for _, snap in self._buffer],
            "held": [move_data_to_device(b, "cpu") for b in self._held] if self.check_batches else [],
            "val_history": list(self._val_history),
            "plateau": self._plateau,
            "events": [dict(e) for e in self.events],
            "strategy": self.strategy.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise SleepbotError(
                f"sleep state of version {state_dict.get('version')!r} is not readable; valid: 1"
            )
        self._reset_state()
        self._origin = int(state_dict["origin"])
        self._last_step = int(state_dict["last_step"])
        for step, snap in zip(state_dict["buffer_steps"], state_dict["buffer"]):
            self._buffer.append((int(step), dict(snap)))
        for batch in state_dict["held"]:
            self._held.append(batch)
        self._val_history = [float(v) for v in state_dict["val_history"]]
        self._plateau = bool(state_dict["plateau"])
        self.events = [dict(e) for e in state_dict["events"]]
        self.strategy.load_state_dict(state_dict["strategy"])
        self._restored = True

    # ---------------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._layers = neuron_layers(pl_module, self.layer_names)
        except ValueError as e:
            raise SleepbotError(str(e)) from None
        if not self._layers:
            raise SleepbotError(f"{type(pl_module).__name__} has no Conv/Linear layer for sleep to move")
        self._final_step = self._max_steps(trainer)
        self.strategy.setup(pl_module, self._final_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored:  # state came from a checkpoint: continue from it
            self._restored = False
            return
        self._reset_state()
        self.events = []
        step = int(trainer.global_step)
        self._origin = step
        self._last_step = step
        if self.strategy.moves_weights and self.context > 1:
            self._buffer.append((step, self._snapshot()))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.strategy.moves_weights:
            return
        if self.check_batches:
            self._held.append(batch)
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: no optimizer step since the last call
            return
        self._last_step = step
        if self.context > 1 and (step - self._origin) % self.snapshot_every == 0:
            self._buffer.append((step, self._snapshot()))
        go = bool(self.should_sleep(step))
        if trainer.world_size > 1:  # rank 0 decides, so a rank-dependent policy cannot split the replicas
            go = bool(trainer.strategy.broadcast(go, src=0))
        if go:
            self.sleep(trainer, pl_module, step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.after_plateau or trainer.sanity_checking or self._plateau:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        self._val_history.append(float(value))
        w = self.plateau_window
        if len(self._val_history) > w:
            before = max(self._val_history[:-w])
            recent = max(self._val_history[-w:])
            self._plateau = recent - before < self.plateau_delta

    # ---------------------------------------------------------------------------------------------- policy
    def should_sleep(self, step: int) -> bool:
        """Whether to sleep after optimizer step `step`: the schedule, gated by the plateau test when asked, and
        never at the Trainer's last step (no training would follow the jump; the final evaluation would see
        untrained extrapolated weights).

        Override this in a subclass for another policy; under DDP rank 0's answer is used on every rank.
        """
        if self._final_step and step >= self._final_step:
            return False
        if not self.schedule(step):
            return False
        return self._plateau or not self.after_plateau

    # ---------------------------------------------------------------------------------------------- the jump
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: neuron_matrix(m) for name, m in self._layers.items()}  # {layer: [N, F]}

    @staticmethod
    def _max_steps(trainer: pl.Trainer) -> int:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        est = trainer.estimated_stepping_batches if trainer.max_epochs not in (None, -1) else math.inf
        return int(est) if math.isfinite(est) else 0

    def _generator(self, step: int) -> torch.Generator:
        # A fresh generator per sleep, seeded from (seed, step): a resumed run draws the same numbers.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))

    @torch.no_grad()
    def _held_loss(self, pl_module: pl.LightningModule) -> float:
        """Mean loss over the held batches, in eval mode (no BatchNorm statistics or dropout side effects)."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            losses = [
                float(self.loss_fn(pl_module, move_data_to_device(b, pl_module.device))) for b in self._held
            ]
        finally:
            pl_module.train(was_training)
        return sum(losses) / len(losses) if losses else math.nan

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """Rank 0's work: propose, check, apply-or-roll-back. Returns the decision (and new weights if accepted)."""
        current = self._snapshot()
        rows = list(self._buffer)
        if not rows or rows[-1][0] != step:
            rows.append((step, current))  # the weights now are always the last row
        rows = rows[-self.context :]
        out: dict[str, Any] = {
            "accepted": False,
            "loss_before": math.nan,
            "loss_after": math.nan,
            "rel_jump": 0.0,
        }
        if len(rows) < self.context:
            out["reason"] = f"history: {len(rows)} of {self.context} snapshots"
            return out
        steps = torch.tensor([s for s, _ in rows], dtype=torch.long)
        gen = self._generator(step)
        progress = step / self._max_steps(trainer) if self._max_steps(trainer) else 0.0
        proposal: dict[str, torch.Tensor] = {}
        for name, module in self._layers.items():
            cur = current[name]
            history = torch.stack([snap[name].to(cur.device) for _, snap in rows])  # [C, N, F]
            if not bool(torch.isfinite(history).all()):  # training has already diverged: nothing to forecast
                out["reason"] = f"nonfinite: history of layer {name}"
                return out
            ctx = LayerContext(
                layer=name,
                kind=layer_kind(module),
                step=step,
                steps=steps,
                snapshot_every=self.snapshot_every,
                progress=progress,
                generator=gen,
            )
            new = self.strategy.propose(history, self.horizon, ctx)
            if tuple(new.shape) != tuple(cur.shape):
                raise SleepbotError(
                    f"strategy {self.strategy.name!r} proposed shape {tuple(new.shape)} for layer {name!r}, "
                    f"which has {tuple(cur.shape)} [neurons, fan_in(+1)]"
                )
            if not bool(torch.isfinite(new).all()):
                out["reason"] = f"nonfinite: layer {name}"
                return out
            proposal[name] = new.to(cur.dtype)
        moved = sum(float((proposal[n] - current[n]).pow(2).sum()) for n in proposal)
        total = sum(float(current[n].pow(2).sum()) for n in proposal)
        out["rel_jump"] = math.sqrt(moved / total) if total > 0 else 0.0
        if self.check_batches and self._held:
            out["loss_before"] = self._held_loss(pl_module)
        self._write(proposal)
        if self.check_batches and self._held:
            after = self._held_loss(pl_module)
            out["loss_after"] = after
            limit = out["loss_before"] * (1.0 + self.tolerance)
            if not math.isfinite(after) or after > limit:
                self._write(current)  # roll back
                out["reason"] = f"loss: {after:.4g} > {limit:.4g}"
                return out
        out.update(accepted=True, reason="ok", weights=proposal, old=current)
        return out

    def _write(self, matrices: dict[str, torch.Tensor]) -> None:
        for name, module in self._layers.items():
            set_neuron_matrix(module, matrices[name])

    def sleep(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """Sleep now: propose, check, apply (or reject), log. Called by the hook when `should_sleep(step)`."""
        t0 = time.perf_counter()
        world = trainer.world_size
        if trainer.is_global_zero:
            decision = self._decide(trainer, pl_module, step)
        else:
            decision = {}
        if world > 1:
            # Replicas receive rank 0's decision and weights (as CPU tensors; broadcast pickles them).
            payload = {k: v for k, v in decision.items() if k not in ("weights", "old")}
            if decision.get("accepted"):
                payload["weights"] = {k: v.cpu() for k, v in decision["weights"].items()}
            payload = trainer.strategy.broadcast(payload if trainer.is_global_zero else None, src=0)
            if not trainer.is_global_zero:
                decision = dict(payload)
                if decision.get("accepted"):
                    decision["old"] = self._snapshot()
                    self._write(decision["weights"])
        if decision["accepted"]:
            new = self._snapshot()  # what the layers hold now, on their device
            adjust_optimizer_state(
                trainer.optimizers, self._layers, decision["old"], new, self.optimizer_state
            )
            self._buffer.clear()
            self._origin = step
            if self.context > 1:
                self._buffer.append((step, new))
        event = {
            "step": int(step),
            "strategy": self.strategy.name,
            "horizon": int(self.horizon),
            "accepted": bool(decision["accepted"]),
            "reason": str(decision["reason"]),
            "loss_before": float(decision["loss_before"]),
            "loss_after": float(decision["loss_after"]),
            "rel_jump": float(decision["rel_jump"]),
            "seconds": time.perf_counter() - t0,
        }
        self.events.append(event)
        self._log(trainer, event)
        return event

    def _log(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        log.info("sleep at step %d: %s (%s)", event["step"], event["reason"], self.strategy.name)
        if not trainer.is_global_zero:
            return
        metrics = {
            "sleep/accepted": float(event["accepted"]),
            "sleep/rel_jump": event["rel_jump"],
            "sleep/loss_before": event["loss_before"],
            "sleep/loss_after": event["loss_after"],
            "sleep/seconds": event["seconds"],
        }
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=event["step"])
        for cb in trainer.callbacks:
            if cb is not self and hasattr(cb, "log_event"):  # a TrajectoryRecorder: the run file's /events
                cb.log_event(
                    event["step"],
                    event["strategy"],
                    event["horizon"],
                    event["accepted"],
                    event["loss_before"],
                    event["loss_after"],
                )
