"""Benchmark the forecasters: the time to forecast one jump for a whole model of ~1M weights, and training
throughput in windows per second. Prints a table and writes JSON.

    .venv/bin/python scripts/bench_forecaster.py                       # 1M weights, 2 threads, shipped forecaster
    .venv/bin/python scripts/bench_forecaster.py --weights 20000 --repeats 1 --out /tmp/b.json   # a toy run

Target (issue 4): the LSTM forecaster jumps a 1M-weight model in under 1 s on 2 cores. The script also times the
design options that were rejected (an nn.LSTM over every weight's own series), so the choice stays checkable.
The synthetic model's layers are a small CNN's shapes scaled to the requested weight count; their trajectories
are synthetic (`sleepbot.forecast.synthetic`): the forecast's cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from sleepbot.forecast import FORECASTERS, build_forecaster, load_forecaster
from sleepbot.forecast.module import group_errors
from sleepbot.forecast.synthetic import synthetic_trajectory


def model_layers(weights: int) -> list[tuple[str, str, int, int]]:
    """(name, kind, neurons, fan_in incl. bias) of a conv net whose layers hold about `weights` weights."""
    base = [
        ("conv1", "conv2d", 64, 9 * 64 + 1),
        ("conv2", "conv2d", 128, 9 * 128 + 1),
        ("fc1", "linear", 512, 1537),
    ]
    total = sum(n * f for _, _, n, f in base) + 10 * 513
    k = max(weights / total, 1e-3)
    layers = [(name, kind, max(1, round(n * k)), f) for name, kind, n, f in base]
    layers.append(("fc2", "linear", 10, 513))
    return layers


def timed(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up: allocator, thread pool, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": statistics.median(times)}


def bench_jump(model, histories: dict, repeats: int) -> dict[str, float]:
    """One jump: predict every layer `horizon` snapshots ahead (what the sleep callback does)."""
    h = 5 if not model.learned else min(5, model.horizons[-1])

    def jump():
        with torch.no_grad():
            for kind, hist in histories.values():
                model.predict(hist, h, kind=kind, progress=0.3)

    return timed(jump, repeats)


def bench_per_weight_lstm(weights: int, hidden: int, context: int, repeats: int) -> dict[str, float]:
    """The rejected option: an nn.LSTM over each weight's own series ([weights, context, 1]) plus a linear readout."""
    lstm, head = nn.LSTM(1, hidden, batch_first=True), nn.Linear(hidden, 1)
    x = torch.randn(weights, context, 1)

    def run():
        with torch.no_grad():
            _, (h, _) = lstm(x)
            head(h[-1])

    return timed(run, repeats)


def bench_training(name: str, steps: int, group_weights: int) -> dict[str, float]:
    """Forward + backward + AdamW on synthetic groups like the windows dataset serves (4 end times per group)."""
    model = build_forecaster(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    c, hs = model.context, model.horizons
    fan_in = 65
    neurons = max(1, group_weights // fan_in)
    traj = torch.from_numpy(synthetic_trajectory(c + hs[-1], neurons, fan_in, tau=20.0, noise=0.3))
    group = {
        "history": traj[:c],
        "target": torch.stack([traj[c - 1 + h] for h in hs]),
        "mask": torch.ones(len(hs), neurons, dtype=torch.bool),
        "progress": torch.full((neurons,), 0.3),
        "kind": "linear",
    }

    def step():
        e = group_errors(model, group)
        opt.zero_grad()
        (e["loss_sum"] / e["count"]).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return {
        "weight_windows_per_s": steps * neurons * fan_in / dt,
        "neuron_windows_per_s": steps * neurons / dt,
        "step_s": dt / steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--weights", type=int, default=1_000_000, help="weights in the synthetic model (default 1M)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the target machine)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forecaster", help="checkpoint for `lstm` (default: the shipped one, else untrained)")
    p.add_argument("--train-steps", type=int, default=30, help="optimizer steps timed per forecaster")
    p.add_argument("--no-options", action="store_true", help="skip the per-weight nn.LSTM design options")
    p.add_argument(
        "--out", default="bench_forecaster.json", help="JSON output (default: bench_forecaster.json)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    layers = model_layers(args.weights)
    histories = {}
    for i, (name, kind, n, f) in enumerate(layers):
        # 20 snapshots: the longest context of any forecaster (multiscale); each reads its own last `context`
        hist = torch.from_numpy(synthetic_trajectory(20, n, f, tau=20.0, noise=0.3, seed=i))
        histories[name] = (kind, hist)
    n_weights = sum(n * f for _, _, n, f in layers)
    try:
        lstm = load_forecaster(args.forecaster)
        lstm_source = args.forecaster or "shipped default"
    except Exception as e:  # noqa: BLE001 - an untrained one costs the same
        lstm, lstm_source = build_forecaster("lstm"), f"untrained ({type(e).__name__})"
    result: dict = {
        "weights": n_weights,
        "layers": [{"name": a, "kind": b, "neurons": c, "fan_in": d} for a, b, c, d in layers],
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "lstm_checkpoint": lstm_source,
        "jump": {},
        "options": {},
        "training": {},
    }
    print(f"jump for a model of {n_weights:,} weights in {len(layers)} layers, {args.threads} threads:")
    for name in FORECASTERS:
        model = lstm if name == "lstm" else build_forecaster(name)
        r = bench_jump(model, histories, args.repeats)
        result["jump"][name] = r
        print(f"  {name:<12} best {r['best_s']:.3f} s   median {r['median_s']:.3f} s")
    if not args.no_options:
        print("rejected design options (same weights, forecast only):")
        for hidden, context in ((32, 16), (8, 5)):
            key = f"per_weight_lstm_h{hidden}_c{context}"
            r = bench_per_weight_lstm(n_weights, hidden, context, max(1, args.repeats // 2))
            result["options"][key] = r
            print(f"  {key:<26} best {r['best_s']:.3f} s")
    print("training throughput (forward + backward + step, groups of ~16k weights):")
    for name in (n for n, cls in FORECASTERS.items() if cls.learned):
        r = bench_training(name, args.train_steps, 16384)
        result["training"][name] = r
        print(
            f"  {name:<12} {r['weight_windows_per_s']:,.0f} weight-windows/s "
            f"({r['neuron_windows_per_s']:,.0f} neuron-windows/s, {r['step_s'] * 1000:.1f} ms per group)"
        )
    lstm_best = result["jump"]["lstm"]["best_s"]
    result["target_s"] = 1.0
    result["meets_target"] = bool(lstm_best < 1.0) if n_weights >= 1_000_000 else None
    print(f"lstm jump: {lstm_best:.3f} s for {n_weights:,} weights (target < 1 s at 1M weights)")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
