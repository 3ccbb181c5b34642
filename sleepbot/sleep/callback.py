"""`Sleep`: a Lightning callback that, between training batches, moves the weights where a strategy says training
would take them.

What happens at each optimizer step (on_train_batch_end, after the optimizer has stepped):

1. every `snapshot_every` steps since the last accepted jump (or the start), the neuron matrices of every layer go
   into a ring buffer of `context` snapshots (sleepbot.neurons: [N, fan_in (+1 bias)] per layer);
2. if `should_sleep(step)`: the strategy proposes new weights for each layer from its history [C, N, F];
   a proposal with NaN or Inf is rejected; with `check_batches > 0` the loss on the last `check_batches` training
   batches is compared before and after, and the jump is rolled back if it rose by more than `tolerance`
   (relative: loss_after > loss_before * (1 + tolerance)); with `verify_after = k > 0` the verdict waits: the jump
   is written, training goes on, and k steps later the held loss (on the batches held at the jump) is compared
   with the loss before the jump; if it is higher, the run goes back to where it was before the jump (weights,
   buffers and optimizer state), the k steps lost;
3. an accepted jump is written in place under torch.no_grad(), the optimizer state is kept / reset / rescaled
   (sleep/optim_state.py), and the ring buffer restarts from the new weights (the trajectory is discontinuous
   there, so older snapshots would mislead an extrapolation);
4. the decision goes to `self.events`, to the Lightning loggers (`sleep/*` metrics) and, when a
   TrajectoryRecorder is among the trainer's callbacks, to its run file's `/events`.

Weights of any dtype and memory format: the history and the jump are computed in float32 (float64 stays float64)
and written back in each parameter's own dtype and layout (bf16/fp16, channels_last).

BatchNorm: with held batches (`check_batches > 0`), the running statistics of the BatchNorm layers in training
mode are re-estimated on the held batches for the weights being judged, before and after the jump (one batch
statistic per held batch, averaged; the layers' momentum and `num_batches_tracked` are restored afterwards), and an
accepted jump keeps the ones re-estimated for its new weights. A rejected jump restores the old weights and the old
running statistics bit for bit. Without held batches the statistics are left to training to re-estimate.

Under DDP, global rank 0 computes the decision and the new weights (and BatchNorm statistics) and broadcasts them,
so replicas stay identical. The decision is exchanged only at steps where `schedule(step)` is true (the schedule
is the same on every rank), so ranks do not synchronise at every step; if rank 0 fails while sleeping, the
other ranks fail with it instead of waiting. `state_dict()` holds the ring buffer, the held batches, the
schedule's progress and the settings, so a run resumed from a checkpoint sleeps exactly as an uninterrupted one,
and a resume whose settings would make that state wrong fails with one line naming the setting.
"""

from __future__ import annotations

import copy
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
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import nn

from sleepbot.errors import SleepbotError
from sleepbot.neurons import layer_kind, neuron_layers, neuron_matrix, set_neuron_matrix
from sleepbot.sleep.base import EveryNSteps, LayerContext, SleepSettings, SleepStrategy, make_strategy
from sleepbot.sleep.held import LossFn, held_loss, norm_layers, norm_state, recompute_norms, set_norm_state
from sleepbot.sleep.optim_state import adjust_optimizer_state, check_policy, optimizer_update

log = logging.getLogger(__name__)

# Used when neither the user nor the strategy sets them (see SleepConfig): 5 snapshots 10 steps apart, a jump
# 5 snapshots (50 steps) ahead every 50 steps, the setting measured in PRIOR_ART.md.
DEFAULTS: dict[str, Any] = {
    "every_n_steps": 50,
    "horizon": 5,
    "snapshot_every": 10,
    "context": 5,
    "check_batches": 0,
    "jump_scales": None,
    "carry_history": False,
}

__all__ = ["LossFn", "Sleep", "default_loss"]

HELD_BATCHES = ("recent", "reservoir")

STATE_VERSION = 2
# Settings a resumed run may change: they only steer what happens from now on. Every other setting shapes the
# saved state (the ring buffer's grid and length, the held batches, the monitored history) or what it means.
RESUMABLE = (
    "every_n_steps",
    "start_step",
    "stop_step",
    "custom_schedule",
    "horizon",
    "optimizer_state",
    "tolerance",
    "plateau_window",
    "plateau_delta",
    "seed",
    "buffer_device",
    "jump_scales",
    "carry_history",
    "min_context",
)


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """`t` in the dtype jumps are computed in: float32 for bf16/fp16 weights, float64 and float32 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_scales(scales: list[float] | None, check_batches: int) -> tuple[float, ...] | None:
    if scales is None:
        return None
    try:
        values = sorted({0.0, *(float(x) for x in scales)})
    except (TypeError, ValueError):
        raise SleepbotError(f"sleep jump_scales must be a list of numbers >= 0, got {scales!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise SleepbotError(f"sleep jump_scales must be a list of numbers >= 0, got {scales!r}")
    if check_batches < 1:
        raise SleepbotError(
            "sleep jump_scales judges each scale on held training batches: set check_batches >= 1"
        )
    return tuple(values)


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
        min_context: snapshots the strategy needs before the first sleep, when it reads histories of several
            lengths up to `context` (default: the strategy's, else `context`).
        optimizer_state: `keep`, `reset` or `rescale` the moved parameters' optimizer state (optim_state.py).
        check_batches: held training batches on which the loss is compared before and after a jump (0: none;
            default: the strategy's, else 0).
        tolerance: relative loss rise allowed before a jump is rolled back.
        loss_fn: `(module, batch) -> loss` for the check (default: see `default_loss`).
        layers: module names of the layers to move (default: every Conv/Linear layer).
        after_plateau: sleep only once `monitor` has flattened: its best value over the last `plateau_window`
            validations improves on the best before them by less than `plateau_delta` (then stays on).
        monitor: the logged validation metric the plateau test reads.
        monitor_mode: `max` when a larger `monitor` is better (an accuracy), `min` when smaller is (a loss).
            (Not `mode`: that name is the oracle strategy's option.)
        plateau_window: validations in the plateau test's window.
        plateau_delta: the improvement below which the metric counts as flat.
        seed: seeds the strategies' random draws, together with the step.
        buffer_device: where the ring buffer and the held batches live, e.g. `cpu` to keep them in host memory
            for a model on an accelerator (each jump then copies its history to the model's device);
            None: on each parameter's own device.
        jump_scales: the adaptive jump. Candidate fractions s of the proposed displacement (the jump written is
            w + s * (proposal - w)); each is judged by the loss on the held training batches (`check_batches` of
            them, BatchNorm statistics re-estimated for each candidate), and the lowest wins. 0 (no jump) is always
            a candidate, so a jump is taken only when some scale lowers the held loss. None: the proposal as it is
            (with `tolerance` deciding). Its cost, `check_batches` forward passes per candidate (twice with
            BatchNorm), is in each event's `probe_forwards` (and `forwards`) and in the run's wall-clock.
            `auto` (the default): the strategy's choice (no built-in strategy probes by default: for `learned`
            the probe measured slower than the unprobed jump, see Learned.defaults), off when check_batches is 0.
        held_batches: which training batches are held for the check and the probe: `recent` (the last
            `check_batches`, which the weights have just been trained on, so the held loss favours the weights as
            they are) or `reservoir` (a uniform sample of every batch seen so far, drawn from `seed`).
        carry_history: after an accepted jump, keep the ring buffer's snapshots, each translated by the jump
            (new weights - old, per weight), so the history stays continuous and the next sleep need not wait for
            `context` new snapshots; False restarts the history at the jump (None: the strategy's choice, else
            False). A strategy that reads long contexts needs it to sleep more than once per context.
        verify_after: judge a jump k steps after it instead of at once (0: at once, the `check_batches` check).
            The loss right after a jump mostly rises even when the jump pays off a few steps later, so the
            immediate check rolls back jumps that would have paid; this one lets training react first. At an
            accepted jump the module's state and the optimizers' state are copied (memory: the model and its
            optimizer state once more, held for k steps); k steps later the mean loss on the training batches
            held at the jump (`check_batches` of them, BatchNorm statistics re-estimated for the judged weights
            and restored afterwards) is compared with the loss on them before the jump, and if it is higher
            (by more than `tolerance`, relative) or not finite, the module and the optimizers are restored: the
            run is back at the weights it had before the jump, k steps later. An LR scheduler is not rewound.
            Needs check_batches >= 1 and no `jump_scales`; must be smaller than `every_n_steps` (a sleep the
            schedule names while a verdict is pending is skipped). Best a multiple of `snapshot_every`: after a
            rollback the history restarts on the jump's snapshot grid, so off it one snapshot fewer is ready.
            Its cost, `check_batches` forward passes at the jump and again at the verdict (twice with
            BatchNorm), is in the events' `forwards`. Off by default: measured slower than no check (README,
            "Choosing the default jump").
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
        min_context: int | None = None,
        optimizer_state: str = "keep",
        check_batches: int | None = None,
        tolerance: float = 0.0,
        loss_fn: LossFn | None = None,
        layers: list[str] | None = None,
        after_plateau: bool = False,
        monitor: str = "val_acc",
        monitor_mode: str = "max",
        plateau_window: int = 5,
        plateau_delta: float = 0.005,
        seed: int = 0,
        buffer_device: str | None = None,
        jump_scales: list[float] | str | None = "auto",
        held_batches: str = "recent",
        carry_history: bool | None = None,
        verify_after: int = 0,
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
        if min_context is None:  # the strategy's, never more than the context
            min_context = min(int(preferred.get("min_context") or resolved["context"]), resolved["context"])
        min_context = int(min_context)
        if not 1 <= min_context <= resolved["context"]:
            raise SleepbotError(
                f"sleep min_context must be between 1 and context ({resolved['context']}), got {min_context}"
            )
        if check_batches is None:
            check_batches = int(preferred["check_batches"])
        if isinstance(jump_scales, str):
            if jump_scales != "auto":
                raise SleepbotError(
                    f"sleep jump_scales must be a list of numbers >= 0, None or 'auto', got {jump_scales!r}"
                )
            jump_scales = preferred["jump_scales"] if check_batches >= 1 else None
        if check_batches < 0 or not tolerance >= 0:
            raise SleepbotError(f"check_batches and tolerance must be >= 0, got {check_batches}, {tolerance}")
        self.settings = SleepSettings(
            start_step=int(start_step),
            stop_step=stop_step,
            custom_schedule=schedule is not None,
            min_context=min_context,
            **resolved,
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
        if monitor_mode not in ("max", "min"):
            raise SleepbotError(f"unknown sleep monitor_mode {monitor_mode!r}; valid: max, min")
        self.monitor_mode = monitor_mode
        self.plateau_window = int(plateau_window)
        self.plateau_delta = float(plateau_delta)
        self.seed = int(seed)
        try:
            self.buffer_device = None if buffer_device is None else torch.device(buffer_device)
        except (RuntimeError, TypeError):
            raise SleepbotError(
                f"unknown sleep buffer_device {buffer_device!r}; valid: None, cpu, cuda, cuda:0, mps, ..."
            ) from None
        self.jump_scales = _check_scales(jump_scales, self.check_batches)
        if held_batches not in HELD_BATCHES:
            raise SleepbotError(
                f"unknown sleep held_batches {held_batches!r}; valid: {', '.join(HELD_BATCHES)}"
            )
        self.held_batches = held_batches
        self.verify_after = int(verify_after)
        if self.verify_after < 0:
            raise SleepbotError(f"sleep verify_after must be >= 0 steps, got {verify_after}")
        if self.verify_after:
            if self.check_batches < 1:
                raise SleepbotError(
                    "sleep verify_after judges a jump by the loss on held training batches: set check_batches >= 1"
                )
            if self.jump_scales is not None:
                raise SleepbotError(
                    "sleep verify_after and jump_scales are two ways to judge a jump; pass one (jump_scales=None)"
                )
            if schedule is None and self.verify_after >= resolved["every_n_steps"]:
                raise SleepbotError(
                    f"sleep verify_after ({self.verify_after}) must be smaller than every_n_steps "
                    f"({resolved['every_n_steps']}), so that each jump is judged before the next"
                )
        self.carry_history = bool(preferred["carry_history"] if carry_history is None else carry_history)
        self.events: list[dict[str, Any]] = []
        self._layers: dict[str, torch.nn.Module] = {}
        self._final_step = 0  # the Trainer's max_steps (0: unknown), set at fit start
        self._state_key: str | None = None
        self._reset_state()

    # ---------------------------------------------------------------------------------------------- state
    def _reset_state(self) -> None:
        self._buffer: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=self.settings.context)
        self._held: deque[Any] = deque(maxlen=max(1, self.check_batches))
        self._seen = 0  # training batches offered to the held set (the reservoir's draw depends on it)
        self._origin = 0  # the step the snapshot grid counts from: the start or the last accepted jump
        self._jumped = 0  # steps skipped by the accepted jumps so far (horizon * snapshot_every each)
        self._last_step = -1
        self._val_history: list[float] = []
        self._plateau = False
        self._restored = False
        # A jump awaiting its verdict (verify_after): the step of the verdict, the loss before the jump, the
        # held batches it is judged on, and the module's and optimizers' state to go back to.
        self._pending: dict[str, Any] | None = None

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
        # Only the strategy's name: a resume with changed settings finds its state and compares them (see
        # `load_state_dict`) instead of silently starting over. Lightning reads this at every hook call
        # (profiler names), so it is computed once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(strategy=self.strategy.name)
        return self._state_key

    def _settings(self) -> dict[str, Any]:
        """The settings a checkpoint records, as plain values (compared on resume)."""
        return {
            "strategy": self.strategy.describe(),
            **{
                k: getattr(self.settings, k)
                for k in ("every_n_steps", "start_step", "stop_step", "custom_schedule")
            },
            **{k: getattr(self.settings, k) for k in ("horizon", "snapshot_every", "context", "min_context")},
            "optimizer_state": self.optimizer_state,
            "check_batches": self.check_batches,
            "held_batches": self.held_batches,
            "tolerance": self.tolerance,
            "layers": None if self.layer_names is None else list(self.layer_names),
            "after_plateau": bool(self.after_plateau),
            "monitor": self.monitor,
            "monitor_mode": self.monitor_mode,
            "plateau_window": self.plateau_window,
            "plateau_delta": self.plateau_delta,
            "seed": self.seed,
            "buffer_device": None if self.buffer_device is None else str(self.buffer_device),
            "jump_scales": None if self.jump_scales is None else list(self.jump_scales),
            "carry_history": self.carry_history,
            "verify_after": self.verify_after,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to sleep exactly as an uninterrupted one (plain tensors and lists)."""
        return {
            "version": STATE_VERSION,
            "sleepbot_sleep": True,  # marks this entry of a checkpoint's callbacks as a Sleep state
            "settings": self._settings(),
            "origin": self._origin,
            "jumped": self._jumped,
            "last_step": self._last_step,
            "buffer_steps": [s for s, _ in self._buffer],
            "buffer": [{k: v.cpu() for k, v in snap.items()} for _, snap in self._buffer],
            "held": [move_data_to_device(b, "cpu") for b in self._held] if self.check_batches else [],
            "seen": self._seen,
            "val_history": list(self._val_history),
            "plateau": self._plateau,
            "events": [dict(e) for e in self.events],
            "strategy": self.strategy.state_dict(),
            "pending": None if self._pending is None else move_data_to_device(self._pending, "cpu"),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise SleepbotError(
                f"sleep state of version {state_dict.get('version')!r} is not readable; valid: {STATE_VERSION}"
            )
        saved, now = {"verify_after": 0, **state_dict["settings"]}, self._settings()
        for key in now:
            if key not in RESUMABLE and saved.get(key) != now[key]:
                raise SleepbotError(
                    f"sleep setting {key} changed since the checkpoint: {saved.get(key)!r} there, {now[key]!r} "
                    f"now; resume with {key}={saved.get(key)!r} (free to change: {', '.join(RESUMABLE)})"
                )
        changed = [k for k in RESUMABLE if saved.get(k) != now[k]]
        if changed:
            log.info("sleep resumes with changed settings: %s", ", ".join(changed))
        self._reset_state()
        self._origin = int(state_dict["origin"])
        self._jumped = int(state_dict["jumped"])
        self._last_step = int(state_dict["last_step"])
        for step, snap in zip(state_dict["buffer_steps"], state_dict["buffer"]):
            self._buffer.append((int(step), self._to_buffer(dict(snap))))
        for batch in state_dict["held"]:
            self._held.append(batch)
        self._seen = int(state_dict.get("seen", 0))
        self._val_history = [float(v) for v in state_dict["val_history"]]
        self._plateau = bool(state_dict["plateau"])
        self.events = [dict(e) for e in state_dict["events"]]
        self.strategy.load_state_dict(state_dict["strategy"])
        self._pending = state_dict.get("pending")
        self._restored = True

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning skips a callback whose state_key is not in the checkpoint without a word; a Sleep state that
        # no Sleep callback of this run claims is a resume with another strategy.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        claimed = {cb.state_key for cb in trainer.callbacks if isinstance(cb, Sleep)}
        for key, state in states.items():
            if key not in claimed and isinstance(state, dict) and state.get("sleepbot_sleep"):
                saved = state["settings"]["strategy"]
                raise SleepbotError(
                    f"sleep setting strategy changed since the checkpoint: {saved} there, "
                    f"{self.strategy.describe()} now; resume with the checkpoint's strategy"
                )

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
            self._buffer.append((step, self._to_buffer(self._snapshot())))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.strategy.moves_weights:
            return
        if self.check_batches:
            self._hold(batch)
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: no optimizer step since the last call
            return
        self._last_step = step
        if self.context > 1 and (step - self._origin) % self.snapshot_every == 0:
            self._buffer.append((step, self._to_buffer(self._snapshot())))
        if self._pending is not None:
            # The verdict's step, like the pending jump itself, is the same on every rank.
            if step >= int(self._pending["step"]):
                self.verify(trainer, pl_module, step)
            else:
                return  # no sleep while a jump awaits its verdict
        go = bool(self.should_sleep(step))
        if trainer.world_size > 1:
            # Rank 0 decides, so a rank-dependent policy cannot split the replicas. The schedule is the same on
            # every rank, so the decision is exchanged only at the steps it names, not at every optimizer step.
            if not self.schedule(step):
                if go:
                    # one message for every step, so that Python's warning filter shows it once
                    rank_zero_warn(
                        "Sleep.should_sleep is true at a step the schedule does not name; under DDP only scheduled "
                        "steps are exchanged between ranks, so it is ignored (pass schedule=... instead)"
                    )
                return
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
            before, recent = self._val_history[:-w], self._val_history[-w:]
            if self.monitor_mode == "max":
                improvement = max(recent) - max(before)
            else:
                improvement = min(before) - min(recent)
            self._plateau = improvement < self.plateau_delta

    # ---------------------------------------------------------------------------------------------- policy
    def should_sleep(self, step: int) -> bool:
        """Whether to sleep after optimizer step `step`: the schedule, gated by the plateau test when asked, and
        never at the Trainer's last step (no training would follow the jump; the final evaluation would see
        untrained extrapolated weights), nor, with `verify_after`, where its verdict would fall past it.

        Override this in a subclass for another policy; under DDP rank 0's answer is used on every rank, and it
        counts only at the steps `schedule` names (an override can veto a scheduled sleep there, not add one).
        """
        if self._final_step and (step >= self._final_step or step + self.verify_after > self._final_step):
            return False  # (with verify_after: no jump that cannot be judged by the end)
        if not self.schedule(step):
            return False
        return self._plateau or not self.after_plateau

    # ---------------------------------------------------------------------------------------------- snapshots
    def _snapshot(self) -> dict[str, torch.Tensor]:
        # {layer: [N, F]}, in the parameters' dtype
        return {name: neuron_matrix(m) for name, m in self._layers.items()}

    def _to_buffer(self, snap: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Snapshots keep the parameters' dtype (a bf16 model's history takes half the memory of float32; the
        # upcast at each jump is exact).
        if self.buffer_device is None:
            return snap
        return {k: v.to(self.buffer_device) for k, v in snap.items()}

    @staticmethod
    def _max_steps(trainer: pl.Trainer) -> int:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        est = trainer.estimated_stepping_batches if trainer.max_epochs not in (None, -1) else math.inf
        return int(est) if math.isfinite(est) else 0

    def _generator(self, step: int) -> torch.Generator:
        # A fresh generator per sleep, seeded from (seed, step): a resumed run draws the same numbers.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))

    # ------------------------------------------------------------------------------------- held batches, BN
    def _hold(self, batch: Any) -> None:
        """Offer a training batch to the held set (`held_batches`): the newest replaces the oldest (`recent`),
        or it takes a random slot with probability check_batches / batches seen (`reservoir`: Vitter's algorithm
        R, each draw seeded from (seed, count), so a resumed run holds the same batches)."""
        self._seen += 1
        if self.held_batches == "reservoir" and len(self._held) == self.check_batches:
            j = int(torch.randint(self._seen, (1,), generator=self._generator(-self._seen)))
            if j >= self.check_batches:
                return
        else:
            j = None
        if self.buffer_device is not None:
            batch = move_data_to_device(batch, self.buffer_device)
        if j is None:
            self._held.append(batch)
        else:
            self._held[j] = batch

    def _held_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, norms: list[nn.Module]) -> float:
        return held_loss(trainer, pl_module, norms, self._held, self.loss_fn)

    # ---------------------------------------------------------------------------------------------- the jump
    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """Rank 0's work: propose, check, apply-or-roll-back. Returns the decision (and new weights if accepted)."""
        current = {k: _compute_dtype(v) for k, v in self._snapshot().items()}  # [N, F] each, float32/64
        rows = list(self._buffer)
        if not rows or rows[-1][0] != step:
            rows.append((step, current))  # the weights now are always the last row
        rows = rows[-self.context :]
        out: dict[str, Any] = {
            "accepted": False,
            "loss_before": math.nan,
            "loss_after": math.nan,
            "rel_jump": 0.0,
            "forwards": 0,  # held-batch forward passes this decision spent (its cost, with the wall-clock)
        }
        if len(rows) < self.settings.min_context:
            out["reason"] = f"history: {len(rows)} of {self.settings.min_context} snapshots"
            return out
        steps = torch.tensor([s for s, _ in rows], dtype=torch.long)
        gen = self._generator(step)
        progress = step / self._max_steps(trainer) if self._max_steps(trainer) else 0.0
        proposal: dict[str, torch.Tensor] = {}
        for name, module in self._layers.items():
            cur = current[name]
            history = torch.stack([snap[name].to(cur.device, cur.dtype) for _, snap in rows])  # [C, N, F]
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
                jumped=self._jumped,
            )
            if self.strategy.reads_optimizer:
                update = optimizer_update(trainer.optimizers, module)
                ctx.update = None if update is None else update.to(cur.device, cur.dtype)
            new = self.strategy.propose(history, self.horizon, ctx)
            if tuple(new.shape) != tuple(cur.shape):
                raise SleepbotError(
                    f"strategy {self.strategy.name!r} proposed shape {tuple(new.shape)} for layer {name!r}, "
                    f"which has {tuple(cur.shape)} [neurons, fan_in(+1)]"
                )
            if not bool(torch.isfinite(new).all()):
                out["reason"] = f"nonfinite: layer {name}"
                return out
            proposal[name] = new.to(cur.device, cur.dtype)
        moved = sum(float((proposal[n] - current[n]).pow(2).sum()) for n in proposal)
        total = sum(float(current[n].pow(2).sum()) for n in proposal)
        out["rel_jump"] = math.sqrt(moved / total) if total > 0 else 0.0
        checked = bool(self.check_batches and self._held)
        norms = norm_layers(trainer, pl_module) if checked else []
        saved_norms = norm_state(norms)
        per_eval = len(self._held) * (2 if norms else 1)  # forward passes of one held-loss evaluation
        if checked:
            out["loss_before"] = self._held_loss(trainer, pl_module, norms)
            out["forwards"] = per_eval
        if checked and self.jump_scales is not None:
            return self._probe(
                trainer, pl_module, norms, saved_norms, current, proposal, total, per_eval, out
            )
        self._write(proposal)
        if checked and self.verify_after:
            # judged verify_after steps later (see `verify`); BatchNorm statistics for the new weights, as an
            # accepted jump keeps them
            if norms:
                recompute_norms(trainer, pl_module, norms, self._held, self.loss_fn)
                out["forwards"] += len(self._held)
        elif checked:
            after = self._held_loss(
                trainer, pl_module, norms
            )  # re-estimates BN statistics for the new weights
            out["loss_after"] = after
            out["forwards"] += per_eval
            limit = out["loss_before"] * (1.0 + self.tolerance)
            if not math.isfinite(after) or after > limit:
                self._write(current)  # roll back, statistics included, bit for bit
                set_norm_state(norms, saved_norms)
                out["reason"] = f"loss: {after:.4g} > {limit:.4g}"
                return out
        out.update(accepted=True, reason="ok", weights=proposal, old=current)
        if norms:
            out["norms"] = norm_state(norms)
            out["norm_names"] = self._norm_names(pl_module, norms)
        return out

    def _probe(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        norms: list[nn.Module],
        saved_norms: list[dict[str, torch.Tensor]],
        current: dict[str, torch.Tensor],
        proposal: dict[str, torch.Tensor],
        total: float,
        per_eval: int,
        out: dict[str, Any],
    ) -> dict[str, Any]:
        """The adaptive jump: the scale of the proposed displacement with the lowest held loss (0 included);
        `per_eval` is the forward passes of one held-loss evaluation."""
        losses = {0.0: out["loss_before"]}  # already paid for in out["forwards"]
        for scale in self.jump_scales:
            if scale == 0.0:
                continue
            self._write({n: current[n] + scale * (proposal[n] - current[n]) for n in current})
            losses[scale] = self._held_loss(trainer, pl_module, norms)
        finite = {k: v for k, v in losses.items() if math.isfinite(v)}
        best = min(finite, key=lambda k: (finite[k], k)) if finite else 0.0  # ties: the smaller jump
        out["probe"] = {str(k): v for k, v in losses.items()}
        out["scale"] = best
        out["probe_forwards"] = per_eval * len(losses)
        out["forwards"] = out["probe_forwards"]
        if best == 0.0:
            self._write(
                current
            )  # no scale lowers the held loss: the weights and statistics stay, bit for bit
            set_norm_state(norms, saved_norms)
            out["rel_jump"] = 0.0
            out["reason"] = "probe: no scale lowers the held loss"
            return out
        chosen = {n: current[n] + best * (proposal[n] - current[n]) for n in current}
        self._write(chosen)
        if norms:  # statistics for the chosen weights (the probe left the last candidate's)
            out["loss_after"] = self._held_loss(trainer, pl_module, norms)
            out["probe_forwards"] += per_eval
        else:  # nothing else depends on the candidate: its probe loss is the loss after
            out["loss_after"] = losses[best]
        out["forwards"] = out["probe_forwards"]
        moved = sum(float((chosen[n] - current[n]).pow(2).sum()) for n in chosen)
        out["rel_jump"] = math.sqrt(moved / total) if total > 0 else 0.0
        out.update(accepted=True, reason=f"ok (scale {best:g})", weights=chosen, old=current)
        if norms:
            out["norms"] = norm_state(norms)
            out["norm_names"] = self._norm_names(pl_module, norms)
        return out

    @staticmethod
    def _norm_names(pl_module: pl.LightningModule, norms: list[nn.Module]) -> list[str]:
        names = {m: n for n, m in pl_module.named_modules()}
        return [names[m] for m in norms]

    def _write(self, matrices: dict[str, torch.Tensor]) -> None:
        for name, module in self._layers.items():
            set_neuron_matrix(module, matrices[name])  # cast to the parameter's dtype, in its memory format

    def sleep(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """Sleep now: propose, check, apply (or reject), log. Called by the hook when `should_sleep(step)`."""
        t0 = time.perf_counter()
        world = trainer.world_size
        decision: dict[str, Any] = {}
        # where a jump judged later (verify_after) goes back to: every rank keeps its own copy
        before = self._save_state(trainer, pl_module) if self.verify_after and self._held else None
        if trainer.is_global_zero:
            try:
                decision = self._decide(trainer, pl_module, step)
            except BaseException as e:
                if world > 1:  # tell the other ranks, which wait for the decision, to stop too
                    trainer.strategy.broadcast({"error": f"{type(e).__name__}: {e}"}, src=0)
                raise
        if world > 1:
            # Replicas receive rank 0's decision and weights (as CPU tensors; broadcast pickles them).
            payload = {k: v for k, v in decision.items() if k not in ("weights", "old", "norms")}
            if decision.get("accepted"):
                payload["weights"] = {k: v.cpu() for k, v in decision["weights"].items()}
                if "norms" in decision:
                    payload["norms"] = [{k: v.cpu() for k, v in s.items()} for s in decision["norms"]]
            payload = trainer.strategy.broadcast(payload if trainer.is_global_zero else None, src=0)
            if "error" in payload:
                raise SleepbotError(f"rank 0 failed while sleeping at step {step}: {payload['error']}")
            if not trainer.is_global_zero:
                decision = dict(payload)
                if decision.get("accepted"):
                    decision["old"] = {k: _compute_dtype(v) for k, v in self._snapshot().items()}
                    self._write(decision["weights"])
                    if "norms" in decision:
                        modules = dict(pl_module.named_modules())
                        norms = [modules[n] for n in decision["norm_names"]]
                        set_norm_state(norms, decision["norms"])
        if decision["accepted"]:
            new = self._snapshot()  # what the layers hold now, on their device, in their dtype
            adjust_optimizer_state(
                trainer.optimizers,
                self._layers,
                decision["old"],
                {k: _compute_dtype(v) for k, v in new.items()},
                self.optimizer_state,
            )
            self._jumped += self.horizon * self.snapshot_every
            self._restart_history(step, decision["old"], new)
            if before is not None:
                self._pending = {
                    "step": step + self.verify_after,
                    "jump_step": step,
                    "loss_before": float(decision["loss_before"]),  # rank 0's; the verdict is rank 0's
                    "held": list(self._held),
                    "skipped": self.horizon * self.snapshot_every,
                    **before,
                }
        event = {
            "step": int(step),
            "strategy": self.strategy.name,
            "horizon": int(self.horizon),
            "accepted": bool(decision["accepted"]),
            "reason": str(decision["reason"]),
            "loss_before": float(decision["loss_before"]),
            "loss_after": float(decision["loss_after"]),
            "rel_jump": float(decision["rel_jump"]),
            "forwards": int(decision.get("forwards", 0)),
            "seconds": time.perf_counter() - t0,
        }
        if "scale" in decision:  # the adaptive jump's choice and its cost
            event.update(
                scale=float(decision["scale"]),
                probe_forwards=int(decision["probe_forwards"]),
                probe={k: float(v) for k, v in decision["probe"].items()},
            )
        self.events.append(event)
        self._log(trainer, event)
        return event

    @staticmethod
    def _save_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {
            "module": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizers": [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers],
        }

    def verify(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, Any]:
        """The verdict on the pending jump (`verify_after` steps after it): keep it, or go back to the module's
        and optimizers' state before it. Rank 0 judges; every rank restores its own copy."""
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        assert pending is not None
        verdict: dict[str, Any] = {"keep": True, "loss": math.nan, "forwards": 0}
        if trainer.is_global_zero:
            try:
                norms = norm_layers(trainer, pl_module)
                saved = norm_state(norms)
                verdict["loss"] = held_loss(trainer, pl_module, norms, pending["held"], self.loss_fn)
                set_norm_state(norms, saved)  # the verdict leaves training's statistics as they were
                verdict["forwards"] = len(pending["held"]) * (2 if norms else 1)
                limit = pending["loss_before"] * (1.0 + self.tolerance)
                verdict["keep"] = bool(math.isfinite(verdict["loss"]) and verdict["loss"] <= limit)
            except BaseException as e:
                if trainer.world_size > 1:
                    trainer.strategy.broadcast({"error": f"{type(e).__name__}: {e}"}, src=0)
                raise
        if trainer.world_size > 1:
            verdict = trainer.strategy.broadcast(verdict if trainer.is_global_zero else None, src=0)
            if "error" in verdict:
                raise SleepbotError(f"rank 0 failed while judging a jump at step {step}: {verdict['error']}")
        jump = int(pending["jump_step"])
        before, after = float(pending["loss_before"]), float(verdict["loss"])
        if verdict["keep"]:
            reason = f"verify: kept the jump of step {jump} ({after:.4g} <= {before:.4g})"
        else:
            self._restore_state(trainer, pl_module, pending)
            self._jumped -= int(pending["skipped"])
            # The history restarts at the restored weights, on the snapshot grid the jump set (its origin is the
            # jump's step), so that sleeps stay on the grid; off the grid (verify_after not a multiple of
            # snapshot_every) the first snapshot waits for the grid's next step.
            self._buffer.clear()
            if self.context > 1 and (step - self._origin) % self.snapshot_every == 0:
                self._buffer.append((step, self._to_buffer(self._snapshot())))
            reason = f"verify: rolled back the jump of step {jump} ({after:.4g} > {before:.4g})"
        for e in reversed(self.events):
            if e["step"] == jump and e["accepted"]:
                e["kept"] = bool(verdict["keep"])
                break
        # accepted=False: no jump is written here (a rollback is the jump of step `jump` undone)
        event = {
            "step": int(step),
            "strategy": self.strategy.name,
            "horizon": int(self.horizon),
            "accepted": False,
            "reason": reason,
            "loss_before": before,
            "loss_after": after,
            "rel_jump": 0.0,
            "forwards": int(verdict["forwards"]),
            "seconds": time.perf_counter() - t0,
            "verify": {"jump_step": jump, "kept": bool(verdict["keep"])},
        }
        self.events.append(event)
        self._log(trainer, event)
        return event

    @staticmethod
    def _restore_state(trainer: pl.Trainer, pl_module: pl.LightningModule, saved: dict[str, Any]) -> None:
        if len(saved["optimizers"]) != len(trainer.optimizers):  # checked first: nothing restored by half
            raise SleepbotError(
                f"sleep verify_after saved {len(saved['optimizers'])} optimizers' state at the jump, and the "
                f"trainer has {len(trainer.optimizers)} now"
            )
        with torch.no_grad():
            pl_module.load_state_dict(saved["module"])  # copies in place: the optimizers' parameters stay
        for opt, state in zip(trainer.optimizers, saved["optimizers"]):
            opt.load_state_dict(state)

    def _restart_history(self, step: int, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
        """The ring buffer after an accepted jump from `old` to `new` (both {layer: [N, F]}) at `step`.

        By default it restarts from the new weights: the trajectory is discontinuous at the jump, so older
        snapshots would mislead an extrapolation. With `carry_history` every older snapshot is translated by the
        jump instead, so the history is the path that leads to the new weights with the same steps between
        snapshots (what the strategy reads is unchanged but for the offset).
        """
        kept = [(s, snap) for s, snap in self._buffer if s != step] if self.carry_history else []
        self._buffer.clear()
        self._origin = step
        if kept:
            delta = {k: _compute_dtype(new[k]) - old[k].to(new[k].device) for k in new}  # [N, F] each
            for s, snap in kept:
                self._buffer.append(
                    (s, {k: (_compute_dtype(v) + delta[k].to(v.device)).to(v.dtype) for k, v in snap.items()})
                )
        if self.context > 1:
            self._buffer.append((step, self._to_buffer(new)))

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
