"""What sleeping costs: seconds per jump for each strategy and model size, and the step-time overhead of a whole
run with sleep against the same run without.

1. Jump cost. A real Trainer fits each model for a few steps with `Sleep(strategy, every_n_steps=k)`; every
   sleep's `seconds` (snapshot -> propose -> NaN check -> write -> optimizer state, on rank 0) is read from
   `Sleep.events`; the median over the sleeps is reported. Models: digits / small_cnn (about 6k weights),
   mnist1d / cnn1d (about 18k) and an MLP of about 1M weights on mnist1d.
2. Run overhead. digits / small_cnn / Adam for 500 steps with no sleep, `linear` and (when a forecaster is
   available) `learned` at their defaults, interleaved `--repeats` times: the median fit time of each arm over
   none's, and the fraction of the fit spent inside Sleep (the callback times itself, so this one does not
   depend on what else the machine is doing).

    python scripts/bench_sleep.py --out reports/bench_sleep.json [--forecaster FILE] [--repeats 3]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from sleepbot.config import RunConfig, build_config
from sleepbot.data import make_datamodule
from sleepbot.errors import SleepbotError
from sleepbot.models import Classifier
from sleepbot.sleep import Sleep
from sleepbot.training import run_training


class WideMLP(pl.LightningModule):
    """About 1M weights: 40 -> 1000 -> 960 -> 10 on MNIST-1D (the size the forecaster issue targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(40, 1000), nn.ReLU(), nn.Linear(1000, 960), nn.ReLU(), nn.Linear(960, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _models() -> dict[str, tuple[pl.LightningModule, Any]]:
    out = {}
    for name, data, arch in (
        ("digits/small_cnn", "digits", "small_cnn"),
        ("mnist1d/cnn1d", "mnist1d", "cnn1d"),
    ):
        cfg = build_config(RunConfig, {"data": {"name": data}})
        dm = make_datamodule(cfg.data)
        out[name] = (Classifier(arch=arch, input_shape=dm.input_shape, num_classes=dm.num_classes), dm)
    dm = make_datamodule(build_config(RunConfig, {"data": {"name": "mnist1d"}}).data)
    out["mnist1d/mlp-1M"] = (WideMLP(), dm)
    return out


def jump_cost(strategies: list[tuple[str, dict[str, Any]]], sleeps: int = 5) -> list[dict[str, Any]]:
    rows = []
    for model_name, (module, dm) in _models().items():
        n_weights = sum(p.numel() for p in module.parameters())
        init = {k: v.clone() for k, v in module.state_dict().items()}
        for strategy, options in strategies:
            module.load_state_dict(init)
            try:
                cb = Sleep(strategy, **options)
            except SleepbotError as e:
                print(f"skip {strategy}: {e}", file=sys.stderr)
                continue
            steps = cb.every_n_steps * sleeps
            trainer = pl.Trainer(
                max_steps=steps,
                accelerator="cpu",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                callbacks=[cb],
            )
            trainer.fit(module, train_dataloaders=dm.train_dataloader())
            secs = [e["seconds"] for e in cb.events if not e["reason"].startswith("history")]
            rows.append(
                {
                    "model": model_name,
                    "weights": n_weights,
                    "strategy": strategy,
                    "options": {k: v for k, v in options.items() if k != "forecaster"},
                    "sleeps": len(secs),
                    "median_seconds_per_jump": statistics.median(secs) if secs else None,
                }
            )
            print(
                f"{model_name:<18} {n_weights:>9,d} weights  {strategy:<17} "
                f"{rows[-1]['median_seconds_per_jump'] * 1e3:8.2f} ms per jump",
                flush=True,
            )
    return rows


def run_overhead(arms: dict[str, dict[str, Any]], repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {a: [] for a in arms}
    asleep: dict[str, list[float]] = {a: [] for a in arms}  # seconds inside Sleep, measured by the callback
    for rep in range(repeats):
        for arm, sleep in arms.items():  # interleaved, so a slow spell of the machine hits every arm alike
            cfg = build_config(
                RunConfig,
                {
                    "seed": rep,
                    "trainer": {"max_steps": 500, "logger": "none", "progress_bar": False},
                    "model": {"lr": 1e-2},
                    "sleep": sleep,
                },
            )
            r = run_training(cfg, test=False, quiet=True)
            times[arm].append(r.fit_seconds)
            asleep[arm].append(sum(e["seconds"] for e in r.events))
    base = statistics.median(times["none"])
    out = {
        arm: {
            "fit_seconds": t,
            "median": statistics.median(t),
            "ratio": statistics.median(t) / base,
            "asleep_seconds": asleep[arm],
            "asleep_fraction": statistics.median(a / f for a, f in zip(asleep[arm], t)),
        }
        for arm, t in times.items()
    }
    for arm, row in out.items():
        print(
            f"500 steps digits/small_cnn, {arm:<8}: median fit {row['median']:.2f}s, x{row['ratio']:.3f} of none; "
            f"{100 * row['asleep_fraction']:.2f}% of the fit inside Sleep"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/bench_sleep.json")
    p.add_argument("--forecaster", help="forecaster checkpoint for `learned` (default: the shipped one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as in the parallel experiments)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    learned = {"forecaster": args.forecaster} if args.forecaster else {}
    strategies = [
        ("linear", {"every_n_steps": 10, "snapshot_every": 2}),
        ("noise", {"every_n_steps": 10}),
        ("square_normalize", {"every_n_steps": 10}),
        ("lookahead", {}),
        ("random", {"every_n_steps": 10, "snapshot_every": 2}),
        ("learned", {**learned}),
    ]
    t0 = time.time()
    result: dict[str, Any] = {"threads": args.threads, "jump_cost": jump_cost(strategies)}
    arms = {"none": {"strategy": "none"}, "linear": {"strategy": "linear"}}
    try:
        Sleep("learned", **learned)
        arms["learned"] = {"strategy": "learned", "options": dict(learned)}
    except SleepbotError as e:
        print(f"no learned arm in the overhead test: {e}", file=sys.stderr)
    result["run_overhead"] = run_overhead(arms, args.repeats)
    result["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
