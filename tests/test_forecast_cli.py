"""`sleepbot train-forecaster` and `evaluate-forecaster` end to end, on real run files (synthetic and one recorded
digits run), the forecast plot, and training under DDP."""

from __future__ import annotations

import json

import pytest
import torch

from sleepbot.cli import main
from sleepbot.forecast import load_baselines, load_forecaster, read_checkpoint
from sleepbot.forecast.synthetic import write_synthetic_runs

TRAIN = ["--max-steps", "30", "--groups-per-epoch", "10", "--max-weights", "1024", "--horizons", "2,5"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: these tiny models gain nothing from two, and the suite shares 2 cores with other
    processes, where two spinning OpenMP threads per process slow everything down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast_store")
    write_synthetic_runs(root, runs=6, snapshots=20, tau=10.0, noise=0.1)
    write_synthetic_runs(root, runs=3, snapshots=20, tau=10.0, noise=0.1, arch="other", seed=50)
    return root


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("forecaster") / "f.pt"
    rc = main(
        ["train-forecaster", "--data", str(store), "--out", str(out), *TRAIN, "--holdout", "arch=other"]
    )
    assert rc == 0
    return out


def test_train_forecaster_writes_a_checkpoint_with_its_split(trained, store, capsys):
    blob = read_checkpoint(trained)
    split = blob["meta"]["split"]
    assert len(split["train"]) == 4 and len(split["val"]) == 1 and len(split["test"]) == 4
    assert all(i.startswith("other-") for i in split["test"][:3])  # the held-out architecture
    assert set(split["train"]).isdisjoint(split["val"] + split["test"])
    assert blob["meta"]["snapshot_every"] == 10 and blob["meta"]["trainer"]["max_steps"] == 30
    model = load_forecaster(trained)
    assert model.name == "lstm" and model.horizons == (2, 5) and model.snapshot_every == 10
    assert sorted(load_baselines(trained)) == ["linear", "mlp", "persistence"]
    # Nothing is overwritten without --overwrite.
    before = trained.read_bytes()
    assert main(["train-forecaster", "--data", str(store), "--out", str(trained), *TRAIN]) == 2
    assert "exists" in capsys.readouterr().err and trained.read_bytes() == before


def test_evaluate_forecaster_scores_only_unseen_runs(trained, store, tmp_path, capsys):
    out_json, out_png = tmp_path / "eval.json", tmp_path / "forecast.png"
    rc = main(
        [
            "evaluate-forecaster",
            "--forecaster",
            str(trained),
            "--data",
            str(store),
            "--by",
            "arch",
            "--json",
            str(out_json),
        ]
        + ["--plot", str(out_png)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "scoring 4 of 9 runs" in printed and "lstm R2 / cos" in printed
    result = json.loads(out_json.read_text())
    split = read_checkpoint(trained)["meta"]["split"]
    assert sorted(result["all"]["runs"]) == sorted(split["test"])
    assert set(result["all"]["models"]) == {"persistence", "linear", "mlp", "lstm"}
    assert sorted(result["by"]) == ["arch=other", "arch=synthetic"]
    rows = result["all"]["rows"]
    assert {(r["horizon"], r["kind"]) for r in rows} == {
        (h, k) for h in (2, 5) for k in ("conv2d", "linear", "all")
    }
    for r in rows:
        if r["model"] == "persistence":
            assert r["r2_disp"] == 0.0
        else:
            assert r["r2_disp"] > 0.3, r  # slowing trajectories, mild noise: every forecaster explains a lot
    assert out_png.stat().st_size > 10_000
    # --split train is possible, but only when asked for.
    assert (
        main(["evaluate-forecaster", "--forecaster", str(trained), "--data", str(store), "--split", "train"])
        == 0
    )
    assert "scoring 4 of 9 runs (split train)" in capsys.readouterr().out


def test_cli_errors_are_one_line(trained, store, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    cases = [
        ["evaluate-forecaster", "--forecaster", str(bad), "--data", str(store)],
        ["evaluate-forecaster", "--forecaster", str(trained), "--data", str(tmp_path / "none")],
        ["evaluate-forecaster", "--forecaster", str(trained), "--data", str(store), "--split", "some"],
        ["train-forecaster", "--data", str(store), "--out", str(tmp_path / "x.pt"), "--kind", "gru"],
        ["train-forecaster", "--data", str(store), "--out", str(tmp_path / "x.pt"), "--kind", "linear"],
        ["train-forecaster", "--data", str(store), "--out", str(tmp_path / "x.pt"), "--horizons", "a,b"],
        ["train-forecaster", "--data", str(store), "--out", str(tmp_path / "x.pt"), "--data.lr", "1"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("sleepbot: error:") and "\n" not in err, (argv, err)
    assert not (tmp_path / "x.pt").exists()


def test_a_real_recorded_run(trained, tiny_config, tmp_path, capsys):
    """One tiny digits run recorded by the real recorder: windows, forecasts, evaluation and the plot."""
    from sleepbot.forecast.evaluate import evaluate, score
    from sleepbot.forecast.windows import WindowDataset, scan_runs
    from sleepbot.store import RunFile
    from sleepbot.training import run_training
    from sleepbot.viz.forecast import plot_forecast

    cfg = tiny_config
    cfg.trainer.max_steps = 60
    cfg.record.enabled = True
    cfg.record.snapshot_every = 5
    cfg.record.path = str(tmp_path / "run.h5")
    run_training(cfg, test=False)
    (info,) = scan_runs([tmp_path / "run.h5"])
    assert info.snapshot_every == 5 and len(info.snapshot_steps) == 13 and info.max_steps == 60
    ds = WindowDataset([info], 5, (2, 5), mode="all", max_weights=10**6, positions=100)
    with RunFile(tmp_path / "run.h5") as f:
        for g in ds:
            w = f.weights(g["layer"])  # [S, N, F]
            t = int(g["t_end"][0])
            torch.testing.assert_close(g["history"][:, : g["neurons"]], torch.from_numpy(w[t - 4 : t + 1]))
    models = {**load_baselines(trained), "lstm": load_forecaster(trained)}
    result = evaluate(models, [info])
    assert {r["kind"] for r in result["rows"]} == {"conv2d", "linear", "all"}
    for name in ("linear", "mlp", "lstm"):
        assert -1e3 < score(result, name, 2) < 1.0
    fig = plot_forecast(tmp_path / "run.h5", tmp_path / "real.png", forecaster=trained, samples=3)
    assert (
        len([a for a in fig.axes if a.get_visible()]) == 3 and (tmp_path / "real.png").stat().st_size > 10_000
    )
    assert (
        main(["evaluate-forecaster", "--forecaster", str(trained), "--data", str(tmp_path / "run.h5")]) == 0
    )
    assert "scoring 1 of 1 runs" in capsys.readouterr().out


@pytest.mark.slow
def test_training_under_ddp(store, tmp_path):
    """Trainer options pass through: two CPU processes (gloo) share the windows and the validation sums."""
    out = tmp_path / "ddp.pt"
    rc = main(
        [
            "train-forecaster",
            "--data",
            str(store),
            "--out",
            str(out),
            *TRAIN,
            "--baselines",
            "",
            "--threads",
            "1",
        ]
        + ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]
    )
    assert rc == 0
    blob = read_checkpoint(out)
    assert blob["meta"]["trainer"]["devices"] == 2 and blob["baselines"] == {}
    scores = blob["meta"]["val_scores"]["lstm"]
    assert set(scores) == {
        "val_loss",
        "val_r2_h2",
        "val_r2_h5",
    }  # validation ran and came back from the ranks
    assert all(v == v for v in scores.values())
    assert torch.isfinite(load_forecaster(out).predict(torch.randn(5, 3, 4), 5)).all()
