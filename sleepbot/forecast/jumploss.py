"""Meta-training a forecaster on the training loss where its jump lands (the `loss` objective).

Why not R2_disp alone. A forecast of where every weight will be 200 steps on is a conditional mean over the
futures the history allows, and the mean of points along a curved valley lies off the valley: measured on a
digits/Adam run of the corpus (scratch experiments summarised in docs/forecaster_ablations.md), the multiscale
forecaster explains 25-50% of each layer's displacement, yet the loss where it lands is HIGHER than where the
run is, while the true displacement shrunk to the same size, or with isotropic noise of the forecast's error size
added, lowers it 30-70%. What matters is the direction inside each neuron, and R2 does not see it. So this
objective scores a forecast by what a jump is for: the base network's training loss at the jumped weights,
relative to the loss where it is, log(L(w + forecast) / L(w)), averaged over corpus runs and times.

Every corpus run can be replayed without retraining: its file records its config, so the network (`models`) and
its training split (`data`) are rebuilt here, and the loss at any weights is one forward pass
(`torch.func.functional_call` with the neuron matrices turned back into parameters), differentiable in the
forecast. Runs whose network has BatchNorm are left out (their statistics at the jumped weights are unknown).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from sleepbot.errors import SleepbotError
from sleepbot.forecast.state import recorded_state_keys
from sleepbot.forecast.windows import RunInfo, _shard


class RunModel:
    """The base network and training split of one recorded run: the loss at any neuron matrices.

    Args:
        info: the run (its file's config rebuilds the network and the data split).
        data_cache: {data config key: (train inputs, train targets, input shape, classes)} shared across runs.
        settle: also prepare `settle` (the run's own optimizer continued from its recorded state): the run must be
            trained with one of `state.STATE_OPTIMIZERS` and recorded with `record.optimizer_state: true`.
    """

    def __init__(
        self, info: RunInfo, data_cache: dict[str, Any] | None = None, *, settle: bool = False
    ) -> None:
        from torch import nn

        from sleepbot.config import RunConfig, build_config
        from sleepbot.data import make_datamodule
        from sleepbot.models import Classifier
        from sleepbot.neurons import neuron_layers
        from sleepbot.store import RunFile

        with RunFile(info.path) as f:
            config = f.attrs.get("config") or {}
            self.optimizer = str(f.attrs.get("optimizer", ""))
            if settle:
                recorded_state_keys(f, info.path, [r.name for r in info.layers], "settling")
                self.lr_by_step = np.asarray(f.metrics["lr"], dtype=np.float64)
        if not config:
            raise SleepbotError(f"{info.path!r} records no config, so its network cannot be rebuilt")
        cfg = build_config(RunConfig, config)
        cache = data_cache if data_cache is not None else {}
        key = json.dumps(
            {k: v for k, v in cfg.to_dict()["data"].items() if k != "batch_size"}, sort_keys=True
        )
        if key not in cache:
            dm = make_datamodule(cfg.data, seed=cfg.seed)
            x, y = dm.tensors["train"]
            cache[key] = (x, y, dm.input_shape, dm.num_classes)
        self.x, self.y, shape, classes = cache[key]
        m = cfg.model
        self.batch_size = int(cfg.data.batch_size)
        self.weight_decay, self.momentum = float(m.weight_decay), float(m.momentum)
        self.module = Classifier(arch=m.arch, input_shape=shape, num_classes=classes).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        if any(isinstance(b, nn.modules.batchnorm._BatchNorm) for b in self.module.modules()):
            raise SleepbotError(
                f"{info.path!r}: a network with BatchNorm cannot be replayed at jumped weights"
            )
        layers = neuron_layers(self.module)
        recorded = [r.name for r in info.layers]
        if list(layers) != recorded or any(r.n_kept != layers[r.name].weight.shape[0] for r in info.layers):
            raise SleepbotError(
                f"{info.path!r}: its recorded layers (every neuron of {', '.join(recorded)}) are not the "
                f"network's ({', '.join(layers)})"
            )
        self.shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
        self.bias = {n: m.bias is not None for n, m in layers.items()}
        self.other = {  # parameters outside the neuron layers keep their initial values (none in the corpus)
            k: v for k, v in self.module.named_parameters() if k.rsplit(".", 1)[0] not in layers
        }

    def params(self, mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{parameter name: tensor} from {layer: [N, fan_in (+1)]} (the inverse of `neurons.neuron_matrix`)."""
        out = dict(self.other)
        for name, shape in self.shapes.items():
            fan_in = math.prod(shape[1:])
            out[f"{name}.weight"] = mats[name][:, :fan_in].reshape(shape)
            if self.bias[name]:
                out[f"{name}.bias"] = mats[name][:, fan_in]
        return out

    def loss(self, mats: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy on the training examples `idx` at the weights `mats` (differentiable in them)."""
        logits = torch.func.functional_call(self.module, self.params(mats), (self.x[idx],))
        return F.cross_entropy(logits, self.y[idx])

    def settle(
        self,
        mats: dict[str, torch.Tensor],
        state: dict[str, dict[str, torch.Tensor]],
        step: int,
        batches: Sequence[torch.Tensor],
        *,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The weights after len(batches) more updates of the run's own optimizer from `mats`, starting from its
        recorded `state` ({layer: {key: [N, F]}}) after `step` updates, at the run's recorded lr schedule.

        Torch's update rules (betas 0.9, 0.999 and eps 1e-8, as sleepbot's adam and adamw use; SGD with the run's
        momentum, no dampening), written out so that with `create_graph` the result is differentiable in `mats`
        (second order: each step's gradient is itself differentiated). A jump that only moves the weights along
        steep directions is undone within a few such steps; what survives them is what a jump is worth to a run
        that trains on (see `jump_log_ratio`'s `settle_steps`).
        """
        b1, b2, eps = 0.9, 0.999, 1e-8
        w = dict(mats)
        st = {k: dict(v) for k, v in state.items()}
        names = list(w)
        for i, idx in enumerate(batches):
            if not create_graph:
                w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    self.loss(w, idx), [w[k] for k in names], create_graph=create_graph
                )
            k = int(step) + i  # updates taken before this one
            lr = float(self.lr_by_step[min(k, len(self.lr_by_step) - 1)])
            for name, g in zip(names, grads):
                p, s = w[name], st[name]
                if self.optimizer == "momentum":
                    s["momentum_buffer"] = self.momentum * s["momentum_buffer"] + g if k > 0 else g
                    w[name] = p - lr * s["momentum_buffer"]
                    continue
                if self.optimizer == "adamw":
                    p = p * (1 - lr * self.weight_decay)
                elif self.weight_decay:
                    g = g + self.weight_decay * p
                s["exp_avg"] = b1 * s["exp_avg"] + (1 - b1) * g
                s["exp_avg_sq"] = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
                t = k + 1
                # sqrt's derivative is unbounded at 0 (a weight whose gradient has always been 0): 1e-20 under it
                # moves the denominator by at most 1e-10, a hundredth of eps
                denom = (s["exp_avg_sq"] / (1 - b2**t) + 1e-20).sqrt() + eps
                w[name] = p - lr * (s["exp_avg"] / (1 - b1**t)) / denom
        return w if create_graph else {k: v.detach() for k, v in w.items()}


class JumpDataset(IterableDataset):
    """(run, time) samples: every layer's history up to one snapshot, and which training examples score it.

    `random` mode (training) draws a run uniformly, a history length uniformly in min_context..context and an end
    snapshot uniformly among those that length allows; `all` mode (validation) takes every run at end snapshots
    `stride` apart, each with the longest history there is (up to `context`). Each sample is a dict: run (int),
    t_end (int), history {layer: [C, N, F] float32}, kind {layer: str}, examples [E] int64 (indices into the run's
    training split, drawn from the seed), and, in `all` mode, future {layer: [N, F]}: the weights `horizon`
    snapshots later where the run has them (the oracle's jump, for reference).

    With `settle_steps` K > 0, a sample also holds what `RunModel.settle` needs to train the run on for K updates
    from the snapshot: `state` {layer: {key: [N, F]}} (the optimizer's recorded state there), `step` (the
    snapshot's step) and `batches` (K index tensors of the run's batch size into its training split, from the same
    seed). `batch_sizes` {run: batch size} is set by the caller, as `train_sizes` is.
    """

    def __init__(
        self,
        runs: Sequence[RunInfo],
        context: int,
        min_context: int,
        *,
        mode: str = "random",
        samples: int = 1000,
        examples: int = 256,
        stride: int = 5,
        horizon: int = 20,
        seed: int = 0,
        settle_steps: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("random", "all"):
            raise SleepbotError(f"unknown jump sample mode {mode!r}; valid: random, all")
        self.runs = [r for r in runs if len(r.snapshot_steps) >= min_context]
        if not self.runs:
            raise SleepbotError(f"no run has the {min_context} snapshots a jump needs")
        self.context, self.min_context = int(context), int(min_context)
        self.mode, self.samples, self.examples = mode, int(samples), int(examples)
        self.stride, self.horizon, self.seed = max(1, int(stride)), int(horizon), int(seed)
        self.settle_steps = int(settle_steps)
        if self.settle_steps < 0:
            raise SleepbotError(
                f"settle_steps must be 0 (score where the jump lands) or more; got {settle_steps}"
            )
        self.epoch = 0
        self.train_sizes: dict[int, int] = {}  # run -> size of its training split, set by the caller
        self.batch_sizes: dict[int, int] = {}  # run -> its training batch size (settling), set by the caller

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self) -> list[tuple[int, int]]:
        """`all` mode: every (run, end snapshot)."""
        return [
            (ri, t)
            for ri, run in enumerate(self.runs)
            for t in range(self.min_context - 1, len(run.snapshot_steps), self.stride)
        ]

    def sample(self, ri: int, t: int, c: int, rng: np.random.Generator) -> dict[str, Any]:
        from sleepbot.store import RunFile

        run = self.runs[ri]
        rows = run.snapshot_rows[t - c + 1 : t + 1]
        fut = t + self.horizon
        with RunFile(run.path) as f:
            history = {
                layer.name: torch.from_numpy(np.ascontiguousarray(f.weights(layer.name, rows), np.float32))
                for layer in run.layers
            }
            future = (
                {
                    layer.name: torch.from_numpy(
                        np.ascontiguousarray(
                            f.weights(layer.name, [int(run.snapshot_rows[fut])])[0], np.float32
                        )
                    )
                    for layer in run.layers
                }
                if self.mode == "all" and fut < len(run.snapshot_steps)
                else None
            )
            state = None
            if self.settle_steps:
                row = int(run.snapshot_rows[t])
                state = {}
                for layer in run.layers:
                    keys = [
                        a[len("optim/") :]
                        for a in f.layer_info(layer.name)["arrays"]
                        if a.startswith("optim/")
                    ]
                    state[layer.name] = {
                        k: torch.from_numpy(np.ascontiguousarray(f.array(layer.name, f"optim/{k}", [row])[0]))
                        for k in keys
                    }
        n = self.train_sizes.get(ri)
        if n is None:
            raise SleepbotError("JumpDataset.train_sizes must give each run's training-split size")
        examples = torch.as_tensor(
            rng.choice(n, size=min(self.examples, n), replace=False), dtype=torch.int64
        )
        out = {
            "run": ri,
            "t_end": t,
            "history": history,
            "kind": {layer.name: layer.kind for layer in run.layers},
            "examples": examples,
            "future": future,
        }
        if state is not None:
            bs = self.batch_sizes.get(ri)
            if bs is None:
                raise SleepbotError("JumpDataset.batch_sizes must give each run's batch size to settle")
            out["state"], out["step"] = state, int(run.snapshot_steps[t])
            out["batches"] = [
                torch.as_tensor(rng.choice(n, size=min(bs, n), replace=False), dtype=torch.int64)
                for _ in range(self.settle_steps)
            ]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = _shard()
        if self.mode == "all":
            rng = np.random.default_rng([self.seed, 1])  # the same examples at every validation
            for k, (ri, t) in enumerate(self.plan()):
                item = self.sample(ri, t, min(t + 1, self.context), rng)
                if k % shards == shard:
                    yield item
            return
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        for _ in range(math.ceil(self.samples / shards)):
            ri = int(rng.integers(len(self.runs)))
            s = len(self.runs[ri].snapshot_steps)
            c = int(rng.integers(self.min_context, min(self.context, s) + 1))
            t = int(rng.integers(c - 1, s))
            yield self.sample(ri, t, c, rng)


def replay_dataset(
    runs: Sequence[RunInfo], context: int, min_context: int, **options: Any
) -> tuple[JumpDataset | None, list[RunModel], list[str]]:
    """A JumpDataset over the runs that can be replayed, their RunModels (in the dataset's run order), and a
    one-line reason for each run left out (BatchNorm, no config). `options` go to JumpDataset."""
    cache: dict[str, Any] = {}
    kept, models, left_out = [], [], []
    settle = bool(options.get("settle_steps"))
    for r in runs:
        try:
            models.append(RunModel(r, cache, settle=settle))
            kept.append(r)
        except SleepbotError as e:
            left_out.append(str(e))
    if not kept:
        return None, [], left_out
    ds = JumpDataset(kept, context, min_context, **options)
    ds.train_sizes = {i: len(m.y) for i, m in enumerate(models)}
    ds.batch_sizes = {i: m.batch_size for i, m in enumerate(models)}
    return ds, models, left_out


def jump_log_ratio(
    forecaster: torch.nn.Module, run_model: RunModel, sample: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(L(w + jump) / L(w)) of one sample, differentiable in the forecaster, and log(L(w)) (no gradient).

    The jump of each layer is the forecaster's last trained horizon. A sample with `batches` (a JumpDataset with
    `settle_steps`) is scored after the run trains on: log(L(settle(w + jump)) / L(settle(w))), both continued for
    the same batches from the optimizer's recorded state, so that a jump earns only what the optimizer would not
    have made up in those steps anyway."""
    now = {k: h[-1] for k, h in sample["history"].items()}
    batches = sample.get("batches")
    with torch.no_grad():
        start = now if not batches else run_model.settle(now, sample["state"], sample["step"], batches)
        base = run_model.loss(start, sample["examples"]).log()
    mats = {
        k: now[k] + forecaster(h, sample["kind"][k], None)[-1] for k, h in sample["history"].items()
    }  # [N, F] each
    if batches:
        mats = run_model.settle(
            mats, sample["state"], sample["step"], batches, create_graph=torch.is_grad_enabled()
        )
    return run_model.loss(mats, sample["examples"]).log() - base, base


def landing_log_ratio(
    run_model: RunModel, sample: dict[str, Any], mats: dict[str, torch.Tensor], base: torch.Tensor
) -> torch.Tensor:
    """log(L(mats) / L(w)) for given jumped weights (the oracle's, in validation), settled as `jump_log_ratio`
    settles; `base` is the log(L(w)) that `jump_log_ratio` returned for the same sample (so the no-jump run is
    not replayed twice). No gradient."""
    batches = sample.get("batches")
    with torch.no_grad():
        if batches:
            mats = run_model.settle(mats, sample["state"], sample["step"], batches)
        return run_model.loss(mats, sample["examples"]).log() - base


def evaluate_jumps(
    forecaster: torch.nn.Module,
    runs: Sequence[RunInfo],
    *,
    context: int | None = None,
    min_context: int | None = None,
    stride: int = 5,
    examples: int = 512,
    horizon: int = 20,
    seed: int = 0,
    settle_steps: int = 0,
) -> dict[str, Any]:
    """How much a forecaster's jump lowers the training loss on `runs`, every `stride` snapshots (with
    `settle_steps`, after both the jumped and the unjumped weights train on that many updates; see
    `jump_log_ratio`).

    Returns a JSON-ready dict: `log_ratio` (mean log(L(w + jump) / L(w)) over samples), `improved` (share of
    samples where the jump lowered the loss), `oracle_log_ratio` (the same for the run's own weights `horizon`
    snapshots later, where recorded: the true future's gain), `samples`, `runs`, and the same per run
    attribute value of `dataset`, `arch` and `optimizer` under `by`. Runs that cannot be replayed (BatchNorm)
    and samples whose loss is not finite (a diverged run) are left out and counted in `skipped`.
    """
    context = int(context or forecaster.context)
    min_context = int(min_context or getattr(forecaster, "min_context", context))
    ds, models, left_out = replay_dataset(
        runs,
        context,
        min_context,
        mode="all",
        stride=stride,
        examples=examples,
        horizon=horizon,
        seed=seed,
        settle_steps=settle_steps,
    )
    if ds is None:
        raise SleepbotError("none of the runs can be replayed to score jumps (BatchNorm, or no config)")
    kept, skipped = ds.runs, len(left_out)
    rows = []
    with torch.no_grad():
        for s in ds:
            ratio, base = jump_log_ratio(forecaster, models[s["run"]], s)
            oracle = float("nan")
            if s["future"] is not None:
                oracle = float(landing_log_ratio(models[s["run"]], s, s["future"], base))
            if not (math.isfinite(float(ratio)) and math.isfinite(float(base))):
                skipped += 1
                continue
            rows.append((s["run"], float(ratio), oracle))

    def summary(sel: list[tuple[int, float, float]]) -> dict[str, Any]:
        ratios = [r for _, r, _ in sel]
        oracles = [o for _, _, o in sel if math.isfinite(o)]
        return {
            "log_ratio": float(np.mean(ratios)) if ratios else float("nan"),
            "improved": float(np.mean([r < 0 for r in ratios])) if ratios else float("nan"),
            "oracle_log_ratio": float(np.mean(oracles)) if oracles else float("nan"),
            "samples": len(ratios),
            "runs": len({i for i, _, _ in sel}),
        }

    out = {**summary(rows), "skipped": skipped, "by": {}}
    for key in ("dataset", "arch", "optimizer"):
        values = sorted({str(r.attrs.get(key)) for r in kept})
        out["by"][key] = {
            v: summary([row for row in rows if str(kept[row[0]].attrs.get(key)) == v]) for v in values
        }
    return out
