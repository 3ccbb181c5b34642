"""Where a forecaster's jump lands on a recorded no-sleep run, against the true future and its degraded versions.

    python scripts/jump_diagnostics.py RUN.h5 [--forecaster F.pt] [--steps 50 100 150 200] [--horizon 20] \
        [--json out.json]

At each step t it replays the run's network on its own training and validation data (sleepbot.forecast.jumploss,
so the run file alone suffices) at: the weights now; the true future w(t + horizon snapshots) (the oracle); the
forecast; the true displacement D shrunk per layer to the forecast's projection on it; D plus isotropic noise
with each neuron's forecast-error size (a forecast of the same R2_disp whose errors are harmless); and the weights
now plus the forecast's error alone. It prints the training loss and validation accuracy of each, and each
layer's R2_disp and cosine. Used for the README's "Why a better R2 is not a faster run".
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
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
