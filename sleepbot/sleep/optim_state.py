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
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sleepbot.errors import SleepbotError
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

    Args:
        optimizers: the trainer's optimizers.
        layers: the moved layers by name.
        old: each layer's neuron matrix before the jump, [N, F].
        new: after the jump, [N, F].
        policy: `keep`, `reset` or `rescale`.
    """
    check_policy(policy)
    if policy == "keep":
        return
    for opt in optimizers:
        for name, module in layers.items():
            params = [module.weight] + ([module.bias] if has_bias(module) else [])
            if policy == "reset":
                for p in params:
                    opt.state.pop(p, None)
                continue
            n_old = old[name].norm(dim=1)  # [N]
            n_new = new[name].to(n_old.device).norm(dim=1)
            ratio = torch.where(n_old > 0, n_new / n_old.clamp_min(torch.finfo(n_old.dtype).tiny), 1.0)
            for p in params:
                state = opt.state.get(p)
                if not state:
                    continue
                r = ratio.to(p.device, p.dtype).view(-1, *([1] * (p.dim() - 1)))  # [N, 1, ...] over p's shape
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.mul_(r * r if key in _SECOND_MOMENTS else r)
