"""The optimizer's step read from its recorded state, and the state ablation on real recorded runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sleepbot.errors import SleepbotError
from sleepbot.experiments import collect
from sleepbot.forecast.state import (
    GRADIENT_COLUMN,
    STATE_COLUMN,
    optimizer_step,
    run_windows,
    state_ablation,
)

GRID = """
datasets: [digits]
archs: [small_cnn]
groups:
  - {name: adam, optimizers: adam, lrs: [1.0e-2], seeds: [0, 1]}
  - {name: momentum, optimizers: momentum, lrs: [3.0e-2], seeds: [0, 1], run: {model: {momentum: 0.9}}}
run:
  data: {train_subset: 256}
  trainer: {max_steps: 120, val_every_n_steps: 60}
  record: {snapshot_every: 10, optimizer_state: STATE}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four real 120-step digits runs recording Adam's or SGD+momentum's state, and one without the state."""
    root = tmp_path_factory.mktemp("state_corpus")
    (root / "grid.yaml").write_text(GRID.replace("STATE", "true"))
    rows = collect(root / "grid.yaml", root / "runs", workers=1, progress=False)
    assert len(rows) == 4 and all(r.status == "trained" for r in rows)
    (root / "plain.yaml").write_text(GRID.replace("STATE", "false").replace("seeds: [0, 1]", "seeds: [5]", 1))
    collect(root / "plain.yaml", root / "plain", workers=1, progress=False)
    return sorted((root / "runs").glob("*.h5")), sorted((root / "plain").glob("*adam*.h5"))


def _last_update(opt_name, **kw):
    """Train a small layer a few steps; return (the last update p_k - p_(k-1), the state after it, k, p_k)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    if opt_name == "momentum":
        opt = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW([p], lr=0.05, weight_decay=kw["weight_decay"])
    else:
        opt = torch.optim.Adam([p], lr=0.05)
    target = torch.randn(4, 3)
    for _ in range(7):
        before = p.detach().clone()
        opt.zero_grad()
        ((p - target) ** 2 * torch.arange(1.0, 13.0).view(4, 3)).sum().backward()
        opt.step()
    state = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
    return p.detach() - before, state, 7, p.detach().clone(), before


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_the_step_read_from_the_state_is_the_update_just_applied(name):
    update, state, k, _, _ = _last_update(name)
    got = optimizer_step(name, state, lr=0.05, step=k)
    torch.testing.assert_close(got, update, rtol=1e-5, atol=1e-7)


def test_adamw_adds_its_decoupled_decay():
    update, state, k, p_now, p_before = _last_update("adamw", weight_decay=0.5)
    got = optimizer_step("adamw", state, lr=0.05, step=k, weights=p_before, weight_decay=0.5)
    torch.testing.assert_close(got, update, rtol=1e-5, atol=1e-7)
    plain = optimizer_step("adam", state, lr=0.05, step=k)
    assert (got - plain).abs().max() > 1e-3  # the decay term is not negligible here, so the test can tell


def test_bad_optimizers_and_missing_state_are_one_line_errors():
    with pytest.raises(SleepbotError, match="valid: adam, adamw, momentum"):
        optimizer_step("sgd", {}, lr=0.1, step=3)
    with pytest.raises(SleepbotError, match="lacks exp_avg_sq.*optimizer_state: true"):
        optimizer_step("adam", {"exp_avg": torch.zeros(2)}, lr=0.1, step=3)


def test_recorded_state_points_where_the_run_goes(runs):
    """On a real run, the step read from the state at a snapshot points along the run's next 10 steps."""
    paths, _ = runs
    for path in paths:
        opt, windows = run_windows(str(path), horizons=(1,), context=5, stride=1)
        assert opt in ("adam", "momentum")
        cos = []
        for x, ys in windows:
            u, d = x[:, STATE_COLUMN], ys[1][0]
            cos.append(float(u @ d / (u.norm() * d.norm())))
        assert sum(cos) / len(cos) > 0.3, (path.name, cos)


def test_ablation_fits_nested_feature_sets_and_scores_held_out_runs(runs):
    paths, _ = runs
    train = [str(p) for p in paths if p.name.endswith("-s0.h5")]
    test = [str(p) for p in paths if p.name.endswith("-s1.h5")]
    assert len(train) == 2 and len(test) == 2
    out = state_ablation(train, test, horizons=(1, 3), context=5, stride=1)
    rows = {(r["optimizer"], r["horizon"], r["target"], r["features"]): r for r in out["rows"]}
    assert len(rows) == 2 * 2 * 2 * 6
    for (opt, h, target, feats), r in rows.items():
        assert r["train_runs"] == 1 and r["test_runs"] == 1 and r["windows"] > 0
        assert r["r2"] == r["r2"] and r["r2"] <= 1.0  # finite, and no better than perfect
        # least squares: a superset of columns never fits the training data worse
        subsets = {
            "history+state": ("history", "state alone"),
            "history+layer": ("history",),
            "history+gradient": ("history",),
            "history+state+gradient": ("history+state", "history+gradient"),
        }
        for sub in subsets.get(feats, ()):
            assert r["fit_r2"] >= rows[(opt, h, target, sub)]["fit_r2"] - 1e-9


def test_the_gradient_column_is_the_replayed_training_gradient(runs):
    """With `gradient`, its column is -lr times the whole training split's gradient at w(t) (SGD+momentum),
    which points downhill: the loss falls along it; without, it is zeros and nothing is replayed."""
    from sleepbot.forecast.jumploss import RunModel
    from sleepbot.forecast.windows import scan_runs
    from sleepbot.store import RunFile

    paths, _ = runs
    path = next(p for p in paths if "momentum" in p.name)
    opt, windows = run_windows(str(path), horizons=(1,), context=5, stride=1, gradient=True)
    _, plain = run_windows(str(path), horizons=(1,), context=5, stride=1)
    assert opt == "momentum" and len(windows) == len(plain)
    assert all(float(x[:, GRADIENT_COLUMN].abs().sum()) == 0.0 for x, _ in plain)
    (info,) = scan_runs([str(path)])
    model = RunModel(info)
    every = torch.arange(len(model.y))
    with RunFile(path) as f:
        layers = list(f.layers)
        w = {n: torch.as_tensor(f.weights(n)) for n in layers}
    t = 4  # the first window ends at the 5th snapshot
    n_ends = len(windows) // len(layers)  # the run's windows are listed layer by layer, window ends in order
    firsts = windows[::n_ends]
    assert len(firsts) == len(layers)
    step = {n: x[:, GRADIENT_COLUMN].reshape(w[n][t].shape).float() for n, (x, _) in zip(layers, firsts)}
    with torch.no_grad():
        now = float(model.loss({n: w[n][t] for n in layers}, every))
        ahead = float(model.loss({n: w[n][t] + step[n] for n in layers}, every))
    assert ahead < now
    mats = {n: w[n][t].clone().requires_grad_(True) for n in layers}
    grads = torch.autograd.grad(model.loss(mats, every), list(mats.values()))
    lr = 3.0e-2
    for n, g in zip(layers, grads):
        torch.testing.assert_close(step[n], -lr * g, rtol=1e-4, atol=1e-9)


def test_low_rank_keeps_what_the_neurons_share():
    from sleepbot.forecast.state import _low_rank

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, 2, generator=g) @ torch.randn(2, 9, generator=g)  # rank 2: what 16 neurons share
    noisy = shared + 0.01 * torch.randn(16, 9, generator=g)
    assert (_low_rank(noisy, 2) - shared).norm() < (noisy - shared).norm()  # the SVD drops most of the noise
    torch.testing.assert_close(_low_rank(shared, 2), shared, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(_low_rank(noisy, 1)) == 1


def test_runs_without_the_state_are_refused_by_name(runs):
    _, plain = runs
    with pytest.raises(SleepbotError, match="holds no optimizer state.*record.optimizer_state: true"):
        run_windows(str(plain[0]), horizons=(1,), context=5)


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("state_ablation", "scripts/state_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _copy_runs(runs, tmp_path):
    """The fixture's recorded runs copied into a directory of this test's own (the script reads a directory)."""
    import shutil

    paths, _ = runs
    data = tmp_path / "data"
    data.mkdir()
    for p in paths:
        shutil.copy(p, data / p.name)
    return data


def test_the_script_writes_its_table_and_refuses_a_corrupt_file(runs, tmp_path, capsys):
    import json

    data = _copy_runs(runs, tmp_path)
    out = tmp_path / "out.json"
    args = [
        "--data",
        str(data),
        "--test-seed",
        "1",
        "--horizons",
        "1",
        "3",
        "--context",
        "5",
        "--stride",
        "1",
    ]
    assert _script().main([*args, "--json", str(out), "--no-gradient"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["features"] for r in rows} == {"history", "history+state", "state alone", "history+layer"}
    assert "| momentum | 1 / 1 | 3 |" in capsys.readouterr().out

    (data / "broken.h5").write_bytes(b"not an hdf5 file")
    assert _script().main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "broken.h5" in err and len(err.splitlines()) == 1
    assert (data / "broken.h5").read_bytes() == b"not an hdf5 file"  # nothing destroyed


def test_the_script_skips_runs_whose_state_holds_no_step(runs, tmp_path, capsys):
    data = _copy_runs(runs, tmp_path)
    (tmp_path / "sgd.yaml").write_text(
        "datasets: [digits]\narchs: [small_cnn]\noptimizers: [sgd]\nlrs: [0.1]\nseeds: [1]\n"
        "run:\n  data: {train_subset: 256}\n  trainer: {max_steps: 60, val_every_n_steps: 60}\n"
        "  record: {snapshot_every: 10}\n"
    )
    (row,) = collect(tmp_path / "sgd.yaml", data, workers=1, progress=False)
    assert row.status == "trained"
    args = ["--data", str(data), "--test-seed", "1", "--horizons", "1", "--context", "5", "--no-gradient"]
    assert _script().main(args) == 0
    assert "skipped (no step readable from the state): 1 runs of sgd" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- settling a jump
def _settle_sample(run_path, settle_steps, t=6):
    from sleepbot.forecast.jumploss import replay_dataset
    from sleepbot.forecast.windows import scan_runs

    ds, models, left_out = replay_dataset(
        scan_runs([run_path]), 6, 3, mode="all", stride=1, examples=64, horizon=2, settle_steps=settle_steps
    )
    assert not left_out
    return models[0], next(s for s in ds if s["t_end"] == t)


@pytest.mark.parametrize("which", [0, 2])  # an Adam run and an SGD+momentum run
def test_settling_continues_the_run_as_torch_s_optimizer_would(runs, which):
    """RunModel.settle, from the recorded state, equals torch's own optimizer loaded with that state and stepped
    on the same batches at the run's recorded lrs."""
    path = runs[0][which]
    model, s = _settle_sample(path, settle_steps=4)
    assert model.optimizer == ("adam" if which == 0 else "momentum")
    now = {k: h[-1].clone() for k, h in s["history"].items()}
    got = model.settle(now, s["state"], s["step"], s["batches"])

    params = {k: v.clone().requires_grad_(True) for k, v in now.items()}
    if model.optimizer == "adam":
        opt = torch.optim.Adam(list(params.values()), lr=1.0)
        for k, p in params.items():
            opt.state[p] = {
                "step": torch.tensor(float(s["step"])),
                **{n: v.clone() for n, v in s["state"][k].items()},
            }
    else:
        opt = torch.optim.SGD(list(params.values()), lr=1.0, momentum=model.momentum)
        for k, p in params.items():
            opt.state[p] = {"momentum_buffer": s["state"][k]["momentum_buffer"].clone()}
    for i, idx in enumerate(s["batches"]):
        for group in opt.param_groups:
            group["lr"] = float(model.lr_by_step[s["step"] + i])
        opt.zero_grad()
        model.loss(params, idx).backward()
        opt.step()
    for k in now:
        torch.testing.assert_close(got[k], params[k].detach(), rtol=1e-4, atol=1e-6)
        assert (got[k] - now[k]).abs().max() > 1e-4  # it did move


def test_a_settled_jump_is_differentiable_and_the_samples_hold_what_settling_needs(runs):
    model, s = _settle_sample(runs[0][0], settle_steps=3)
    assert len(s["batches"]) == 3 and all(len(b) == model.batch_size for b in s["batches"])
    now = {k: h[-1].clone() for k, h in s["history"].items()}
    torch.manual_seed(0)
    d = {k: 0.02 * torch.randn_like(v) for k, v in now.items()}
    eps = torch.zeros((), requires_grad=True)

    def settled_loss(e):
        w = model.settle(
            {k: now[k] + e * d[k] for k in now}, s["state"], s["step"], s["batches"], create_graph=True
        )
        return model.loss(w, s["examples"])

    (slope,) = torch.autograd.grad(settled_loss(eps), eps)
    with torch.no_grad():
        h = 0.05
        up = model.loss(
            model.settle({k: now[k] + h * d[k] for k in now}, s["state"], s["step"], s["batches"]),
            s["examples"],
        )
        down = model.loss(
            model.settle({k: now[k] - h * d[k] for k in now}, s["state"], s["step"], s["batches"]),
            s["examples"],
        )
    fd = float(up - down) / (2 * h)
    assert abs(fd) > 1e-4
    assert float(slope) == pytest.approx(fd, rel=0.15)


def test_settling_refuses_runs_without_the_state_and_objectives_that_cannot_use_it(runs, tmp_path):
    from sleepbot.forecast.jumploss import replay_dataset
    from sleepbot.forecast.module import ForecasterTrainConfig, train_forecaster
    from sleepbot.forecast.windows import scan_runs

    ds, _, left_out = replay_dataset(scan_runs(runs[1]), 6, 3, settle_steps=2)
    assert ds is None and len(left_out) == 1 and "record.optimizer_state: true" in left_out[0]
    cfg = ForecasterTrainConfig(model="multiscale", context=6, min_context=3, horizons=(2,), settle_steps=2)
    with pytest.raises(SleepbotError, match="needs objective 'loss'"):
        train_forecaster([str(p) for p in runs[0]], cfg, out=tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists()


def test_a_forecaster_trains_on_the_settled_loss_and_the_cli_scores_it_so(runs, tmp_path, capsys):
    import json

    from sleepbot.cli import main
    from sleepbot.forecast.module import ForecasterTrainConfig, train_forecaster

    paths = [str(p) for p in runs[0]]
    cfg = ForecasterTrainConfig(
        model="multiscale",
        context=6,
        min_context=3,
        horizons=(2,),
        baselines=(),
        objective="loss",
        settle_steps=2,
        groups_per_epoch=16,
        jump_examples=32,
        val_stride=3,
        val_fraction=0.5,
        test_fraction=0.0,
        threads=1,
    )
    result = train_forecaster(paths, cfg, trainer_kwargs={"max_steps": 8}, out=tmp_path / "s.pt")
    scores = result.val_scores["multiscale"]
    # the true future, settled, still gains
    assert np.isfinite(scores["val_loss"]) and scores["val_oracle"] < 0
    out = tmp_path / "settled.json"
    args = ["evaluate-forecaster", "--forecaster", str(tmp_path / "s.pt"), "--data", str(runs[0][0].parent)]
    assert main([*args, "--split", "val", "--jumps", "--settle-steps", "2", "--json", str(out)]) == 0
    assert "both trained on for 2 updates" in capsys.readouterr().out
    res = json.loads(out.read_text())["multiscale"]
    assert res["samples"] > 0 and np.isfinite(res["log_ratio"]) and res["oracle_log_ratio"] < 0
    assert main([*args, "--settle-steps", "2"]) == 2
    assert "pass it with --jumps" in capsys.readouterr().err
