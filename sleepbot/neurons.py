"""Neurons: one output unit of a Conv1d/Conv2d/Conv3d layer (one output channel, its kernel flattened) or of a
Linear layer (one row), with its bias as an extra last column.

Every part of sleepbot that reads or moves weights (the recorder, the sleep strategies, the forecaster, the plots)
goes through these functions, so a neuron means the same thing everywhere:

    matrix = neuron_matrix(layer)        # [N, fan_in (+1 with bias)], a detached copy
    set_neuron_matrix(layer, matrix)     # writes it back in place, under torch.no_grad()
"""

from __future__ import annotations

import torch
from torch import nn

NEURON_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_kind(module: nn.Module) -> str:
    """`conv1d`, `conv2d`, `conv3d` or `linear`."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"conv{module.weight.dim() - 2}d"
    raise TypeError(f"{type(module).__name__} is not a neuron layer (Conv1d/2d/3d or Linear)")


def neuron_layers(model: nn.Module, include: list[str] | None = None) -> dict[str, nn.Module]:
    """The model's neuron layers by module name, in definition order.

    Args:
        model: any nn.Module (a LightningModule too).
        include: module names to keep; None keeps every Conv/Linear layer.
    """
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, NEURON_LAYER_TYPES) and name != ""
    }
    if include is not None:
        missing = [n for n in include if n not in layers]
        if missing:
            raise ValueError(f"no neuron layer named {missing[0]!r}; valid: {', '.join(layers)}")
        layers = {n: layers[n] for n in include}
    return layers


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def neuron_rows(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A detached copy of a layer's neurons from its weight (and bias) tensors, [N, fan_in (+1 with bias)] (bias
    last): the layout the recorder stores and the forecasters read, for tensors outside a module."""
    w = weight.detach().reshape(weight.shape[0], -1)  # [N, fan_in]
    return torch.cat([w, bias.detach()[:, None]], dim=1) if bias is not None else w.clone()


def neuron_matrix(module: nn.Module) -> torch.Tensor:
    """A detached copy of the layer's neurons, [N, fan_in (+1 with bias)] (bias last)."""
    with torch.no_grad():
        return neuron_rows(module.weight, module.bias if has_bias(module) else None)


def set_neuron_matrix(module: nn.Module, matrix: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Write `matrix` ([N, fan_in (+1)], or [len(rows), ...] for a subset of neurons) into the layer in place.

    The values are cast to the parameter's dtype (a float32 jump lands in a bf16/fp16 model rounded once) and
    copied through the parameter's own indexing, so its memory format (channels_last, a non-contiguous view)
    and storage stay as they were.
    """
    with torch.no_grad():
        weight = module.weight
        fan_in = weight[0].numel()
        matrix = matrix.to(device=weight.device, dtype=weight.dtype)
        idx = slice(None) if rows is None else rows.to(weight.device)
        n = matrix.shape[0]
        # [n, fan_in] -> [n, C_in, *kernel]: reshape of the logical layout, whatever the strides of `weight`
        weight[idx] = matrix[:, :fan_in].reshape(n, *weight.shape[1:])
        if has_bias(module):
            module.bias[idx] = matrix[:, fan_in]


def neuron_norms(module: nn.Module) -> torch.Tensor:
    """Per-neuron L2 norm of weights and bias together, [N]."""
    with torch.no_grad():
        sq = module.weight.detach().reshape(module.weight.shape[0], -1).pow(2).sum(1)
        if has_bias(module):
            sq = sq + module.bias.detach().pow(2)
        return sq.sqrt()
