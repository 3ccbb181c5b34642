"""`RecorderCore`: records one run into one HDF5 file from any training loop (torch only, no Lightning).

What is recorded (the file layout is in trajectories/README.md):

- every step: each layer's per-neuron L2 norms (weights and bias together), the train loss and the learning rate;
- every `snapshot_every` steps, step 0 (the initial weights) included: snapshots of every kept neuron's weights,
  and optionally its gradient and optimizer state;
- validation metrics, test metrics and sleep events when they are logged.

Steps count optimizer updates: the weights "at step k" are those after k updates; the train loss and lr at step k
are those of update k (the loss is NaN at step 0, where no update has happened yet).

Cost. For a small network (at most STAGE_BYTES / 8 of parameters, e.g. small_cnn) a step is ONE tensor op: every
weight, bias and the loss are concatenated (`torch.cat(..., out=)`) into a row of a staging block, and the norms of a
whole block of steps are computed at once when it is full (a few ops per layer per block, not per step). Each
torch op costs microseconds of dispatch whatever its size, which is what a ~1 ms step notices. For a larger
network the norms are computed straight into the preallocated block buffer ([rows, N] per layer, `out=`), two ops
per layer, since copying its weights every step would cost more than reading them. Snapshots are copied straight
into the writer's block buffer. Nothing synchronises with an accelerator per step. The HDF5 write happens when the
snapshot block is full (`flush_every` snapshots, fewer when they would pass `buffer_bytes`) or every
`flush_seconds`, whichever comes first.

Resume. `state_dict()` flushes and returns what the file holds (rows per dataset, last step, the file's run id);
`RecorderCore(..., resume=state)` reopens that file, cuts off whatever a crashed run wrote after that point, and
appends (trajectories/README.md, "Resuming").
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sleepbot.errors import SleepbotError
from sleepbot.neurons import has_bias, layer_kind, neuron_layers
from sleepbot.store import LayerSpec, RunWriter

# Per-parameter optimizer state tensors, by optimizer class, for when the state is still empty (before the first
# step; Adam and friends create it lazily). Keys present in a non-empty state are read from the state itself.
_OPTIM_KEYS: dict[str, tuple[str, ...]] = {
    "Adam": ("exp_avg", "exp_avg_sq"),
    "AdamW": ("exp_avg", "exp_avg_sq"),
    "NAdam": ("exp_avg", "exp_avg_sq"),
    "RAdam": ("exp_avg", "exp_avg_sq"),
    "Adamax": ("exp_avg", "exp_inf"),
    "Adagrad": ("sum",),
    "RMSprop": ("square_avg",),
    "SGD": ("momentum_buffer",),
}


MAX_STEP_ROWS = 4096  # per-step rows buffered at most (norms, loss, lr) before they go to HDF5
BUFFER_BYTES = 64 * 2**20  # default memory budget of the in-memory blocks (snapshots and per-step rows)
STAGE_BYTES = (
    2 * 2**20
)  # the staging block of a small network (see "Cost" above); 8 rows at least, 64 at most
STAGE_ROWS = 64


def optimizer_state_keys(optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's per-parameter state tensors (the ones shaped like the parameter).

    Raises:
        SleepbotError: an optimizer with no such state (plain SGD) or an unknown one whose state is still empty.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        state = optimizer.state.get(p)
        if state:
            keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape]
            if keys:
                return sorted(keys)
    name = type(optimizer).__name__
    group = optimizer.param_groups[0]
    keys = list(_OPTIM_KEYS.get(name, ()))
    if name == "SGD" and not group.get("momentum"):
        keys = []
    if name in ("Adam", "AdamW") and group.get("amsgrad"):
        keys.append("max_exp_avg_sq")
    if name == "RMSprop":
        keys += ["momentum_buffer"] * bool(group.get("momentum")) + ["grad_avg"] * bool(group.get("centered"))
    if not keys:
        raise SleepbotError(
            f"optimizer_state=True, but {name} has no per-parameter state to record; supported: "
            f"{', '.join(sorted(_OPTIM_KEYS))} (SGD with momentum only)"
        )
    return keys


def sample_neurons(layer: str, n: int, max_neurons: int | None, seed: int) -> np.ndarray:
    """Indices of the neurons whose full weights are snapshotted: all of them, or a seeded sorted sample.

    The sample depends only on (seed, layer name, n), so every run with the same seed keeps the same neurons.
    """
    if not max_neurons or n <= max_neurons:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), zlib.crc32(layer.encode())])
    return np.sort(rng.choice(n, size=int(max_neurons), replace=False)).astype(np.int64)


def _as_float(x: Any) -> float:
    if x is None:
        return float("nan")
    if torch.is_tensor(x):
        return float(x.detach())
    return float(x)


class RecorderCore:
    """Records one run into one HDF5 file from any training loop.

    A plain PyTorch loop::

        core = RecorderCore("run.h5", model, optimizer=opt)
        core.record_step(0)                      # the initial weights
        for step in range(1, n + 1):
            ...; opt.step()
            core.record_step(step, loss=loss)    # norms every step, a snapshot when step % snapshot_every == 0
        core.close()                             # status 'complete' (a `with` block closes 'failed' on error)

    Args:
        path: the .h5 file to create.
        model: the network; its Conv/Linear layers are recorded (sleepbot.neurons defines a neuron).
        snapshot_every: steps between snapshots of full weights (10: 0-8% overhead measured, see README).
        max_neurons_per_layer: snapshot at most this many neurons per layer, a seeded sample (None: all).
            The default 256 keeps every neuron of small_cnn, lenet5, cnn1d and mlp.
        layers: module names to record (None: every Conv/Linear layer).
        gradients: also snapshot each kept neuron's gradient (zeros where there is none, e.g. at step 0).
        optimizer_state: also snapshot the optimizer's per-parameter state (Adam's exp_avg and exp_avg_sq, ...);
            needs `optimizer`. Before the first update the state is zeros, as Adam initialises it.
        optimizer: the optimizer (for optimizer_state, and for the lr when record_step gets none).
        seed: seeds the neuron sample.
        attrs: root attributes for the file (config, dataset, arch, ...).
        overwrite: replace an existing file.
        flush_every: snapshots buffered in memory between writes to disk, at most (64, measured: see README).
        buffer_bytes: memory budget of the buffered blocks (64 MiB): a quarter at most for the per-step rows, the
            rest for snapshots, so that a large network flushes after fewer snapshots (one at least, whatever its
            size). None: no budget (only `flush_every`).
        flush_seconds: also flush when this long has passed since the last flush, so a slow run loses little.
        compression: HDF5 filter (None, "lzf", "gzip"); None by measurement, see README.
        resume: a `state_dict()` taken from a recorder of this run: append to its file (which must be there and be
            that run's) from the state's last step, instead of creating a new file.
    """

    def __init__(
        self,
        path: str | Path,
        model: nn.Module,
        *,
        snapshot_every: int = 10,
        max_neurons_per_layer: int | None = 256,
        layers: Sequence[str] | None = None,
        gradients: bool = False,
        optimizer_state: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        flush_every: int = 64,
        flush_seconds: float = 10.0,
        compression: str | None = None,
        buffer_bytes: int | None = BUFFER_BYTES,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        _check_options(snapshot_every, max_neurons_per_layer, flush_every, buffer_bytes)
        self.path = Path(path)
        self.model = model
        self.snapshot_every = int(snapshot_every)
        self.optimizer = optimizer
        self.flush_seconds = float(flush_seconds)
        try:
            self.modules = neuron_layers(model, include=list(layers) if layers is not None else None)
        except ValueError as e:
            raise SleepbotError(str(e)) from None
        if not self.modules:
            raise SleepbotError(
                f"{type(model).__name__} has no Conv1d/2d/3d or Linear sub-layer to record "
                "(a bare layer must be wrapped, e.g. nn.Sequential(layer))"
            )
        if optimizer_state and optimizer is None:
            raise SleepbotError("optimizer_state=True needs the optimizer (RecorderCore(..., optimizer=opt))")
        self.optim_keys = optimizer_state_keys(optimizer) if optimizer_state else []
        arrays = ["weight"] + ["grad"] * bool(gradients) + [f"optim/{k}" for k in self.optim_keys]
        self.specs = [
            LayerSpec(
                name=name,
                kind=layer_kind(m),
                shape=tuple(int(s) for s in m.weight.shape),
                has_bias=has_bias(m),
                neurons=sample_neurons(name, m.weight.shape[0], max_neurons_per_layer, seed),
            )
            for name, m in self.modules.items()
        ]
        file_attrs = {
            "snapshot_every": self.snapshot_every,
            "max_neurons_per_layer": int(max_neurons_per_layer or 0),
            "neuron_seed": int(seed),
            "gradients": bool(gradients),
            "optimizer_state": bool(optimizer_state),
            "model_class": type(model).__name__,
            **(attrs or {}),
        }
        self._rows, n_snapshots = _block_sizes(
            self.specs, len(arrays), self.snapshot_every, flush_every, buffer_bytes
        )
        if resume is None:
            self.writer = RunWriter(
                self.path,
                self.specs,
                attrs=file_attrs,
                snapshot_arrays=arrays,
                overwrite=overwrite,
                buffer_snapshots=n_snapshots,
                buffer_steps=self._rows,
                compression=compression,
            )
        else:
            self.writer = self._reopen(resume, file_attrs, arrays, n_snapshots)
        self._arrays = arrays
        first = next(iter(self.modules.values())).weight
        self._device = first.device
        # Per-step block buffers. On CPU they are numpy memory seen through torch (no copy at write time); on an
        # accelerator they stay on the device and are copied once per block.
        self._norms = {s.name: self._buffer((self._rows, s.n)) for s in self.specs}  # {layer: [rows, N]}
        self._loss = self._buffer((self._rows,))
        self._lr = np.full(self._rows, np.nan, np.float32)
        self._steps = np.zeros(self._rows, np.int64)
        self._n = 0
        # Torch views of the writer's snapshot buffers, [B, N_kept, F], and the kept-neuron indices on device.
        self._snap = {key: torch.from_numpy(buf) for key, buf in self.writer.snapshot_buffers.items()}
        self._snap_rows = {key: list(t.unbind(0)) for key, t in self._snap.items()}  # [N_kept, F] views
        self._idx = {
            s.name: None if s.n_kept == s.n else torch.as_tensor(s.neurons, device=self._device)
            for s in self.specs
        }
        self._plan = self._make_plan()
        self._make_stage()
        self.last_step: int | None = None if resume is None else int(resume["last_step"])
        self.last_snapshot: int | None = None if resume is None else _opt_int(resume["last_snapshot"])
        self._last_flush = time.monotonic()
        self.closed = False

    def _reopen(
        self, state: Mapping[str, Any], file_attrs: Mapping[str, Any], arrays: list[str], n_snapshots: int
    ) -> RunWriter:
        try:
            run_id, rows, last_step = str(state["run_id"]), dict(state["rows"]), int(state["last_step"])
        except (KeyError, TypeError, ValueError):
            raise SleepbotError(
                f"cannot resume recording into {str(self.path)!r}: the state has no run_id/rows/last_step "
                f"(got keys {sorted(state)})"
            ) from None
        settings = ("snapshot_every", "max_neurons_per_layer", "neuron_seed", "gradients", "optimizer_state")
        return RunWriter.reopen(
            self.path,
            self.specs,
            run_id=run_id,
            rows=rows,
            snapshot_arrays=arrays,
            buffer_snapshots=n_snapshots,
            wall_seconds=float(state.get("wall_seconds", 0.0)),
            last_step=last_step,
            expect={k: file_attrs[k] for k in settings},
        )

    def state_dict(self) -> dict[str, Any]:
        """Flush, and return what a resumed recorder needs (`RecorderCore(..., resume=state)`): the file's run id,
        rows per dataset on disk, the last step and snapshot recorded. Plain JSON-able values."""
        if not self.closed:
            self.flush()
        return {
            "path": str(self.path),
            "run_id": self.writer.run_id,
            "rows": dict(self.writer.rows),
            "last_step": self.last_step,
            "last_snapshot": self.last_snapshot,
            "wall_seconds": time.time() - self.writer._t0,
        }

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._device.type == "cpu":
            return torch.from_numpy(np.full(shape, np.nan, np.float32))
        return torch.full(shape, float("nan"), dtype=torch.float32, device=self._device)

    def _make_plan(self) -> list[tuple]:
        """Per layer, what the per-step norm needs, looked up once: nn.Module attribute access costs about a
        microsecond each, and the step path must stay in the tens of microseconds.

        Entries: (weight, bias, weight as a detached [N, fan_in] view or None if it must be reshaped each step,
        bias detached or None, norm buffer [rows, N]). Views of the parameters follow in-place optimizer updates.
        """
        plan = []
        for name, m in self.modules.items():
            w, b = m.weight, m.bias
            try:
                w2d = w.detach().view(w.shape[0], -1)  # [N, fan_in]
            except RuntimeError:  # not viewable (e.g. channels_last): reshaped (copied) at each step instead
                w2d = None
            if w.dtype != torch.float32:
                w2d = None  # the slow path converts
            bd = None if b is None else b.detach()
            bcol = (
                None if bd is None or b.dtype != torch.float32 or not bd.is_contiguous() else bd.unsqueeze(1)
            )
            plan.append((w, b, w2d, bd, self._norms[name], bcol))
        return plan

    def _make_stage(self) -> None:
        """The staging block of a small network (see the module docstring), or none for a larger one.

        A row is every parameter flattened, in plan order (weight, then bias, per layer); the losses of the staged
        steps wait in a list. `_drain` turns what was staged into norms and losses in the block buffers.
        """
        self._stage = None
        self._s = 0  # rows staged, not yet drained
        self._stage_len = -1  # no stage: `_s` never reaches it
        self._losses: list[Any] = []
        flat: list[torch.Tensor] = []
        for w, _b, w2d, bd, _buf, _bcol in self._plan:
            if w2d is None or w.device != self._device or (bd is not None and _bcol is None):
                return  # non-float32, non-viewable or scattered parameters: the per-layer path
            flat.append(w2d.view(-1))
            if bd is not None:
                flat.append(bd.view(-1))
        width = sum(t.numel() for t in flat)
        rows = min(STAGE_ROWS, self._rows, STAGE_BYTES // (4 * width))
        if rows < min(8, self._rows):
            return
        self._stage = torch.empty((rows, width), dtype=torch.float32, device=self._device)
        self._stage_rows = list(self._stage.unbind(0))  # views made once: indexing costs a dispatch per step
        self._stage_len = rows
        self._flat = flat

    def _drain(self) -> None:
        """Norms and losses of the staged rows, into the block buffers (a few ops per layer for the whole block)."""
        s = self._s
        if s == 0:
            return
        stage = self._stage[:s]
        i1 = self._n
        i0 = i1 - s
        off = 0
        for _w, _b, w2d, bd, buf, _bcol in self._plan:
            n, k = w2d.shape
            wk = stage[:, off : off + n * k].view(s, n, k)  # [s, N, fan_in]
            off += n * k
            if bd is None:
                torch.linalg.vector_norm(wk, dim=2, out=buf[i0:i1])
            else:
                torch.hypot(torch.linalg.vector_norm(wk, dim=2), stage[:, off : off + n], out=buf[i0:i1])
                off += n
        losses = self._losses
        if all(isinstance(x, torch.Tensor) for x in losses):
            self._loss[i0:i1] = torch.stack(losses).reshape(s)  # one op for the block, on the losses' device
        else:  # a plain loop passing floats or None
            for k, x in enumerate(losses):
                self._loss[i0 + k] = (
                    float("nan") if x is None else (x.reshape(()) if torch.is_tensor(x) else x)
                )
        self._losses = []
        self._s = 0

    def _plan_is_current(self) -> bool:
        """False when a layer's weight or bias was replaced by a new Parameter since the plan was made."""
        return all(m.weight is w and m.bias is b for m, (w, b, *_) in zip(self.modules.values(), self._plan))

    # ------------------------------------------------------------------------------------------ recording
    def record_step(self, step: int, loss: Any = None, lr: float | None = None) -> None:
        """Record the norms, loss and lr at `step`; snapshot the weights when `step % snapshot_every == 0`.

        Args:
            step: optimizer updates so far; must increase from call to call.
            loss: the loss of the update that led here (a float or a tensor; a tensor is not synchronised here).
            lr: its learning rate; None reads the optimizer's first param group (if an optimizer was given).
        """
        if self.closed:
            self._check_open()
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise SleepbotError(f"record_step: steps must increase, got {step} after {self.last_step}")
        i = self._n
        if self._stage is not None:  # small network: one op per step (see the module docstring)
            torch.cat(self._flat, out=self._stage_rows[self._s])
            self._s += 1
            # A tensor loss stays on its device (no host sync per step); the block's losses are stacked at drain.
            self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        else:
            self._norm_step(i, loss)
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]
        self._lr[i] = lr if isinstance(lr, float) else _as_float(lr)
        self._steps[i] = step
        self._n += 1
        self.last_step = step
        if self._s == self._stage_len:
            self._drain()
        if step % self.snapshot_every == 0:
            self.snapshot(self.model, step)
            if self.writer.snapshots_full:
                self.flush()
                return
        if self._n == self._rows:
            self._push_steps()
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def _norm_step(self, i: int, loss: Any) -> None:
        """Norms and loss of one step straight into block row `i` (networks too large to stage)."""
        # No torch.no_grad() needed: every tensor here is detached. Two ops per layer: ||w_row|| then hypot with b.
        for w, _b, w2d, bd, buf, _bcol in self._plan:
            if w2d is None:  # slow path: non-float32 or non-viewable weights
                norms = torch.linalg.vector_norm(w.detach().reshape(w.shape[0], -1).float(), dim=1)
                buf[i] = norms if bd is None else torch.hypot(norms, bd.float())
            elif bd is None:
                torch.linalg.vector_norm(w2d, dim=1, out=buf[i])
            else:
                torch.hypot(torch.linalg.vector_norm(w2d, dim=1), bd, out=buf[i])
        if loss is None:
            self._loss[i] = float("nan")
        elif torch.is_tensor(loss):
            self._loss[i] = loss.detach().reshape(())  # stays on its device; no host sync per step
        else:
            self._loss[i] = float(loss)

    @torch.no_grad()
    def snapshot(self, model: nn.Module, step: int) -> None:
        """Save the full weights (and gradient / optimizer state when asked) of every kept neuron at `step`.

        `model` must have the same layers as the recorded one (usually it is the same object). A second call for
        the step last snapshotted does nothing.
        """
        self._check_open()
        step = int(step)
        if self.last_snapshot is not None and step <= self.last_snapshot:
            if step == self.last_snapshot:
                return
            raise SleepbotError(f"snapshot: steps must increase, got {step} after {self.last_snapshot}")
        if model is self.model and not self._plan_is_current():
            if self._stage is not None:
                self._drain()  # rows staged from the old parameters
            self._plan = self._make_plan()  # a parameter was replaced: follow the new one
            self._make_stage()
        modules = self.modules if model is self.model else neuron_layers(model, include=list(self.modules))
        if self.writer.snapshots_full:
            self.flush()
        j = self.writer.snapshot_index
        fast = model is self.model
        for spec, (_w, _b, w2d, _bd, _buf, bcol) in zip(self.specs, self._plan):
            m = modules[spec.name]
            idx = self._idx[spec.name]
            for arr in self._arrays:
                if arr == "weight" and fast and w2d is not None and idx is None:
                    # one op per layer: [N, fan_in] and the bias column side by side, into the block row
                    out = self._snap_rows[(spec.name, arr)][j]
                    if bcol is None:
                        out.copy_(w2d)
                    else:
                        torch.cat((w2d, bcol), dim=1, out=out)
                    continue
                if arr == "weight":
                    w, b = m.weight, m.bias
                elif arr == "grad":
                    w, b = m.weight.grad, (m.bias.grad if m.bias is not None else None)
                else:  # optim/<key>
                    key = arr[len("optim/") :]
                    w = self.optimizer.state.get(m.weight, {}).get(key)
                    b = self.optimizer.state.get(m.bias, {}).get(key) if m.bias is not None else None
                _copy_neurons(self._snap[(spec.name, arr)][j], w, b, spec, idx)
        self.writer.commit_snapshot(step)
        self.last_snapshot = step

    def log_val(self, step: int, loss: Any, acc: Any) -> None:
        """Record a validation result (NaN for a metric that is not known)."""
        self._check_open()
        self.writer.write_val(int(step), _as_float(loss), _as_float(acc))

    def log_test(self, acc: Any = None, loss: Any = None) -> None:
        """Record test metrics; they are written as /metrics/test/acc (and /loss) when the file is closed."""
        self.writer.write_test(
            **{k: _as_float(v) for k, v in (("acc", acc), ("loss", loss)) if v is not None}
        )

    def log_event(
        self,
        step: int,
        strategy: str,
        horizon: int,
        accepted: bool,
        loss_before: float,
        loss_after: float,
    ) -> None:
        """Record one sleep event in the /events table."""
        self._check_open()
        self.writer.write_event(
            step, strategy, horizon, accepted, _as_float(loss_before), _as_float(loss_after)
        )

    # ------------------------------------------------------------------------------------------ flushing
    def _push_steps(self) -> None:
        if self._stage is not None:
            self._drain()
        n = self._n
        if n == 0:
            return
        norms = {name: buf[:n].cpu().numpy() for name, buf in self._norms.items()}
        loss = self._loss[:n].cpu().numpy()
        self.writer.write_steps(self._steps[:n], norms, loss, self._lr[:n])
        self._n = 0

    def flush(self) -> None:
        """Write everything buffered to disk now (readers and a later crash see it)."""
        self._check_open()
        self._push_steps()
        self.writer.flush()
        self._last_flush = time.monotonic()

    def close(self, status: str = "complete") -> None:
        """Flush and close; `status` is `complete` or `failed`. A second call does nothing."""
        if self.closed:
            return
        self.closed = True
        try:
            self._push_steps()
        finally:
            self.writer.close(status)

    def _check_open(self) -> None:
        if self.closed:
            raise SleepbotError(f"recorder for {str(self.path)!r} is closed")

    def __enter__(self) -> RecorderCore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "complete")


def _copy_neurons(
    out: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    spec: LayerSpec,
    idx: torch.Tensor | None,
) -> None:
    """Copy a layer's tensor pair (weight-shaped `w`, bias-shaped `b`) into `out` [N_kept, F], bias last.

    Missing tensors (no gradient yet, no optimizer state yet) are written as zeros.
    """
    fan = spec.fan_in - int(spec.has_bias)
    if w is None:
        out[:, :fan].zero_()
    else:
        w2d = w.detach().reshape(spec.n, -1)  # [N, fan_in]
        out[:, :fan].copy_(w2d if idx is None else w2d.index_select(0, idx))
    if spec.has_bias:
        if b is None:
            out[:, fan].zero_()
        else:
            b = b.detach()
            out[:, fan].copy_(b if idx is None else b.index_select(0, idx))


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _block_sizes(
    specs: Sequence[LayerSpec], n_arrays: int, snapshot_every: int, flush_every: int, buffer_bytes: int | None
) -> tuple[int, int]:
    """(per-step rows, snapshots) per in-memory block, within `buffer_bytes` (per-step rows: a quarter at most).

    Per-step rows: one block per snapshot block, capped for long snapshot intervals (MAX_STEP_ROWS).
    """
    rows = min(flush_every * snapshot_every, MAX_STEP_ROWS)
    snaps = flush_every
    if buffer_bytes is not None:
        row_bytes = 4 * (sum(s.n for s in specs) + 2) + 8  # norms, loss, lr (float32) and the step (int64)
        rows = max(1, min(rows, buffer_bytes // 4 // row_bytes))
        snapshot_bytes = 4 * n_arrays * sum(s.n_kept * s.fan_in for s in specs)
        snaps = max(1, min(snaps, (buffer_bytes - rows * row_bytes) // max(1, snapshot_bytes)))
    return rows, snaps


def _check_options(
    snapshot_every: int, max_neurons_per_layer: int | None, flush_every: int, buffer_bytes: int | None = None
) -> None:
    if not isinstance(snapshot_every, int) or snapshot_every < 1:
        raise SleepbotError(f"snapshot_every must be an integer >= 1, got {snapshot_every!r}")
    if max_neurons_per_layer is not None and (
        not isinstance(max_neurons_per_layer, int) or max_neurons_per_layer < 0
    ):
        raise SleepbotError(
            f"max_neurons_per_layer must be an integer >= 0 or None, got {max_neurons_per_layer!r}"
        )
    if not isinstance(flush_every, int) or flush_every < 1:
        raise SleepbotError(f"flush_every must be an integer >= 1, got {flush_every!r}")
    if buffer_bytes is not None and (not isinstance(buffer_bytes, int) or buffer_bytes < 1):
        raise SleepbotError(f"buffer_bytes must be an integer >= 1 or None, got {buffer_bytes!r}")
