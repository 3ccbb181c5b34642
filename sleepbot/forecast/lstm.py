"""`LSTMForecaster`: an LSTM over each neuron's recent history that steers a small per-weight head.

Where the recurrence runs decides the speed. An nn.LSTM over every weight's own series is too slow for a jump of
a 1M-weight model in under 1 s on 2 cores: scripts/bench_forecaster.py measured (1 thread, a busy machine) 7.9 s
for hidden 32 over 16 snapshots and 1.0 s for hidden 8 over 5, before any feature or normalisation; this design
takes 0.31 s with the same weights. So the LSTM runs once per NEURON, over summary features of the neuron's
snapshot-to-snapshot steps (how big, how consistent in direction, how its norm changes), plus what is known about
the neuron (layer kind, fan-in, how fast it moves relative to its size). A neuron is ~1/100 to 1/1000 of the
weights, so the recurrence costs little.

Its output conditions a per-weight head shared by every weight: the head reads the weight's own context (in the
neuron's motion units) and the least-squares line through it, and predicts

    displacement_h = scale_n * (alpha_{n,h} * line_h + head_h(weight context, neuron state)),

where line_h is the linear extrapolation h snapshots ahead and alpha_{n,h} a per-neuron factor the LSTM sets
(initialised at 1, so training starts from linear extrapolation and learns where to damp or amplify it). The head
is a one-hidden-layer MLP whose hidden bias comes from the neuron state, so per weight it costs one small matmul
in, one out.

What it does NOT read by default: the relative training time step / max_steps (`read_progress`). A forecaster that
reads it jumps differently in the first 500 steps of a run with max_steps 500 than of one with 5,000, so a user's
budget would change what sleep does; checkpoints trained before this option read it (and keep doing so).

Ablation switches (scripts/forecaster_ablations.py; README, "The weight forecaster"): `mixer="mlp"` replaces the
recurrence by an MLP over the same step features flattened (does the LSTM earn its place?); `layer_context=True`
adds the mean of the layer's neuron states to each neuron's (NiNo's case for neuron interaction, in its cheapest
form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sleepbot.errors import SleepbotError
from sleepbot.forecast.base import KINDS, LearnedForecaster, kind_index, neuron_scale, register_forecaster
from sleepbot.forecast.baselines import line_fit

N_STEP_FEATURES = 5  # per snapshot-to-snapshot step of a neuron (see `_neuron_features`)
# Per neuron: relative speed, progress, progress known, log fan-in, and the kind as (linear, convolution): conv1d,
# conv2d and conv3d share one flag, so that a forecaster trained on conv2d layers has seen the flag a conv1d sets.
N_CONST_FEATURES = 6
# Weights per block of the per-weight head (see LSTMForecaster.forward): 64K weights x 32 hidden = 8 MB per block.
HEAD_BLOCK_WEIGHTS = 1 << 16


def neuron_features(
    history: torch.Tensor, scale: torch.Tensor, kind: str, progress: torch.Tensor | None
) -> torch.Tensor:
    """The LSTM's input: [N, C-1, N_STEP_FEATURES + N_CONST_FEATURES], all dimensionless.

    Per step c (from snapshot c to c+1): the step's RMS in motion units (does the neuron slow down?), its cosine
    with the previous step and with the whole context's displacement (does it keep its direction?), its mean in
    motion units (a drift shared by the neuron's weights), and the neuron's norm relative to the last snapshot.
    Constant per neuron, repeated at every step: log(step size / weight size), progress (0 when unknown) and a
    flag saying whether it is known, log fan-in, and whether the layer is linear or a convolution.
    """
    c, n, f = history.shape
    d = history[1:] - history[:-1]  # [C-1, N, F]
    ds = d / scale[None, :, None]  # in motion units
    rms = ds.pow(2).mean(-1).sqrt()  # [C-1, N]
    drift = ds.mean(-1)  # [C-1, N]
    del ds
    # Cosines of each step with the one before (0 for the first, which has none) and with the whole context's
    # displacement, every row's norm taken once (in as few passes over [C-1, N, F] as it takes).
    dn = d.norm(dim=-1)  # [C-1, N]
    cos_prev = torch.zeros_like(dn)
    cos_prev[1:] = (d[1:] * d[:-1]).sum(-1) / (dn[1:] * dn[:-1]).clamp_min(1e-20)
    total = history[-1] - history[0]  # [N, F]
    cos_total = (d * total).sum(-1) / (dn * total.norm(dim=-1)).clamp_min(1e-20)  # [C-1, N]
    norms = history.norm(dim=-1)  # [C, N]
    rel_norm = (norms[1:] - norms[-1]) / (scale * math.sqrt(f))  # [C-1, N]
    step = torch.stack([rms, cos_prev, cos_total, drift, rel_norm], dim=-1)  # [C-1, N, 5]

    speed = torch.log(scale * math.sqrt(f) / (norms[-1] + 1e-12)).clamp(-20, 5) / 5  # [N]
    if progress is None:
        prog = torch.zeros(n, device=history.device)
        known = torch.zeros(n, device=history.device)
    else:
        known = torch.isfinite(progress).float()
        prog = torch.nan_to_num(progress.float(), nan=0.0).clamp(0, 2)
    onehot = torch.zeros(n, 2, device=history.device)
    onehot[:, 0 if KINDS[kind_index(kind)] == "linear" else 1] = 1.0
    fan = torch.full((n,), math.log(f) / 5, device=history.device)
    const = torch.cat([torch.stack([speed, prog, known, fan], -1), onehot], -1)  # [N, 6]
    step = torch.cat([step, const[None].expand(c - 1, n, const.shape[-1])], -1)  # [C-1, N, 11]
    return step.transpose(0, 1).contiguous()  # [N, C-1, 11]


@register_forecaster("lstm")
class LSTMForecaster(LearnedForecaster):
    """An LSTM over each neuron's step history steering a shared per-weight head (see the module docstring).

    Args:
        context: snapshots read (5: WNN and NiNo both use 5; longer contexts cost the head more per weight).
        horizons: snapshots ahead it is trained for, all at once.
        snapshot_every: steps between snapshots of its training data (recorded in checkpoints).
        hidden: LSTM state size (per neuron, so cheap; 64 scored a little better than 32 on held-out runs).
        head_hidden: the per-weight head's width: the cost per weight (32: about 0.5 s for 1M weights).
        read_progress: read step / max_steps when the caller gives it (default False: jumps independent of the
            budget; see the module docstring).
        mixer: `lstm` (the recurrence over the neuron's steps) or `mlp` (the same features, flattened, no
            recurrence).
        layer_context: also read the mean state of the layer's neurons.
    """

    def __init__(
        self,
        context: int = 5,
        horizons: Sequence[int] = (5, 10, 20),
        snapshot_every: int | None = None,
        default_horizon: int | None = None,
        hidden: int = 64,
        head_hidden: int = 32,
        read_progress: bool = False,
        mixer: str = "lstm",
        layer_context: bool = False,
    ) -> None:
        super().__init__(context, horizons, snapshot_every, default_horizon)
        if mixer not in ("lstm", "mlp"):
            raise SleepbotError(f"unknown lstm forecaster mixer {mixer!r}; valid: lstm, mlp")
        self.hidden = int(hidden)
        self.head_hidden = int(head_hidden)
        self.read_progress = bool(read_progress)
        self.mixer = mixer
        self.layer_context = bool(layer_context)
        n_h = len(self.horizons)
        n_in = N_STEP_FEATURES + N_CONST_FEATURES
        if mixer == "lstm":
            self.lstm = nn.LSTM(n_in, hidden, batch_first=True)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(n_in * (self.context - 1), hidden), nn.GELU(), nn.Linear(hidden, hidden)
            )
        state = hidden * (2 if self.layer_context else 1)
        self.neuron_out = nn.Linear(state + N_CONST_FEATURES, head_hidden + n_h)
        # Per-weight input: the C-1 earlier values relative to the last, the line's slope, its offset, and the RMS
        # residual around the line (the weight's own noise: how far to trust its slope).
        self.head_in = nn.Linear(self.context + 2, head_hidden, bias=False)
        self.head_out = nn.Linear(head_hidden, n_h)
        with torch.no_grad():
            # Start as linear extrapolation: alpha = 1, head output 0.
            self.neuron_out.weight[head_hidden:].zero_()
            self.neuron_out.bias[head_hidden:].fill_(1.0)
            self.head_out.weight.mul_(0.1)
            self.head_out.bias.zero_()
        self.register_buffer("_h", torch.tensor(self.horizons, dtype=torch.float32), persistent=False)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "hidden": self.hidden,
            "head_hidden": self.head_hidden,
            "read_progress": self.read_progress,
            "mixer": self.mixer,
            "layer_context": self.layer_context,
        }

    def forward(self, history: torch.Tensor, kind: str, progress: torch.Tensor | None) -> torch.Tensor:
        return self.forward_at(history, kind, progress, range(len(self.horizons)))

    def forward_at(
        self, history: torch.Tensor, kind: str, progress: torch.Tensor | None, index: Sequence[int]
    ) -> torch.Tensor:
        index = list(index)
        c, n, f = history.shape
        scale = neuron_scale(history)  # [N]
        seq = neuron_features(history, scale, kind, progress if self.read_progress else None)  # [N, C-1, 11]
        if self.mixer == "lstm":
            _, (h_n, _) = self.lstm(seq)
            state = h_n[-1]  # [N, hidden]
        else:
            state = self.mlp(seq.reshape(n, -1))
        if self.layer_context:
            # Groups of windows stack several end times of one layer along the neuron axis; a caller's history
            # is one time. Either way the mean over the rows given is the layer's mean state.
            state = torch.cat([state, state.mean(0, keepdim=True).expand_as(state)], -1)
        const = seq[:, -1, N_STEP_FEATURES:]  # [N, 6]
        z = self.neuron_out(torch.cat([state, const], -1))  # [N, head_hidden + H]
        bias, alpha = z[:, : self.head_hidden], z[:, self.head_hidden :][:, index]

        # The per-weight head, over blocks of neurons: the same numbers as one pass, but its [N, F, head_hidden]
        # intermediate stays a few MB instead of growing with the model (1.3 GB at 10M weights).
        block = max(1, HEAD_BLOCK_WEIGHTS // f)
        if n <= block:
            return self._head(history, scale, bias, alpha, index)
        return torch.cat(
            [
                self._head(
                    history[:, i : i + block],
                    scale[i : i + block],
                    bias[i : i + block],
                    alpha[i : i + block],
                    index,
                )
                for i in range(0, n, block)
            ],
            dim=1,
        )

    def _head(
        self,
        history: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        alpha: torch.Tensor,
        index: list[int],
    ) -> torch.Tensor:
        """The displacement [len(index), N, F] of a block of neurons at the trained horizons `index`, from their
        neuron states (bias, alpha [N, len(index)])."""
        c = history.shape[0]
        s = scale[:, None]  # [N, 1]
        slope, offset = line_fit(history)  # [N, F] each
        slope, offset = slope / s, offset / s
        x = (history[:-1] - history[-1]) / s  # [C-1, N, F]
        t = torch.arange(c, dtype=x.dtype, device=x.device) - (c - 1)  # snapshot times relative to the last
        resid = torch.cat([x, torch.zeros_like(x[:1])]) - offset - slope * t[:, None, None]  # [C, N, F]
        noise = resid.pow(2).mean(0).sqrt()  # [N, F]
        u = torch.cat(
            [x.permute(1, 2, 0), slope[..., None], offset[..., None], noise[..., None]], -1
        )  # [N,F,C+2]
        hid = F.gelu(self.head_in(u) + bias[:, None, :])  # [N, F, head_hidden]
        out = self.head_out(hid)  # [N, F, H]: every horizon (one small product), then only those asked for
        if len(index) < out.shape[-1]:
            out = out[..., index]
        line = offset[..., None] + slope[..., None] * self._h[index]  # [N, F, len(index)]
        out = out + alpha[:, None, :] * line
        return (out * scale[:, None, None]).permute(2, 0, 1)  # [H, N, F]
