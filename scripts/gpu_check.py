"""GPU check: recording and sleep on CUDA are correct, and what they cost there.

    python scripts/gpu_check.py [--out gpu_check.json] [--steps 300]

Checks (each reported pass/fail with its numbers, one failing check does not stop the rest):
  1. a CUDA run of small_cnn on digits with TrajectoryRecorder + Sleep("linear") completes; the file's last
     snapshot equals the model's weights at that step, and the sleep events reach the file;
  2. every sleep strategy (but oracle, which needs a recorded run) jumps a CUDA model without error, and its
     proposal on CUDA matches the same proposal computed on CPU from the same history;
  3. throughput on a ~1M-weight MLP: steps/s with no callback, the default recorder, snapshots every step,
     and recorder + Sleep(linear); time of one learned jump of all 1M weights on the GPU and on the CPU.
Runs on CPU too (then it only measures), so it can be tried before spending device time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from sleepbot.config import DataConfig
from sleepbot.data import make_datamodule
from sleepbot.models import Classifier, register_arch
from sleepbot.neurons import layer_kind, neuron_layers, neuron_matrix
from sleepbot.recording import TrajectoryRecorder
from sleepbot.sleep import STRATEGIES, Sleep
from sleepbot.store import RunFile


@register_arch("mlp_1m")
def mlp_1m(input_shape, num_classes):
    """64 -> 1000 -> 1000 -> classes: about 1.08M weights."""
    flat = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(flat, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, num_classes),
    )


def trainer(device: str, steps: int, callbacks) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        val_check_interval=50,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def fit(device: str, arch: str, steps: int, callbacks, seed: int = 0) -> tuple[Classifier, float]:
    pl.seed_everything(seed, verbose=False)
    dm = make_datamodule(DataConfig(batch_size=64), seed=seed)
    model = Classifier(
        arch=arch, input_shape=dm.input_shape, num_classes=dm.num_classes, lr=1e-3, max_steps=steps
    )
    t = trainer(device, steps, callbacks)
    t0 = time.perf_counter()
    t.fit(model, datamodule=dm)
    if device == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


def check_recording_and_sleep(device: str, tmp: Path, steps: int) -> dict:
    path = tmp / "cuda_run.h5"
    rec = TrajectoryRecorder(path, snapshot_every=10)
    # no jump at the last step: the recorder snapshots before the Sleep callback jumps, so a jump there would
    # (rightly) leave the model ahead of the file's last snapshot
    sleep = Sleep("linear", every_n_steps=50, horizon=5, stop_step=steps)
    model, seconds = fit(device, "small_cnn", steps, [rec, sleep])
    with RunFile(path) as run:
        last = int(run.snapshot_steps[-1])
        diffs = {}
        for name, layer in neuron_layers(model).items():
            stored = run.weights(name, snapshots=slice(-1, None))[0]
            diffs[name] = float(np.abs(stored - neuron_matrix(layer).cpu().numpy()).max())
        n_events = len(run.events())
        status = run.status
    ok = (
        status == "complete"
        and last == steps
        and max(diffs.values()) == 0.0
        and n_events == len(sleep.events) > 0
    )
    return {
        "ok": ok,
        "status": status,
        "last_snapshot_step": last,
        "max_abs_diff_file_vs_model": max(diffs.values()),
        "events_in_file": n_events,
        "events_in_callback": len(sleep.events),
        "accepted": sum(bool(e.get("accepted")) for e in sleep.events),
        "seconds": seconds,
    }


def check_strategies(device: str) -> dict:
    from sleepbot.sleep.base import LayerContext, make_strategy

    out = {}
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    base = neuron_matrix(layer)  # [16, 33]
    drift = torch.randn_like(base) * 0.01
    history = torch.stack([base + i * drift + 1e-3 * torch.randn_like(base) for i in range(6)])  # [6, 16, 33]
    for name in STRATEGIES:
        if name in ("oracle", "none"):
            continue
        row = {}
        try:
            props = {}
            for dev in ("cpu", device):
                strat = make_strategy(name)
                gen = torch.Generator(device=dev).manual_seed(0)
                ctx = LayerContext(
                    layer="l",
                    kind=layer_kind(layer),
                    step=50,
                    steps=torch.arange(0, 60, 10),
                    snapshot_every=10,
                    progress=0.1,
                    generator=gen,
                )
                h = history.to(dev)
                props[dev] = strat.propose(h, 5, ctx).detach().cpu()
            row["max_abs_diff_cpu_vs_device"] = float((props["cpu"] - props[device]).abs().max())
            # random draws differ between CPU and CUDA generators; everything else must agree to float tolerance
            row["ok"] = name in ("noise", "random") or row["max_abs_diff_cpu_vs_device"] < 1e-4
        except Exception as e:  # noqa: BLE001 - reported
            row = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out[name] = row
    for name in STRATEGIES:  # and inside a real CUDA run
        if name in ("oracle",):
            continue
        try:
            schedule = (
                {} if name == "lookahead" else dict(every_n_steps=30, horizon=3, snapshot_every=10, context=3)
            )
            cb = Sleep(name, **schedule)
            fit(device, "small_cnn", 70, [cb])
            out.setdefault(name, {})["in_run_events"] = len(cb.events)
        except Exception as e:  # noqa: BLE001
            out.setdefault(name, {}).update(ok=False, in_run_error=f"{type(e).__name__}: {e}")
    return out


def throughput(device: str, tmp: Path, steps: int, repeats: int) -> dict:
    arms = {
        "none": lambda: [],
        "recorder_every_10": lambda: [TrajectoryRecorder(tmp / "t10.h5", snapshot_every=10, overwrite=True)],
        "recorder_every_1": lambda: [TrajectoryRecorder(tmp / "t1.h5", snapshot_every=1, overwrite=True)],
        "recorder_and_linear_sleep": lambda: [
            TrajectoryRecorder(tmp / "ts.h5", snapshot_every=10, overwrite=True),
            Sleep("linear", every_n_steps=50),
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):  # interleaved, so drift hits every arm alike
        for name, make in arms.items():
            _, sec = fit(device, "mlp_1m", steps, make())
            times[name].append(steps / sec)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "steps": steps,
        "params": sum(p.numel() for p in mlp_1m((1, 8, 8), 10).parameters()),
        "steps_per_second": med,
        "ratio_vs_none": {k: med["none"] / v for k, v in med.items()},
    }


def jump_time(device: str) -> dict:
    from sleepbot.forecast import load_forecaster

    res = {}
    net = mlp_1m((1, 8, 8), 10)
    layers = neuron_layers(net)
    for dev in dict.fromkeys(["cpu", device]):
        f = load_forecaster().to(dev)
        hist = {n: torch.stack([neuron_matrix(m)] * f.context).to(dev) for n, m in layers.items()}
        for n in hist:
            hist[n] = hist[n] + 1e-3 * torch.randn_like(hist[n])
        runs = []
        for _ in range(3):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for n, m in layers.items():
                f.predict(hist[n], f.horizons[0], kind=layer_kind(m), progress=0.5)
            if dev == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        res[dev] = {"seconds_median": float(np.median(runs)), "runs": runs}
    res["weights"] = sum(p.numel() for p in net.parameters())
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in [
            ("recording_and_sleep", lambda: check_recording_and_sleep(device, Path(tmp), 200)),
            ("strategies", lambda: check_strategies(device)),
            ("throughput_1m", lambda: throughput(device, Path(tmp), args.steps, args.repeats)),
            ("learned_jump_1m", lambda: jump_time(device)),
        ]:
            t0 = time.time()
            try:
                report[name] = fn()
            except Exception as e:  # noqa: BLE001 - reported, the other checks still run
                report[name] = {
                    "ok": False,
                    "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc(),
                }
            print(
                f"{name} ({time.time() - t0:.0f}s): {json.dumps(report[name], default=str)[:1500]}",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
