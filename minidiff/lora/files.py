"""LoRA files: the three namings people exchange adapters in, and save / read / load. The adapters themselves
(LoRALinear, inject_lora, merge, ...) are in layers.py, which this file imports and which never imports it back;
`minidiff.lora` (lora/__init__.py) re-exports both, so `minidiff.lora.save_lora` is this file's save_lora.

File namings (https://github.com/kohya-ss/sd-scripts/blob/48d368fa/networks/lora.py,
https://github.com/huggingface/diffusers/blob/58eb52c0803e/src/diffusers/utils/state_dict_utils.py):
    kohya      lora_unet_<original sgm module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha
               lora_te1_text_model_encoder_layers_0_self_attn_q_proj..., lora_te2_... (ComfyUI, A1111, kohya)
    diffusers  unet.<module>.lora.down.weight / .lora.up.weight, text_encoder.<module>.lora_linear_layer.down.weight
    peft       unet.<module>.lora_A.weight / .lora_B.weight (what diffusers' save_lora_weights writes today)
diffusers and peft files carry no alpha (alpha = r), so when alpha != r we fold alpha/r into B before writing.
The format of a file being read is detected from its key style (parse_lora).
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from .. import io
from ..errors import LoRAError
from ..weights.layouts import diffusers_to_ldm_unet_key
from .layers import LoRAConv2d, LoRALinear, adapters_of, check_name, components, lora_layers, lora_shapes, wrap

FORMATS = ("kohya", "diffusers", "peft")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


# ------------------------------------------------------------------------------------------------------ file names
def _file_path(component, model, path):
    """The module path files use: transformers 5 dropped CLIPTextModel's `text_model.` level, files keep it."""
    if component.startswith("text_encoder") and not hasattr(model, "text_model") and path.startswith("encoder."):
        return "text_model." + path
    return path


def _ldm_path(model, path):
    """The original sgm/ldm module path of a diffusers UNet module path, or None (layouts.py owns the rules)."""
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
        found = sorted({n for _, n in adapters_of(model)})
        if len(found) != 1:
            raise LoRAError(
                f"pass name=, the model has adapters {found}"
                if found
                else "the model has no LoRA: call inject_lora or load_lora first"
            )
        name = found[0]
    return name


def lora_state_dict(model, format="kohya", prefix="unet", name=None, dtype=torch.float32) -> dict:
    """The tensors of adapter `name` (the only one when None) named the `format` way (module docstring)."""
    if format not in FORMATS:
        raise LoRAError(f"unknown LoRA format {format!r}: expected one of {FORMATS}")
    name = _one_adapter(model, name)
    out = {}
    for component, m in components(model, prefix).items():
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
                out.update(
                    {
                        f"{key}.lora_down.weight": A.to(dtype),
                        f"{key}.lora_up.weight": B.to(dtype),
                        f"{key}.alpha": torch.tensor(a.alpha),
                    }
                )
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
    pairs = adapters_of(components(model, prefix), name)
    linear = [layer.adapters[n] for layer, n in pairs if not isinstance(layer, LoRAConv2d)]
    conv = [layer.adapters[n] for layer, n in pairs if isinstance(layer, LoRAConv2d)]
    first = (linear or conv)[0]
    meta = {
        "format": "pt",
        "minidiff.format": format,
        "minidiff.adapter": name,
        "minidiff.rank": ",".join(map(str, sorted({a.rank for a in linear + conv}))),
        "minidiff.alpha": ",".join(f"{x:g}" for x in sorted({a.alpha for a in linear + conv})),
        "minidiff.targets": ",".join(sorted({a.targets for a in linear + conv})),
    }
    if format == "kohya":  # the keys kohya's tools and the web UIs read (sd-scripts networks/lora.py)
        args = {"conv_dim": str(conv[0].rank), "conv_alpha": f"{conv[0].alpha:g}"} if conv else {}
        meta.update(
            {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(first.rank),
                "ss_network_alpha": f"{first.alpha:g}",
                "ss_base_model_version": "sdxl_base_v1-0",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "ss_network_args": json.dumps(args),
            }
        )
    elif any(a.alpha != a.rank for a in linear + conv):
        meta["minidiff.note"] = "alpha/rank is folded into the up/B tensors: load with alpha = rank"
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    return io.save_safetensors(tensors, path, metadata=meta)


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
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
)  # old attention processors: to_q_lora
_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
    ("base_model.model.", None),
)
# adapters that are not plain LoRA/LoCon, by a key only they have (LyCORIS and peft names; ComfyUI's
# comfy/weight_adapter/ reads the same keys): refused by name, never half-applied
VARIANTS = (
    (r"hada_w1|hada_t1", "LoHa (LyCORIS Hadamard product)"),
    (r"lokr_w1|lokr_w2", "LoKr (LyCORIS Kronecker)"),
    (r"\.lora_mid\.weight$", "LoCon with Tucker decomposition (lora_mid)"),
    (r"\.(a1|a2|b1|b2)\.weight$", "GLoRA"),
    (r"\.on_input$|ia3_l", "IA3"),
    (r"oft_blocks|oft_diag|\.oft_r$|oft_R|boft_", "OFT (orthogonal fine-tuning)"),
    (r"dora_scale|lora_magnitude_vector", "DoRA"),
    (r"\.diff(_b)?$", "full weight-difference (diff)"),
    (r"\.w_norm$|\.b_norm$", "LyCORIS norm"),
)


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
            stem, component = stem[len(p) :], c or default_component
            break
    if suffix.startswith("_lora."):  # attn1.processor.to_q_lora -> attn1.to_q; to_out_lora -> to_out.0
        stem = re.sub(r"\.to_out$", ".to_out.0", stem.replace(".processor.", "."))
    return component, stem, role


def read_lora(path, default_component="unet"):
    """Reads a LoRA safetensors file of any of the three namings: ([LoRAEntry], format, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a non-safetensors file
        raise LoRAError(
            f"{path} is not a readable safetensors file ({type(e).__name__}); LoRA files are .safetensors"
        ) from None
    entries, fmt = parse_lora(tensors, metadata, default_component, source=path.name)
    return entries, fmt, metadata


def parse_lora(tensors, metadata=None, default_component="unet", source="state dict"):
    """Groups a LoRA state dict into LoRAEntry's; the format is detected from the key style."""
    for pattern, variant in VARIANTS:
        found = [k for k in tensors if re.search(pattern, k)]
        if found:
            raise LoRAError(
                f"{source} holds {variant} weights (e.g. key {found[0]}), a LoRA variant minidiff does "
                "not apply: it loads plain LoRA and LoCon (lora_down/lora_up or lora_A/lora_B)"
            )
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
        raise LoRAError(
            f"{source} holds no LoRA tensors (expected keys ending in .lora_down.weight, .lora.down.weight "
            f"or .lora_A.weight), found e.g. {list(tensors)[:3]}"
        )
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
        for role in ("down", "up"):
            if not torch.isfinite(getattr(e, role)).all():
                raise LoRAError(
                    f"{source}: {e.keys[role]} holds NaN or inf values (a LoRA from a diverged training "
                    "run?); applied, it would turn every image black"
                )
        if not math.isfinite(e.alpha):
            raise LoRAError(f"{source}: {e.keys.get('alpha', e.name)} is {e.alpha}, not a finite alpha")
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
    models = components(model, prefix)
    if name is None:  # the file's stem; a second lora.safetensors becomes lora_2
        taken, stem = {n for _, n in adapters_of(models)}, re.sub(r"\W", "_", source)
        name, i = stem, 1
        while name in taken:
            i += 1
            name = f"{stem}_{i}"
    check_name(name)
    lookup = {c: _file_names(c, m) for c, m in models.items()}
    plan, unmatched = [], []
    for e in entries:
        module_path = lookup.get(e.component, {}).get(e.name)
        if module_path is None:
            unmatched.append(next(iter(e.keys.values())))
        else:
            plan.append((models[e.component], module_path, e))
    if unmatched:
        raise LoRAError(
            f"{len(unmatched)} of {len(entries)} LoRA modules match nothing in the model "
            f"(components given: {sorted(models)}), e.g. {unmatched[:3]}"
        )
    if not math.isfinite(scale):
        raise LoRAError(f"LoRA scale must be a finite number, got {scale}")
    for m, p, e in plan:
        module = m.get_submodule(p)
        if name in getattr(module, "adapters", {}):
            raise LoRAError(f"adapter {name!r} already exists on {p}: pass another name=")
        for role, want in zip(("down", "up"), lora_shapes(module.weight, e.rank)):
            t, key = getattr(e, role), e.keys[role]
            if _squeeze(t.shape) != _squeeze(want):  # [r, in] and [r, in, 1, 1] are the same LoRA
                raise LoRAError(
                    f"{key}: LoRA tensor has shape {list(t.shape)} but {p} needs {list(want)} "
                    "(a LoRA for another model or architecture?)"
                )
    for m, p, e in plan:
        layer = wrap(m, p)
        layer.add_adapter(name, e.rank, e.alpha, A=e.down, B=e.up, targets=f"file:{source}")
        layer.adapters[name].multiplier = float(scale)
        layer.lora_A[name].requires_grad_(trainable)
        layer.lora_B[name].requires_grad_(trainable)
    return name
