"""`nino`: NiNo's WNN+ weight nowcaster (Knyazev et al., ICLR 2025) as a sleep strategy.

WNN+ forecasts every scalar parameter on its own from that scalar's last 5 states, with a small MLP shared by all
parameters and told only what kind of tensor the scalar belongs to. Its checkpoint is NiNo's
`checkpoints/nino_mlp.pt` (github.com/SamsungSAILMontreal/nino, MIT); sleepbot does not ship a copy, the user
passes its path:

    Sleep("nino", checkpoint="path/to/nino_mlp.pt", k=5)

The model is written here from the checkpoint's layout (see `LAYOUT`), not taken from NiNo's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sleepbot.errors import SleepbotError
from sleepbot.neurons import has_bias, neuron_layers
from sleepbot.sleep.base import LayerContext, SleepSettings, SleepStrategy, register_strategy

CONTEXT = 5  # states per scalar the model reads, oldest first
HIDDEN = 128
N_TYPES = 15  # rows of the tensor-type embedding
MAX_K = 40  # outputs: the change 1..40 state spacings ahead
TRAINED_SPACING = 200  # optimizer steps between the states NiNo trained on

# Tensor types (rows of `layer_embed`): 1 Linear weight, 2 bias, 3 conv weight (4, 1-D norm weights, is not used:
# sleepbot moves only Conv/Linear layers).
TYPE_LINEAR, TYPE_BIAS, TYPE_CONV = 1, 2, 3

HIDDEN_LAYERS = ("edge_mlp.fc.0", "edge_mlp.fc.2", "edge_mlp.fc.4")  # each followed by SiLU
LAYOUT: dict[str, tuple[int, ...]] = {
    "layer_embed.weight": (N_TYPES, HIDDEN),
    "edge_proj.fc.0.weight": (HIDDEN, CONTEXT),
    "edge_proj.fc.0.bias": (HIDDEN,),
    **{
        f"{n}.{p}": (HIDDEN, HIDDEN) if p == "weight" else (HIDDEN,)
        for n in HIDDEN_LAYERS
        for p in ("weight", "bias")
    },
    "edge_mlp.fc.6.weight": (MAX_K, HIDDEN),
    "edge_mlp.fc.6.bias": (MAX_K,),
}

SOURCE = "checkpoints/nino_mlp.pt of NiNo's repository, github.com/SamsungSAILMontreal/nino (MIT)"
CHUNK = 65_536  # scalars per batched forward: bounds the [chunk, 128] activations of a big layer to ~32 MB


def load_wnn_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The WNN+ weights of a NiNo checkpoint file, {key: float32 tensor} (the keys and shapes of `LAYOUT`).

    Anything else (a missing or unreadable file, not a dict, NiNo's graph model, a missing key, a wrong shape)
    raises a one-line SleepbotError naming the file, the problem and what is expected.
    """
    where = f"nino checkpoint {str(path)!r}"
    expected = f"expected NiNo's WNN+ file ({SOURCE})"
    if not Path(path).is_file():
        raise SleepbotError(f"{where} does not exist; {expected}")
    try:
        data = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means "not this layout"
        raise SleepbotError(
            f"{where} is not readable by torch.load(weights_only=True) ({type(e).__name__}); {expected}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        what = "a dict without a 'state_dict' dict" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise SleepbotError(f"{where} is {what}, not {{'state_dict', 'model_args'}}; {expected}")
    args = data.get("model_args")
    if isinstance(args, dict) and args.get("gnn"):
        raise SleepbotError(
            f"{where} is NiNo's graph model (model_args gnn=True), not WNN+ (gnn=False); {expected}"
        )
    sd = data["state_dict"]
    out = {}
    for key, shape in LAYOUT.items():
        if key not in sd:
            raise SleepbotError(f"{where} has no {key!r} in its state_dict (shape {shape}); {expected}")
        t = sd[key]
        if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) != shape:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise SleepbotError(
                f"{where}: {key!r} is {got}, expected a float tensor of shape {shape}; {expected}"
            )
        out[key] = t.detach().to(torch.float32).contiguous()
    return out


def wnn_forecast(
    params: dict[str, torch.Tensor], states: torch.Tensor, tensor_type: int, k: int
) -> torch.Tensor:
    """WNN+'s forecast of one parameter tensor, k state spacings after its last state.

    Args:
        params: the weights from `load_wnn_checkpoint`.
        states: [5, M] the tensor's M scalars at its last 5 states, oldest first (float32).
        tensor_type: the row of `layer_embed` (TYPE_LINEAR, TYPE_BIAS, TYPE_CONV).
        k: spacings ahead, 1..40.

    Returns:
        [M], float32, on the device of `states`.
    """
    dev = states.device
    p = {key: v.to(dev) for key, v in params.items()}
    # One mean and one unbiased std over the whole tensor and all 5 states (NiNo scales per parameter tensor).
    mean, std = states.mean(), states.std()
    x = ((states - mean) / (std + 1e-6)).T.contiguous()  # [M, 5]
    # The tensor type's embedding joins the input projection's bias: one vector for every scalar of the tensor.
    b_in = p["edge_proj.fc.0.bias"] + p["layer_embed.weight"][tensor_type]  # [128]
    w_out, b_out = p["edge_mlp.fc.6.weight"][k - 1], p["edge_mlp.fc.6.bias"][k - 1]  # only output k-1 is read
    delta = torch.empty(x.shape[0], dtype=x.dtype, device=dev)  # [M], change of the scaled last state
    for lo in range(0, x.shape[0], CHUNK):
        h = torch.addmm(b_in, x[lo : lo + CHUNK], p["edge_proj.fc.0.weight"].T)  # [m, 128]
        for name in HIDDEN_LAYERS:
            h = F.silu(torch.addmm(p[f"{name}.bias"], h, p[f"{name}.weight"].T))
        delta[lo : lo + CHUNK] = h @ w_out + b_out
    # The unscaling NiNo uses: times std (not std + 1e-6), so a constant tensor stays where it is.
    return (x[:, -1] + delta) * std + mean


@register_strategy("nino")
class NinoWNN(SleepStrategy):
    """NiNo's WNN+ nowcaster moves every weight and bias k state spacings (snapshots) ahead.

    Each of a layer's parameter tensors is forecast on its own, as NiNo does: the weight (the neuron matrix's
    first fan_in columns; tensor type 1 for a Linear layer, 3 for a convolution) and, when the layer has one, the
    bias (the last column; type 2). Whether a layer has a bias is read from the model in `setup`, so the strategy
    works through the Sleep callback (or after calling `setup(model, max_steps)` yourself).

    The model reads exactly 5 snapshots (the callback's context is 5) and expects them evenly spaced. NiNo trained
    it on states 200 optimizer steps apart (and jumps every 1,000 steps with k decaying from 40 to 1); with any
    other `snapshot_every` it is used out of its training distribution, which a table of its results should say.
    The optimizer state after a jump is the callback's `optimizer_state` (NiNo keeps it, the callback's default).

    Args:
        checkpoint: path to NiNo's WNN+ checkpoint (`checkpoints/nino_mlp.pt` of
            github.com/SamsungSAILMontreal/nino); required, sleepbot ships no copy.
        k: state spacings to jump ahead, 1..40; None uses the callback's `horizon` (in snapshots).
    """

    def __init__(self, checkpoint: str | None = None, k: int | None = None) -> None:
        if checkpoint is None:
            raise SleepbotError(
                f"the nino strategy needs checkpoint='path/to/nino_mlp.pt'; get the file from {SOURCE}"
            )
        if k is not None and not 1 <= int(k) <= MAX_K:
            raise SleepbotError(f"nino k must be in 1..{MAX_K} (its outputs), got {k}")
        self.checkpoint = str(checkpoint)
        self.k = None if k is None else int(k)
        self._params = load_wnn_checkpoint(self.checkpoint)  # plain CPU tensors: the strategy pickles
        self._layers: dict[str, tuple[int, bool]] = {}  # {layer: (fan_in, has bias)}, filled by setup

    def defaults(self) -> dict[str, Any]:
        return {"context": CONTEXT}

    def validate(self, settings: SleepSettings) -> None:
        if settings.context != CONTEXT:
            raise SleepbotError(
                f"nino reads the last {CONTEXT} states of each weight; got context={settings.context} (leave it unset)"
            )
        k = self.k if self.k is not None else settings.horizon
        if not 1 <= k <= MAX_K:
            raise SleepbotError(
                f"nino predicts 1..{MAX_K} snapshots ahead; got horizon={k} (or pass k=1..{MAX_K})"
            )

    def setup(self, model: torch.nn.Module, max_steps: int) -> None:
        self._layers = {name: (m.weight[0].numel(), has_bias(m)) for name, m in neuron_layers(model).items()}

    def propose(self, history: torch.Tensor, horizon: int, ctx: LayerContext) -> torch.Tensor:
        k = self.k if self.k is not None else int(horizon)
        if history.shape[0] != CONTEXT:
            raise SleepbotError(f"nino reads {CONTEXT} snapshots per layer, got {history.shape[0]}")
        if not 1 <= k <= MAX_K:
            raise SleepbotError(f"nino predicts 1..{MAX_K} snapshots ahead, got {k}")
        gaps = torch.diff(ctx.steps)
        if bool((gaps != ctx.snapshot_every).any()):
            raise SleepbotError(
                f"nino needs snapshots exactly {ctx.snapshot_every} steps apart; a custom schedule slept at step "
                f"{ctx.step}, between snapshot steps (history steps {ctx.steps.tolist()})"
            )
        if ctx.layer not in self._layers:
            raise SleepbotError(
                f"nino does not know layer {ctx.layer!r} (whether it has a bias): use it through the Sleep "
                f"callback or call setup(model, max_steps) with the model that has it"
            )
        fan_in, bias = self._layers[ctx.layer]
        if history.shape[-1] != fan_in + bias:
            raise SleepbotError(
                f"nino: layer {ctx.layer!r} has fan_in {fan_in}{' + bias' if bias else ''}, the history has "
                f"{history.shape[-1]} columns"
            )
        h = history.to(torch.float32)  # [5, N, F]
        n = h.shape[1]
        out = torch.empty_like(h[-1])  # [N, F]
        w_type = TYPE_LINEAR if ctx.kind == "linear" else TYPE_CONV
        out[:, :fan_in] = wnn_forecast(self._params, h[:, :, :fan_in].reshape(CONTEXT, -1), w_type, k).view(
            n, fan_in
        )
        if bias:
            out[:, fan_in] = wnn_forecast(self._params, h[:, :, fan_in], TYPE_BIAS, k)
        return out.to(dtype=history.dtype, device=history.device)
