"""`MultiScaleForecaster`: an LSTM over each neuron's long history that mixes per-weight trends of several lengths.

Why a long history. How far a weight will have moved 200 steps on is mostly its drift, and a drift read off
the last 40 steps of a minibatch-noisy path is mostly noise: on the digits/Adam runs of the meta corpus, a least-
squares fit of the smoothed displacement 20 snapshots ahead explains 0.23 of it from windows of the last 2-5
snapshots, and 0.35 with windows of up to 20 (`scripts/forecaster_ablations.py` measures the learned version).
So the forecaster reads up to `context` snapshots (20 by default: 190 steps at 10 steps apart) and at least
`min_context` (5): early in a run, and right after the Sleep callback starts, it works with what there is.

What it computes, per weight, in units of the neuron's motion (the RMS of its snapshot-to-snapshot steps):

    r_k = mean of the last k snapshots - the last one       (k in R_WINDOWS: where the recent path is centred)
    s_k = least-squares slope over the last k snapshots     (k in S_WINDOWS: the drift at several time scales)

(a window longer than the history given is cut to it), and the displacement h snapshots ahead is

    displacement_h = scale_n * sum_k a_{n,h,k} * feature_k   (+ an optional per-weight MLP correction)

with coefficients a_{n,h,k} = a0_{h,k} + (a linear map of the neuron's state). The neuron's state is an LSTM
over its snapshot-to-snapshot step features (`lstm.neuron_features`: how big, how consistent in direction, how
its norm changes), plus what is known about it (layer kind, fan-in) and how much history it was given. The
recurrence runs once per NEURON, and per weight the forecast is a handful of running sums and one weighted sum
of K features, so a jump of a 10M-weight model costs a few passes over its history.

It never reads how far training has got (step / max_steps), so a run's jumps do not depend on its budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sleepbot.errors import SleepbotError
from sleepbot.forecast.base import LearnedForecaster, neuron_scale, register_forecaster
from sleepbot.forecast.lstm import N_CONST_FEATURES, N_STEP_FEATURES, neuron_features

# Window lengths, in snapshots, of the per-weight features. r_2 and s_2 carry the same information (the last
# step), so the slopes start at 3.
R_WINDOWS = (2, 3, 5, 10, 20)
S_WINDOWS = (3, 5, 10, 20)
N_FEATURES = len(R_WINDOWS) + len(S_WINDOWS)
MIN_CONTEXT = 5  # the default least history: 40 steps at 10 steps apart, what the first forecaster read
# Weights per block of the optional per-weight MLP head (its [N, F, head_hidden] intermediate stays a few MB).
HEAD_BLOCK_WEIGHTS = 1 << 16


def trend_features(history: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """The per-weight features [r_k for R_WINDOWS] + [s_k for S_WINDOWS], each [N, F], in motion units.

    Computed from nested segment sums of the history read newest-first (x_i = history[C-1-i]), so that every
    window costs one pass over the snapshots it adds: mean_k = S0_k / k and the slope per snapshot (time running
    toward the newest) is -(S1_k - (k-1)/2 S0_k) / (k (k^2 - 1) / 12), with S0_k = sum_{i<k} x_i and
    S1_k = sum_{i<k} i x_i. Differences to the newest snapshot are taken first, so float32 keeps its digits.
    """
    c = history.shape[0]
    last = history[-1]
    s = scale[:, None]  # [N, 1]
    windows = sorted({min(k, c) for k in (*R_WINDOWS, *S_WINDOWS)})
    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    s0 = torch.zeros_like(last)
    s1 = torch.zeros_like(last)
    done = 1  # x_0 - last = 0 contributes nothing
    for k in windows:
        if k > done:
            seg = history[c - k : c - done] - last  # [k - done, N, F], newest last: i = k-1 .. done
            i = torch.arange(k - 1, done - 1, -1, dtype=history.dtype, device=history.device)
            s0 = s0 + seg.sum(0)
            s1 = s1 + torch.tensordot(i, seg, dims=([0], [0]))
            done = k
        sums[k] = (s0, s1)
    out = []
    for k in R_WINDOWS:
        k = min(k, c)
        out.append(sums[k][0] / (k * s))
    for k in S_WINDOWS:
        k = min(k, c)
        s0, s1 = sums[k]
        out.append(-(s1 - 0.5 * (k - 1) * s0) / (k * (k * k - 1) / 12.0 * s))
    return out


@register_forecaster("multiscale")
class MultiScaleForecaster(LearnedForecaster):
    """Per-weight trends over windows of 2 to 20 snapshots, mixed by coefficients an LSTM sets per neuron.

    Args:
        context: snapshots read at most (20: 190 steps at 10 steps apart).
        min_context: snapshots needed at least (trained on every length in between; default 5, or the context
            when it is shorter).
        horizons: snapshots ahead it is trained for, all at once.
        snapshot_every: steps between snapshots of its training data (recorded in checkpoints).
        hidden: the LSTM's state size, per neuron.
        head_hidden: width of an optional per-weight MLP over the same features (0: none, the mix alone).
        mixer: `lstm` (the recurrence over the neuron's steps), `mlp` (the mean of the step features through an
            MLP: no recurrence) or `none` (global coefficients a0 only: a linear forecaster learned on the corpus).
        layer_context: also read the mean state of the layer's neurons (NiNo's neuron interaction, cheapest form).
    """

    def __init__(
        self,
        context: int = 20,
        horizons: Sequence[int] = (5, 10, 20),
        snapshot_every: int | None = None,
        default_horizon: int | None = None,
        min_context: int | None = None,
        hidden: int = 64,
        head_hidden: int = 0,
        mixer: str = "lstm",
        layer_context: bool = False,
    ) -> None:
        if min_context is None:
            min_context = min(MIN_CONTEXT, int(context))
        super().__init__(context, horizons, snapshot_every, default_horizon, min_context)
        if mixer not in ("lstm", "mlp", "none"):
            raise SleepbotError(f"unknown multiscale forecaster mixer {mixer!r}; valid: lstm, mlp, none")
        self.hidden = int(hidden)
        self.head_hidden = int(head_hidden)
        self.mixer = mixer
        self.layer_context = bool(layer_context)
        n_h = len(self.horizons)
        n_in = N_STEP_FEATURES + N_CONST_FEATURES + 1  # + the share of the full context given
        self.a0 = nn.Parameter(torch.zeros(n_h, N_FEATURES))
        if mixer == "lstm":
            self.lstm = nn.LSTM(n_in, hidden, batch_first=True)
        elif mixer == "mlp":
            self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        if mixer != "none":
            state = hidden * (2 if self.layer_context else 1) + n_in
            self.coef = nn.Linear(state, n_h * N_FEATURES + self.head_hidden)
            with torch.no_grad():  # start from the global mix a0
                self.coef.weight.zero_()
                self.coef.bias.zero_()
        if self.head_hidden:
            self.head_in = nn.Linear(N_FEATURES, self.head_hidden, bias=False)
            self.head_out = nn.Linear(self.head_hidden, n_h)
            with torch.no_grad():
                self.head_out.weight.mul_(0.1)
                self.head_out.bias.zero_()

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "min_context": self.min_context,
            "hidden": self.hidden,
            "head_hidden": self.head_hidden,
            "mixer": self.mixer,
            "layer_context": self.layer_context,
        }

    def neuron_state(
        self, history: torch.Tensor, scale: torch.Tensor, kind: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-neuron coefficients [N, H, K] and head bias [N, head_hidden] from the neuron's step history."""
        c, n, _ = history.shape
        n_h = len(self.horizons)
        if self.mixer == "none":
            return self.a0.expand(n, n_h, N_FEATURES), None
        seq = neuron_features(history, scale, kind, None)  # [N, C-1, 11]
        given = torch.full((n, c - 1, 1), (c - 1) / (self.context - 1), device=history.device)
        seq = torch.cat([seq, given], -1)  # [N, C-1, 12]
        if self.mixer == "lstm":
            _, (h_n, _) = self.lstm(seq)
            state = h_n[-1]  # [N, hidden]
        else:
            state = self.mlp(seq).mean(1)
        if self.layer_context:
            # Groups of windows stack several end times of one layer along the neuron axis; a caller's history
            # is one time. Either way the mean over the rows given is the layer's mean state.
            state = torch.cat([state, state.mean(0, keepdim=True).expand_as(state)], -1)
        z = self.coef(torch.cat([state, seq[:, -1]], -1))  # [N, H*K + head_hidden]
        a = self.a0 + z[:, : n_h * N_FEATURES].reshape(n, n_h, N_FEATURES)
        return a, z[:, n_h * N_FEATURES :]

    def forward(self, history: torch.Tensor, kind: str, progress: torch.Tensor | None) -> torch.Tensor:
        return self.forward_at(history, kind, progress, range(len(self.horizons)))

    def forward_at(
        self, history: torch.Tensor, kind: str, progress: torch.Tensor | None, index: Sequence[int]
    ) -> torch.Tensor:
        index = list(index)
        c, n, f = history.shape
        if not self.min_context <= c <= self.context:
            raise SleepbotError(
                f"the multiscale forecaster reads {self.min_context} to {self.context} snapshots, got {c}"
            )
        scale = neuron_scale(history)  # [N]
        a, head_bias = self.neuron_state(history, scale, kind)  # [N, H, K], [N, head_hidden]
        a = a[:, index]  # [N, len(index), K]: the horizons asked for
        feats = trend_features(history, scale)  # K x [N, F]
        out = torch.zeros(len(index), n, f, dtype=history.dtype, device=history.device)
        for k, x in enumerate(feats):
            out += a[:, :, k].T[:, :, None] * x  # [len(index), N, F]
        if self.head_hidden:
            out = out + self._head(feats, head_bias)[index]
        return out * scale[None, :, None]

    def _head(self, feats: list[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
        """The per-weight MLP correction [H, N, F], over blocks of neurons (bounded memory)."""
        n, f = feats[0].shape
        block = max(1, HEAD_BLOCK_WEIGHTS // f)
        parts = []
        for i in range(0, n, block):
            u = torch.stack([x[i : i + block] for x in feats], -1)  # [b, F, K]
            hid = F.gelu(self.head_in(u) + bias[i : i + block, None, :])  # [b, F, head_hidden]
            parts.append(self.head_out(hid).permute(2, 0, 1))  # [H, b, F]
        return torch.cat(parts, dim=1)
