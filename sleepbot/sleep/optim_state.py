"""What happens to the optimizer's per-parameter state (Adam's moments, SGD's momentum) when sleep moves weights.

Three policies, for the parameters of the layers that were moved (other parameters are never touched):

- `keep`: leave the state as it is. The moments still describe the trajectory the weights were on, and a forecast
  jump continues that trajectory, so they stay meaningful.
- `reset`: drop the state, as if these parameters were new to the optimizer (Adam restarts its bias correction;
  its first update is then about lr * sign(grad) per weight).
- `rescale`: multiply each neuron's state by the ratio r = ||w_new|| / ||w_old|| of its norms after and before
  the jump (r^2 for second moments: Adam's `exp_avg_sq` and `max_exp_avg_sq`, RMSprop's `square_avg`,
  Adagrad's `sum`), so the state keeps its size relative to a neuron whose scale the jump changed (noise,
  square_normalize). For a forecast jump r is close to 1 and this is close to `keep`.

Schedule-Free optimizers (schedulefree's AdamWScheduleFree and kin, told apart by `is_schedule_free`) keep two
sequences and the parameters show a mix of them. Their per-parameter state is `z` (the base sequence) and
`exp_avg_sq`; the averaged point x is implicit. In train mode the parameters hold y = (1 - beta1) z + beta1 x,
in eval mode they hold x (`eval()` computes x = y + (1 - 1/beta1) (z - y)). Each step pulls y towards z
(y <- y + c (z - y) + ...), so a jump that moved the parameters alone would be partly undone at the next step,
and x would move by delta / beta1 instead of delta. So for these optimizers the jump of delta = new - old is
carried into the sequences, whatever the mode the parameters are in:

- `keep`: z += delta. With the parameters moved by delta too, x, y and z all move by delta: the next step is
  the one the optimizer would take had the trajectory been at the jumped point all along.
- `reset`: z = the new weights, so x = y = z (in eval mode too): the average is forgotten and restarts at the
  jump. `exp_avg_sq` is kept, because Schedule-Free's bias correction counts steps per group, not per
  parameter: a zeroed second moment would make the next update about lr / sqrt(1 - beta2) (~32 lr) per weight.
- `rescale`: z += delta (as `keep`), and `exp_avg_sq` times r^2 per neuron, as for Adam.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sleepbot.errors import SleepbotError
from sleepbot.models import is_schedule_free
from sleepbot.neurons import has_bias

OPTIMIZER_STATE_POLICIES = ("keep", "reset", "rescale")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")


def check_policy(policy: str) -> str:
    if policy not in OPTIMIZER_STATE_POLICIES:
        raise SleepbotError(
            f"unknown optimizer_state {policy!r}; valid: {', '.join(OPTIMIZER_STATE_POLICIES)}"
        )
    return policy


@torch.no_grad()
def adjust_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer],
    layers: dict[str, nn.Module],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    policy: str,
) -> None:
    """Apply `policy` to the state of every parameter (weight and bias) of the moved layers.

    Call it after the new weights are written into the layers. A Schedule-Free optimizer's sequences are moved
    with the jump under every policy (see the module docstring).

    Args:
        optimizers: the trainer's optimizers.
        layers: the moved layers by name.
        old: each layer's neuron matrix before the jump, [N, F].
        new: after the jump, [N, F].
        policy: `keep`, `reset` or `rescale`.
    """
    check_policy(policy)
    for opt in optimizers:
        if is_schedule_free(opt):
            _adjust_schedule_free(opt, layers, old, new, policy)
            continue
        if policy == "keep":
            continue
        for name, module in layers.items():
            params = [module.weight] + ([module.bias] if has_bias(module) else [])
            if policy == "reset":
                for p in params:
                    opt.state.pop(p, None)
                continue
            ratio = _norm_ratio(old[name], new[name])
            for p in params:
                state = opt.state.get(p)
                if not state:
                    continue
                r = ratio.to(p.device, p.dtype).view(-1, *([1] * (p.dim() - 1)))  # [N, 1, ...] over p's shape
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.mul_(r * r if key in _SECOND_MOMENTS else r)


def _norm_ratio(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Per neuron ||new|| / ||old||, [N] (1 where the old neuron was all zeros)."""
    n_old = old.norm(dim=1)  # [N]
    n_new = new.to(n_old.device).norm(dim=1)
    return torch.where(n_old > 0, n_new / n_old.clamp_min(torch.finfo(n_old.dtype).tiny), 1.0)


def _param_deltas(
    module: nn.Module, old: torch.Tensor, new: torch.Tensor
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, new - old in that parameter's shape) for the layer's weight and bias."""
    delta = new.to(old.device) - old  # [N, fan_in (+1)]
    weight = module.weight
    fan_in = weight[0].numel()
    out = [(weight, delta[:, :fan_in].reshape(weight.shape))]  # [N, C_in, *kernel]
    if has_bias(module):
        out.append((module.bias, delta[:, fan_in]))
    return out


def _adjust_schedule_free(
    opt: torch.optim.Optimizer,
    layers: dict[str, nn.Module],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    policy: str,
) -> None:
    for name, module in layers.items():
        ratio = _norm_ratio(old[name], new[name]) if policy == "rescale" else None
        for p, delta in _param_deltas(module, old[name], new[name]):
            state = opt.state.get(p)
            z = state.get("z") if state else None
            if z is None:  # never stepped: z will start at the parameter's (new) value
                continue
            if policy == "reset":
                z.copy_(p.detach())
            else:
                z.add_(delta.to(z.device, z.dtype))
            if ratio is not None:
                r = ratio.to(z.device, z.dtype).view(-1, *([1] * (p.dim() - 1)))  # [N, 1, ...]
                for key in _SECOND_MOMENTS:
                    if torch.is_tensor(state.get(key)) and state[key].shape == p.shape:
                        state[key].mul_(r * r)


_UPDATE_RULES = {"Adam": "adam", "AdamW": "adamw", "SGD": "momentum"}


@torch.no_grad()
def optimizer_update(optimizers: Iterable[torch.optim.Optimizer], module: nn.Module) -> torch.Tensor | None:
    """The update the optimizer's state points to for one layer, [N, F] in neuron_matrix's layout (bias last):
    its last step recomputed from the state and the param group now (`sleepbot.forecast.state.optimizer_step`:
    -lr m_hat / (sqrt(v_hat) + eps) for Adam, plus AdamW's decay, and -lr * momentum_buffer for SGD with
    momentum). None when the layer's optimizer is another one (Schedule-Free, plain SGD, ...), uses amsgrad or
    nesterov, or has not stepped yet: a strategy that reads it must do without."""
    from sleepbot.forecast.state import STATE_KEYS, optimizer_step

    for opt in optimizers:
        group = next((g for g in opt.param_groups if any(p is module.weight for p in g["params"])), None)
        if group is None:
            continue
        rule = _UPDATE_RULES.get(type(opt).__name__)
        if rule is None or is_schedule_free(opt) or group.get("amsgrad") or group.get("nesterov"):
            return None
        if rule == "momentum" and not group.get("momentum"):
            return None
        params = [module.weight] + ([module.bias] if has_bias(module) else [])
        states = [opt.state.get(p) or {} for p in params]
        keys = STATE_KEYS[rule]
        if any(not torch.is_tensor(s.get(k)) for s in states for k in keys):
            return None
        n = module.weight.shape[0]
        dtype = torch.promote_types(module.weight.dtype, torch.float32)  # bf16/fp16 state read in float32
        state = {k: torch.cat([s[k].reshape(n, -1) for s in states], 1).to(dtype) for k in keys}
        step = int(states[0].get("step", 0)) if rule != "momentum" else 0
        lr = float(group["lr"])  # the lr now: a scheduler that has stepped since shows its next value
        weights = torch.cat([p.detach().reshape(n, -1) for p in params], 1).to(dtype)
        return optimizer_step(
            rule,
            state,
            lr=lr,
            step=step,
            weights=weights,
            betas=tuple(group.get("betas", (0.9, 0.999))),
            eps=float(group.get("eps", 1e-8)),
            weight_decay=float(group.get("weight_decay", 0.0)),
        )
    return None
