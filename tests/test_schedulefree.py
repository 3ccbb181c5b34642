"""Schedule-Free AdamW in sleepbot: train/eval modes in a real Trainer, BatchNorm recomputation at x,
checkpoints, and sleep jumps carried into Schedule-Free's sequences (checked against the update rule by hand)."""

from __future__ import annotations

import copy
from collections import deque

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from sleepbot.config import DataConfig
from sleepbot.data import make_datamodule
from sleepbot.errors import SleepbotError
from sleepbot.models import Classifier, build_arch, build_optimizer, is_schedule_free
from sleepbot.neurons import neuron_layers, neuron_matrix, set_neuron_matrix
from sleepbot.sleep import Sleep, adjust_optimizer_state

BETA1 = 0.9  # AdamWScheduleFree's default betas[0]


def _x_from_y(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The averaged point from the train-mode parameter y = (1 - beta1) z + beta1 x."""
    return (y - (1 - BETA1) * z) / BETA1


def _datamodule(subset: int = 256):
    return make_datamodule(DataConfig(train_subset=subset, batch_size=32), seed=0)


def _trainer(max_steps: int, callbacks=(), **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kw,
    )


def _classifier(arch: str, dm, **kw) -> Classifier:
    kw.setdefault("lr", 1e-2)
    return Classifier(
        arch, dm.input_shape, dm.num_classes, optimizer="schedulefree_adamw", max_steps=40, **kw
    )


class ModeLog(pl.Callback):
    """Records the optimizer's mode in every training, validation and test batch, and checks that evaluation
    sees x: the weights then equal x computed from the last train-mode weights y and z."""

    def __init__(self) -> None:
        self.opt: torch.optim.Optimizer | None = None
        self.modes: dict[str, list[bool]] = {"train": [], "val": [], "test": []}
        self.y: dict[str, torch.Tensor] = {}
        self.x_errors: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.opt = trainer.optimizers[0]
        self.modes["train"].append(bool(self.opt.param_groups[0]["train_mode"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.y = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_validation_start(self, trainer, pl_module) -> None:
        if not self.y:
            return
        for n, p in pl_module.named_parameters():
            x = _x_from_y(self.y[n], self.opt.state[p]["z"])
            self.x_errors.append(float((p.detach() - x).abs().max()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.modes["val"].append(bool(self.opt.param_groups[0]["train_mode"]))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.modes["test"].append(bool(self.opt.param_groups[0]["train_mode"]))


@pytest.mark.parametrize("arch", ["small_cnn", "resnet_tiny"])
def test_modes_in_a_trainer_and_above_chance(arch):
    pl.seed_everything(0, verbose=False)
    dm = _datamodule()
    model = _classifier(arch, dm, warmup_steps=5)
    log = ModeLog()
    trainer = _trainer(40, [log])
    trainer.fit(model, datamodule=dm)
    assert is_schedule_free(log.opt)
    assert trainer.lr_scheduler_configs == []  # Schedule-Free warms up by itself: no LambdaLR on top
    assert log.opt.param_groups[0]["warmup_steps"] == 5
    assert len(log.modes["train"]) == 40 and all(log.modes["train"])
    assert len(log.modes["val"]) > 0 and not any(log.modes["val"])
    assert len(log.x_errors) > 0 and max(log.x_errors) < 1e-5
    assert model.history["step"] == [10, 20, 30, 40]
    assert model.history["acc"][-1] > 0.5  # 10 classes: chance is 0.1

    # After fit the parameters stay at x: validate and test, by this Trainer or a new one, evaluate x.
    assert not log.opt.param_groups[0]["train_mode"]
    x_final = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(x_final[n], _x_from_y(log.y[n], log.opt.state[p]["z"]))
    trainer.test(model, datamodule=dm, verbose=False)
    other = _trainer(1, [log])
    log.modes["val"].clear()
    other.validate(model, datamodule=dm, verbose=False)
    assert len(log.modes["test"]) > 0 and not any(log.modes["test"])
    assert len(log.modes["val"]) > 0 and not any(log.modes["val"])
    assert model.test_acc > 0.5
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), x_final[n])


class BNProbe(pl.Callback):
    """Holds the last 8 training inputs and, at each validation, the first BatchNorm's running statistics
    and the weights evaluated; also the statistics just before validation and at the next training batch."""

    def __init__(self) -> None:
        self.inputs: deque[torch.Tensor] = deque(maxlen=8)
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.during: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []
        self.after: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending:
            bn = pl_module.net[1]
            self.after.append((bn.running_mean.clone(), bn.running_var.clone()))
            self._pending = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.inputs.append(batch[0].clone())
        bn = pl_module.net[1]
        self.last = (bn.running_mean.clone(), bn.running_var.clone())

    def on_validation_start(self, trainer, pl_module) -> None:
        bn = pl_module.net[1]
        self.before.append(self.last)
        conv_weight = pl_module.net[0].weight.detach().clone()
        self.during.append((bn.running_mean.clone(), bn.running_var.clone(), conv_weight, list(self.inputs)))
        self._pending = True


def test_bn_stats_are_recomputed_at_x_on_resnet_tiny():
    pl.seed_everything(0, verbose=False)
    dm = _datamodule()
    model = _classifier("resnet_tiny", dm)
    probe = BNProbe()
    _trainer(30, [probe]).fit(model, datamodule=dm)
    assert len(probe.during) == 3 and len(probe.after) == 2
    for i, (mean, var, conv_weight, inputs) in enumerate(probe.during):
        # Direct recomputation: the stem convolution (no bias) at x on the 8 held inputs; BatchNorm with
        # momentum None averages the per-batch mean and unbiased variance over the batches.
        with torch.no_grad():
            acts = [F.conv2d(x, conv_weight, padding=1) for x in inputs]  # [B, 16, 8, 8] each
        means = torch.stack([a.mean((0, 2, 3)) for a in acts])  # [8, 16]
        vars_ = torch.stack([a.transpose(0, 1).reshape(16, -1).var(1, unbiased=True) for a in acts])
        torch.testing.assert_close(mean, means.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(var, vars_.mean(0), atol=1e-5, rtol=1e-4)
        # Without recomputation the statistics would be the training EMA at y: clearly different.
        assert float((mean - probe.before[i][0]).abs().max()) > 1e-3
    # Training resumes with y's statistics, as if validation had not happened.
    for (mean_y, var_y), (mean_after, var_after) in zip(probe.before, probe.after):
        assert torch.equal(mean_y, mean_after) and torch.equal(var_y, var_after)
    # After fit the statistics stay those of x (the last validation's, recomputed on the same inputs).
    torch.testing.assert_close(model.net[1].running_mean, probe.during[-1][0])


def test_small_cnn_holds_no_batches_and_other_optimizers_none():
    dm = _datamodule(64)
    assert _classifier("small_cnn", dm)._bn_inputs.maxlen == 0
    assert Classifier("resnet_tiny", dm.input_shape, optimizer="adam")._bn_inputs.maxlen == 0
    assert _classifier("resnet_tiny", dm)._bn_inputs.maxlen == 8


def test_schedule_with_schedule_free_is_a_one_line_error():
    with pytest.raises(
        SleepbotError,
        match=r"schedule 'cosine' cannot be used with optimizer 'schedulefree_adamw'.*valid: constant$",
    ):
        Classifier(optimizer="schedulefree_adamw", schedule="cosine")
    with pytest.raises(
        SleepbotError, match="unknown optimizer 'lion'; valid: adam, adamw, momentum, schedulefree"
    ):
        Classifier(optimizer="lion")


class SaveAt(pl.Callback):
    """Saves a checkpoint after optimizer step `step` (in train mode) and keeps y and x at that moment."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path
        self.y: dict[str, torch.Tensor] = {}
        self.x: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        opt = trainer.optimizers[0]
        assert opt.param_groups[0]["train_mode"]
        trainer.save_checkpoint(self.path)
        for n, p in pl_module.named_parameters():
            self.y[n] = p.detach().clone()
            self.x[n] = _x_from_y(p.detach(), opt.state[p]["z"])


class FirstBatch(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "weights"):
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.train_mode = trainer.optimizers[0].param_groups[0]["train_mode"]


def test_mid_run_checkpoint_holds_x_and_resumes_at_y(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = _datamodule()
    model = _classifier("small_cnn", dm)
    path = tmp_path / "mid.ckpt"
    save = SaveAt(15, path)
    _trainer(20, [save]).fit(model, datamodule=dm)
    ckpt = torch.load(path, weights_only=False)
    assert all(not g["train_mode"] for g in ckpt["optimizer_states"][0]["param_groups"])
    for n, x in save.x.items():
        torch.testing.assert_close(ckpt["state_dict"][n], x)
        assert float((x - save.y[n]).abs().max()) > 1e-4  # x and y are different points
    # The live run was not touched by saving: it went on from y.
    loaded = Classifier.load_from_checkpoint(path)
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p.detach(), save.x[n])
    # Resuming restores the optimizer and returns to y before the first step.
    first = FirstBatch()
    _trainer(20, [first]).fit(loaded, datamodule=dm, ckpt_path=path)
    assert first.train_mode
    for n, w in first.weights.items():
        torch.testing.assert_close(w, save.y[n], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- sleep jumps
def _stepped(steps: int = 5, weight_decay: float = 0.0):
    """A small_cnn and its Schedule-Free optimizer in train mode after `steps` steps on fixed random data."""
    torch.manual_seed(0)
    net = build_arch("small_cnn", (1, 8, 8), 10)
    opt = build_optimizer("schedulefree_adamw", net.parameters(), lr=1e-2, weight_decay=weight_decay)
    opt.train()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt, (x, y)


def _jump(net, seed: int = 1) -> tuple[dict, dict, dict]:
    """Move every neuron layer by a random delta; return (layers, old, new) as the Sleep callback passes them."""
    gen = torch.Generator().manual_seed(seed)
    layers = neuron_layers(net)
    old = {n: neuron_matrix(m) for n, m in layers.items()}
    for n, m in layers.items():
        set_neuron_matrix(m, old[n] + 0.05 * torch.randn(old[n].shape, generator=gen))
    return layers, old, {n: neuron_matrix(m) for n, m in layers.items()}


def _grads(net, batch) -> list[torch.Tensor]:
    net.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    return [p.grad.clone() for p in net.parameters()]


def _reference_step(y, z, v, g, group, wd):
    """One AdamWScheduleFree step written out from its update rule (schedulefree 1.4, r = 0, weight_lr_power 2)."""
    beta1, beta2 = group["betas"]
    k = group["k"]
    lr = group["lr"] * ((k + 1) / group["warmup_steps"] if k < group["warmup_steps"] else 1.0)
    lr_max = max(lr, group["lr_max"])
    weight = lr_max**2
    c = weight / (group["weight_sum"] + weight)
    v = beta2 * v + (1 - beta2) * g * g
    ghat = g / ((v / (1 - beta2 ** (k + 1))).sqrt() + group["eps"]) + wd * y
    y_new = y + c * (z - y) + lr * (beta1 * (1 - c) - 1) * ghat
    return y_new, z - lr * ghat


@pytest.mark.parametrize("policy", ["keep", "rescale"])
def test_jump_moves_z_and_x_and_the_next_step_keeps_it(policy):
    wd = 1e-2
    net, opt, batch = _stepped(weight_decay=wd)
    params = list(net.parameters())
    y0 = [p.detach().clone() for p in params]
    z0 = [opt.state[p]["z"].clone() for p in params]
    v0 = [opt.state[p]["exp_avg_sq"].clone() for p in params]
    group = copy.deepcopy({k: v for k, v in opt.param_groups[0].items() if k != "params"})
    layers, old, new = _jump(net)
    delta = [p.detach() - y for p, y in zip(params, y0)]
    adjust_optimizer_state([opt], layers, old, new, policy)
    for p, y, z, d in zip(params, y0, z0, delta):
        torch.testing.assert_close(opt.state[p]["z"], z + d)
        # x moved by delta too (and not by delta / beta1, as moving the parameters alone would do)
        torch.testing.assert_close(_x_from_y(p.detach(), opt.state[p]["z"]), _x_from_y(y, z) + d)
    if policy == "rescale":
        index = {id(p): i for i, p in enumerate(params)}
        for name, m in layers.items():
            r = new[name].norm(dim=1) / old[name].norm(dim=1)  # [N]
            for p in (m.weight, m.bias):
                i = index[id(p)]
                v0[i] = v0[i] * r.view(-1, *([1] * (p.dim() - 1))) ** 2
                torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v0[i])
    # One more real step, against the update rule applied by hand from the shifted point (y0 + d, z0 + d).
    grads = _grads(net, batch)
    opt.step()
    for p, y, z, v, g, d in zip(params, y0, z0, v0, grads, delta):
        y_ref, z_ref = _reference_step(y + d, z + d, v, g, group, wd)
        torch.testing.assert_close(p.detach(), y_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p]["z"], z_ref, atol=1e-6, rtol=1e-5)


def test_next_step_keeps_the_jump_and_moving_parameters_alone_does_not():
    """Same gradient, no weight decay: the jumped run ends exactly delta from the unjumped one in y, z and x."""
    net, opt, _ = _stepped()
    twin_net, twin_opt = copy.deepcopy((net, opt))
    bare_net, bare_opt = copy.deepcopy((net, opt))  # jumped, but the optimizer is not told
    params, twin, bare = list(net.parameters()), list(twin_net.parameters()), list(bare_net.parameters())
    y0 = [p.detach().clone() for p in params]
    layers, old, new = _jump(net)
    _jump(bare_net)  # the same delta (same seed)
    adjust_optimizer_state([opt], layers, old, new, "keep")
    delta = [p.detach() - y for p, y in zip(params, y0)]
    gen = torch.Generator().manual_seed(2)
    for a, b, c in zip(params, twin, bare):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad, c.grad = a.grad.clone(), a.grad.clone()
    for o in (opt, twin_opt, bare_opt):
        o.step()
    drift = 0.0
    for a, b, c, d in zip(params, twin, bare, delta):
        torch.testing.assert_close(a.detach() - b.detach(), d, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[a]["z"] - twin_opt.state[b]["z"], d, atol=1e-6, rtol=1e-5)
        xa, xb = _x_from_y(a.detach(), opt.state[a]["z"]), _x_from_y(b.detach(), twin_opt.state[b]["z"])
        torch.testing.assert_close(xa - xb, d, atol=1e-5, rtol=1e-4)
        drift = max(drift, float((c.detach() - b.detach() - d).abs().max()))
    assert drift > 1e-4  # without the adjustment the step pulls y back towards the old z


def test_reset_collapses_the_average_onto_the_jump_and_keeps_the_second_moment():
    net, opt, _ = _stepped()
    v0 = {p: opt.state[p]["exp_avg_sq"].clone() for p in net.parameters()}
    layers, old, new = _jump(net)
    adjust_optimizer_state([opt], layers, old, new, "reset")
    for p in net.parameters():
        assert torch.equal(opt.state[p]["z"], p.detach())  # z = y, hence x = y too
        assert torch.equal(opt.state[p]["exp_avg_sq"], v0[p])
    opt.eval()  # eval-mode x is the jumped point itself
    for n, m in layers.items():
        torch.testing.assert_close(neuron_matrix(m), new[n])


class AroundSleep(pl.Callback):
    """Placed before and after a Sleep callback: x computed from (y, z) on either side of each step's hooks."""

    def __init__(self, side: str, log: dict) -> None:
        self.side, self.record = side, log

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        ps = [p for p in pl_module.parameters() if "z" in opt.state[p]]
        y = torch.cat([p.detach().flatten() for p in ps])
        x = torch.cat([_x_from_y(p.detach(), opt.state[p]["z"]).flatten() for p in ps])
        self.record.setdefault(int(trainer.global_step), {})[self.side] = (y, x)


def test_sleep_in_a_trainer_moves_x_with_the_jump():
    pl.seed_everything(0, verbose=False)
    dm = _datamodule()
    model = _classifier("small_cnn", dm)
    log: dict = {}
    sleep = Sleep("noise", every_n_steps=10, alpha=0.05)
    _trainer(25, [AroundSleep("before", log), sleep, AroundSleep("after", log)]).fit(model, datamodule=dm)
    assert [e["step"] for e in sleep.events if e["accepted"]] == [10, 20]
    for step in (10, 20):
        (y0, x0), (y1, x1) = log[step]["before"], log[step]["after"]
        assert float((y1 - y0).abs().max()) > 1e-4
        torch.testing.assert_close(x1 - x0, y1 - y0, atol=1e-5, rtol=1e-4)
