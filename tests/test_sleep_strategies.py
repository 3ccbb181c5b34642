"""Every registered sleep strategy against a slow, obvious reference, on the neurons of a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_sleep_helpers import TinyNet, digits_tensors

from sleepbot.errors import SleepbotError
from sleepbot.neurons import layer_kind, neuron_layers, neuron_matrix
from sleepbot.sleep import STRATEGIES, LayerContext, Sleep, SleepStrategy, make_strategy

# The package's own strategies (test modules register their own, e.g. tests/test_compare_cli.py).
BUILTIN = sorted(n for n, c in STRATEGIES.items() if c.__module__.startswith("sleepbot."))


@pytest.fixture(scope="module")
def trajectory():
    """Real snapshots of TinyNet's layers: 6 snapshots, 3 plain SGD steps apart, on digits. {layer: [C, N, F]}."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = digits_tensors(128)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    layers = neuron_layers(model)
    snaps = {name: [neuron_matrix(m)] for name, m in layers.items()}
    for step in range(1, 16):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[step % 4 * 32 :][:32]), y[step % 4 * 32 :][:32]).backward()
        opt.step()
        if step % 3 == 0:
            for name, m in layers.items():
                snaps[name].append(neuron_matrix(m))
    return {name: (torch.stack(s), layer_kind(layers[name])) for name, s in snaps.items()}


def _ctx(name: str, kind: str, steps: list[int], seed: int = 7) -> LayerContext:
    return LayerContext(
        layer=name,
        kind=kind,
        step=steps[-1],
        steps=torch.tensor(steps),
        snapshot_every=3,
        progress=0.25,
        generator=torch.Generator().manual_seed(seed),
    )


# ------------------------------------------------------------------------------------------ slow references
def ref_linear(history: np.ndarray, steps: list[int], horizon: int, every: int) -> np.ndarray:
    """A degree-1 numpy.polyfit per weight, evaluated `horizon` snapshots after the last one."""
    c, n, f = history.shape
    t = (np.array(steps, dtype=float) - steps[-1]) / every
    out = np.empty((n, f))
    for i in range(n):
        for j in range(f):
            slope, intercept = np.polyfit(t, history[:, i, j], 1)
            out[i, j] = intercept + slope * horizon
    return out


def ref_noise(w: np.ndarray, eps: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = w[i, j] + alpha * abs(w[i, j]) * eps[i, j]
    return out


def ref_square_normalize(w: np.ndarray, mix: float) -> np.ndarray:
    out = np.empty_like(w)
    for i, row in enumerate(w):
        sq = [math.copysign(v * v, v) for v in row]
        norm_w = math.sqrt(sum(v * v for v in row))
        norm_s = math.sqrt(sum(v * v for v in sq))
        target = [v * norm_w / norm_s for v in sq] if norm_s > 0 else list(row)
        out[i] = [(1 - mix) * a + mix * b for a, b in zip(row, target)]
    return out


def _check_close(got: torch.Tensor, want: np.ndarray, tol: float = 1e-4) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)


def case_none(hist, kind, name, tmp_path):
    s = make_strategy("none")
    assert not s.moves_weights
    _check_close(s.propose(hist, 5, _ctx(name, kind, [0, 3, 6, 9, 12, 15])), hist[-1].numpy())


def case_linear(hist, kind, name, tmp_path):
    s = make_strategy("linear")
    steps = [0, 3, 6, 9, 12, 15]
    _check_close(s.propose(hist, 4, _ctx(name, kind, steps)), ref_linear(hist.double().numpy(), steps, 4, 3))
    # unevenly spaced history (a custom schedule slept between grid points): the fit uses the real steps
    steps = [0, 3, 6, 9, 12, 14]
    _check_close(s.propose(hist, 2, _ctx(name, kind, steps)), ref_linear(hist.double().numpy(), steps, 2, 3))


def case_noise(hist, kind, name, tmp_path):
    s = make_strategy("noise", alpha=0.3)
    w = hist[-1]
    eps = torch.randn(w.shape, generator=torch.Generator().manual_seed(7)).numpy()
    _check_close(s.propose(hist[-1:], 1, _ctx(name, kind, [15])), ref_noise(w.numpy(), eps, 0.3))


def case_square_normalize(hist, kind, name, tmp_path):
    w = hist[-1].clone()
    w[0] = 0.0  # an all-zero neuron is left alone
    for mix in (1.0, 0.25):
        got = make_strategy("square_normalize", mix=mix).propose(w[None], 1, _ctx(name, kind, [15]))
        _check_close(got, ref_square_normalize(w.double().numpy(), mix))
    got = make_strategy("square_normalize").propose(w[None], 1, _ctx(name, kind, [15]))
    torch.testing.assert_close(got.norm(dim=1), w.norm(dim=1))  # each neuron keeps its norm


def case_lookahead(hist, kind, name, tmp_path):
    s = make_strategy("lookahead", alpha=0.4, k=3)
    slow, fast = hist[-2].double().numpy(), hist[-1].double().numpy()
    want = np.array([[a + 0.4 * (b - a) for a, b in zip(rs, rf)] for rs, rf in zip(slow, fast)])
    _check_close(s.propose(hist[-2:], 1, _ctx(name, kind, [12, 15])), want)


def case_average(hist, kind, name, tmp_path):
    s = make_strategy("average", k=3)
    h = hist[-3:].double().numpy()
    want = np.array(
        [[sum(h[c][n][f] for c in range(3)) / 3 for f in range(h.shape[2])] for n in range(h.shape[1])]
    )
    _check_close(s.propose(hist[-3:], 7, _ctx(name, kind, [9, 12, 15])), want)
    with pytest.raises(SleepbotError, match="average needs k >= 2"):
        make_strategy("average", k=1)


def ref_dmd(history: np.ndarray, horizon: int, rank: int, max_ratio: float) -> np.ndarray:
    """Textbook exact DMD (Schmid 2010; Tu et al. 2014) in numpy: X = [x_0 .. x_{C-2}], Y = [x_1 .. x_{C-1}] as
    columns, X = U S V^T truncated to `rank`, A~ = U^T Y V S^-1, the jump U (A~^h - I) U^T x_{C-1}, capped at
    max_ratio x |x_{C-1} - x_0| / (C - 1) x h."""
    c = history.shape[0]
    cols = history.reshape(c, -1).T  # [P, C]
    u, sv, vt = np.linalg.svd(cols[:, :-1], full_matrices=False)
    r = min(rank, int((sv > sv[0] * 1e-10).sum()))
    u, sv, v = u[:, :r], sv[:r], vt[:r].T
    a = u.T @ cols[:, 1:] @ v @ np.diag(1 / sv)
    z = u.T @ cols[:, -1]
    jump = u @ (np.linalg.matrix_power(a, horizon) @ z - z)
    cap = max_ratio * np.linalg.norm(cols[:, -1] - cols[:, 0]) / (c - 1) * horizon
    if np.linalg.norm(jump) > cap:
        jump *= cap / np.linalg.norm(jump)
    return (cols[:, -1] + jump).reshape(history.shape[1:])


def case_dmd(hist, kind, name, tmp_path):
    steps = [0, 3, 6, 9, 12, 15]
    for rank, ratio in ((2, 1.0), (8, 3.0)):
        got = make_strategy("dmd", rank=rank, max_ratio=ratio).propose(hist, 4, _ctx(name, kind, steps))
        _check_close(got, ref_dmd(hist.double().numpy(), 4, rank, ratio))
    for bad in ({"rank": 0}, {"max_ratio": 0.0}):
        with pytest.raises(SleepbotError, match="dmd"):
            make_strategy("dmd", **bad)


def test_dmd_fits_a_straight_path_and_a_geometric_approach_exactly():
    g = torch.Generator().manual_seed(4)
    x0, v, target = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    ctx = _ctx("layer", "linear", [0, 3, 6, 9, 12, 15, 18, 21])
    line = torch.stack([x0 + t * v for t in range(8)])
    torch.testing.assert_close(make_strategy("dmd").propose(line, 5, ctx), x0 + 12 * v)
    # x_t = target + 0.8^t (x0 - target): the jump approaches the target, shorter than the straight line
    curve = torch.stack([target + 0.8**t * (x0 - target) for t in range(8)])
    torch.testing.assert_close(make_strategy("dmd").propose(curve, 5, ctx), target + 0.8**12 * (x0 - target))
    # a growing mode is capped at the straight line's length
    grow = torch.stack([target + 1.5**t * (x0 - target) for t in range(8)])
    got = make_strategy("dmd").propose(grow, 5, ctx)
    assert (got - grow[-1]).norm() == pytest.approx(float((grow[-1] - grow[0]).norm() / 7 * 5))


def case_random(hist, kind, name, tmp_path):
    s = make_strategy("random", base="linear")
    steps = [0, 3, 6, 9, 12, 15]
    got = s.propose(hist, 4, _ctx(name, kind, steps))
    cur = hist[-1].double().numpy()
    size = math.sqrt(((ref_linear(hist.double().numpy(), steps, 4, 3) - cur) ** 2).sum())
    eps = torch.randn(hist[-1].shape, generator=torch.Generator().manual_seed(7)).double().numpy()
    # the base (linear) draws nothing, so the direction is the generator's first draw
    _check_close(got, cur + eps * size / math.sqrt((eps**2).sum()))


def case_learned(hist, kind, name, tmp_path):
    from sleepbot.forecast import LinearForecaster, save_forecaster

    path = tmp_path / f"linear-{name}.pt"
    save_forecaster(LinearForecaster(context=4, horizons=(1, 2, 5), snapshot_every=3), path)
    s = make_strategy("learned", forecaster=str(path))
    assert s.defaults()["context"] == 4 and s.defaults()["snapshot_every"] == 3
    steps = [6, 9, 12, 15]
    want = ref_linear(hist[-4:].double().numpy(), steps, 2, 3)
    _check_close(s.propose(hist[-4:], 2, _ctx(name, kind, steps)), want)
    with pytest.raises(SleepbotError, match="steps apart"):
        s.propose(hist[-4:], 2, _ctx(name, kind, [6, 9, 12, 14]))
    # gain scales the displacement: twice the line's displacement from the last snapshot
    s = make_strategy("learned", forecaster=str(path), gain=2.0)
    last = hist[-1].double().numpy()
    _check_close(s.propose(hist[-4:], 2, _ctx(name, kind, steps)), last + 2 * (want - last))


def case_oracle(hist, kind, name, tmp_path):
    pytest.importorskip("h5py")
    from sleepbot.store import RunFile

    path = _recorded_run(tmp_path)
    s = make_strategy("oracle", run=str(path))
    s.setup(None, 20)
    with RunFile(path) as run:
        steps = [int(x) for x in run.snapshot_steps]
        layer = run.layers[0]
        n = run.layer_info(layer)["n"]
        recorded = run.weights(layer)  # [S, N, F]
    cur = torch.as_tensor(recorded[1]) + 1.0  # "current" weights somewhere else
    ctx = _ctx(layer, kind, [steps[1]])
    ctx.snapshot_every = steps[1] - steps[0]
    got = s.propose(cur[None], 2, ctx)
    # the oracle jumps to what the recorded run had 2 snapshots later, neuron by neuron
    want = np.stack([recorded[3][i] for i in range(n)])
    _check_close(got, want)
    # after earlier jumps skipped 2 snapshots, the weights stand for the recording 2 snapshots on: it reads from there
    ctx.jumped = 2 * ctx.snapshot_every
    _check_close(s.propose(cur[None], 2, ctx), np.stack([recorded[5][i] for i in range(n)]))
    # past the end of the recording, nothing moves
    ctx = _ctx(layer, kind, [steps[-1]])
    _check_close(s.propose(cur[None], 2, ctx), cur.numpy())


def case_nino(hist, kind, name, tmp_path):
    # the per-scalar reference lives with nino's own tests (tests/test_sleep_nino.py); here one layer of a real
    # trajectory, weights and bias as separate tensors
    from test_sleep_nino import random_state_dict, ref_tensor

    path = tmp_path / f"wnn-{name}.pt"
    sd = random_state_dict()
    torch.save({"state_dict": sd, "model_args": {"gnn": False}}, path)
    s = make_strategy("nino", checkpoint=str(path), k=3)
    s.setup(TinyNet(), 20)
    h = hist[-5:].double().numpy()  # [5, N, fan_in + 1]
    want = np.concatenate(
        [ref_tensor(sd, h[:, :, :-1], 1, 3), ref_tensor(sd, h[:, :, -1], 2, 3)[:, None]], axis=1
    )
    _check_close(s.propose(hist[-5:], 3, _ctx(name, kind, [3, 6, 9, 12, 15])), want)


_RECORDED: dict[str, object] = {}


def _recorded_run(tmp_path):
    """A real TrajectoryRecorder run of TinyNet (snapshots every 2 steps, 12 steps), made once per module."""
    if "path" not in _RECORDED:
        from test_sleep_helpers import digits_loader, trainer

        from sleepbot.recording import TrajectoryRecorder

        path = tmp_path / "oracle-run.h5"
        torch.manual_seed(0)
        trainer(12, [TrajectoryRecorder(path, snapshot_every=2)]).fit(TinyNet(), digits_loader())
        _RECORDED["path"] = path
    return _RECORDED["path"]


REFERENCES = {
    "none": case_none,
    "linear": case_linear,
    "noise": case_noise,
    "square_normalize": case_square_normalize,
    "lookahead": case_lookahead,
    "average": case_average,
    "dmd": case_dmd,
    "random": case_random,
    "learned": case_learned,
    "oracle": case_oracle,
    "nino": case_nino,
}


def test_every_registered_strategy_has_a_reference():
    assert set(REFERENCES) == set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_strategy_matches_slow_reference(name, trajectory, tmp_path):
    if name == "oracle":
        REFERENCES[name](None, "linear", None, tmp_path)
        return
    for layer, (hist, kind) in trajectory.items():
        REFERENCES[name](hist, kind, layer, tmp_path)


def test_config_names_match_registry():
    """The names YAML and the CLI accept: the package's registry lines, plus whatever is registered at run time."""
    from sleepbot.registry import _static_names, names

    assert set(_static_names()["strategy"]) == set(BUILTIN)
    assert set(names("strategy")) == set(STRATEGIES)  # run-time registrations (a test module's) count too


def test_bad_names_and_options_are_one_line_errors():
    with pytest.raises(SleepbotError, match="unknown sleep strategy 'nope'; valid: .*linear"):
        Sleep("nope")
    with pytest.raises(SleepbotError, match="has no option 'beta'; valid: alpha"):
        Sleep("noise", beta=1.0)
    with pytest.raises(SleepbotError, match="needs context >= 2"):
        Sleep("linear", context=1)
    with pytest.raises(SleepbotError, match="lookahead reads the slow weights"):
        Sleep("lookahead", every_n_steps=50)
    with pytest.raises(SleepbotError, match="unknown optimizer_state 'zero'"):
        Sleep("linear", optimizer_state="zero")
    with pytest.raises(SleepbotError, match="every_n_steps must be >= 1"):
        Sleep("linear", every_n_steps=0)
    with pytest.raises(SleepbotError, match="does not exist"):
        Sleep("learned", forecaster="/nonexistent/forecaster.pt")
    with pytest.raises(SleepbotError, match="cannot match the size of another random"):
        Sleep("random", base="random")
    for msg in ("\n",):
        try:
            Sleep("nope")
        except SleepbotError as e:
            assert msg not in str(e)


def test_learned_calibrate_shrinks_a_jump_by_how_right_the_forecaster_was_on_this_run(tmp_path):
    """calibrate backtests the forecaster `horizon` snapshots back: on a straight line the backtest is exact
    (lambda 1, the full jump); on a path that turned back after the backtest's history, the old forecast pointed the
    wrong way (lambda clipped to 0, no move); with too little history there is nothing to judge by (no move)."""
    from sleepbot.forecast import LinearForecaster, save_forecaster

    path = tmp_path / "line.pt"
    save_forecaster(LinearForecaster(context=10, min_context=3, horizons=(1, 2, 5), snapshot_every=3), path)
    plain = make_strategy("learned", forecaster=str(path))
    cal = make_strategy("learned", forecaster=str(path), calibrate=True)
    assert cal.options()["calibrate"] is True
    torch.manual_seed(0)
    start, slope = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.arange(10.0)[:, None, None]
    line = start + slope * t  # [10, 4, 6]
    steps = [3 * i for i in range(10)]
    ctx = _ctx("fc", "linear", steps)
    torch.testing.assert_close(cal.propose(line, 2, ctx), plain.propose(line, 2, ctx))
    assert ctx.extra["calibration"] == pytest.approx(1.0)
    turned = torch.cat([line[:8], line[[6, 5]]])  # forward for 8 snapshots, then 2 back the way it came
    ctx = _ctx("fc", "linear", steps)
    assert torch.equal(cal.propose(turned, 2, ctx), turned[-1])
    assert ctx.extra["calibration"] == 0.0
    assert not torch.equal(plain.propose(turned, 2, _ctx("fc", "linear", steps)), turned[-1])
    ctx = _ctx("fc", "linear", steps[:4])
    assert torch.equal(cal.propose(line[:4], 2, ctx), line[3])  # 4 < min_context 3 + horizon 2
    # the callback refuses a context too short to backtest, in one line
    short = tmp_path / "short.pt"
    save_forecaster(LinearForecaster(context=4, horizons=(1, 2), snapshot_every=3), short)
    with pytest.raises(SleepbotError, match="min_context \\+ horizon = 6"):
        Sleep("learned", forecaster=str(short), calibrate=True, horizon=2)


def test_learned_refuses_settings_its_forecaster_was_not_trained_for(tmp_path):
    from sleepbot.forecast import LinearForecaster, MLPForecaster, save_forecaster

    path = tmp_path / "f.pt"
    save_forecaster(LinearForecaster(context=4, horizons=(1, 2), snapshot_every=3), path)
    cb = Sleep("learned", forecaster=str(path))
    assert (cb.context, cb.snapshot_every, cb.every_n_steps) == (4, 3, 12)
    with pytest.raises(SleepbotError, match="reads context=4"):
        Sleep("learned", forecaster=str(path), context=5)
    with pytest.raises(SleepbotError, match="snapshots 3 steps apart"):
        Sleep("learned", forecaster=str(path), snapshot_every=10)
    mlp = tmp_path / "mlp.pt"
    save_forecaster(MLPForecaster(context=4, horizons=(1, 2), snapshot_every=3), mlp)
    assert Sleep("learned", forecaster=str(mlp)).horizon == 2  # default: its default_horizon, min(5, largest)
    wide = tmp_path / "wide.pt"
    save_forecaster(MLPForecaster(context=4, horizons=(2, 5, 10, 20), snapshot_every=3), wide)
    assert Sleep("learned", forecaster=str(wide)).horizon == 5
    far = tmp_path / "far.pt"
    save_forecaster(
        MLPForecaster(context=4, horizons=(2, 5, 10, 20), snapshot_every=3, default_horizon=10), far
    )
    assert Sleep("learned", forecaster=str(far)).horizon == 10
    # the shipped forecaster, named or not, jumps SHIPPED_HORIZON ahead, not its checkpoint's default_horizon
    from sleepbot.forecast.checkpoint import DEFAULT_PATH
    from sleepbot.sleep.strategies import SHIPPED_HORIZON

    assert Sleep("learned").horizon == SHIPPED_HORIZON == 2
    assert Sleep("learned", forecaster=str(DEFAULT_PATH)).horizon == SHIPPED_HORIZON
    assert Sleep("learned").strategy.model.default_horizon == 5
    with pytest.raises(SleepbotError, match="up to 2 snapshots ahead"):
        Sleep("learned", forecaster=str(mlp), horizon=3)


def test_custom_strategy_object_is_accepted():
    class Halve(SleepStrategy):
        def propose(self, history, horizon, ctx):
            return history[-1] / 2

    cb = Sleep(Halve(), context=1)
    assert cb.strategy.name == "custom"
    with pytest.raises(SleepbotError, match="pass them to its constructor"):
        Sleep(Halve(), alpha=1.0)


def test_learned_along_the_trend_keeps_the_forecast_s_length():
    """`along="trend"`: each neuron moves along its history's least-squares line, as far as the forecast moves it."""
    from sleepbot.sleep.strategies import Learned, LinearExtrapolation

    torch.manual_seed(0)
    steps = torch.arange(0, 50, 10)
    drift = torch.randn(1, 6, 9)
    hist = torch.randn(6, 9) + drift * steps[:, None, None] / 10 + 0.3 * torch.randn(5, 6, 9)  # [5, N, F]
    ctx = LayerContext(layer="l", kind="linear", step=40, steps=steps, snapshot_every=10)
    cur = hist[-1]
    forecast = Learned().propose(hist, 2, ctx) - cur
    trend = LinearExtrapolation().propose(hist, 2, ctx) - cur
    jump = Learned(along="trend").propose(hist, 2, ctx) - cur
    torch.testing.assert_close(jump.norm(dim=1), forecast.norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(jump, trend, dim=1)
    assert bool((cos > 1 - 1e-5).all()) and not torch.allclose(jump, forecast)
    assert "along" not in Learned().describe() and "along='trend'" in Learned(along="trend").describe()
    # along the optimizer's update (which the callback hands only to a strategy that reads it)
    update = torch.randn(6, 9)
    ctx.update = update
    jump = Learned(along="update").propose(hist, 2, ctx) - cur
    torch.testing.assert_close(jump.norm(dim=1), forecast.norm(dim=1))
    assert bool((torch.nn.functional.cosine_similarity(jump, update, dim=1) > 1 - 1e-5).all())
    assert Learned(along="update").reads_optimizer and not Learned(along="trend").reads_optimizer
    ctx.update = None
    with pytest.raises(SleepbotError, match="known for Adam, AdamW and SGD with momentum only"):
        Learned(along="update").propose(hist, 2, ctx)
    with pytest.raises(SleepbotError, match="valid: forecast, trend, update"):
        Learned(along="gradient")
