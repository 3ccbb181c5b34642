"""Check the recorder on an accelerator (CUDA) against an in-memory reference; prints one line per check.

    python scripts/check_recorder_device.py [--device cuda]

On CUDA the recorder keeps its per-step buffers (norms, loss) on the device and copies them to the host once per
block, and copies snapshots device-to-host: this checks both paths, with sampled neurons (index_select on the
device), gradients and Adam state, in a plain loop and inside a Lightning Trainer. The test suite covers the CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sleepbot.neurons import neuron_matrix, neuron_norms
from sleepbot.recording import RecorderCore, TrajectoryRecorder, sample_neurons
from sleepbot.store import RunFile


def plain_loop(device: str, tmp: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = ["0", "3", "5"]
    mods = dict(model.named_modules())
    idx = {n: sample_neurons(n, mods[n].weight.shape[0], 12, 7) for n in names}
    ref_norm, ref_w, ref_g, ref_m, ref_loss = [], [], [], [], []
    path = tmp / "plain.h5"
    with RecorderCore(
        path,
        model,
        optimizer=opt,
        snapshot_every=3,
        max_neurons_per_layer=12,
        gradients=True,
        optimizer_state=True,
        seed=7,
        flush_every=2,
    ) as core:
        for step in range(0, 26):
            if step > 0:
                x = torch.randn(64, 1, 8, 8, device=device)
                y = torch.randint(0, 10, (64,), device=device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            core.record_step(step, loss=loss if step > 0 else None)
            ref_loss.append(loss.item() if step > 0 else np.nan)
            ref_norm.append({n: neuron_norms(mods[n]).cpu().numpy() for n in names})
            if step % 3 == 0:
                ref_w.append({n: neuron_matrix(mods[n]).cpu().numpy()[idx[n]] for n in names})
                g, m = {}, {}
                for n in names:
                    mod = mods[n]
                    gw = mod.weight.grad if mod.weight.grad is not None else torch.zeros_like(mod.weight)
                    gb = mod.bias.grad if mod.bias.grad is not None else torch.zeros_like(mod.bias)
                    st = opt.state.get(mod.weight, {}).get("exp_avg", torch.zeros_like(mod.weight))
                    sb = opt.state.get(mod.bias, {}).get("exp_avg", torch.zeros_like(mod.bias))
                    g[n] = torch.cat([gw.reshape(len(gw), -1), gb[:, None]], 1).cpu().numpy()[idx[n]]
                    m[n] = torch.cat([st.reshape(len(st), -1), sb[:, None]], 1).cpu().numpy()[idx[n]]
                ref_g.append(g)
                ref_m.append(m)
    with RunFile(path) as run:
        assert run.complete, run.status
        np.testing.assert_array_equal(run.steps, np.arange(26))
        np.testing.assert_array_equal(run.snapshot_steps, np.arange(0, 26, 3))
        np.testing.assert_allclose(run.metrics["train_loss"], np.float32(ref_loss), rtol=1e-6)
        for n in names:
            np.testing.assert_allclose(run.norms(n), np.stack([r[n] for r in ref_norm]), rtol=1e-5)
            np.testing.assert_array_equal(run.weights(n), np.stack([r[n] for r in ref_w]))
            np.testing.assert_array_equal(run.array(n, "grad"), np.stack([r[n] for r in ref_g]))
            np.testing.assert_array_equal(run.array(n, "optim/exp_avg"), np.stack([r[n] for r in ref_m]))
    print(f"ok plain loop on {device}: norms, loss, sampled weights, grads, Adam exp_avg match the reference")


def lightning(device: str, tmp: Path) -> None:
    from sleepbot.config import RunConfig
    from sleepbot.data import make_datamodule
    from sleepbot.training import make_module, make_trainer

    cfg = RunConfig(out_dir=str(tmp))
    cfg.trainer.max_steps = 65
    cfg.trainer.logger = "none"
    cfg.trainer.progress_bar = False
    cfg.trainer.accelerator = "gpu" if device.startswith("cuda") else "cpu"
    cfg.trainer.deterministic = False  # adaptive_avg_pool2d's CUDA backward has no deterministic kernel
    dm = make_datamodule(cfg.data, seed=0)
    module = make_module(cfg, dm.input_shape, dm.num_classes)
    path = tmp / "lightning.h5"
    trainer = make_trainer(cfg, [TrajectoryRecorder(path, snapshot_every=10)])
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    with RunFile(path) as run:
        assert run.complete
        np.testing.assert_array_equal(run.steps, np.arange(66))
        np.testing.assert_array_equal(run.snapshot_steps, np.arange(0, 61, 10))
        assert np.all(np.isfinite(run.metrics["train_loss"][1:]))
        np.testing.assert_array_equal(run.metrics["val/step"], np.arange(10, 61, 10))
        assert abs(float(run.metrics["test/acc"]) - module.test_acc) < 1e-6
        for name, mod in dict(module.named_modules()).items():
            if name in run.layers:  # the norm at the last step is the norm of the final weights
                np.testing.assert_allclose(run.norms(name, -1), neuron_norms(mod).cpu().numpy(), rtol=1e-5)
    print(f"ok Lightning on {device}: T=66, S=7, val and test recorded, last norms equal the final weights'")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        plain_loop(args.device, Path(d))
        lightning(args.device, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
