"""LoRA: low-rank adapters on frozen Linear / Conv2d layers, and the three file namings people exchange them in.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3, with one term per named adapter n:

    y = W0 x + b + sum_n  m_n * (alpha_n / r_n) * B_n A_n dropout(x)

    W0, b   the pretrained weight and bias, frozen (requires_grad False: no gradient, no optimizer state)
    A_n     "down" [r, in] (a conv: [r, in, kh, kw]), random: Gaussian N(0, 1/r^2) (peft "gaussian", what the
            diffusers SDXL script uses) or Kaiming-uniform(a=sqrt(5)) (kohya, Microsoft's loralib)
    B_n     "up" [out, r] (a conv: [out, r, 1, 1]), zero, so every adapter starts as an exact no-op
    alpha_n / r_n   fixed scale (kohya's default alpha=1 gives 1/r; diffusers uses alpha=r, scale 1)
    m_n     the multiplier a user turns at inference (diffusers "adapter weight", kohya "multiplier")

Several adapters may sit on one layer (a character LoRA plus a style LoRA), each with its own m_n. A, B stay fp32
even on an fp16 model: the input is cast up and the delta cast back. merge folds m (alpha/r) B A into W0 for
inference; unmerge subtracts the same product again (exact up to rounding, i.e. to fp32 tolerance; an fp16 W0
comes back to fp16 rounding only).

State-dict keys of the model do not change: a wrapped `to_q` keeps its own `weight`/`bias` Parameters under the
same names, and adds `lora_A.<adapter>` / `lora_B.<adapter>`. A plain base checkpoint therefore still loads with
`model.load_state_dict(sd)` (strict) after injection: adapter tensors a checkpoint lacks entirely are left as they are.

File namings (trainers.md §3; which tools read which: §3.4):
    kohya      lora_unet_<original sgm module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha
               lora_te1_text_model_encoder_layers_0_self_attn_q_proj..., lora_te2_... (ComfyUI, A1111, kohya)
    diffusers  unet.<module>.lora.down.weight / .lora.up.weight, text_encoder.<module>.lora_linear_layer.down.weight
    peft       unet.<module>.lora_A.weight / .lora_B.weight (what diffusers' save_lora_weights writes today)
diffusers and peft files carry no alpha (alpha = r), so when alpha != r we fold alpha/r into B before writing.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import diffusers_to_ldm_unet_key
from .errors import LoRAError
from .training import atomic_save_file

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
FORMATS = ("kohya", "diffusers", "peft")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


@dataclass
class Adapter:
    """The settings of one named adapter on one layer (its tensors live in the layer's lora_A / lora_B)."""

    rank: int
    alpha: float
    multiplier: float = 1.0
    dropout: float = 0.0
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

    # the two places where a Linear and a Conv2d differ
    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def down_up(self, x, A, B):
        return F.linear(F.linear(x, A), B)

    def add_adapter(self, name, rank, alpha, init="gaussian", dropout=0.0, A=None, B=None, targets=""):
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
        self.adapters[name] = Adapter(rank, float(alpha), dropout=dropout, targets=targets)

    def delta_weight(self, name):
        """(alpha / r) B A, shaped like W0 (fp32): the change this adapter makes at multiplier 1."""
        a = self.adapters[name]
        A, B = self.lora_A[name], self.lora_B[name]
        return (a.alpha / a.rank) * (B.flatten(1) @ A.flatten(1)).view(self.weight.shape)

    def forward(self, x):
        y = self.base_forward(x)
        for name, a in self.adapters.items():
            if not a.enabled or a.merged:
                continue
            h = x.to(self.lora_A[name].dtype)
            if a.dropout > 0:
                h = F.dropout(h, a.dropout, self.training)
            delta = self.down_up(h, self.lora_A[name], self.lora_B[name])
            y = y + (a.multiplier * a.alpha / a.rank * delta).to(y.dtype)
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

    def base_forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def down_up(self, x, A, B):
        return F.conv2d(F.conv2d(x, A, None, self.stride, self.padding, self.dilation), B)


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
        base_kind = nn.Linear if type(m) is LoRALinear else nn.Conv2d if type(m) is LoRAConv2d else type(m)
        if issubclass(base_kind, kinds) and regex.search(name):
            names.append(name)
    return names


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    """Replaces module `name` by its LoRA wrapper (once) and returns the wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, LoRALinear):
        return module
    layer = LoRAConv2d(module) if isinstance(module, nn.Conv2d) else LoRALinear(module)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return layer


def _check_name(name):
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
        raise LoRAError(f"adapter name must be letters, digits, '_' or '-' (no dots), got {name!r}")


def _check_settings(rank, alpha, name, init, dropout):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise LoRAError(f"LoRA alpha must be positive, got {alpha!r}")
    _check_name(name)
    if init not in ("gaussian", "kaiming"):
        raise LoRAError(f"LoRA init must be 'gaussian' or 'kaiming', got {init!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def inject_lora(model, targets="attn", rank=4, alpha=None, name="default", init="gaussian", dropout=0.0) -> list:
    """Wraps the layers `targets` selects with a new trainable adapter `name` (alpha=None means alpha = rank, scale 1)
    and freezes every other parameter of `model`. Returns the wrapped module names."""
    _check_settings(rank, alpha, name, init, dropout)
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
        _wrap(model, n).add_adapter(name, rank, alpha or rank, init=init, dropout=dropout, targets=label)
    return names


def _adapters_of(models, name=None):
    """[(layer, adapter name)] over one model or a dict of models; name=None means every adapter."""
    pairs = []
    for model in _components(models, None).values():
        for layer in lora_layers(model).values():
            pairs += [(layer, n) for n in layer.adapters if name is None or n == name]
    if name is not None and not pairs:
        raise LoRAError(f"no LoRA adapter named {name!r} in the model")
    return pairs


def lora_parameters(model, name=None) -> list:
    """The A and B tensors (of adapter `name`, or of all): what the optimizer gets."""
    return [p for layer, n in _adapters_of(model, name) for p in (layer.lora_A[n], layer.lora_B[n])]


def _set(model, name, **values):
    for layer, n in _adapters_of(model, name):
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
    for layer in {id(layer): layer for layer, _ in _adapters_of(model, name)}.values():
        layer.merge(None if name is None else {name})


def unmerge_lora(model):
    """Undoes merge_lora: W0 -= m (alpha/r) B A for every merged adapter."""
    for layer in {id(layer): layer for layer, _ in _adapters_of(model)}.values():
        layer.unmerge()


# ------------------------------------------------------------------------------------------------------ file names
def _components(model, prefix):
    """{component: module}: a dict as given (None entries dropped, e.g. no text encoder), or {prefix: model}."""
    return {c: m for c, m in model.items() if m is not None} if isinstance(model, dict) else {prefix: model}


def _file_path(component, model, path):
    """The module path files use: transformers 5 dropped CLIPTextModel's `text_model.` level, files keep it."""
    if component.startswith("text_encoder") and not hasattr(model, "text_model") and path.startswith("encoder."):
        return "text_model." + path
    return path


def _ldm_path(model, path):
    """The original sgm/ldm module path of a diffusers UNet module path, or None (checkpoint.py owns the rules)."""
    key = diffusers_to_ldm_unet_key(path + ".weight", model.config)
    return key and key.removeprefix("model.diffusion_model.").removesuffix(".weight")


def _file_names(component, model):
    """{every module name a file may use for a Linear/Conv2d of `model`: our module path}; no underscore parsing."""
    names = {}
    for path, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, LoRALinear)):
            continue
        file_path = _file_path(component, model, path)
        for n in (path, file_path, file_path.replace(".", "_")):
            names[n] = path
        if component == "unet" and hasattr(getattr(model, "config", None), "layers_per_block"):
            ldm = _ldm_path(model, path)
            if ldm:
                names[ldm] = names[ldm.replace(".", "_")] = path
    return names


def _one_adapter(model, name):
    """`name`, or the model's only adapter when None."""
    if name is None:
        found = sorted({n for _, n in _adapters_of(model)})
        if len(found) != 1:
            raise LoRAError(f"pass name=, the model has adapters {found}" if found
                            else "the model has no LoRA: call inject_lora or load_lora first")
        name = found[0]
    return name


def lora_state_dict(model, format="kohya", prefix="unet", name=None, dtype=torch.float32) -> dict:
    """The tensors of adapter `name` (the only one when None) named the `format` way (module docstring)."""
    if format not in FORMATS:
        raise LoRAError(f"unknown LoRA format {format!r}: expected one of {FORMATS}")
    name = _one_adapter(model, name)
    out = {}
    for component, m in _components(model, prefix).items():
        for path, layer in lora_layers(m).items():
            if name not in layer.adapters:
                continue
            a, A, B = layer.adapters[name], layer.lora_A[name].detach(), layer.lora_B[name].detach()
            file_path = _file_path(component, m, path)
            if format == "kohya":
                if component not in KOHYA_PREFIX:
                    raise LoRAError(f"kohya names exist for {sorted(KOHYA_PREFIX)}, not {component!r}")
                p = _ldm_path(m, path) if component == "unet" else file_path
                if p is None:
                    raise LoRAError(f"{path} has no name in the original UNet layout, so no kohya name: save as peft")
                key = KOHYA_PREFIX[component] + "_" + p.replace(".", "_")
                out.update({f"{key}.lora_down.weight": A.to(dtype), f"{key}.lora_up.weight": B.to(dtype),
                            f"{key}.alpha": torch.tensor(a.alpha)})
                continue
            B = B * (a.alpha / a.rank)  # these formats imply alpha = r: fold alpha / r into B
            if format == "peft":
                down, up = f"{component}.{file_path}.lora_A.weight", f"{component}.{file_path}.lora_B.weight"
            else:
                kind = "lora" if component == "unet" else "lora_linear_layer"
                down, up = f"{component}.{file_path}.{kind}.down.weight", f"{component}.{file_path}.{kind}.up.weight"
            out.update({down: A.to(dtype), up: B.to(dtype)})
    if not out:
        raise LoRAError(f"adapter {name!r} has no layers to save")
    return out


def save_lora(model, path, format="kohya", metadata=None, prefix="unet", name=None, dtype=torch.float32) -> Path:
    """Writes adapter `name` of `model` (one module, or {"unet": .., "text_encoder": .., "text_encoder_2": ..}) to a
    safetensors file, atomically. `metadata` (strings) is kept; we add minidiff.* and kohya's ss_* keys."""
    name = _one_adapter(model, name)
    tensors = lora_state_dict(model, format, prefix=prefix, name=name, dtype=dtype)
    pairs = _adapters_of(_components(model, prefix), name)
    linear = [layer.adapters[n] for layer, n in pairs if not isinstance(layer, LoRAConv2d)]
    conv = [layer.adapters[n] for layer, n in pairs if isinstance(layer, LoRAConv2d)]
    first = (linear or conv)[0]
    meta = {"format": "pt", "minidiff.format": format, "minidiff.adapter": name,
            "minidiff.rank": ",".join(map(str, sorted({a.rank for a in linear + conv}))),
            "minidiff.alpha": ",".join(f"{x:g}" for x in sorted({a.alpha for a in linear + conv})),
            "minidiff.targets": ",".join(sorted({a.targets for a in linear + conv}))}
    if format == "kohya":  # the keys kohya's tools and the web UIs read (trainers.md 2.6, 3.5)
        args = {"conv_dim": str(conv[0].rank), "conv_alpha": f"{conv[0].alpha:g}"} if conv else {}
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
                     "ss_network_alpha": f"{first.alpha:g}", "ss_base_model_version": "sdxl_base_v1-0",
                     "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_network_args": json.dumps(args)})
    elif any(a.alpha != a.rank for a in linear + conv):
        meta["minidiff.note"] = "alpha/rank is folded into the up/B tensors: load with alpha = rank"
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    return atomic_save_file(tensors, path, metadata=meta)


# ------------------------------------------------------------------------------------------------------- reading
@dataclass
class LoRAEntry:
    """One adapted module as a file stores it: A (down), B (up), alpha; `name` is spelled the file's way."""

    component: str
    name: str
    down: torch.Tensor = None
    up: torch.Tensor = None
    alpha: float = None
    keys: dict = field(default_factory=dict)  # {"down": file key, "up": .., "alpha": ..}

    @property
    def rank(self):
        return self.down.shape[0]


# (key suffix, role) for every LoRA tensor style in the wild (ComfyUI comfy/weight_adapter/lora.py lists the same)
_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
             (".lora.down.weight", "down"), (".lora.up.weight", "up"),
             (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
             (".lora_A.weight", "down"), (".lora_B.weight", "up"),
             (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
             ("_lora.down.weight", "down"), ("_lora.up.weight", "up"))  # old attention processors: to_q_lora
_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
             ("lora_te_", "text_encoder"), ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"),
             ("text_encoder.", "text_encoder"), ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
             ("base_model.model.", None))
_OTHER_ADAPTERS = re.compile(r"hada_w1|lokr_w1|dora_scale|lora_magnitude_vector|oft_|\.diff(_b)?$")  # LoHa, LoKr, ...


def _split_key(key, default_component):
    """'unet.x.y.lora.down.weight' -> ('unet', 'x.y', 'down'), or None for a key that is not a LoRA tensor."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    component = default_component
    for p, c in _PREFIXES:
        if stem.startswith(p):
            stem, component = stem[len(p):], c or default_component
            break
    if suffix.startswith("_lora."):  # attn1.processor.to_q_lora -> attn1.to_q; to_out_lora -> to_out.0
        stem = re.sub(r"\.to_out$", ".to_out.0", stem.replace(".processor.", "."))
    return component, stem, role


def read_lora(path, default_component="unet"):
    """Reads a LoRA safetensors file of any of the three namings: ([LoRAEntry], format, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a non-safetensors file
        raise LoRAError(f"{path} is not a readable safetensors file ({type(e).__name__}); "
                        "LoRA files are .safetensors") from None
    entries, fmt = parse_lora(tensors, metadata, default_component, source=path.name)
    return entries, fmt, metadata


def parse_lora(tensors, metadata=None, default_component="unet", source="state dict"):
    """Groups a LoRA state dict into LoRAEntry's; the format is detected from the key style."""
    others = [k for k in tensors if _OTHER_ADAPTERS.search(k)]
    if others:
        raise LoRAError(f"{source} holds a LoRA variant minidiff does not load (LoHa/LoKr/DoRA/diff), e.g. {others[0]}")
    entries, stray = {}, []
    for key, t in tensors.items():
        split = _split_key(key, default_component)
        if split is None:
            stray.append(key)
            continue
        component, stem, role = split
        e = entries.setdefault((component, stem), LoRAEntry(component, stem))
        setattr(e, role, t.item() if role == "alpha" else t)
        e.keys[role] = key
    if not entries:
        raise LoRAError(f"{source} holds no LoRA tensors (expected keys ending in .lora_down.weight, .lora.down.weight "
                        f"or .lora_A.weight), found e.g. {list(tensors)[:3]}")
    if stray:
        raise LoRAError(f"{source}: {len(stray)} keys are not LoRA tensors, e.g. {stray[:3]}")
    incomplete = [next(iter(e.keys.values())) for e in entries.values() if e.down is None or e.up is None]
    if incomplete:
        raise LoRAError(f"{source}: down/A or up/B tensor missing for {incomplete[:3]}")
    keys = list(tensors)
    fmt = "kohya" if keys[0].startswith("lora_") else "peft" if any(".lora_A." in k for k in keys) else "diffusers"
    try:
        peft_meta = json.loads((metadata or {}).get("lora_adapter_metadata", "{}"))
    except ValueError:
        raise LoRAError(f"{source}: its lora_adapter_metadata is not valid JSON") from None
    for e in entries.values():
        if e.alpha is None:  # diffusers / peft: alpha = rank unless diffusers wrote its LoraConfig into the metadata
            e.alpha = _peft_alpha(peft_meta, e.component, e.name, e.rank)
    return list(entries.values()), fmt


def _peft_alpha(meta, component, name, rank):
    """alpha from diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": .., "unet.alpha_pattern": {..}}), else r."""
    alpha = meta.get(f"{component}.lora_alpha", rank)
    for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", name):
            alpha = value
    if meta.get(f"{component}.use_rslora"):  # scale alpha / sqrt(r) = (alpha sqrt(r)) / r
        alpha = alpha * math.sqrt(rank)
    return float(alpha)


def _squeeze(shape):
    return tuple(shape[:2]) if all(d == 1 for d in shape[2:]) else tuple(shape)


def load_lora(model, path, scale=1.0, name=None, prefix="unet", trainable=False) -> str:
    """Loads a LoRA file (kohya, diffusers or peft naming, detected; or such a state dict) into `model` (one module,
    or {"unet": .., "text_encoder": .., "text_encoder_2": ..}) as adapter `name` (default: the file's stem) with
    multiplier `scale`. Every key and shape is checked before the model is touched. Returns the adapter name."""
    if isinstance(path, dict):
        (entries, _), source = parse_lora(path, None, prefix), "default"
    else:
        (entries, _, _), source = read_lora(path, prefix), Path(path).stem
    models = _components(model, prefix)
    if name is None:  # the file's stem; a second lora.safetensors becomes lora_2
        taken, stem = {n for _, n in _adapters_of(models)}, re.sub(r"\W", "_", source)
        name, i = stem, 1
        while name in taken:
            i += 1
            name = f"{stem}_{i}"
    _check_name(name)
    lookup = {c: _file_names(c, m) for c, m in models.items()}
    plan, unmatched = [], []
    for e in entries:
        module_path = lookup.get(e.component, {}).get(e.name)
        if module_path is None:
            unmatched.append(next(iter(e.keys.values())))
        else:
            plan.append((models[e.component], module_path, e))
    if unmatched:
        raise LoRAError(f"{len(unmatched)} of {len(entries)} LoRA modules match nothing in the model "
                        f"(components given: {sorted(models)}), e.g. {unmatched[:3]}")
    for m, p, e in plan:
        module = m.get_submodule(p)
        if name in getattr(module, "adapters", {}):
            raise LoRAError(f"adapter {name!r} already exists on {p}: pass another name=")
        for role, want in zip(("down", "up"), lora_shapes(module.weight, e.rank)):
            t, key = getattr(e, role), e.keys[role]
            if _squeeze(t.shape) != _squeeze(want):  # [r, in] and [r, in, 1, 1] are the same LoRA
                raise LoRAError(f"{key}: LoRA tensor has shape {list(t.shape)} but {p} needs {list(want)} "
                                "(a LoRA for another model or architecture?)")
    for m, p, e in plan:
        layer = _wrap(m, p)
        layer.add_adapter(name, e.rank, e.alpha, A=e.down, B=e.up, targets=f"file:{source}")
        layer.adapters[name].multiplier = float(scale)
        layer.lora_A[name].requires_grad_(trainable)
        layer.lora_B[name].requires_grad_(trainable)
    return name
