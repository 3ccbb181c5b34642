"""The sleep strategy interface, its registry, and the step schedules the Sleep callback sleeps on.

A strategy sees one neuron layer at a time: the layer's recent snapshots, oldest first, as a tensor
`history` [C, N, F] (C snapshots, N neurons, F = fan_in (+1 for the bias), see sleepbot.neurons), and returns the
weights it proposes for that layer, [N, F]. The Sleep callback owns everything else: when to sleep, the snapshot
ring buffer, applying the proposal under `torch.no_grad()`, rejecting NaNs, rolling back, the optimizer state,
DDP, logging and resume state.

To add a strategy, subclass `SleepStrategy`, implement `propose`, and register it:

    @register_strategy("shrink")
    class Shrink(SleepStrategy):
        '''Pull every weight 1% toward zero.'''

        def __init__(self, factor: float = 0.99) -> None:
            self.factor = factor

        def propose(self, history, horizon, ctx):
            return history[-1] * self.factor        # [N, F]

`Sleep("shrink", factor=0.98)` then builds it by name (keyword arguments the callback does not know go to the
strategy's constructor), and the parametrized tests in tests/test_sleep_strategies.py cover it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sleepbot.errors import SleepbotError, unknown_name


@dataclass
class LayerContext:
    """What a strategy may know about the layer it is asked to move, besides its history.

    Attributes:
        layer: the module name of the layer (e.g. `net.0.0`).
        kind: `conv1d`, `conv2d`, `conv3d` or `linear` (sleepbot.neurons.layer_kind).
        step: the optimizer step at which the callback sleeps (the step of `history[-1]`).
        steps: the steps of the history's snapshots, [C], oldest first. Usually evenly spaced by
            `snapshot_every`; a custom schedule that sleeps between grid points makes the last gap shorter.
        snapshot_every: the nominal number of steps between snapshots (the unit of `horizon`).
        progress: step / max_steps, the relative training time in [0, 1] (0 when the budget is unknown).
        generator: the random generator to draw from; seeded from (seed, step) so that a jump does not depend on
            what happened before it (resume and DDP stay exact).
        jumped: the steps skipped by this run's earlier accepted jumps (`horizon * snapshot_every` each), so that
            the weights now stand where a run without sleep would be at about `step + jumped` (the oracle reads
            its recording there).
        update: the update the optimizer's state points to now, [N, F] like the history
            (`sleepbot.sleep.optim_state.optimizer_update`: Adam, AdamW, SGD with momentum), filled only for a
            strategy whose `reads_optimizer` is True, and None when the optimizer is another one.
    """

    layer: str
    kind: str
    step: int
    steps: torch.Tensor
    snapshot_every: int
    progress: float = 0.0
    generator: torch.Generator | None = None
    jumped: int = 0
    update: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SleepStrategy(ABC):
    """Proposes new weights for one layer from that layer's recent snapshots.

    Subclasses implement `propose`. They may also override:
      - `defaults()`: the callback settings this strategy wants when the user does not give them (for example
        Lookahead sleeps every k steps and reads two snapshots k steps apart);
      - `validate(settings)`: raise a one-line SleepbotError when the callback's settings cannot work;
      - `setup(model, max_steps)`: one-off work once the model is known (open a file, load a checkpoint);
      - `state_dict()` / `load_state_dict()`: state that must survive a resume (most strategies have none:
        the callback seeds their generator from the step).

    Attributes:
        name: the registry name (set by `register_strategy`).
        moves_weights: False only for the `none` control, which the callback then never runs.
        reads_optimizer: True for a strategy that reads `LayerContext.update` (the callback computes it only then).
    """

    name: str = "custom"
    moves_weights: bool = True
    reads_optimizer: bool = False

    @abstractmethod
    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        """The proposed weights of one layer.

        Args:
            history: [C, N, F] snapshots of the layer, oldest first; `history[-1]` is the weights now.
            horizon: how far ahead to move, in snapshots (`horizon * snapshot_every` steps).
            ctx: the layer and the time (see LayerContext).

        Returns:
            [N, F], same dtype and device as `history`. Non-finite values make the callback reject the jump.
        """

    def defaults(self) -> dict[str, Any]:
        """Callback settings preferred by this strategy: any of every_n_steps, horizon, snapshot_every, context,
        min_context, check_batches, jump_scales and carry_history (what the user leaves unset)."""
        return {}

    def validate(self, settings: SleepSettings) -> None:  # noqa: B027 - optional hook
        """Raise a one-line SleepbotError if this strategy cannot work with `settings`."""

    def setup(self, model: torch.nn.Module, max_steps: int) -> None:  # noqa: B027 - optional hook
        """Called once per fit, before the first snapshot."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `state_dict` returned."""

    def describe(self) -> str:
        """One line for logs: the name and the constructor options."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"

    def options(self) -> dict[str, Any]:
        """The constructor arguments this instance was built with (those stored as same-named attributes)."""
        out = {}
        for p in inspect.signature(type(self).__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and hasattr(self, p.name):
                out[p.name] = getattr(self, p.name)
        return out


@dataclass
class SleepSettings:
    """The callback's resolved settings, as strategies see them in `validate`.

    Attributes:
        every_n_steps: sleep every this many optimizer steps (with the default schedule).
        start_step: first step at which sleeping is allowed.
        stop_step: no sleep at or after this step (None: never stop).
        horizon: snapshots ahead (`horizon * snapshot_every` steps).
        snapshot_every: steps between the snapshots of the ring buffer.
        context: snapshots handed to the strategy at most (`history.shape[0]` once the buffer is full).
        custom_schedule: True when the user gave a schedule callable (every_n_steps is then unused).
        min_context: snapshots handed to the strategy at least (None: `context`): a strategy that reads
            histories of several lengths sleeps before the buffer is full.
    """

    every_n_steps: int
    start_step: int
    stop_step: int | None
    horizon: int
    snapshot_every: int
    context: int
    custom_schedule: bool = False
    min_context: int | None = None

    def __post_init__(self) -> None:
        if self.min_context is None:
            self.min_context = self.context


STRATEGIES: dict[str, type[SleepStrategy]] = {}


def register_strategy(name: str) -> Callable[[type[SleepStrategy]], type[SleepStrategy]]:
    """Class decorator: make a SleepStrategy subclass available by `name` (Sleep("name"), the CLI, configs)."""

    def deco(cls: type[SleepStrategy]) -> type[SleepStrategy]:
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


def make_strategy(strategy: str | SleepStrategy, **options: Any) -> SleepStrategy:
    """A strategy instance from a registry name and constructor options, or the instance itself.

    Unknown names and options raise a one-line SleepbotError naming what is valid.
    """
    if isinstance(strategy, SleepStrategy):
        if options:
            raise SleepbotError(
                f"options {sorted(options)} were given with a strategy object; pass them to its constructor"
            )
        return strategy
    if not isinstance(strategy, str):
        raise SleepbotError(
            f"a sleep strategy is a registry name or a SleepStrategy instance, got {type(strategy).__name__}"
        )
    if strategy not in STRATEGIES:
        raise unknown_name("sleep strategy", strategy, STRATEGIES)
    cls = STRATEGIES[strategy]
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    bad = [k for k in options if k not in valid]
    if bad and not accepts_any:
        raise SleepbotError(
            f"sleep strategy {strategy!r} has no option {bad[0]!r}; valid: {', '.join(valid) or '(none)'}"
        )
    return cls(**options)


class EveryNSteps:
    """The default schedule: step s is a sleep step when 0 < s, start_step <= s < stop_step and
    (s - start_step) % every_n_steps == 0. With start_step 0 and every 50: 50, 100, 150, ...; with start_step 100:
    100, 150, ...
    It is a class rather than a lambda so that the callback stays picklable (ddp_spawn, forkserver workers).
    """

    def __init__(self, every_n_steps: int, start_step: int = 0, stop_step: int | None = None) -> None:
        if every_n_steps < 1:
            raise SleepbotError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if start_step < 0:
            raise SleepbotError(f"start_step must be >= 0, got {start_step}")
        if stop_step is not None and stop_step <= start_step:
            raise SleepbotError(f"stop_step ({stop_step}) must be after start_step ({start_step})")
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.stop_step = stop_step

    def __call__(self, step: int) -> bool:
        if step <= 0 or step < self.start_step:
            return False
        if self.stop_step is not None and step >= self.stop_step:
            return False
        return (step - self.start_step) % self.every_n_steps == 0

    def __repr__(self) -> str:
        return f"EveryNSteps({self.every_n_steps}, start_step={self.start_step}, stop_step={self.stop_step})"
