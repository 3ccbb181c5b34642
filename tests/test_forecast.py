"""The forecasters: the interface, every registered forecaster on a known trajectory, checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sleepbot.errors import SleepbotError
from sleepbot.forecast import (
    FORECASTERS,
    build_forecaster,
    load_baselines,
    load_forecaster,
    read_checkpoint,
    save_forecaster,
)
from sleepbot.forecast.synthetic import synthetic_trajectory, write_synthetic_runs


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: these tiny models gain nothing from two, and the suite shares 2 cores with other
    processes, where two spinning OpenMP threads per process slow everything down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _history(c=5, n=7, f=11, seed=0, tau=20.0, noise=0.3):
    return torch.from_numpy(synthetic_trajectory(c, n, f, tau=tau, noise=noise, seed=seed))


# Every registered forecaster, and the lstm's ablation variants (they have parameters of their own).
VARIANTS = {
    **{name: (name, {}) for name in sorted(FORECASTERS)},
    "lstm-mixer_mlp": ("lstm", {"mixer": "mlp"}),
    "lstm-layer_context": ("lstm", {"layer_context": True}),
    "lstm-read_progress": ("lstm", {"read_progress": True}),
    "multiscale-mixer_none": ("multiscale", {"mixer": "none"}),
    "multiscale-mixer_mlp": ("multiscale", {"mixer": "mlp"}),
    "multiscale-head": ("multiscale", {"head_hidden": 8}),
}


# ------------------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_predict_shapes_and_context(variant):
    name, options = VARIANTS[variant]
    model = build_forecaster(name, context=4, horizons=(2, 4), **options)
    hist = _history(c=9)
    out = model.predict(hist, 2, kind="conv2d", progress=0.5)
    assert out.shape == (7, 11) and torch.isfinite(out).all()
    # Only the last `context` snapshots count.
    same = model.predict(hist[-4:], 2, kind="conv2d", progress=0.5)
    torch.testing.assert_close(out, same)
    with pytest.raises(SleepbotError, match="needs at least 4"):
        model.predict(hist[:3], 2)
    bad = hist.clone()
    bad[-1, 0, 0] = float("nan")
    with pytest.raises(SleepbotError, match="NaN"):
        model.predict(bad, 2)
    with pytest.raises(SleepbotError, match="layer kind"):
        model.predict(hist, 2, kind="conv5d")
    with pytest.raises(SleepbotError, match="horizon"):
        model.predict(hist, 0)
    with pytest.raises(SleepbotError, match=r"\[C, N, F\]"):
        model.predict(hist[0], 2)


def test_check_history_tells_infinite_weights_from_a_sum_that_overflows():
    model = build_forecaster("linear")
    huge = torch.full((5, 3, 4), 3e38)  # finite weights whose sum overflows float32
    assert torch.equal(model.check_history(huge), huge)
    for bad in (float("inf"), -float("inf")):
        hist = _history()
        hist[2, 1, 3] = bad
        with pytest.raises(SleepbotError, match="NaN or infinite"):
            model.check_history(hist)


def test_persistence_and_linear_are_exact():
    hist = _history(c=5, tau=float("inf"), noise=0.0)  # straight lines
    lin = build_forecaster("linear")
    per = build_forecaster("persistence")
    slope = hist[1] - hist[0]
    torch.testing.assert_close(lin.predict(hist, 7), hist[-1] + 7 * slope, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(per.predict(hist, 7), hist[-1])


def test_learned_horizons_interpolate_and_refuse_beyond():
    torch.manual_seed(0)
    model = build_forecaster("lstm", horizons=(2, 6))
    hist = _history()
    with torch.no_grad():
        d2, d6 = model(model.check_history(hist), "linear", None)
    last = hist[-1]
    torch.testing.assert_close(model.predict(hist, 4) - last, 0.5 * d2 + 0.5 * d6, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.predict(hist, 1) - last, 0.5 * d2, rtol=1e-4, atol=1e-5)
    with pytest.raises(SleepbotError, match="beyond the largest horizon"):
        model.predict(hist, 7)


@pytest.mark.parametrize("variant", [v for v, (n, _) in sorted(VARIANTS.items()) if FORECASTERS[n].learned])
def test_forward_at_gives_the_rows_of_forward(variant):
    """A jump computes only the trained horizons it needs (`forward_at`): the same numbers as the full forward's
    rows, bit for bit, and interpolated horizons built from them."""
    name, options = VARIANTS[variant]
    torch.manual_seed(1)
    model = build_forecaster(name, context=6, horizons=(2, 4, 8), **options)
    with torch.no_grad():
        for p in model.parameters():  # away from the init, where some forecasters' outputs are trivial
            p.add_(0.1 * torch.randn_like(p))
        hist = model.check_history(_history(c=6, n=40, f=9))
        full = model(hist, "conv2d", None)
        for index in ([0], [2], [1, 2], [0, 1, 2]):
            assert torch.equal(model.forward_at(hist, "conv2d", None, index), full[index])
        d = model.displacement(hist, [3, 8, 1], "conv2d", None)
    assert torch.equal(d[1], full[2])
    torch.testing.assert_close(d[0], 0.5 * (full[0] + full[1]))
    torch.testing.assert_close(d[2], 0.5 * full[0])


@pytest.mark.parametrize("name", ["lstm", "mlp"])
def test_learned_forecasters_are_scale_free(name):
    """Multiplying a trajectory by k multiplies the forecast displacement by k (per-neuron / per-weight scaling)."""
    torch.manual_seed(0)
    model = build_forecaster(name)
    hist = _history()
    base = model.predict(hist, 5, kind="linear", progress=0.2) - hist[-1]
    for k in (1e-3, 1e3):
        scaled = model.predict(hist * k, 5, kind="linear", progress=0.2) - hist[-1] * k
        torch.testing.assert_close(scaled / k, base, rtol=1e-3, atol=1e-4)


def test_default_horizon_is_checked_and_kept():
    assert build_forecaster("lstm", horizons=(5, 10)).default_horizon == 5
    assert build_forecaster("lstm", horizons=(2, 3)).default_horizon == 3
    with pytest.raises(SleepbotError, match="default_horizon"):
        build_forecaster("lstm", horizons=(5, 10), default_horizon=20)
    with pytest.raises(SleepbotError, match="unknown forecaster"):
        build_forecaster("transformer")


# ------------------------------------------------------------------------------- learning, every forecaster
@pytest.fixture(scope="module")
def linear_store(tmp_path_factory):
    """Linear-plus-noise trajectories (straight lines, noise 5% of a step) in real run files."""
    root = tmp_path_factory.mktemp("linear_store")
    write_synthetic_runs(root, runs=2, snapshots=16, noise=0.05, layers=(("fc", "linear", 8, 9),))
    return root


@pytest.mark.parametrize("name", sorted(FORECASTERS))
def test_every_forecaster_learns_a_linear_plus_noise_trajectory(name, linear_store):
    """Learned forecasters are trained on the runs and must then explain their displacement almost fully (the best
    possible on straight lines plus noise is the least-squares line, R2 ~0.99 here); linear extrapolation does so
    untrained; persistence explains nothing, by definition."""
    from sleepbot.forecast.evaluate import evaluate, score
    from sleepbot.forecast.module import ForecasterTrainConfig, fit_one
    from sleepbot.forecast.windows import resolve_paths, scan_runs

    runs = scan_runs(resolve_paths(linear_store))
    cfg = ForecasterTrainConfig(
        model=name,
        context=4,
        horizons=(2, 4),
        groups_per_epoch=40,
        groups_per_step=2,
        lr=1e-2,
        max_weights=512,
    )
    if FORECASTERS[name].learned:
        model, scores = fit_one(name, cfg, runs, runs[:1], 10, {"max_steps": 150})
        assert set(scores) == {"val_loss", "val_r2_h2", "val_r2_h4"}
    else:
        model = build_forecaster(name, context=4, horizons=(2, 4))
    result = evaluate({name: model}, runs)
    for h in (2, 4):
        r2 = score(result, name, h)
        if name == "persistence":
            assert r2 == 0.0 and score(result, name, h, key="cos") == 0.0
        else:
            assert r2 > 0.97, f"{name} R2_disp {r2:.3f} at horizon {h}"
            assert score(result, name, h, key="cos") > 0.95


def test_lstm_learns_to_damp_a_saturating_trajectory(tmp_path):
    """On trajectories that slow down (tau = 8 snapshots), linear extrapolation overshoots; the trained LSTM must
    beat it on runs it never saw."""
    from sleepbot.forecast.evaluate import evaluate, score
    from sleepbot.forecast.module import ForecasterTrainConfig, fit_one
    from sleepbot.forecast.windows import resolve_paths, scan_runs

    write_synthetic_runs(tmp_path / "train", runs=2, snapshots=30, tau=8.0, noise=0.02, seed=0)
    write_synthetic_runs(tmp_path / "test", runs=1, snapshots=30, tau=8.0, noise=0.02, seed=10)
    train = scan_runs(resolve_paths(tmp_path / "train"))
    test = scan_runs(resolve_paths(tmp_path / "test"))
    cfg = ForecasterTrainConfig(context=5, horizons=(5, 10), groups_per_epoch=50, max_weights=2048, lr=1e-2)
    model, _ = fit_one("lstm", cfg, train, [], 10, {"max_steps": 150})
    result = evaluate({"lstm": model, "linear": build_forecaster("linear", horizons=(5, 10))}, test)
    for h in (5, 10):
        assert score(result, "lstm", h) > score(result, "linear", h) + 0.05
        assert score(result, "lstm", h) > 0.8


def test_evaluate_context_scores_on_the_windows_of_a_longer_reader(tmp_path):
    """`context` sets the windows, not what a model reads: a 4-snapshot linear fit scored on the windows of a
    10-snapshot reader sees exactly the windows it sees when evaluated beside one; shorter than a model's is an
    error."""
    from sleepbot.forecast.evaluate import evaluate, score
    from sleepbot.forecast.windows import resolve_paths, scan_runs

    write_synthetic_runs(tmp_path, runs=1, snapshots=30, tau=8.0, noise=0.05, seed=3)
    runs = scan_runs(resolve_paths(tmp_path))
    short = build_forecaster("linear", context=4, horizons=(2,))
    long_reader = build_forecaster("persistence", context=10, horizons=(2,))

    def windows(res):
        return next(r["windows"] for r in res["rows"] if r["kind"] == "all")

    own = evaluate({"short": short}, runs)
    alone = evaluate({"short": short}, runs, context=10)
    beside = evaluate({"short": short, "long": long_reader}, runs)
    assert windows(alone) == windows(beside) < windows(own)
    assert score(alone, "short", 2) == score(beside, "short", 2) != score(own, "short", 2)
    with pytest.raises(SleepbotError, match="shorter than a model's context 4"):
        evaluate({"short": short}, runs, context=3)


# -------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_forecaster("lstm", horizons=(5, 10), snapshot_every=10, hidden=16)
    mlp = build_forecaster("mlp", horizons=(5, 10), snapshot_every=10)
    path = tmp_path / "f.pt"
    save_forecaster(model, path, baselines={"mlp": mlp}, split={"train": ["a"], "val": [], "test": ["b"]})
    loaded = load_forecaster(path)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    assert loaded.snapshot_every == 10 and loaded.hidden == 16 and not loaded.training
    hist = _history()
    torch.testing.assert_close(loaded.predict(hist, 5, progress=0.3), model.predict(hist, 5, progress=0.3))
    base = load_baselines(path)
    assert sorted(base) == ["linear", "mlp", "persistence"]
    torch.testing.assert_close(base["mlp"].predict(hist, 10), mlp.predict(hist, 10))
    blob = read_checkpoint(path)
    assert blob["meta"]["split"]["test"] == ["b"] and blob["normalisation"]["kind"] == "neuron-motion-rms"
    # Nothing is overwritten without asking; a refused save leaves the file as it was.
    before = path.read_bytes()
    with pytest.raises(SleepbotError, match="overwrite"):
        save_forecaster(mlp, path)
    assert path.read_bytes() == before
    save_forecaster(mlp, path, overwrite=True)
    assert load_forecaster(path).name == "mlp"
    assert not list(tmp_path.glob(".*tmp"))


class _Exploit:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    exploit_target = tmp_path / "pwned"
    cases = {
        "random.pt": lambda p: torch.save({"weights": torch.randn(3)}, p),
        "tensor.pt": lambda p: torch.save(torch.randn(3), p),
        "exploit.pt": lambda p: torch.save({"x": _Exploit(str(exploit_target))}, p),
        "pickle.pkl": lambda p: p.write_bytes(
            pickle.dumps({"format": "sleepbot-forecaster", "obj": _Exploit(str(exploit_target))})
        ),
        "text.txt": lambda p: p.write_text("not a checkpoint\n"),
        "hello.pt": lambda p: p.write_text("hello"),  # 'h' is a pickle opcode: the unpickler fails oddly
        "empty.pt": lambda p: p.write_bytes(b""),
    }
    for name, make in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(SleepbotError) as info:
            load_forecaster(path)
        msg = str(info.value)
        assert "\n" not in msg and "not a sleepbot forecaster" in msg, (name, msg)
    assert not exploit_target.exists()  # weights_only loading never ran the pickled code
    # A truncated real checkpoint, and one whose weights do not fit its config.
    good = tmp_path / "good.pt"
    save_forecaster(build_forecaster("lstm"), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SleepbotError, match="not a sleepbot forecaster"):
        load_forecaster(tmp_path / "cut.pt")
    blob = torch.load(good, weights_only=True)
    blob["forecaster"]["config"]["hidden"] = 8
    torch.save(blob, tmp_path / "mismatch.pt")
    with pytest.raises(SleepbotError, match="do not fit"):
        load_forecaster(tmp_path / "mismatch.pt")
    with pytest.raises(SleepbotError, match="does not exist"):
        load_forecaster(tmp_path / "missing.pt")


def test_shipped_default_loads_and_is_small():
    from sleepbot.forecast import DEFAULT_PATH

    assert DEFAULT_PATH.is_file(), (
        "sleepbot/assets/forecaster.pt is missing (scripts/train_default_forecaster.sh)"
    )
    assert DEFAULT_PATH.stat().st_size <= 2 * 1024 * 1024
    model = load_forecaster()
    assert model.name == "lstm" and model.snapshot_every == 10 and model.context == 5
    assert model.default_horizon in model.horizons
    hist = _history()
    out = model.predict(hist, model.default_horizon, kind="conv2d", progress=0.1)
    assert out.shape == hist.shape[1:] and torch.isfinite(out).all()
    meta = read_checkpoint(DEFAULT_PATH)["meta"]
    assert set(meta["split"]["train"]).isdisjoint(meta["split"]["test"])


def test_lstm_ignores_the_budget_unless_told_to_read_it():
    """A forecaster's jump must not depend on the budget the user set: step / max_steps differs between a run of
    500 steps and one of 5,000 at the same step. The default lstm ignores it; read_progress=True reads it."""
    hist = _history(c=5)
    torch.manual_seed(0)
    blind = build_forecaster("lstm", context=5, horizons=(2, 4))
    with torch.no_grad():
        for p in blind.parameters():
            p.normal_(0, 0.3)
    reader = build_forecaster("lstm", context=5, horizons=(2, 4), read_progress=True)
    reader.load_state_dict(blind.state_dict())
    a, b = (blind.predict(hist, 2, kind="linear", progress=p) for p in (0.1, 0.01))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a, b = (reader.predict(hist, 2, kind="linear", progress=p) for p in (0.1, 0.01))
    assert not torch.equal(a, b)
    with pytest.raises(SleepbotError, match="mixer"):
        build_forecaster("lstm", mixer="gru")


# --------------------------------------------------------------------------------------------- multiscale
@pytest.mark.parametrize("c", [2, 4, 7, 20, 25])
def test_trend_features_match_a_loop_over_each_window(c):
    from sleepbot.forecast.multiscale import R_WINDOWS, S_WINDOWS, trend_features

    g = torch.Generator().manual_seed(c)
    hist = torch.randn(c, 3, 5, generator=g, dtype=torch.float64).cumsum(0) + 10.0
    scale = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    got = trend_features(hist, scale)
    assert len(got) == len(R_WINDOWS) + len(S_WINDOWS)
    want = []
    for k in R_WINDOWS:  # mean of the last k (the whole history when shorter) minus the last, in motion units
        k = min(k, c)
        want.append((hist[-k:].mean(0) - hist[-1]) / scale[:, None])
    for k in S_WINDOWS:  # least-squares slope per snapshot over the last k, by np.polyfit weight by weight
        k = min(k, c)
        slope = torch.zeros(3, 5, dtype=torch.float64)
        for n in range(3):
            for f in range(5):
                slope[n, f] = float(np.polyfit(np.arange(k), hist[-k:, n, f].numpy(), 1)[0])
        want.append(slope / scale[:, None])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_multiscale_reads_any_history_length_between_its_min_and_its_context():
    model = build_forecaster("multiscale", context=8, min_context=3, horizons=(2, 4))
    hist = _history(c=12)
    for c in (3, 5, 8):
        out = model.predict(hist[-c:], 2, kind="linear")
        assert out.shape == hist.shape[1:] and torch.isfinite(out).all()
    torch.testing.assert_close(model.predict(hist, 2), model.predict(hist[-8:], 2))  # only the last 8 count
    with pytest.raises(SleepbotError, match="needs at least 3 \\(its min_context\\)"):
        model.predict(hist[-2:], 2)
    with pytest.raises(SleepbotError, match="min_context must be between 2 and context"):
        build_forecaster("multiscale", context=8, min_context=9)
    # a mixer of global coefficients only, and the per-weight head, give forecasts of the same shape
    for options in ({"mixer": "none"}, {"head_hidden": 8}, {"mixer": "mlp", "layer_context": True}):
        m = build_forecaster("multiscale", context=8, min_context=3, horizons=(2, 4), **options)
        assert m.predict(hist, 4).shape == hist.shape[1:]
