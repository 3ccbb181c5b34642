"""What the optimizer's state at a snapshot says about where the weights go next, and whether a forecaster gains by
reading it (issue 11: "what it reads ... the optimizer's state at the snapshot, such as Adam's m/sqrt(v) or the
momentum buffer").

`optimizer_step` turns a recorded state (`collect` with `record.optimizer_state: true`) into the update it points
to, in weight units: the update the optimizer applied last, recomputed from its state,

    Adam:  -lr_t * m_hat / (sqrt(v_hat) + eps)      (m_hat, v_hat bias-corrected at the snapshot's step)
    AdamW: the same, plus its decoupled decay -lr_t * weight_decay * w
    SGD with momentum: -lr_t * momentum_buffer

with lr_t the scheduled lr at that step (the run's recorded `metrics/lr`). Snapshots are 10 steps apart, so this one
step, smoothed by the optimizer's own averages (Adam's m, the momentum buffer: about 10 steps of memory at beta
0.9), is a finer reading of the run's velocity than the snapshot differences. `state_ablation` asks, on recorded
runs, how much of the future displacement a linear forecaster explains from the weight history alone (the 9
multiscale trend features of `sleepbot.forecast.multiscale`), from the history plus this step, and from the history
plus the layer's low-rank version of its slopes (the cheapest neuron interaction: what the layer's neurons move
along together, denoised by a truncated SVD of the layer's [neurons, inputs] slope matrix), and from the history
plus the step the optimizer would take with the gradient of the whole training split at the snapshot (an input
beyond the weights, replayed from the run's file; see `run_windows`): one pooled
least-squares mix per optimizer and horizon, fitted on some runs and scored (R2_disp, in weight units, as
`evaluate-forecaster` scores) on the others. It is the `none` mixer of the multiscale forecaster with more
features, so what it finds bounds nothing from above, but it says whether the state, the layer or the gradient
carries information that the neuron's own history lacks. `scripts/state_ablation.py` prints the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from sleepbot.errors import SleepbotError
from sleepbot.forecast.base import neuron_scale
from sleepbot.forecast.multiscale import N_FEATURES, R_WINDOWS, trend_features

# The optimizers whose recorded per-weight state is read here (and replayed by `jumploss.RunModel.settle`), and
# the state each keeps.
STATE_KEYS = {
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "momentum": ("momentum_buffer",),
}
STATE_OPTIMIZERS = tuple(STATE_KEYS)


def recorded_state_keys(f: Any, path: str, layers: Iterable[str], use: str) -> tuple[str, ...]:
    """The state keys of the optimizer that trained the open run file `f`, once every layer in `layers` is checked
    to have recorded them; a one-line error naming what `use` (e.g. "the state ablation") needs otherwise."""
    opt = str(f.attrs.get("optimizer", ""))
    keys = STATE_KEYS.get(opt)
    if keys is None:
        raise SleepbotError(f"{path!r} was trained with {opt!r}; {use} reads {', '.join(STATE_OPTIMIZERS)}")
    for layer in layers:
        have = f.layer_info(layer)["arrays"]
        if any(f"optim/{k}" not in have for k in keys):
            raise SleepbotError(
                f"{path!r} holds no optimizer state for {layer} (arrays: {', '.join(have)}); collect with "
                f"record.optimizer_state: true"
            )
    return keys


# Columns of a window's X: the 9 trend features (r_k then s_k), the state's step, the slopes s_k replaced by their
# best low-rank approximation over the layer's neurons, and the step the optimizer would take with the gradient
# of the whole training split (zeros unless asked for).
_SLOPES = list(range(len(R_WINDOWS), N_FEATURES))  # s_k for k in S_WINDOWS
STATE_COLUMN = _STATE = N_FEATURES  # the state's step
_LAYER = list(range(N_FEATURES + 1, N_FEATURES + 1 + len(_SLOPES)))  # the slopes' low-rank layer versions
GRADIENT_COLUMN = _GRAD = N_FEATURES + 1 + len(_SLOPES)
N_COLUMNS = _GRAD + 1
_HISTORY = list(range(N_FEATURES))
FEATURE_SETS = {
    "history": _HISTORY,
    "history+state": _HISTORY + [_STATE],
    "state alone": [_STATE],
    "history+layer": _HISTORY + _LAYER,
    "history+gradient": _HISTORY + [_GRAD],
    "history+state+gradient": _HISTORY + [_STATE, _GRAD],
}
GRADIENT_SETS = ("history+gradient", "history+state+gradient")


def optimizer_step(
    optimizer: str,
    state: dict[str, torch.Tensor],
    *,
    lr: float,
    step: int,
    weights: torch.Tensor | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """The update the optimizer applied last, recomputed from its state after `step` updates (tested equal to
    torch's Adam and SGD+momentum; AdamW's decay is taken at `weights`, the weights after the update).

    Args:
        optimizer: `adam`, `adamw` or `momentum` (sleepbot's names, as recorded in a run's attrs).
        state: the recorded per-parameter state: `exp_avg` and `exp_avg_sq` (Adam, AdamW) or `momentum_buffer`.
        lr: the lr in force at that step.
        step: updates taken so far (Adam's bias correction); 0 gives a zero step.
        weights: the weights at that step (AdamW's decay), same shape as the state.
    """
    if optimizer not in STATE_OPTIMIZERS:
        raise SleepbotError(
            f"no optimizer step can be read from the state of {optimizer!r}; valid: {', '.join(STATE_OPTIMIZERS)}"
        )
    missing = [k for k in STATE_KEYS[optimizer] if k not in state]
    if missing:
        raise SleepbotError(
            f"the {optimizer} state lacks {', '.join(missing)}; record it with record.optimizer_state: true"
        )
    if optimizer == "momentum":
        return -lr * state["momentum_buffer"]
    if step < 1:
        return torch.zeros_like(state["exp_avg"])
    b1, b2 = betas
    m_hat = state["exp_avg"] / (1 - b1**step)
    v_hat = state["exp_avg_sq"] / (1 - b2**step)
    out = -lr * m_hat / (v_hat.sqrt() + eps)
    if optimizer == "adamw" and weight_decay:
        if weights is None:
            raise SleepbotError("adamw's step needs the weights (its decoupled weight decay)")
        out = out - lr * weight_decay * weights
    return out


def run_windows(
    path: str,
    horizons: Sequence[int],
    context: int = 20,
    stride: int = 2,
    smooth: int = 5,
    layer_rank: int = 2,
    gradient: bool = False,
) -> tuple[str, list[tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]]]:
    """(optimizer, windows) of one recorded run: per window, X [weights, 15] (the 9 trend features, the
    optimizer's step, the 4 slopes at rank `layer_rank` over the layer, and with `gradient` the step of the whole
    training split's gradient, else zeros; every column in weight units) and per horizon h the true displacement at
    t + h and its smoothed version (the mean of the `smooth` snapshots up to t + h, minus w(t)), each [weights].
    Windows end every `stride` snapshots from the `context`-th on, while t + h stays inside the run for the largest
    h.

    The gradient step replays the run's network on its training split at w(t) (`jumploss.RunModel`; one forward and
    backward pass over every training example per window, what a run could not afford at each sleep): -lr g for
    SGD+momentum, and for Adam and AdamW -lr g / (sqrt(v_hat) + eps) with the run's recorded v, clamped to Adam's
    bound on its own step, lr (1 - beta1) / sqrt(1 - beta2) per weight (Kingma & Ba 2015, section 2.1): where v is
    tiny, as for a unit that has not fired for a while, the quotient would be huge. Betas are torch's defaults, which
    sleepbot's `adam` and `adamw` use."""
    from sleepbot.store import RunFile

    with RunFile(path) as f:
        layers = list(f.layers)
        keys = recorded_state_keys(f, path, layers, "the state ablation")
        opt = str(f.attrs["optimizer"])
        model = (f.attrs.get("config") or {}).get("model", {})
        betas = (0.9, 0.999)
        wd = float(model.get("weight_decay", 0.0)) if opt == "adamw" else 0.0
        steps = np.asarray(f.snapshot_steps)
        lr_by_step = np.asarray(f.metrics["lr"])  # [T], the lr in force at each step
        data = []
        for layer in layers:
            w = torch.as_tensor(f.weights(layer)).double()
            st = {k: torch.as_tensor(f.array(layer, f"optim/{k}")).double() for k in keys}
            data.append((w, st))
    h_max = max(horizons)
    n_snap = data[0][0].shape[0]
    ends = list(range(context - 1, n_snap - h_max, stride))
    grads = _gradients(path, layers, [w for w, _ in data], ends) if gradient else None
    out = []
    for li, (w, st) in enumerate(data):
        for t in ends:
            hist = w[t - context + 1 : t + 1]
            scale = neuron_scale(hist)  # [N]
            k = int(steps[t])
            lr = float(lr_by_step[min(k, len(lr_by_step) - 1)])
            u = optimizer_step(
                opt,
                {n: v[t] for n, v in st.items()},
                lr=lr,
                step=k,
                weights=w[t],
                betas=betas,
                weight_decay=wd,
            )
            feats = [x * scale[:, None] for x in trend_features(hist, scale)] + [u]
            feats += [_low_rank(feats[i], layer_rank) for i in _SLOPES]
            if grads is None:
                feats.append(torch.zeros_like(u))
            elif opt == "momentum":
                feats.append(-lr * grads[t][li])
            else:
                v_hat = st["exp_avg_sq"][t] / (1 - betas[1] ** max(k, 1))
                bound = lr * (1 - betas[0]) / (1 - betas[1]) ** 0.5
                feats.append((-lr * grads[t][li] / (v_hat.sqrt() + 1e-8)).clamp(-bound, bound))
            x = torch.stack(feats, -1).reshape(-1, N_COLUMNS)
            ys = {}
            for h in horizons:
                point = w[t + h] - w[t]
                sm = w[max(t + h - smooth + 1, t + 1) : t + h + 1].mean(0) - w[t]
                ys[h] = (point.reshape(-1), sm.reshape(-1))
            out.append((x, ys))
    return opt, out


def _gradients(
    path: str, layers: list[str], weights: list[torch.Tensor], ends: list[int]
) -> dict[int, list[torch.Tensor]]:
    """{snapshot t: [the mean training loss's gradient at w(t), per layer, [N, F] float64]}, over the whole
    training split of the run (its file's config rebuilds the network and the data)."""
    from sleepbot.forecast.jumploss import RunModel
    from sleepbot.forecast.windows import scan_runs

    (info,) = scan_runs([path])
    model = RunModel(info)
    every = torch.arange(len(model.y))
    out = {}
    for t in ends:
        now = {name: w[t].float().requires_grad_(True) for name, w in zip(layers, weights)}
        loss = model.loss(now, every)
        out[t] = [g.double() for g in torch.autograd.grad(loss, list(now.values()))]
    return out


def _low_rank(m: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of a layer's [N, F] matrix (truncated SVD): what the layer's neurons move
    along together, the rest (each neuron's own, mostly noise) dropped."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]) @ vh[:r]


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least squares from the normal equations a x = b, rank-deficient allowed: the trend features are linearly
    dependent (s_3 = a mix of r_2 and r_3), so a is singular. Columns are equilibrated, then the minimum-norm
    solution is taken by SVD (gelsd)."""
    d = a.diagonal().clamp_min(1e-300).rsqrt()  # [K]
    sol = torch.linalg.lstsq(a * d[:, None] * d[None, :], (b * d)[:, None], rcond=1e-12, driver="gelsd")
    return sol.solution[:, 0] * d


def _r2(stat: list, cols: list[int], coef: torch.Tensor) -> float:
    """1 - ||X c - y||^2 / ||y||^2 from the sufficient statistics [X'X, X'y, y'y] (R2_disp: persistence scores 0)."""
    xtx, xty, yty = stat[0][cols][:, cols], stat[1][cols], stat[2]
    err = yty - 2.0 * float(coef @ xty) + float(coef @ xtx @ coef)
    return 1.0 - err / max(yty, 1e-300)


def state_ablation(
    train: Iterable[str],
    test: Iterable[str],
    horizons: Sequence[int] = (2, 5, 20),
    context: int = 20,
    stride: int = 2,
    layer_rank: int = 2,
    gradient: bool = True,
) -> dict[str, Any]:
    """Per optimizer, horizon, target (point / smooth) and feature set (`history`, `history+state`, `state
    alone`, `history+layer`, and with `gradient` `history+gradient` and `history+state+gradient`): the pooled
    least-squares mix fitted on `train` runs, its R2_disp on the `test` runs and its R2 on the training windows
    themselves (`fit_r2`: adding a column can never lower it).

    Each run is read once and reduced to sufficient statistics (X'X, X'y and y'y per optimizer, split, horizon and
    target, in float64), so memory does not grow with the corpus: a mix c scores err = y'y - 2 c'X'y + c'X'X c.

    Returns {"rows": [{optimizer, horizon, target, features, r2, fit_r2, train_runs, test_runs, windows}], ...}.
    """
    stats: dict[tuple[str, str, int, int], list] = {}  # (opt, split, h, target) -> [X'X, X'y, y'y]
    runs: dict[tuple[str, str], int] = {}
    windows: dict[tuple[str, str], int] = {}
    for split, paths in (("train", train), ("test", test)):
        for p in paths:
            opt, ws = run_windows(p, horizons, context, stride, layer_rank=layer_rank, gradient=gradient)
            runs[(opt, split)] = runs.get((opt, split), 0) + 1
            windows[(opt, split)] = windows.get((opt, split), 0) + len(ws)
            for x, ys in ws:
                xtx = x.T @ x
                for h in horizons:
                    for ti in (0, 1):
                        y = ys[h][ti]
                        acc = stats.setdefault((opt, split, h, ti), [0.0, 0.0, 0.0])
                        acc[0] = acc[0] + xtx
                        acc[1] = acc[1] + x.T @ y
                        acc[2] = acc[2] + float(y @ y)
    rows = []
    for opt in sorted({o for o, _ in runs}):
        if (opt, "train") not in runs or (opt, "test") not in runs:
            raise SleepbotError(f"the state ablation needs {opt} runs on both sides of the split")
        for h in horizons:
            for ti, target in enumerate(("point", "smooth")):
                tr, te = stats[(opt, "train", h, ti)], stats[(opt, "test", h, ti)]
                for name, cols in FEATURE_SETS.items():
                    if name in GRADIENT_SETS and not gradient:
                        continue
                    coef = _solve(tr[0][cols][:, cols], tr[1][cols])
                    rows.append(
                        {
                            "optimizer": opt,
                            "horizon": h,
                            "target": target,
                            "features": name,
                            "r2": _r2(te, cols, coef),
                            "fit_r2": _r2(tr, cols, coef),
                            "coef": [float(c) for c in coef],
                            "train_runs": runs[(opt, "train")],
                            "test_runs": runs[(opt, "test")],
                            "windows": windows[(opt, "test")],
                        }
                    )
    return {
        "horizons": list(horizons),
        "context": context,
        "stride": stride,
        "layer_rank": layer_rank,
        "rows": rows,
    }
