"""The `nino` strategy (NiNo's WNN+) against a slow per-scalar reference, its checkpoint checks, and a real run."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sleepbot.errors import SleepbotError
from sleepbot.neurons import layer_kind, neuron_matrix
from sleepbot.sleep import LayerContext, Sleep, make_strategy
from sleepbot.sleep.nino import LAYOUT, NinoWNN

# CI runs from a fresh clone with shared/ beside the checkout: checkout/../shared/peers/nino_mlp.pt.
REAL = Path(__file__).resolve().parents[2] / "shared" / "peers" / "nino_mlp.pt"
needs_real = pytest.mark.skipif(not REAL.is_file(), reason=f"NiNo's WNN+ checkpoint is not at {REAL}")


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the WNN+ layout, scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=g) / (math.sqrt(shape[-1]) if len(shape) == 2 else 2.0)
        for key, shape in LAYOUT.items()
    }


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "wnn.pt"
    torch.save({"state_dict": random_state_dict(), "model_args": {"gnn": False}}, path)
    return path


def _ctx(layer: str, kind: str, every: int = 10) -> LayerContext:
    return LayerContext(
        layer=layer, kind=kind, step=40, steps=torch.arange(0, 50, every), snapshot_every=every
    )


# ------------------------------------------------------------------------------------------ slow reference
def ref_tensor(sd: dict[str, torch.Tensor], states: np.ndarray, ttype: int, k: int) -> np.ndarray:
    """WNN+ on one parameter tensor, one scalar at a time, in float64 numpy. states: [5, *shape] -> [*shape]."""
    p = {key: v.double().numpy() for key, v in sd.items()}
    mean = states.mean()
    std = states.std(ddof=1)
    flat = states.reshape(5, -1)
    out = np.empty(flat.shape[1])
    for i in range(flat.shape[1]):
        x = (flat[:, i] - mean) / (std + 1e-6)  # [5]
        h = p["edge_proj.fc.0.weight"] @ x + p["edge_proj.fc.0.bias"] + p["layer_embed.weight"][ttype]
        for n in ("edge_mlp.fc.0", "edge_mlp.fc.2", "edge_mlp.fc.4"):
            z = p[f"{n}.weight"] @ h + p[f"{n}.bias"]
            h = z / (1.0 + np.exp(-z))  # SiLU
        y = p["edge_mlp.fc.6.weight"] @ h + p["edge_mlp.fc.6.bias"]  # [40]
        out[i] = (x[-1] + y[k - 1]) * std + mean
    return out.reshape(states.shape[1:])


def ref_layer(sd, module: nn.Module, weights: list[torch.Tensor], biases: list[torch.Tensor] | None, k: int):
    """The reference in the layer's own parameter shapes, returned as a neuron matrix [N, fan_in (+1)]."""
    ttype = 1 if isinstance(module, nn.Linear) else 3
    w = ref_tensor(sd, torch.stack(weights).double().numpy(), ttype, k)  # [*weight shape]
    cols = [w.reshape(w.shape[0], -1)]
    if biases is not None:
        cols.append(ref_tensor(sd, torch.stack(biases).double().numpy(), 2, k)[:, None])
    return np.concatenate(cols, axis=1)


LAYERS = {
    "linear": lambda bias: nn.Linear(6, 4, bias=bias),
    "conv1d": lambda bias: nn.Conv1d(2, 3, 3, bias=bias),
    "conv2d": lambda bias: nn.Conv2d(2, 3, 2, bias=bias),
    "conv3d": lambda bias: nn.Conv3d(1, 2, 2, bias=bias),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_matches_per_scalar_reference(kind, bias, checkpoint):
    torch.manual_seed(1)
    model = nn.Sequential(LAYERS[kind](bias))
    layer = model[0]
    assert layer_kind(layer) == kind
    # a drifting, noisy trajectory of 5 states, in the layer's own parameters
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    drift = [torch.randn_like(p) * 0.05 for p in params]
    weights, biases, snaps = [], [], []
    for _ in range(5):
        with torch.no_grad():
            for p, d in zip(params, drift):
                p.add_(d + 0.01 * torch.randn_like(p))
        weights.append(layer.weight.detach().clone())
        if bias:
            biases.append(layer.bias.detach().clone())
        snaps.append(neuron_matrix(layer))
    biases = biases if bias else None
    history = torch.stack(snaps)  # [5, N, F]
    strat = make_strategy("nino", checkpoint=str(checkpoint))
    strat.setup(model, 100)
    sd = torch.load(checkpoint, weights_only=True)["state_dict"]
    for k in (1, 5, 40):
        got = strat.propose(history, k, _ctx("0", kind))
        assert got.shape == history[-1].shape and got.dtype == history.dtype
        np.testing.assert_allclose(
            got.numpy(), ref_layer(sd, layer, weights, biases, k), atol=1e-5, rtol=1e-5
        )
    # k overrides the callback's horizon; float64 histories come back as float64
    fixed = make_strategy("nino", checkpoint=str(checkpoint), k=3)
    fixed.setup(model, 100)
    got = fixed.propose(history.double(), 17, _ctx("0", kind))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_layer(sd, layer, weights, biases, 3), atol=1e-5, rtol=1e-5)


def test_weight_and_bias_are_scaled_as_separate_tensors(checkpoint):
    """A bias far larger than the weights must not change the weights' forecast (per-tensor scaling)."""
    model = nn.Sequential(nn.Linear(5, 3))
    strat = NinoWNN(str(checkpoint))
    strat.setup(model, 10)
    torch.manual_seed(0)
    history = torch.cumsum(torch.randn(5, 3, 6) * 0.1, dim=0)
    moved = history.clone()
    moved[:, :, -1] = moved[:, :, -1] * 1000 + 50
    a = strat.propose(history, 2, _ctx("0", "linear"))
    b = strat.propose(moved, 2, _ctx("0", "linear"))
    torch.testing.assert_close(a[:, :5], b[:, :5])


def test_big_layer_is_chunked_the_same(checkpoint, monkeypatch):
    import sleepbot.sleep.nino as nino

    model = nn.Sequential(nn.Linear(50, 40))
    strat = NinoWNN(str(checkpoint))
    strat.setup(model, 10)
    history = torch.cumsum(torch.randn(5, 40, 51) * 0.1, dim=0)
    whole = strat.propose(history, 4, _ctx("0", "linear"))
    monkeypatch.setattr(nino, "CHUNK", 7)
    torch.testing.assert_close(strat.propose(history, 4, _ctx("0", "linear")), whole)


def test_pickles_and_reports_its_options(checkpoint):
    model = nn.Sequential(nn.Linear(4, 2))
    strat = NinoWNN(str(checkpoint), k=7)
    strat.setup(model, 10)
    again = pickle.loads(pickle.dumps(strat))
    history = torch.cumsum(torch.randn(5, 2, 5), dim=0)
    torch.testing.assert_close(
        again.propose(history, 1, _ctx("0", "linear")), strat.propose(history, 1, _ctx("0", "linear"))
    )
    assert strat.options() == {"checkpoint": str(checkpoint), "k": 7}
    assert strat.describe().startswith("nino(")
    pickle.loads(pickle.dumps(Sleep("nino", checkpoint=str(checkpoint))))


# ------------------------------------------------------------------------------------------ user errors
def _one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(SleepbotError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    def save(name, obj):
        path = tmp_path / name
        torch.save(obj, path)
        return str(path)

    good = random_state_dict()
    missing = {k: v for k, v in good.items() if k != "edge_mlp.fc.2.bias"}
    wrong = {**good, "edge_proj.fc.0.weight": torch.zeros(128, 4)}
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n" * 10)
    cases = {
        save("list.pt", [1, 2, 3]): "is a list, not",
        save("nosd.pt", {"model_args": {"gnn": False}}): "without a 'state_dict'",
        save("missing.pt", {"state_dict": missing, "model_args": {"gnn": False}}): "no 'edge_mlp.fc.2.bias'",
        save(
            "shape.pt", {"state_dict": wrong, "model_args": {"gnn": False}}
        ): r"'edge_proj.fc.0.weight' is \(128, 4\)",
        save("gnn.pt", {"state_dict": good, "model_args": {"gnn": True}}): "graph model",
        str(text): "not readable by torch.load",
        str(tmp_path / "absent.pt"): "does not exist",
    }
    for path, match in cases.items():
        msg = _one_line(match, Sleep, "nino", checkpoint=path)
        assert path in msg and "SamsungSAILMontreal/nino" in msg


def test_checkpoint_is_required_and_says_where_to_get_it():
    msg = _one_line("needs checkpoint=", Sleep, "nino")
    assert "SamsungSAILMontreal/nino" in msg and "checkpoints/nino_mlp.pt" in msg


def test_validate_rejects_other_contexts_and_jumps(checkpoint):
    cb = Sleep("nino", checkpoint=str(checkpoint))
    assert cb.context == 5
    _one_line("last 5 states .* context=4", Sleep, "nino", checkpoint=str(checkpoint), context=4)
    _one_line("1..40 snapshots ahead; got horizon=41", Sleep, "nino", checkpoint=str(checkpoint), horizon=41)
    _one_line("k must be in 1..40", Sleep, "nino", checkpoint=str(checkpoint), k=41)
    _one_line("k must be in 1..40", Sleep, "nino", checkpoint=str(checkpoint), k=0)
    Sleep("nino", checkpoint=str(checkpoint), k=40, horizon=41)  # k overrides the horizon


def test_propose_needs_the_model_and_even_spacing(checkpoint):
    strat = NinoWNN(str(checkpoint))
    history = torch.zeros(5, 2, 5)
    _one_line("does not know layer '0'", strat.propose, history, 1, _ctx("0", "linear"))
    strat.setup(nn.Sequential(nn.Linear(4, 2)), 10)
    ctx = _ctx("0", "linear")
    ctx.steps = torch.tensor([0, 10, 20, 30, 35])
    _one_line("exactly 10 steps apart", strat.propose, history, 1, ctx)
    _one_line(
        "has fan_in 4 \\+ bias, the history has 6",
        strat.propose,
        torch.zeros(5, 2, 6),
        1,
        _ctx("0", "linear"),
    )


# ------------------------------------------------------------------------------------------ the real file
@needs_real
def test_real_checkpoint_jumps_a_smooth_trajectory():
    strat = NinoWNN(str(REAL), k=5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    strat.setup(model, 1000)
    t = torch.arange(5, dtype=torch.float32)[:, None, None]  # [5, 1, 1]
    for layer, f in (("0", 28), ("2", 9)):
        base = torch.randn(1, 8 if layer == "0" else 4, f) * 0.1
        history = base + 0.01 * t * torch.sign(base) + 0.001 * t**2  # [5, N, F], smooth
        kind = "conv2d" if layer == "0" else "linear"
        out = strat.propose(history, 1, _ctx(layer, kind))
        assert out.shape == history[-1].shape and bool(torch.isfinite(out).all())
        assert not torch.equal(out, history[-1])


@needs_real
def test_real_checkpoint_in_a_lightning_run(tmp_path):
    from test_sleep_helpers import trainer

    from sleepbot.config import DataConfig
    from sleepbot.data import make_datamodule
    from sleepbot.models import Classifier

    torch.manual_seed(0)
    dm = make_datamodule(DataConfig(name="digits", train_subset=256), seed=0)
    model = Classifier(
        arch="small_cnn", input_shape=dm.input_shape, num_classes=dm.num_classes, lr=1e-2, max_steps=25
    )
    cb = Sleep("nino", checkpoint=str(REAL), every_n_steps=10, snapshot_every=2, k=5)
    trainer(max_steps=25, callbacks=[cb], limit_val_batches=0, default_root_dir=str(tmp_path)).fit(model, dm)
    assert [e["step"] for e in cb.events] == [10, 20]
    assert all(e["accepted"] and e["rel_jump"] > 0 for e in cb.events), cb.events
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
