"""Benchmark the TrajectoryRecorder: step-time overhead, bytes on disk, HDF5 write throughput and compression.

    python scripts/bench_recording.py [--steps 1000] [--repeats 5] [--archs small_cnn tiny_cnn3]
        [--out reports/bench_recording.json]

Step time. digits / small_cnn and digits / tiny_cnn3 (three small layers, about 1 ms a step on an idle core, where
the recorder's per-step cost shows most) / Adam, one torch thread (as a `collect` worker has), trained by
`run_training` with each recorder setting ("arm") in turn, interleaved over repeats so that a slow spell of a
shared machine hits every arm alike. Per run: milliseconds per step from the start of step `--warmup` to the end of training (so the
recorder's block writes and its final flush are in it; validation is not). Reported: the median over repeats,
and its ratio to the median of the run without a recorder.

Peak memory. A ~10M-weight MLP (3072-3072-256-10) recorded by RecorderCore with every neuron kept, a snapshot
at each of a few steps, in a fresh child process: the peak of Python/numpy allocations during recording
(tracemalloc; the snapshot and per-step blocks are numpy), and the growth of the process's peak resident set
(resource.getrusage ru_maxrss, which also sees torch and HDF5) over what it was before the recorder existed.

Write throughput and compression. The snapshots recorded every step by the `every_step` arm are replayed from
memory into a fresh file with each HDF5 filter (none, lzf, gzip): MB/s of float32 data written, and the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from sleepbot.config import RunConfig
from sleepbot.models import ARCHS, register_arch
from sleepbot.recording import RecorderCore, TrajectoryRecorder
from sleepbot.store import LayerSpec, RunFile, RunWriter
from sleepbot.training import run_training

# arm name -> record options (None: no recorder). `noop` and `norms_only` take the default arm's cost apart: an
# extra callback that overrides the same hooks and does nothing; the recorder with no snapshot after step 0.
ARMS: dict[str, dict | None] = {
    "none": None,
    "default": {"snapshot_every": 10},
    "every_step": {"snapshot_every": 1},
    "grad_and_adam_state": {"snapshot_every": 10, "gradients": True, "optimizer_state": True},
    "noop": None,
    "norms_only": {"snapshot_every": 10**6},
}
DEFAULT_ARMS = ["none", "default", "every_step", "grad_and_adam_state"]


if "tiny_cnn3" not in ARCHS:

    @register_arch("tiny_cnn3")
    def tiny_cnn3(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """Benchmark only: two 3x3 convolutions (4, 8 channels) and a linear head, 852 parameters."""
        c = input_shape[0]
        return nn.Sequential(
            nn.Conv2d(c, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 10),
        )


class NoopCallback(pl.Callback):
    """Overrides the recorder's per-step hooks and does nothing: Lightning's cost of one more callback."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass


class StepClock(pl.Callback):
    """Wall-clock of the training loop from the start of step `warmup` to the end of training."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0: float | None = None
        self.t1: float | None = None
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.starts.append(now)
        if trainer.global_step == self.warmup:
            self.t0 = now

    def on_train_end(self, trainer, pl_module) -> None:
        self.t1 = time.perf_counter()  # after the recorder's on_train_end (config callbacks come first)


class TimedRecorder(TrajectoryRecorder):
    """The recorder, timing its own per-step hooks (and the final flush) from step `warmup` on.

    Whole-run step times vary by several percent from run to run even on an idle machine, more than the recorder
    costs; the time spent inside the recorder is measured directly and is the sharper estimate of its overhead.
    """

    def __init__(self, *args, warmup: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.warmup = warmup
        self.seconds = 0.0

    def _timed(self, trainer, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        if trainer.global_step >= self.warmup:
            self.seconds += time.perf_counter() - t0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._timed(trainer, super().on_before_optimizer_step, trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._timed(trainer, super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        self._timed(trainer, super().on_train_end, trainer, pl_module)


def run_arm(
    arm: str,
    steps: int,
    warmup: int,
    repeat: int,
    tmp: Path,
    accelerator: str = "cpu",
    arch: str = "small_cnn",
) -> dict:
    cfg = RunConfig(seed=repeat, out_dir=str(tmp))
    cfg.model.arch = arch
    cfg.trainer.accelerator = accelerator
    cfg.trainer.deterministic = (
        accelerator == "cpu"
    )  # adaptive_avg_pool2d's CUDA backward is not deterministic
    cfg.name = f"{arch}-{arm}-r{repeat}"
    cfg.trainer.max_steps = steps
    cfg.trainer.val_every_n_steps = 10**9  # no validation inside the timed window
    cfg.trainer.logger = "none"
    cfg.trainer.progress_bar = False
    options = ARMS[arm]
    path = tmp / f"{cfg.name}.h5"
    extra: list[pl.Callback] = [NoopCallback()] if arm == "noop" else []
    if options is not None:
        extra.append(TimedRecorder(path, warmup=warmup, seed=repeat, **options))
    clock = StepClock(warmup)
    run_training(cfg, callbacks=[*extra, clock], test=False, quiet=True)
    step_ms = np.diff(clock.starts[warmup:]) * 1e3
    out = {
        "arch": arch,
        "arm": arm,
        "repeat": repeat,
        "ms_per_step": (clock.t1 - clock.t0) * 1e3 / (steps - warmup),
        "median_step_ms": float(np.median(step_ms)),
    }
    if options is not None:
        size = path.stat().st_size
        out["file_bytes"] = size
        out["bytes_per_1000_steps"] = size * 1000 / steps
        out["in_recorder_ms_per_step"] = extra[-1].seconds * 1e3 / (steps - warmup)
    return out


def write_throughput(source: Path, tmp: Path, repeats: int) -> dict:
    """Replay a recorded file's snapshots and per-step rows from memory with each filter."""
    with RunFile(source) as run:
        specs = []
        snaps = {}
        norms = {}
        for name in run.layers:
            info = run.layer_info(name)
            specs.append(LayerSpec(name, info["kind"], info["shape"], info["has_bias"], info["neurons"]))
            snaps[(name, "weight")] = run.weights(name)
            norms[name] = run.norms(name)
        steps, snap_steps = run.steps, run.snapshot_steps
        loss, lr = run.metrics["train_loss"], run.metrics["lr"]
    raw = (
        sum(a.nbytes for a in snaps.values())
        + sum(a.nbytes for a in norms.values())
        + loss.nbytes
        + lr.nbytes
    )
    results = {}
    for comp in (None, "lzf", "gzip"):
        secs = []
        for r in range(repeats):
            path = tmp / f"replay-{comp}-{r}.h5"
            t0 = time.perf_counter()
            w = RunWriter(path, specs, compression=comp, buffer_snapshots=64, buffer_steps=640)
            for i in range(0, len(steps), 640):  # per-step rows in the recorder's block size
                sl = slice(i, i + 640)
                w.write_steps(steps[sl], {k: v[sl] for k, v in norms.items()}, loss[sl], lr[sl])
            for j, step in enumerate(snap_steps):
                w.write_snapshot(int(step), {k: v[j] for k, v in snaps.items()})
            w.close()
            secs.append(time.perf_counter() - t0)
            size = path.stat().st_size
        sec = statistics.median(secs)
        results[str(comp).lower()] = {
            "seconds": sec,
            "MB_per_s": raw / sec / 1e6,
            "file_bytes": size,
            "size_vs_raw": size / raw,
            "us_per_snapshot": sec / len(snap_steps) * 1e6,
        }
    return {"source": source.name, "raw_bytes": raw, "snapshots": len(snap_steps), "filters": results}


def memory_child(steps: int) -> dict:
    """Peak memory of recording a ~10M-weight MLP for `steps` snapshot steps (run in a fresh process)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    n_weights = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        tracemalloc.start()
        core = RecorderCore(Path(d) / "big.h5", model, snapshot_every=1, max_neurons_per_layer=None)
        buffered = core.writer.buffer_snapshots
        for step in range(steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)
            core.record_step(step, loss=1.0)
        core.close()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        file_bytes = (Path(d) / "big.h5").stat().st_size
    snapshot_bytes = 4 * sum(s.n_kept * s.fan_in for s in core.specs)
    return {
        "model": "MLP 3072-3072-256-10, every neuron kept, a snapshot every step",
        "weights": n_weights,
        "snapshot_steps": steps,
        "snapshot_MB": snapshot_bytes / 1e6,
        "buffer_MB": core.writer.buffer_snapshots * snapshot_bytes / 1e6,
        "snapshots_buffered": buffered,
        "buffer_bytes_budget": 64 * 2**20,
        "tracemalloc_peak_MB": peak / 1e6,
        "maxrss_growth_MB": (rss1 - rss0) * 1024 / 1e6,
        "file_MB": file_bytes / 1e6,
    }


def memory_peak(steps: int) -> dict:
    """`memory_child` in a fresh interpreter, so that ru_maxrss is this measurement's own peak."""
    code = f"import json, runpy; m = runpy.run_path({str(Path(__file__).resolve())!r}); "
    code += f"print(json.dumps(m['memory_child']({int(steps)})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summarise(runs: list[dict], arm_names: list[str]) -> dict:
    """Per arm: medians over repeats, and ratios to the run without a recorder."""
    base = statistics.median(x["ms_per_step"] for x in runs if x["arm"] == "none")
    arms = {}
    for arm in arm_names:
        mine = [x for x in runs if x["arm"] == arm]
        med = statistics.median(x["ms_per_step"] for x in mine)
        arms[arm] = {
            "ms_per_step": med,
            "median_step_ms": statistics.median(x["median_step_ms"] for x in mine),
            "ratio_vs_none": med / base,
            "ratio_per_repeat": [
                x["ms_per_step"] / y["ms_per_step"]
                for x in mine
                for y in runs
                if y["arm"] == "none" and y["repeat"] == x["repeat"]
            ],
        }
        if ARMS[arm] is not None:
            inside = statistics.median(x["in_recorder_ms_per_step"] for x in mine)
            arms[arm]["in_recorder_ms_per_step"] = inside
            arms[arm]["in_recorder_ratio"] = (
                base + inside
            ) / base  # the recorder's own time over a bare step
            arms[arm]["bytes_per_1000_steps"] = statistics.median(x["bytes_per_1000_steps"] for x in mine)
            arms[arm]["options"] = ARMS[arm]
    return arms


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    ap.add_argument(
        "--archs", nargs="+", default=["small_cnn", "tiny_cnn3"], help="workloads, one after another"
    )
    ap.add_argument(
        "--memory-steps", type=int, default=4, help="snapshot steps of the peak-memory run (0: skip)"
    )
    ap.add_argument("--accelerator", default="cpu", help="cpu or gpu (Lightning's names)")
    ap.add_argument("--out", default="reports/bench_recording.json")
    args = ap.parse_args(argv)
    if "none" not in args.arms:
        args.arms.insert(0, "none")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for r in range(args.repeats):
            order = args.arms[r % len(args.arms) :] + args.arms[: r % len(args.arms)]  # rotate who goes first
            for arch in args.archs:
                for arm in order:
                    runs.append(run_arm(arm, args.steps, args.warmup, r, tmp, args.accelerator, arch))
                    print(json.dumps(runs[-1]), flush=True)
        source = next(
            (tmp / f"{args.archs[0]}-{a}-r0.h5" for a in ("every_step", "default") if a in args.arms), None
        )
        write = write_throughput(source, tmp, repeats=3) if source else None
    by_arch = {arch: _summarise([x for x in runs if x["arch"] == arch], args.arms) for arch in args.archs}
    memory = memory_peak(args.memory_steps) if args.memory_steps > 0 else None
    out = {
        "workload": f"digits / {' and '.join(args.archs)} / adam lr 3e-3 / batch 32, one torch thread",
        "accelerator": args.accelerator,
        "device": torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "cpu",
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "arms": by_arch[args.archs[0]],  # the first workload's, as before
        "by_arch": by_arch,
        "memory": memory,
        "write": write,
        "runs": runs,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    for arch, arms in by_arch.items():
        print(f"\n{arch:<20} ms/step  ratio  in recorder ms/step  ratio  MB/1000 steps")
        for arm, a in arms.items():
            mb = a.get("bytes_per_1000_steps", 0) / 1e6
            inside = a.get("in_recorder_ms_per_step", 0.0)
            print(
                f"{arm:<20} {a['ms_per_step']:7.3f}  {a['ratio_vs_none']:5.3f}  {inside:19.4f}  "
                f"{a.get('in_recorder_ratio', 1.0):5.3f}  {mb:13.2f}"
            )
    if memory:
        print(
            f"\npeak memory, {memory['weights'] / 1e6:.1f}M weights, {memory['snapshot_MB']:.1f} MB a snapshot, "
            f"{memory['snapshots_buffered']} buffered: tracemalloc {memory['tracemalloc_peak_MB']:.1f} MB, "
            f"ru_maxrss +{memory['maxrss_growth_MB']:.1f} MB"
        )
    if write:
        print(
            f"\nreplaying {write['source']} ({write['raw_bytes'] / 1e6:.1f} MB, {write['snapshots']} snapshots):"
        )
        for comp, w in write["filters"].items():
            print(f"  {comp:<5} {w['MB_per_s']:7.1f} MB/s  size {w['size_vs_raw']:.3f} of raw")
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
