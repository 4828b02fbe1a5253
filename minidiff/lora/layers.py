"""LoRA: low-rank adapters on frozen Linear / Conv2d layers: the layers, the target presets and the model surgery
(inject, merge / unmerge, multiplier, enable / disable). No file is read or written here: the three file namings
are lora/files.py's, which imports this file, never the reverse.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3, with one term per named adapter n:

    y = W0 x + b + sum_n  m_n * (alpha_n / r_n) * B_n A_n dropout(x)

    W0, b   the pretrained weight and bias, frozen (requires_grad False: no gradient, no optimizer state)
    A_n     "down" [r, in] (a conv: [r, in, kh, kw]), random: Gaussian N(0, 1/r^2) (peft "gaussian", what the
            diffusers SDXL script uses) or Kaiming-uniform(a=sqrt(5)) (kohya, Microsoft's loralib)
    B_n     "up" [out, r] (a conv: [out, r, 1, 1]), zero, so every adapter starts as an exact no-op
    alpha_n / r_n   fixed scale (kohya's default alpha=1 gives 1/r; diffusers uses alpha=r, scale 1)
    m_n     the multiplier a user turns at inference (diffusers "adapter weight", kohya "multiplier")

While training, kohya's two other regularisers may drop parts of the adapter (`rank_dropout`, `module_dropout`):

    rank dropout p:    B (k * A x) / (1 - p),   k [B, r] ~ Bernoulli(1 - p) per sample and rank
    module dropout q:  the whole term is skipped with probability q per forward

Several adapters may sit on one layer (a character LoRA plus a style LoRA), each with its own m_n. A, B stay fp32
even on an fp16 model: the input is cast up and the delta cast back. merge folds m (alpha/r) B A into W0 for
inference; unmerge subtracts the same product again (exact up to rounding, i.e. to fp32 tolerance; an fp16 W0
comes back to fp16 rounding only).

State-dict keys of the model do not change: a wrapped `to_q` keeps its own `weight`/`bias` Parameters under the
same names, and adds `lora_A.<adapter>` / `lora_B.<adapter>`. A plain base checkpoint therefore still loads with
`model.load_state_dict(sd)` (strict) after injection: adapter tensors a checkpoint lacks entirely are left as they are.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LoRAError
from ..weights.base_precision import wrap_stored

# Module-name patterns; a pattern matches a module when the module's dotted name ends with it.
_ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TARGETS = {
    "attn": (_ATTN,),  # diffusers' default: 560 modules in SDXL
    "attn-ff": (_ATTN, r"attentions\.\d+\.(proj_in|proj_out)", r"ff\.net\.(0\.proj|2)"),  # kohya's: 722 in SDXL
    "conv": (r"resnets\.\d+\.(conv1|conv2|conv_shortcut)", r"(downsamplers|upsamplers)\.0\.conv"),  # kohya conv_dim
    "all-linear": (r"[^.]+",),  # every nn.Linear (convs are left alone)
    "text": (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)",),  # diffusers' --train_text_encoder targets
    "text-mlp": (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"mlp\.(fc1|fc2)"),  # kohya's text-encoder targets
}
TARGETS["attn-ff-conv"] = TARGETS["attn-ff"] + TARGETS["conv"]


@dataclass
class Adapter:
    """The settings of one named adapter on one layer (its tensors live in the layer's lora_A / lora_B)."""

    rank: int
    alpha: float
    multiplier: float = 1.0
    dropout: float = 0.0
    rank_dropout: float = 0.0  # kohya's rank_dropout and module_dropout (module docstring); training only
    module_dropout: float = 0.0
    enabled: bool = True
    merged: float = 0.0  # the m with which m (alpha/r) B A was folded into W0; 0 = not merged
    targets: str = ""


class LoRALinear(nn.Module):
    """y = W0 x + b + sum_n m_n (alpha_n / r_n) B_n A_n dropout(x) around a frozen nn.Linear (module docstring)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: same keys, no copy
        self.in_features, self.out_features = self.weight.shape[1], self.weight.shape[0]
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()  # {adapter name: A or B}
        self.adapters: dict[str, Adapter] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """A checkpoint saved before injection lacks our adapters: keep them as they are, so the base model's
        checkpoints still load strictly. (torch hands each module its own copy of the state dict.)"""
        for n in self.adapters:
            a, b = f"{prefix}lora_A.{n}", f"{prefix}lora_B.{n}"
            if a not in state_dict and b not in state_dict:
                state_dict[a], state_dict[b] = self.lora_A[n], self.lora_B[n]
        super()._load_from_state_dict(state_dict, prefix, *args)

    # the places where a Linear and a Conv2d differ
    rank_dim = -1  # where the r channels of A x sit: [..., r] (a conv: [B, r, H, W])

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def down(self, x, A):
        return F.linear(x, A)

    def up(self, h, B):
        return F.linear(h, B)

    def add_adapter(
        self,
        name,
        rank,
        alpha,
        init="gaussian",
        dropout=0.0,
        A=None,
        B=None,
        targets="",
        rank_dropout=0.0,
        module_dropout=0.0,
    ):
        """Adds adapter `name`: A random and B zero, or the given A, B (loaded from a file). Both fp32."""
        a_shape, b_shape = lora_shapes(self.weight, rank)
        dev = self.weight.device
        if A is None:
            A, B = torch.empty(a_shape, device=dev), torch.zeros(b_shape, device=dev)
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / rank)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A.detach().to(dev, torch.float32).reshape(a_shape).clone())
        self.lora_B[name] = nn.Parameter(B.detach().to(dev, torch.float32).reshape(b_shape).clone())
        self.adapters[name] = Adapter(
            rank,
            float(alpha),
            dropout=dropout,
            targets=targets,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
        )

    def delta_weight(self, name):
        """(alpha / r) B A, shaped like W0 (fp32): the change this adapter makes at multiplier 1."""
        a = self.adapters[name]
        A, B = self.lora_A[name], self.lora_B[name]
        return (a.alpha / a.rank) * (B.flatten(1) @ A.flatten(1)).view(self.weight.shape)

    def forward(self, x):
        y = self.base_forward(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        for name, a in self.adapters.items():
            if not a.enabled or a.merged or (self.training and a.module_dropout and torch.rand(()) < a.module_dropout):
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            h = x if autocast else x.to(A.dtype)  # under autocast F.linear casts x, A, B to one dtype itself
            if a.dropout > 0:
                h = F.dropout(h, a.dropout, self.training)
            h = self.down(h, A)  # [..., r] (conv: [B, r, H, W])
            scale = a.multiplier * a.alpha / a.rank
            if self.training and a.rank_dropout:  # k [B, r], one draw per sample and rank, broadcast elsewhere
                shape = [h.shape[0]] + [1] * (h.ndim - 1)
                shape[self.rank_dim] = a.rank
                h = h * (torch.rand(shape, device=h.device) >= a.rank_dropout).to(h.dtype)
                scale = scale / (1 - a.rank_dropout)
            delta = self.up(h, B)
            y = y + (delta if scale == 1 else scale * delta).to(y.dtype)  # scale 1 (alpha = r): no multiply
        return y

    @torch.no_grad()
    def merge(self, names=None):
        """W0 <- W0 + m (alpha/r) B A for each enabled adapter; forward then skips it."""
        for name, a in self.adapters.items():
            if (names is None or name in names) and a.enabled and not a.merged and a.multiplier != 0:
                a.merged = a.multiplier
                self.weight += (a.merged * self.delta_weight(name)).to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W0 - (what merge added), adapter by adapter."""
        for name, a in self.adapters.items():
            if a.merged:
                self.weight -= (a.merged * self.delta_weight(name)).to(self.weight.dtype)
                a.merged = 0.0

    def extra_repr(self):
        adapters = ", ".join(f"{n}: r={a.rank} alpha={a.alpha:g} m={a.multiplier:g}" for n, a in self.adapters.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{adapters}]"


class LoRAConv2d(LoRALinear):
    """The same around an nn.Conv2d (kohya's LoCon): A is a conv with W0's kernel, stride and padding, B a 1x1 conv,
    so B A is the kernel [out, in, kh, kw] = B[:, :, 0, 0] @ A.flatten(1), reshaped."""

    def __init__(self, base: nn.Conv2d):
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise LoRAError(f"LoRA supports Conv2d with groups=1 and numeric zero padding, got {base}")
        super().__init__(base)
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation

    rank_dim = 1

    def base_forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def down(self, x, A):
        return F.conv2d(x, A, None, self.stride, self.padding, self.dilation)

    def up(self, h, B):
        return F.conv2d(h, B)


def lora_shapes(weight, r):
    """Shapes of A and B for a layer with weight W0: Linear [out, in] -> [r, in], [out, r];
    Conv2d [out, in, kh, kw] -> [r, in, kh, kw], [out, r, 1, 1]."""
    out_f, in_f, *kernel = weight.shape
    return (r, in_f, *kernel), (out_f, r, *[1] * len(kernel))


# ----------------------------------------------------------------------------------------------- inject and control
def lora_layers(model: nn.Module) -> dict:
    """{module name: LoRALinear} of every wrapped layer in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def find_targets(model: nn.Module, targets="attn") -> list:
    """Names of the Linear / Conv2d modules that `targets` (a preset name or a list of patterns) selects."""
    if isinstance(targets, str):
        if targets not in TARGETS:
            raise LoRAError(f"unknown LoRA targets {targets!r}: expected one of {sorted(TARGETS)} or a pattern list")
        patterns = TARGETS[targets]
    else:
        patterns = tuple(targets)
    kinds = (nn.Linear,) if targets == "all-linear" else (nn.Linear, nn.Conv2d)
    regex = re.compile(r"(^|\.)(" + "|".join(f"(?:{p})" for p in patterns) + r")$")
    names = []
    for name, m in model.named_modules():
        base_kind = nn.Conv2d if isinstance(m, LoRAConv2d) else nn.Linear if isinstance(m, LoRALinear) else type(m)
        if issubclass(base_kind, kinds) and regex.search(name):
            names.append(name)
    return names


def wrap(model: nn.Module, name: str) -> LoRALinear:
    """Replaces module `name` by its LoRA wrapper (once) and returns the wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, LoRALinear):
        return module
    layer = wrap_stored(module, LoRAConv2d if isinstance(module, nn.Conv2d) else LoRALinear)  # fp8 stays fp8
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return layer


def check_name(name):
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
        raise LoRAError(f"adapter name must be letters, digits, '_' or '-' (no dots), got {name!r}")


def _check_settings(rank, alpha, name, init, *dropouts):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise LoRAError(f"LoRA alpha must be positive, got {alpha!r}")
    check_name(name)
    if init not in ("gaussian", "kaiming"):
        raise LoRAError(f"LoRA init must be 'gaussian' or 'kaiming', got {init!r}")
    if not all(0.0 <= p < 1.0 for p in dropouts):
        raise LoRAError(f"LoRA dropout, rank dropout and module dropout must be in [0, 1), got {dropouts}")


def inject_lora(
    model,
    targets="attn",
    rank=4,
    alpha=None,
    name="default",
    init="gaussian",
    dropout=0.0,
    rank_dropout=0.0,
    module_dropout=0.0,
) -> list:
    """Wraps the layers `targets` selects with a new trainable adapter `name` (alpha=None means alpha = rank, scale 1)
    and freezes every other parameter of `model`. Returns the wrapped module names."""
    _check_settings(rank, alpha, name, init, dropout, rank_dropout, module_dropout)
    names = find_targets(model, targets)
    if not names:
        raise LoRAError(f"LoRA targets {targets!r} match no Linear/Conv2d module in {type(model).__name__}")
    for n in names:
        if name in getattr(model.get_submodule(n), "adapters", {}):
            raise LoRAError(f"adapter {name!r} already exists on {n}: pick another name")
    for p_name, p in model.named_parameters():
        if ".lora_A." not in p_name and ".lora_B." not in p_name:
            p.requires_grad_(False)
    label = targets if isinstance(targets, str) else ",".join(targets)
    for n in names:
        wrap(model, n).add_adapter(
            name,
            rank,
            alpha or rank,
            init=init,
            dropout=dropout,
            targets=label,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
        )
    return names


def components(model, prefix):
    """{component: module}: a dict as given (None entries dropped, e.g. no text encoder), or {prefix: model}."""
    return {c: m for c, m in model.items() if m is not None} if isinstance(model, dict) else {prefix: model}


def adapters_of(models, name=None):
    """[(layer, adapter name)] over one model or a dict of models; name=None means every adapter."""
    pairs = []
    for model in components(models, None).values():
        for layer in lora_layers(model).values():
            pairs += [(layer, n) for n in layer.adapters if name is None or n == name]
    if name is not None and not pairs:
        raise LoRAError(f"no LoRA adapter named {name!r} in the model")
    return pairs


def lora_parameters(model, name=None) -> list:
    """The A and B tensors (of adapter `name`, or of all): what the optimizer gets."""
    return [p for layer, n in adapters_of(model, name) for p in (layer.lora_A[n], layer.lora_B[n])]


def _set(model, name, **values):
    for layer, n in adapters_of(model, name):
        if layer.adapters[n].merged:
            raise LoRAError(f"adapter {n!r} is merged into the weights: call unmerge_lora first")
        for k, v in values.items():
            setattr(layer.adapters[n], k, v)


def set_lora_scale(model, scale, name=None):
    """Sets the multiplier m_n of adapter `name` (all adapters when None)."""
    _set(model, name, multiplier=float(scale))


def enable_lora(model, name=None):
    _set(model, name, enabled=True)


def disable_lora(model, name=None):
    """The adapter stays attached but adds nothing until enable_lora."""
    _set(model, name, enabled=False)


def merge_lora(model, name=None):
    """Folds the enabled adapters (or just `name`) into W0 for inference speed: W0 += m (alpha/r) B A."""
    for layer in {id(layer): layer for layer, _ in adapters_of(model, name)}.values():
        layer.merge(None if name is None else {name})


def unmerge_lora(model):
    """Undoes merge_lora: W0 -= m (alpha/r) B A for every merged adapter."""
    for layer in {id(layer): layer for layer, _ in adapters_of(model)}.values():
        layer.unmerge()
