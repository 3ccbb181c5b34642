"""The `loss` objective on real recorded runs: replaying a run's network and data, its samples, and training on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sleepbot.errors import SleepbotError
from sleepbot.experiments import collect
from sleepbot.forecast import build_forecaster
from sleepbot.forecast.jumploss import JumpDataset, RunModel, jump_log_ratio
from sleepbot.forecast.module import ForecasterTrainConfig, train_forecaster
from sleepbot.forecast.windows import resolve_paths, scan_runs
from sleepbot.store import RunFile

GRID = """
datasets: [digits]
archs: [small_cnn, mlp, resnet_tiny]
optimizers: [adam]
lrs: [1.0e-2]
seeds: [0, 1, 2]
run:
  data: {train_subset: 256}
  trainer: {max_steps: 80, val_every_n_steps: 40}
  record: {snapshot_every: 10}
"""


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Nine real 80-step runs of digits: small_cnn, mlp and resnet_tiny (BatchNorm), three seeds each."""
    root = tmp_path_factory.mktemp("jump_corpus")
    (root / "grid.yaml").write_text(GRID)
    rows = collect(root / "grid.yaml", root / "runs", workers=1, progress=False)
    assert all(r.status == "trained" for r in rows)
    return root / "runs"


def _runs(corpus, arch=None):
    runs = scan_runs(resolve_paths(corpus))
    return [r for r in runs if arch is None or r.attrs["arch"] == arch]


def test_run_model_loss_is_the_networks_loss_at_the_recorded_weights(corpus):
    from sleepbot.config import RunConfig, build_config
    from sleepbot.data import make_datamodule
    from sleepbot.models import Classifier
    from sleepbot.neurons import neuron_layers, set_neuron_matrix

    (info, *_) = _runs(corpus, "small_cnn")
    model = RunModel(info)
    with RunFile(info.path) as f:
        cfg = build_config(RunConfig, f.attrs["config"])
        mats = {layer: torch.as_tensor(f.weights(layer, [4])[0]) for layer in f.layers}
    # the reference: the network built by hand, the snapshot written in, a plain forward pass
    dm = make_datamodule(cfg.data, seed=cfg.seed)
    net = Classifier(arch="small_cnn", input_shape=dm.input_shape, num_classes=dm.num_classes).eval()
    for name, layer in neuron_layers(net).items():
        set_neuron_matrix(layer, mats[name])
    x, y = dm.tensors["train"]
    idx = torch.arange(0, len(y), 3)
    with torch.no_grad():
        want = F.cross_entropy(net(x[idx]), y[idx])
    torch.testing.assert_close(model.loss(mats, idx), want)
    # differentiable in the weights
    mats = {k: v.clone().requires_grad_(True) for k, v in mats.items()}
    model.loss(mats, idx).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in mats.values())


def test_a_network_with_batchnorm_is_refused_in_one_line(corpus):
    (info, *_) = _runs(corpus, "resnet_tiny")
    with pytest.raises(SleepbotError, match="BatchNorm cannot be replayed"):
        RunModel(info)


def test_jump_samples_are_the_runs_snapshots(corpus):
    runs = _runs(corpus, "mlp")
    ds = JumpDataset(runs, context=6, min_context=3, samples=40, examples=32, seed=1)
    ds.train_sizes = {i: 256 for i in range(len(runs))}
    lengths = set()
    for s in ds:
        run = ds.runs[s["run"]]
        for layer, h in s["history"].items():
            c = h.shape[0]
            lengths.add(c)
            with RunFile(run.path) as f:
                want = f.weights(layer, slice(s["t_end"] - c + 1, s["t_end"] + 1))
            np.testing.assert_array_equal(h.numpy(), want)
        assert len(set(s["examples"].tolist())) == 32 and int(s["examples"].max()) < 256
    assert lengths == {3, 4, 5, 6}
    # validation: every run at every 2nd end snapshot, the longest history there is, the future where recorded
    val = JumpDataset(runs, context=6, min_context=3, mode="all", stride=2, horizon=2, examples=8)
    val.train_sizes = ds.train_sizes
    items = list(val)
    assert [(s["run"], s["t_end"]) for s in items] == val.plan()
    assert all(next(iter(s["history"].values())).shape[0] == min(s["t_end"] + 1, 6) for s in items)
    assert [s["future"] is not None for s in items] == [s["t_end"] + 2 <= 8 for s in items]


def test_the_loss_objective_learns_jumps_that_lower_the_loss(corpus, tmp_path):
    cfg = ForecasterTrainConfig(
        model="multiscale",
        context=6,
        min_context=3,
        horizons=(4,),
        baselines=(),
        objective="loss",
        groups_per_epoch=40,
        jump_examples=64,
        val_stride=2,
        threads=1,
    )
    with pytest.warns(UserWarning, match="BatchNorm"):
        result = train_forecaster(corpus, cfg, trainer_kwargs={"max_steps": 60}, out=tmp_path / "jl.pt")
    scores = result.val_scores["multiscale"]
    assert {"val_loss", "val_improved", "val_oracle"} <= set(scores)
    # An untrained forecaster starts at the zero jump (log ratio 0); trained, it lowers the loss on runs it never saw.
    runs = [r for r in _runs(corpus) if r.run_id in result.split["val"] + result.split["test"]]
    runs = [r for r in runs if r.attrs["arch"] != "resnet_tiny"]
    ds = JumpDataset(runs, context=6, min_context=3, mode="all", stride=1, examples=128)
    models = [RunModel(r) for r in runs]
    ds.train_sizes = {i: len(m.y) for i, m in enumerate(models)}
    untrained = build_forecaster("multiscale", context=6, min_context=3, horizons=(4,))
    with torch.no_grad():
        before = [float(jump_log_ratio(untrained, models[s["run"]], s)[0]) for s in ds]
        after = [float(jump_log_ratio(result.model, models[s["run"]], s)[0]) for s in ds]
    assert max(abs(b) for b in before) < 1e-6
    assert np.mean(after) < -0.05, np.mean(after)
    # the CLI scores it the same way, and the diagnostics script replays it on one run
    from sleepbot.cli import main

    out = tmp_path / "jumps.json"
    assert (
        main(
            [
                "evaluate-forecaster",
                "--forecaster",
                str(tmp_path / "jl.pt"),
                "--data",
                str(corpus),
                "--jumps",
                "--stride",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    scores = json.loads(out.read_text())["multiscale"]
    assert scores["skipped"] >= 1 and scores["samples"] > 0  # the BatchNorm run is left out, counted
    assert set(scores["by"]["arch"]) == {"small_cnn", "mlp"}

    import importlib.util

    spec = importlib.util.spec_from_file_location("jump_diagnostics", "scripts/jump_diagnostics.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    run = next(r for r in runs if r.attrs["arch"] == "small_cnn")
    rows_path = tmp_path / "diag.json"
    assert (
        diag.main(
            [
                run.path,
                "--forecaster",
                str(tmp_path / "jl.pt"),
                "--steps",
                "40",
                "--horizon",
                "4",
                "--json",
                str(rows_path),
                "--hessian-top",
                "3",
                "--fisher-filter",
                "1",
                "1e9",
            ]
        )
        == 0
    )
    (row,) = json.loads(rows_path.read_text())
    assert row["step"] == 40 and "oracle (step 80)" in row["points"] and len(row["r2_disp"]) == 3
    assert "forecast without the top 3 Hessian directions" in row["points"]
    assert all(0.0 <= v <= 1.0 for v in row["steep_share"]["3"].values())
    pts = {k: v["train_loss"] for k, v in row["points"].items()}
    # damped without bound, the jump vanishes: the loss is the loss now (and the forecast's own is not)
    assert abs(pts["forecast damped by the Fisher diagonal, C = 1e+09"] - pts["now"]) < 1e-3 * pts["now"]
    assert abs(pts["forecast"] - pts["now"]) > 1e-3 * pts["now"]

    # the directions it removes are the steepest: orthonormal, and curved more than any random direction
    model = RunModel(run)
    with RunFile(run.path) as f:
        i = list(f.snapshot_steps).index(40)
        now = {layer.name: torch.as_tensor(f.weights(layer.name)[i]) for layer in run.layers}
    idx = torch.arange(len(model.y))
    vecs = diag.top_hessian_directions(model, now, 3, idx)  # [P, 3]
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=vecs.dtype), atol=1e-6, rtol=0)
    flat0 = torch.cat([v.reshape(-1) for v in now.values()]).double()

    def curvature(v):  # v^T H v by finite differences of the loss along v (unit v)
        def at(x):
            with torch.no_grad():
                return float(model.loss(diag.unflat(x, {k: t[None] for k, t in now.items()}), idx))

        e = 1e-2
        return (at(flat0 + e * v) - 2 * at(flat0) + at(flat0 - e * v)) / e**2

    top = curvature(vecs[:, 0])

    # the Fisher diagonal is the mean squared per-example gradient, example by example
    two = torch.tensor([0, 5])
    fisher = diag.fisher_diagonal(model, now, two)
    ref = {k: torch.zeros_like(v) for k, v in now.items()}
    for e in two:
        mats = {k: v.clone().requires_grad_(True) for k, v in now.items()}
        for k, g in zip(mats, torch.autograd.grad(model.loss(mats, e[None]), list(mats.values()))):
            ref[k] += g.pow(2) / 2
    for k in now:
        torch.testing.assert_close(fisher[k], ref[k], rtol=1e-4, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    rand = [curvature(r / r.norm()) for r in torch.randn(5, flat0.numel(), generator=g, dtype=torch.float64)]
    assert top > 10 * max(rand), (top, rand)
