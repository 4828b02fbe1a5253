"""The frozen base weights stored in fp16, bf16 or float8 (e4m3), cast up to the compute dtype layer by layer at use.

kohya's and OneTrainer's `fp8_base`: the frozen UNet is most of a LoRA step's memory (2.57 G parameters, 4.78 GiB
in fp16), so storing it in one byte per weight halves that, while every matmul and convolution still runs in
fp16 / bf16 (a P100 or T4 has no fp8 arithmetic; none is needed). For each Linear / Conv2d weight W [out, ...]:

    s_o  = max_i |W_oi| / 448                    one scale per output channel (448: e4m3's largest finite value)
    W8   = fp8_e4m3(W / s)                       stored: 1 byte per weight (+ 4 bytes per output channel)
    W'   = fp16(W8) * s                          computed at each use, freed after the layer (and its backward)

e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 per weight, 0.036 on average for Gaussian weights
(scaled so the channel's largest weight sits at 448); errors of many weights average out in each dot product.
The per-channel scale keeps small channels out of e4m3's subnormals (kohya casts without a scale; `scaled=False`).
The first and last layers (conv_in, conv_out) stay in the compute dtype: tiny, and where errors are not averaged.
The cast is a torch parametrization of `weight` (torch.nn.utils.parametrize): the module's code does not change, the
fp8 tensor is `parametrizations.weight.original`, and LoRA layers wrap a stored layer keeping its storage
(`wrap_stored`). Stored weights are frozen (requires_grad False): LoRA trains on top of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import MinidiffError

PRECISIONS = ("fp16", "bf16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KEEP = ("conv_in", "conv_out")  # module names left in the compute dtype


class CastUp(nn.Module):
    """The parametrization: W' = dtype(W8) * s, s one scale per output channel (module docstring)."""

    def __init__(self, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, w8: torch.Tensor) -> torch.Tensor:
        w = w8.to(self.dtype)
        return w.mul_(self.scale.view(-1, *[1] * (w.dim() - 1)).to(self.dtype))


def quantize(w: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (W8, s) with W ~ W8 * s per output channel (fp32 arithmetic; s = 1 when scaled=False)."""
    w32 = w.detach().float()
    if scaled:
        amax = w32.abs().flatten(1).amax(dim=1).clamp_min(1e-12)
        scale = amax / FP8_MAX
    else:
        scale = torch.ones(w.shape[0], device=w.device)
        w32 = w32.clamp(-FP8_MAX, FP8_MAX)
    return (w32 / scale.view(-1, *[1] * (w.dim() - 1))).to(FP8), scale


def _stored_layers(model: nn.Module):
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if (
            isinstance(w, nn.Parameter)
            and w.dim() >= 2
            and name.split(".")[-1] not in KEEP
            and isinstance(m, (nn.Linear, nn.Conv2d))
            or _is_lora(m)
            and name.split(".")[-1] not in KEEP
        ):
            yield name, m


def _is_lora(m) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "base_forward")  # lora.LoRALinear (lora/layers.py imports this file)


@torch.no_grad()
def store(model: nn.Module, precision: str, compute_dtype: torch.dtype, scaled: bool = True) -> nn.Module:
    """Store the frozen weights of `model` in `precision` (fp16 | bf16 | fp8) for compute in `compute_dtype`.
    fp16 / bf16: the whole model in that dtype (LoRA adapters stay fp32). fp8: every Linear / Conv2d weight but
    conv_in / conv_out becomes fp8 + per-channel scale with a CastUp parametrization; the rest in compute_dtype."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # fp32: the CPU's
    if precision not in PRECISIONS and precision != "fp32":
        raise MinidiffError(f"--base-precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp8":
        return _to_dtype(model, dtypes[precision])
    _to_dtype(model, compute_dtype)
    for _, m in list(_stored_layers(model)):
        if parametrize.is_parametrized(m, "weight"):
            continue
        w8, scale = quantize(m.weight, scaled)
        m.weight = nn.Parameter(w8, requires_grad=False)
        parametrize.register_parametrization(m, "weight", CastUp(scale, compute_dtype), unsafe=True)
    return model


def _to_dtype(model, dtype):
    """Floating tensors to dtype, except LoRA adapters (fp32) and tensors already stored in fp8."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if (
            t.is_floating_point()
            and t.dtype not in (FP8, dtype)
            and ".lora_" not in name
            and not name.endswith(".scale")
        ):
            t.data = t.data.to(dtype)
    return model


def wrap_stored(module: nn.Module, make) -> nn.Module:
    """make(module) for a LoRA wrapper, keeping a stored weight stored: the fp8 parametrization moves from the wrapped
    layer to the wrapper (which otherwise would keep the computed fp16 weight as its own)."""
    if not parametrize.is_parametrized(module, "weight"):
        return make(module)
    cast = module.parametrizations.weight[0]
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    layer = make(module)
    parametrize.register_parametrization(layer, "weight", cast, unsafe=True)
    return layer


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (fp8 weights count 1 byte each)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
