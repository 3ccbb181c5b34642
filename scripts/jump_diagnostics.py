"""Where a forecaster's jump lands on a recorded no-sleep run, against the true future and its degraded versions.

    python scripts/jump_diagnostics.py RUN.h5 [--forecaster F.pt] [--steps 50 100 150 200] [--horizon 20] \
        [--json out.json]

At each step t it replays the run's network on its own training and validation data (sleepbot.forecast.jumploss,
so the run file alone suffices) at: the weights now; the true future w(t + horizon snapshots) (the oracle); the
forecast; the true displacement D shrunk per layer to the forecast's projection on it; D plus isotropic noise
with each neuron's forecast-error size (a forecast of the same R2_disp whose errors are harmless); and the weights
now plus the forecast's error alone. It prints the training loss and validation accuracy of each, and each
layer's R2_disp and cosine. Used for the README's "Why a better R2 is not a faster run".

With --hessian-top K it also finds the K steepest directions at w(t) (the top eigenvectors of the training loss's
Hessian over the whole training split, by scipy's Lanczos `eigsh` on exact Hessian-vector products in float64:
about a minute per step for K = 40 on 2 cores) and scores the forecast and the true future with their components
along those directions removed, and prints how much of each displacement, and of the forecast's error, lies in
them. It answers: is the forecast's harm in a few steep directions, and what is left of its gain without them?

With --fisher-filter C it also scores the forecast damped per weight by the diagonal of the empirical Fisher at
w(t) (the mean squared per-example gradient over the training split, what Adam's second moment estimates):
d_i / (1 + C F_i / mean F over the layer). It answers: does a curvature filter a jump could afford (Adam's v is at
hand) find the same directions?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a recorded run (sleepbot collect, or a compare run's .h5)")
    p.add_argument("--forecaster", default=None, help="checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 150, 200])
    p.add_argument(
        "--horizon", type=int, default=20, help="snapshots ahead (the forecast's and the oracle's)"
    )
    p.add_argument("--seed", type=int, default=0, help="of the isotropic noise")
    p.add_argument(
        "--hessian-top",
        type=int,
        nargs="*",
        default=[],
        metavar="K",
        help="also remove the top-K Hessian directions from the forecast and the future (e.g. 10 40)",
    )
    p.add_argument(
        "--fisher-filter",
        type=float,
        nargs="*",
        default=[],
        metavar="C",
        help="also damp the forecast by the Fisher diagonal with these strengths (e.g. 1 10 100)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from sleepbot.config import RunConfig, build_config
    from sleepbot.data import make_datamodule
    from sleepbot.forecast import load_forecaster
    from sleepbot.forecast.jumploss import RunModel
    from sleepbot.forecast.windows import scan_runs
    from sleepbot.store import RunFile

    (info,) = scan_runs([args.run])
    model = RunModel(info)
    with RunFile(args.run) as f:
        steps = [int(s) for s in f.snapshot_steps]
        w = {layer.name: torch.as_tensor(f.weights(layer.name)) for layer in info.layers}  # [S, N, F]
        cfg = build_config(RunConfig, f.attrs["config"])
    xv, yv = make_datamodule(cfg.data, seed=cfg.seed).tensors["val"]
    fc = load_forecaster(args.forecaster)
    kinds = {layer.name: layer.kind for layer in info.layers}
    every = torch.arange(len(model.y))
    gen = torch.Generator().manual_seed(args.seed)

    def score(mats: dict[str, torch.Tensor]) -> dict[str, float]:
        with torch.no_grad():
            loss = float(model.loss(mats, every))
            logits = torch.func.functional_call(model.module, model.params(mats), (xv,))
        return {"train_loss": loss, "val_acc": float((logits.argmax(1) == yv).float().mean())}

    rows = []
    for t in args.steps:
        i = steps.index(t)
        j = min(i + args.horizon, len(steps) - 1)
        now = {k: v[i] for k, v in w.items()}
        c = min(i + 1, fc.context)
        fcst = {k: fc.predict(v[i - c + 1 : i + 1], args.horizon, kind=kinds[k]) for k, v in w.items()}
        d = {k: w[k][j] - now[k] for k in w}
        err = {k: fcst[k] - now[k] - d[k] for k in w}
        proj = {k: float(((fcst[k] - now[k]) * d[k]).sum() / d[k].pow(2).sum().clamp_min(1e-30)) for k in w}
        noise = {
            k: torch.randn(d[k].shape, generator=gen) * err[k].pow(2).mean(1, keepdim=True).sqrt() for k in w
        }
        points = {
            "now": now,
            f"oracle (step {steps[j]})": {k: w[k][j] for k in w},
            "forecast": fcst,
            "D x the forecast's projection": {k: now[k] + proj[k] * d[k] for k in w},
            "D + isotropic noise of the error's size": {k: now[k] + d[k] + noise[k] for k in w},
            "now + the forecast's error": {k: now[k] + err[k] for k in w},
        }
        if args.fisher_filter:
            fisher = fisher_diagonal(model, now, every)
            for c in args.fisher_filter:
                points[f"forecast damped by the Fisher diagonal, C = {c:g}"] = {
                    k: now[k] + (fcst[k] - now[k]) / (1 + c * fisher[k] / fisher[k].mean().clamp_min(1e-30))
                    for k in w
                }
        steep = {}
        if args.hessian_top:
            vecs = top_hessian_directions(model, now, max(args.hessian_top), every)  # [P, K] float64
            flat = lambda m: torch.cat([m[k].reshape(-1).double() for k in w])  # noqa: E731
            df, do, de = flat(fcst) - flat(now), flat(d), flat(err)
            for k in sorted(set(args.hessian_top)):
                v = vecs[:, :k]
                for name, x in (("forecast", df), ("oracle", do)):
                    points[f"{name} without the top {k} Hessian directions"] = unflat(
                        flat(now) + x - v @ (v.T @ x), w
                    )
                steep[k] = {
                    name: float((v.T @ x).pow(2).sum() / x.pow(2).sum().clamp_min(1e-300))
                    for name, x in (("forecast", df), ("true displacement", do), ("forecast error", de))
                }
        row = {
            "step": t,
            "r2_disp": {k: 1 - float(err[k].pow(2).sum() / d[k].pow(2).sum()) for k in w},
            "cos": {
                k: float(((fcst[k] - now[k]) * d[k]).sum() / ((fcst[k] - now[k]).norm() * d[k].norm()))
                for k in w
            },
            "points": {},
        }
        print(f"step {t}: R2_disp " + ", ".join(f"{k} {v:.2f}" for k, v in row["r2_disp"].items()))
        for name, mats in points.items():
            s = score(mats)
            row["points"][name] = s
            print(f"  {name:42s} train loss {s['train_loss']:.4f}  val acc {s['val_acc']:.4f}")
        for k, shares in steep.items():
            print(
                f"  share of the squared norm in the top {k} Hessian directions: "
                + ", ".join(f"{n} {v:.4f}" for n, v in shares.items())
            )
        row["steep_share"] = steep
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def unflat(x: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: [N, F] float32} from one flat vector in the order of `like`'s layers."""
    out, o = {}, 0
    for k, v in like.items():
        n = v[0].numel()
        out[k] = x[o : o + n].reshape(v.shape[1:]).to(v.dtype)
        o += n
    return out


def fisher_diagonal(model, now: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: [N, F]} the mean over examples `idx` of each per-example gradient squared, at the matrices `now`."""
    import torch.nn.functional as F

    def one(mats, x, y):
        logits = torch.func.functional_call(model.module, model.params(mats), (x[None],))
        return F.cross_entropy(logits, y[None])

    per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    out = {k: torch.zeros_like(v) for k, v in now.items()}
    for i in range(0, len(idx), 256):
        b = idx[i : i + 256]
        grads = per_example(now, model.x[b], model.y[b])
        for k in out:
            out[k] += grads[k].pow(2).sum(0)
    return {k: v / len(idx) for k, v in out.items()}


def top_hessian_directions(model, now: dict[str, torch.Tensor], k: int, idx: torch.Tensor) -> torch.Tensor:
    """The top-k eigenvectors [P, k] (largest eigenvalue first) of the Hessian of the mean training loss on
    examples `idx` at the neuron matrices `now`, in the flat order of `now`'s layers."""
    import copy

    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    m64 = copy.copy(model)
    m64.module = copy.deepcopy(model.module).double()
    m64.other = {n: t.double() for n, t in model.other.items()}
    m64.x = model.x.double()
    names = list(now)
    shapes = {n: now[n].shape for n in names}
    sizes = {n: now[n].numel() for n in names}

    def loss(x: torch.Tensor) -> torch.Tensor:
        mats, o = {}, 0
        for n in names:
            mats[n] = x[o : o + sizes[n]].reshape(shapes[n])
            o += sizes[n]
        return m64.loss(mats, idx)

    x0 = torch.cat([now[n].reshape(-1).double() for n in names])
    grad = torch.func.grad(loss)

    def hvp(v: np.ndarray) -> np.ndarray:
        return torch.func.jvp(grad, (x0,), (torch.as_tensor(v, dtype=torch.float64).reshape(-1),))[1].numpy()

    n = x0.numel()
    vals, vecs = eigsh(LinearOperator((n, n), matvec=hvp, dtype=np.float64), k=k, which="LA", tol=1e-3)
    order = np.argsort(-vals)
    return torch.as_tensor(np.ascontiguousarray(vecs[:, order]))


if __name__ == "__main__":
    raise SystemExit(main())
