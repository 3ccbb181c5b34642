"""What `Sleep("learned")` does in a run's first steps must not depend on the budget the user set: a run with
max_steps 120 and one with 360, same seed, make the same jumps to the same weights in their first 120 steps."""

from __future__ import annotations

import torch

from sleepbot.config import RunConfig, build_config
from sleepbot.neurons import neuron_layers, neuron_matrix
from sleepbot.training import run_training


def _run(max_steps: int, out):
    import pytorch_lightning as pl

    class Grab(pl.Callback):
        """The neuron matrices at step 120 (after any jump there)."""

        weights: dict[str, torch.Tensor] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 120:
                Grab.weights = {k: neuron_matrix(m).clone() for k, m in neuron_layers(pl_module).items()}

    cfg = build_config(
        RunConfig,
        {
            "seed": 3,
            "out_dir": str(out),
            "data": {"name": "digits", "batch_size": 32},
            "model": {"arch": "small_cnn", "optimizer": "adam", "lr": 1e-2},
            "trainer": {"max_steps": max_steps, "val_every_n_steps": 60, "logger": "none"},
            "sleep": {"strategy": "learned"},
        },
    )
    grab = Grab()
    result = run_training(cfg, callbacks=[grab], test=False, quiet=True)
    return [e for e in result.events if e["step"] <= 120], dict(Grab.weights)


def test_the_budget_does_not_change_the_first_jumps(tmp_path):
    torch.set_num_threads(1)
    short_events, short_w = _run(120, tmp_path)
    long_events, long_w = _run(360, tmp_path)
    keys = ("step", "accepted", "reason", "rel_jump", "loss_before", "loss_after", "scale")
    assert [e["step"] for e in short_events] == [50, 100]
    assert [{k: e.get(k) for k in keys} for e in short_events] == [
        {k: e.get(k) for k in keys} for e in long_events
    ]
    assert any(e["accepted"] and e["rel_jump"] > 0 for e in short_events)
    assert short_w.keys() == long_w.keys()
    for k in short_w:
        torch.testing.assert_close(short_w[k], long_w[k], rtol=0, atol=0)
