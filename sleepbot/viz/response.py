"""The all-ones response: how each layer answers a constant input, snapshot by snapshot.

The network is rebuilt from a run file's config, each recorded snapshot is written into it
(`sleepbot.neurons.set_neuron_matrix`), an all-ones input goes through it, and every neuron layer's output
(before its non-linearity) is kept. Over training these maps change from noise to structure and then settle:
the original Sleepbot's video of the network "thinking". Shown as an image grid per snapshot, and as an
animated GIF over training (MP4 as well when ffmpeg is installed).

Caveats, by construction: layers whose recorder kept only a sample of neurons show the unrecorded neurons at
their initial weights (the figure says so); BatchNorm running statistics are not recorded, so a network with
BatchNorm is evaluated with fresh statistics (mean 0, variance 1).
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sleepbot.errors import SleepbotError
from sleepbot.viz._io import new_figure, open_run, save


@dataclass
class Responses:
    """Layer outputs to an all-ones input: {layer: [S, C, *spatial]} at `steps` [S]."""

    steps: np.ndarray
    layers: dict[str, np.ndarray]
    kinds: dict[str, str]
    partial: list[str] = field(default_factory=list)  # layers whose snapshots keep only some neurons
    title: str = ""


def rebuild_model(run: Any):
    """The run's network (sleepbot's Classifier) rebuilt from the run file's config, at its initial weights.

    Raises:
        SleepbotError: the file has no sleepbot run config (a run recorded from someone else's module), or its
            layers do not match the rebuilt network.
    """
    from sleepbot.config import RunConfig, build_config
    from sleepbot.data import make_datamodule
    from sleepbot.models import Classifier
    from sleepbot.neurons import neuron_layers

    cfg_dict = run.attrs.get("config") or {}
    if not cfg_dict.get("model"):
        raise SleepbotError(
            f"{str(run.path)!r} holds no sleepbot run config, so its network cannot be rebuilt; "
            f"pass model= (a module whose layers have the recorded names)"
        )
    cfg = build_config(RunConfig, cfg_dict)
    dm = make_datamodule(cfg.data, seed=cfg.seed)
    model = Classifier(arch=cfg.model.arch, input_shape=dm.input_shape, num_classes=dm.num_classes)
    have = set(neuron_layers(model))
    missing = [name for name in run.layers if name not in have]
    if missing:
        raise SleepbotError(
            f"{str(run.path)!r} records layer {missing[0]!r}, which the rebuilt {cfg.model.arch} does not have"
        )
    model.eval()
    model.input_shape = tuple(dm.input_shape)
    return model


def _respond(model, layers: list[str], input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One forward pass of an all-ones input [1, *input_shape]; each layer's output [C, *spatial] or [N]."""
    import torch

    from sleepbot.neurons import neuron_layers

    mods = neuron_layers(model, include=layers)
    outs: dict[str, np.ndarray] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, o, name=name: outs.__setitem__(name, o[0].detach().cpu().numpy())
        )
        for name, m in mods.items()
    ]
    try:
        with torch.no_grad():
            model(torch.ones(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return outs


def _input_shape(model) -> tuple[int, ...]:
    shape = getattr(model, "input_shape", None) or getattr(
        getattr(model, "hparams", None), "input_shape", None
    )
    if shape is None:
        raise SleepbotError("cannot tell the model's input shape; pass input_shape=(channels, *spatial)")
    return tuple(shape)


def compute_responses(
    source: Any,
    *,
    layers: list[str] | None = None,
    snapshots: list[int] | None = None,
    run: str | None = None,
    model: Any = None,
    input_shape: tuple[int, ...] | None = None,
) -> Responses:
    """All-ones responses of every (or the chosen) snapshot of a run, or of a live module's current weights.

    Args:
        source: a run file, a directory of runs (see `plot_norms`), an open RunFile, or a torch module (its
            current weights give a single frame).
        layers: which neuron layers (default: all recorded ones).
        snapshots: positions in the run's `snapshot_steps` (default: all).
        run: picks a run in a directory by a substring of its file name.
        model: a module to write the snapshots into, instead of rebuilding sleepbot's Classifier.
        input_shape: (channels, *spatial) of the input, when the module does not say.
    """
    import torch

    from sleepbot.neurons import neuron_layers, set_neuron_matrix

    if isinstance(source, torch.nn.Module):
        names = layers or list(neuron_layers(source))
        shape = tuple(input_shape) if input_shape else _input_shape(source)
        was = source.training
        source.eval()
        try:
            outs = _respond(source, names, shape)
        finally:
            source.train(was)
        from sleepbot.neurons import layer_kind

        mods = neuron_layers(source, include=names)
        return Responses(
            np.zeros(1, dtype=np.int64),
            {k: v[None] for k, v in outs.items()},
            {k: layer_kind(m) for k, m in mods.items()},
            title=type(source).__name__,
        )

    f = open_run(source, run)
    owned = f is not source
    try:
        net = model if model is not None else rebuild_model(f)
        shape = tuple(input_shape) if input_shape else _input_shape(net)
        names = list(layers) if layers is not None else list(f.layers)
        steps = np.asarray(f.snapshot_steps)
        pos = list(range(len(steps))) if snapshots is None else [int(p) for p in snapshots]
        if not pos:
            raise SleepbotError(f"{str(f.path)!r} has no weight snapshots to show")
        mods = neuron_layers(net, include=names)
        info = {name: f.layer_info(name) for name in names}
        weights = {name: f.weights(name, snapshots=pos) for name in names}  # [S, N_kept, F] each
        partial = [name for name in names if info[name]["n_kept"] < info[name]["n"]]
        frames: dict[str, list[np.ndarray]] = {name: [] for name in names}
        net.eval()
        for i in range(len(pos)):
            for name in names:
                rows = torch.as_tensor(info[name]["neurons"], dtype=torch.long)
                set_neuron_matrix(mods[name], torch.as_tensor(weights[name][i]), rows=rows)
            outs = _respond(net, names, shape)
            for name in names:
                frames[name].append(outs[name])
        return Responses(
            steps[pos],
            {name: np.stack(v) for name, v in frames.items()},
            {name: str(info[name]["kind"]) for name in names},
            partial,
            f.path.stem,
        )
    finally:
        if owned:
            f.close()


def tile(response: np.ndarray) -> np.ndarray:
    """One layer's response as a 2-D image.

    conv2d [C, H, W] -> the C maps tiled in a near-square grid (NaN gutters); conv1d [C, L] -> C rows of L;
    linear [N] -> N values folded into a near-square grid; other shapes are flattened like linear.
    """
    r = np.asarray(response, dtype=float)
    if r.ndim == 3:
        c, h, w = r.shape
        cols = math.ceil(math.sqrt(c))
        rows = math.ceil(c / cols)
        img = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
        for k in range(c):
            i, j = divmod(k, cols)
            img[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = r[k]
        return img
    if r.ndim == 2:
        return r
    flat = r.reshape(-1)
    cols = math.ceil(math.sqrt(flat.size))
    img = np.full(cols * math.ceil(flat.size / cols), np.nan)
    img[: flat.size] = flat
    return img.reshape(-1, cols)


def _scales(resp: Responses) -> dict[str, float]:
    # One symmetric colour scale per layer over all snapshots, so that growth over training is visible.
    return {k: float(np.nanmax(np.abs(v))) or 1.0 for k, v in resp.layers.items()}


def _draw_row(axes, resp: Responses, i: int, scales: dict[str, float], labels: bool) -> None:
    for ax, (name, frames) in zip(axes, resp.layers.items()):
        v = scales[name]
        ax.imshow(tile(frames[i]), cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if labels:
            star = " *" if name in resp.partial else ""
            ax.set_title(f"{name}{star}\n{resp.kinds[name]} {tuple(frames.shape[1:])}", fontsize=8)


def plot_response_grid(
    source: Any,
    out: str | Path | None = None,
    *,
    snapshots: int | list[int] = 6,
    layers: list[str] | None = None,
    run: str | None = None,
    responses: Responses | None = None,
):
    """An image grid: one row per chosen snapshot, one column per layer, of the all-ones response.

    Args:
        source: see `compute_responses`.
        out: where to save the figure; None only returns it.
        snapshots: how many snapshots, evenly spaced from first to last, or their positions.
        layers: which layers (default: all).
        run: picks a run in a directory.
        responses: already computed responses (skips the rebuild).

    Returns:
        The matplotlib Figure.
    """
    if responses is not None:
        resp = responses
    else:
        import torch

        if isinstance(source, torch.nn.Module):
            resp = compute_responses(source, layers=layers)
        else:
            f = open_run(source, run)
            try:
                n = len(f.snapshot_steps)
                if isinstance(snapshots, int):
                    pos = np.linspace(0, max(n - 1, 0), min(snapshots, n)).round().astype(int).tolist()
                else:
                    pos = list(snapshots)
                resp = compute_responses(f, layers=layers, snapshots=sorted(set(pos)))
            finally:
                if f is not source:
                    f.close()
    n = len(resp.steps)
    if responses is not None and isinstance(snapshots, int):
        idx = sorted(set(np.linspace(0, n - 1, min(snapshots, n)).round().astype(int).tolist()))
    else:
        idx = list(range(n))
    scales = _scales(resp)
    fig = new_figure(1.0 + 1.9 * len(resp.layers), 0.7 + 1.75 * len(idx))
    axes = fig.subplots(len(idx), len(resp.layers), squeeze=False)
    for r, i in enumerate(idx):
        _draw_row(axes[r], resp, i, scales, labels=r == 0)
        axes[r, 0].set_ylabel(f"step {int(resp.steps[i])}", fontsize=9)
    note = "  (* only sampled neurons recorded)" if resp.partial else ""
    fig.suptitle(f"all-ones response: {resp.title}{note}", fontsize=10)
    save(fig, out)
    return fig


def _frame_png(resp: Responses, i: int, scales: dict[str, float]) -> bytes:
    fig = new_figure(1.0 + 1.9 * len(resp.layers), 2.6)
    axes = fig.subplots(1, len(resp.layers), squeeze=False)[0]
    _draw_row(axes, resp, i, scales, labels=True)
    fig.suptitle(f"{resp.title}: step {int(resp.steps[i])}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def has_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


def animate_response(
    source: Any,
    out: str | Path,
    *,
    fps: int = 6,
    layers: list[str] | None = None,
    run: str | None = None,
    responses: Responses | None = None,
) -> Path:
    """The all-ones response over training as an animation: `.gif` (Pillow) or `.mp4` (needs ffmpeg).

    Args:
        source: see `compute_responses`.
        out: the file to write; its suffix picks the format.
        fps: frames (snapshots) per second.
        layers: which layers (default: all).
        run: picks a run in a directory.
        responses: already computed responses (skips the rebuild).

    Returns:
        The path written.
    """
    path = Path(out)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise SleepbotError(f"unknown animation format {path.suffix!r}; valid: .gif, .mp4")
    if path.suffix.lower() == ".mp4" and not has_ffmpeg():
        raise SleepbotError("writing .mp4 needs ffmpeg on the PATH; install it or write a .gif")
    resp = responses or compute_responses(source, layers=layers, run=run)
    scales = _scales(resp)
    frames = [_frame_png(resp, i, scales) for i in range(len(resp.steps))]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in frames]
        images[0].save(
            path,
            save_all=True,
            append_images=images[1:],
            duration=max(20, int(1000 / fps)),
            loop=0,
            optimize=True,
        )
        return path
    # MP4: PNG frames through a pipe; yuv420p needs even sizes, hence the pad filter.
    cmd = [
        "ffmpeg", "-y", "-loglevel", "error", "-f", "image2pipe", "-framerate", str(fps), "-i", "-",
        "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, input=b"".join(frames), capture_output=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SleepbotError(f"ffmpeg failed writing {str(path)!r}: {msg[-1] if msg else proc.returncode}")
    return path
