"""The oracle control in real Trainers: each jump lands where the recorded no-sleep run is, counting the steps that
earlier jumps skipped, also across a checkpoint resume."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_sleep_helpers import TinyNet, digits_loader, digits_tensors, trainer

from sleepbot.neurons import neuron_layers, neuron_matrix
from sleepbot.sleep import Sleep

pytest.importorskip("h5py")

SLEEPS = (6, 12, 18)  # every 6 steps, each jump 2 snapshots of 2 steps = 4 steps ahead


class StepKeyedNet(TinyNet):
    """Trains on the batch chosen by the global step (a resumed run sees the same data as an uninterrupted one)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = digits_tensors(256)
        i = self.trainer.global_step % 8 * 32
        return x[i : i + 32], y[i : i + 32]


class AfterSleep(pl.Callback):
    """The neuron matrices right after Sleep ran at each of its sleep steps (placed after Sleep)."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in SLEEPS:
            self.at[trainer.global_step] = {n: neuron_matrix(m) for n, m in neuron_layers(pl_module).items()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A recorded no-sleep run of StepKeyedNet (seed 0), a snapshot every 2 steps up to 40: {step: {layer: [N, F]}}."""
    from sleepbot.recording import TrajectoryRecorder
    from sleepbot.store import RunFile

    path = tmp_path_factory.mktemp("oracle") / "plain.h5"
    pl.seed_everything(0, verbose=False)
    trainer(40, [TrajectoryRecorder(path, snapshot_every=2)]).fit(StepKeyedNet(), digits_loader())
    with RunFile(path) as run:
        steps = [int(s) for s in run.snapshot_steps]
        by_layer = {layer: torch.as_tensor(run.weights(layer)) for layer in run.layers}  # [S, N, F]
    return path, {s: {k: w[i] for k, w in by_layer.items()} for i, s in enumerate(steps)}


def _oracle(path) -> Sleep:
    return Sleep("oracle", run=str(path), every_n_steps=6, horizon=2, snapshot_every=2)


def _events(cb: Sleep) -> list[dict]:
    """The events without their timing, NaN losses (no check batches) as a string so that they compare equal."""
    return [{k: "nan" if v != v else v for k, v in e.items() if k != "seconds"} for e in cb.events]


def _fit(callbacks, max_steps, seed=0, **kw):
    pl.seed_everything(seed, verbose=False)
    module = StepKeyedNet()
    trainer(max_steps, callbacks, **kw).fit(module, digits_loader())
    return module


def test_each_jump_lands_on_step_plus_jumped_plus_horizon(recorded):
    path, snaps = recorded
    cb, after = _oracle(path), AfterSleep()
    _fit([cb, after], max_steps=24)
    assert [(e["step"], e["accepted"]) for e in cb.events] == [(6, True), (12, True), (18, True)]
    # jumped = 0, 4, 8 before the three jumps: targets 10, 20, 30 (not 10, 16, 22 as without counting them)
    for step, target in zip(SLEEPS, (10, 20, 30)):
        for layer, want in snaps[target].items():
            assert torch.equal(after.at[step][layer], want.to(after.at[step][layer].dtype)), (step, layer)
    assert not torch.equal(after.at[12]["head"], snaps[16]["head"])


def test_resumed_oracle_jumps_to_the_same_targets(recorded, tmp_path):
    path, snaps = recorded
    full_cb, full_after = _oracle(path), AfterSleep()
    full = _fit([full_cb, full_after], max_steps=24)

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=15, save_top_k=-1)
    _fit([_oracle(path), ckpt], max_steps=15, enable_checkpointing=True)  # two jumps (8 steps) before it
    (ckpt_path,) = tmp_path.glob("*step=15.ckpt")
    resumed_cb, resumed_after = _oracle(path), AfterSleep()
    pl.seed_everything(123, verbose=False)  # a different seed: everything must come from the checkpoint
    module = StepKeyedNet()
    trainer(24, [resumed_cb, resumed_after]).fit(module, digits_loader(), ckpt_path=ckpt_path)

    assert list(resumed_after.at) == [18]
    for layer, want in snaps[30].items():
        assert torch.equal(resumed_after.at[18][layer], full_after.at[18][layer]), layer
        assert torch.equal(resumed_after.at[18][layer], want.to(resumed_after.at[18][layer].dtype)), layer
    assert _events(resumed_cb) == _events(full_cb)
    for k, v in full.state_dict().items():
        assert torch.equal(v, module.state_dict()[k]), k


class BeforeSleep(pl.Callback):
    """The neuron matrices right before Sleep runs at its sleep steps (placed before Sleep)."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in SLEEPS:
            self.at[trainer.global_step] = {n: neuron_matrix(m) for n, m in neuron_layers(pl_module).items()}


def test_a_degraded_oracle_scales_the_true_displacement_and_adds_noise(recorded):
    path, snaps = recorded
    before, after = BeforeSleep(), AfterSleep()
    cb = Sleep("oracle", run=str(path), every_n_steps=6, horizon=2, snapshot_every=2, scale=0.5)
    _fit([before, cb, after], max_steps=8)
    for layer, want in snaps[10].items():  # the first jump: half of the way to step 10's weights
        now = before.at[6][layer]
        torch.testing.assert_close(after.at[6][layer], now + 0.5 * (want - now))
    noisy, after2 = (
        Sleep("oracle", run=str(path), every_n_steps=6, horizon=2, snapshot_every=2, noise=0.5),
        AfterSleep(),
    )
    _fit([noisy, after2], max_steps=8)
    for layer, want in snaps[10].items():
        d = want - before.at[6][layer]
        err = after2.at[6][layer] - want  # noise: 0.5 x each neuron's RMS displacement x N(0, 1)
        ratio = err.pow(2).mean(1).sqrt() / d.pow(2).mean(1).sqrt()
        assert 0.1 < float(ratio.median()) < 1.0, (layer, ratio)


def test_the_projected_oracle_fits_the_true_jump_by_the_history_s_trends(recorded):
    """`project`: the true displacement replaced by its best fit from the multiscale forecaster's trend features."""
    from sleepbot.errors import SleepbotError
    from sleepbot.forecast.base import neuron_scale
    from sleepbot.forecast.multiscale import trend_features
    from sleepbot.sleep.strategies import Oracle, project_on_history

    path, snaps = recorded
    hist = torch.stack([snaps[s]["body.0"] for s in range(0, 20, 2)]).double()  # [10, N, F]
    scale = neuron_scale(hist)
    x = torch.stack(trend_features(hist, scale), -1) * scale[:, None, None]  # [N, F, 9]
    torch.manual_seed(0)
    per_neuron = (x @ torch.randn(x.shape[0], 9, 1, dtype=x.dtype))[..., 0]  # a different mix for each neuron
    shared = (x @ torch.randn(9, 1, dtype=x.dtype))[..., 0]
    torch.testing.assert_close(project_on_history(per_neuron, hist, "neuron"), per_neuron)
    torch.testing.assert_close(project_on_history(shared, hist, "layer"), shared)
    layer_fit = project_on_history(per_neuron, hist, "layer")
    # one mix cannot fit the neurons' own ones
    assert (layer_fit - per_neuron).norm() > 0.1 * per_neuron.norm()
    # a real jump: its fit leaves a residual orthogonal to the features
    d = snaps[30]["body.0"].double() - hist[-1]
    fit = project_on_history(d, hist, "neuron")
    residual = d - fit
    assert 0 < residual.norm() < d.norm()
    assert float((x * residual[..., None]).sum(1).abs().max()) < 1e-8 * float(d.norm() * x.norm())
    with pytest.raises(SleepbotError, match="valid: neuron, layer, or none"):
        Oracle(str(path), project="weight")

    # In a Trainer: it waits for the multiscale forecaster's 5 snapshots, then jumps to a fit of the true jump.
    cb, before, after = (
        Sleep("oracle", run=str(path), every_n_steps=6, horizon=2, snapshot_every=2, project="neuron"),
        BeforeSleep(),
        AfterSleep(),
    )
    _fit([before, cb, after], max_steps=14)
    assert [e["step"] for e in cb.events if e["accepted"]] == [12]
    moved = after.at[12]["body.0"] - before.at[12]["body.0"]
    true = snaps[16]["body.0"] - before.at[12]["body.0"]
    assert (
        0 < moved.norm() < true.norm()
        and torch.nn.functional.cosine_similarity(moved.flatten(), true.flatten(), dim=0) > 0.5
    )


def test_an_extra_column_fits_the_true_jump_at_least_as_well(recorded):
    """`extra`: the optimizer's update (or a random control) as a 10th column of the projection's fit."""
    from sleepbot.errors import SleepbotError
    from sleepbot.sleep.strategies import Oracle, project_on_history

    path, snaps = recorded
    hist = torch.stack([snaps[s]["body.0"] for s in range(0, 20, 2)]).double()  # [10, N, F]
    d = snaps[30]["body.0"].double() - hist[-1]
    residual = d - project_on_history(d, hist, "neuron")
    # the part of the jump the trends miss, given as a column, is fit exactly
    torch.testing.assert_close(project_on_history(d, hist, "neuron", extra=[residual]), d)
    with pytest.raises(SleepbotError, match="valid: state, random, or none"):
        Oracle(str(path), project="neuron", extra="gradient")
    with pytest.raises(SleepbotError, match="give project too"):
        Oracle(str(path), extra="state")

    # In a Trainer, the first jump (same run up to it in every arm) lands at least as near the true target with a
    # column more, whichever it is.
    missed = {}
    for extra in (None, "state", "random"):
        cb, before, after = (
            Sleep(
                "oracle",
                run=str(path),
                every_n_steps=6,
                horizon=2,
                snapshot_every=2,
                project="neuron",
                extra=extra,
            ),
            BeforeSleep(),
            AfterSleep(),
        )
        _fit([before, cb, after], max_steps=14)
        assert cb.strategy.reads_optimizer is (extra == "state")
        missed[extra] = sum(float((after.at[12][k] - snaps[16][k]).norm()) for k in snaps[16])
    assert missed["state"] < missed[None] and missed["random"] < missed[None]


def test_combine_takes_the_forecast_s_direction_or_size_and_the_rest_from_the_true_jump(recorded):
    """`combine`: per neuron, the forecast's direction with the true jump's length, or the other way round."""
    from sleepbot.errors import SleepbotError
    from sleepbot.sleep.base import LayerContext
    from sleepbot.sleep.strategies import Learned, Oracle

    path, snaps = recorded
    steps = list(range(0, 10, 2))  # the shipped forecaster's 5 snapshots, 2 steps apart here
    hist = torch.stack([snaps[s]["body.0"] for s in steps])  # [5, N, F]
    cur = hist[-1]
    ctx = LayerContext(layer="body.0", kind="linear", step=8, steps=torch.tensor(steps), snapshot_every=2)
    true = snaps[12]["body.0"] - cur  # 2 snapshots ahead
    forecast = Learned().propose(hist, 2, ctx) - cur
    cos = torch.nn.functional.cosine_similarity
    for keep, along, length in (("direction", forecast, true), ("size", true, forecast)):
        oracle = Oracle(str(path), combine=keep)
        oracle.setup(None, 40)
        jump = oracle.propose(hist, 2, ctx) - cur
        torch.testing.assert_close(jump.norm(dim=1), length.norm(dim=1))
        assert bool((cos(jump, along, dim=1) > 1 - 1e-5).all())
    assert Oracle(str(path), combine="size").defaults() == Learned().defaults()
    with pytest.raises(SleepbotError, match="valid: direction, size, or none"):
        Oracle(str(path), combine="angle")
    with pytest.raises(SleepbotError, match="not both"):
        Oracle(str(path), combine="size", project="neuron")
    with pytest.raises(SleepbotError, match="give combine too"):
        Oracle(str(path), forecaster="f.pt")
