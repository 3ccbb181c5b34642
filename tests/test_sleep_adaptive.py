"""The adaptive jump (`Sleep(jump_scales=...)`): the scale of the proposed displacement with the lowest held-batch
loss wins, 0 (no jump) included, so a jump that every candidate makes worse is not taken and leaves the weights and
the BatchNorm statistics exactly as they were."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from test_sleep_batchnorm import BigNoise, Capture, _loader, _model, reference_loss
from test_sleep_helpers import trainer

from sleepbot.errors import SleepbotError
from sleepbot.neurons import neuron_layers, neuron_matrix
from sleepbot.sleep import Sleep, SleepStrategy


class Overshoot(SleepStrategy):
    """Proposes twice the way to known good weights (a trained model's): scale 0.5 lands on them, 1.0 overshoots."""

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        self.target = target

    def propose(self, history, horizon, ctx):
        return history[-1] + 2.0 * (self.target[ctx.layer] - history[-1])


def _trained_and_perturbed():
    """A model trained for 60 steps (its neuron matrices are the target) and a copy with noisy weights."""
    import copy

    pl.seed_everything(0, verbose=False)
    good = _model()
    trainer(max_steps=60).fit(good, train_dataloaders=_loader())
    target = {name: neuron_matrix(m) for name, m in neuron_layers(good).items()}
    bad = copy.deepcopy(good)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return target, bad


def _fit(strategy, scales, model=None, max_steps=11):
    pl.seed_everything(0, verbose=False)
    pre, post = Capture(), Capture()
    cb = Sleep(
        strategy, every_n_steps=5, snapshot_every=1, context=3, horizon=1, check_batches=3, jump_scales=scales
    )
    trainer(max_steps=max_steps, callbacks=[pre, cb, post]).fit(
        model or _model(), train_dataloaders=_loader()
    )
    return cb, pre, post


def test_every_candidate_raising_the_loss_means_no_jump_and_untouched_statistics():
    cb, pre, post = _fit(BigNoise(), [0.5, 1.0, 2.0])
    assert [e["step"] for e in cb.events] == [5, 10]
    for e in cb.events:
        assert not e["accepted"] and e["scale"] == 0.0 and e["reason"].startswith("probe:")
        assert all(v > e["loss_before"] for k, v in e["probe"].items() if k != "0.0")
        # resnet_tiny has BatchNorm: 4 candidates (0 included) x 3 held batches x (re-estimate + loss)
        assert e["probe_forwards"] == 4 * 3 * 2
        step = e["step"]
        for k, v in pre.state[step].items():  # weights and every BN buffer, bit for bit
            assert torch.equal(post.state[step][k], v), k


def test_the_chosen_scale_is_the_argmin_and_is_what_is_written():
    target, bad = _trained_and_perturbed()
    cb, pre, post = _fit(Overshoot(target), [0.25, 0.5, 1.0], model=bad, max_steps=6)
    assert [e["accepted"] for e in cb.events] == [True]  # some part of the way to trained weights helps
    for e in cb.events:
        probe = {float(k): v for k, v in e["probe"].items()}
        best = min(probe, key=lambda k: (probe[k], k))
        assert e["scale"] == best and e["accepted"] == (best > 0)
        if e["accepted"]:
            # the written weights' held loss, with statistics re-estimated for them, is the probe's value
            assert e["loss_after"] == pytest.approx(probe[best], rel=1e-5)
            assert reference_loss(post.state[e["step"]], pre.batches[e["step"]]) == pytest.approx(
                e["loss_after"], rel=1e-4
            )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"jump_scales": [0.5]}, "set check_batches >= 1"),
        ({"jump_scales": [-1.0], "check_batches": 2}, "numbers >= 0"),
        ({"jump_scales": ["far"], "check_batches": 2}, "numbers >= 0"),
    ],
)
def test_bad_jump_scales_are_one_line_errors(kwargs, message):
    with pytest.raises(SleepbotError, match=message) as info:
        Sleep("linear", **kwargs)
    assert "\n" not in str(info.value)


def test_learned_writes_the_forecast_by_default_and_probes_when_asked():
    from sleepbot.sleep.strategies import LEARNED_CHECK_BATCHES, LEARNED_JUMP_SCALES

    cb = Sleep("learned")  # measured: unprobed beat the probe on development seeds (Learned.defaults)
    assert cb.check_batches == 0 and cb.jump_scales is None
    cb = Sleep("learned", check_batches=LEARNED_CHECK_BATCHES, jump_scales=list(LEARNED_JUMP_SCALES))
    assert cb.check_batches == LEARNED_CHECK_BATCHES >= 1
    assert cb.jump_scales == (0.0, *LEARNED_JUMP_SCALES)  # 0 (no jump) always a candidate
    with pytest.raises(
        SleepbotError, match="check_batches >= 1"
    ):  # scales without held batches to judge them
        Sleep("learned", check_batches=0, jump_scales=[1.0])
    assert Sleep("learned", check_batches=2, jump_scales=None).jump_scales is None
    assert Sleep("learned", check_batches=2, jump_scales=[2.0]).jump_scales == (0.0, 2.0)
    for other in ("linear", "noise"):
        assert Sleep(other).jump_scales is None and Sleep(other).check_batches == 0
    # The random control keeps the base's schedule but not its probe: its jump is the matched size, unprobed.
    rnd = Sleep("random", base="learned")
    assert rnd.jump_scales is None and rnd.check_batches == 0
    with pytest.raises(SleepbotError, match="jump_scales"):
        Sleep("learned", jump_scales="sometimes")
