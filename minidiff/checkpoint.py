"""Weights on disk -> modules: diffusers folders, SDXL's original single file, and the key rules between them.

Two layouts hold the same SDXL weights (reference notes `sdxl.md` sec. 2):

    diffusers folder   unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/, each with its
                       config.json and `*.safetensors` (or `*.fp16.safetensors`, or shards + `*.safetensors.index.json`)
    original file      sd_xl_base_1.0.safetensors: model.diffusion_model.* (UNet, ldm names), first_stage_model.*
                       (VAE, ldm names), conditioner.embedders.0.transformer.* (CLIP-L, transformers names),
                       conditioner.embedders.1.model.* (OpenCLIP bigG, open_clip names); no configs, no tokenizer

Our modules use diffusers' names, so the folder loads by name and the single file goes through small rules
(formulas, not tables of 1680 names). With L = layers_per_block (2 for SDXL):

    down_blocks.i.resnets.j     <-> input_blocks.((L+1) i + j + 1).0        (attentions.j: .1)
    down_blocks.i.downsamplers  <-> input_blocks.((L+1)(i+1)).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 <-> middle_block.0 / 1 / 2
    up_blocks.i.resnets.j       <-> output_blocks.((L+1) i + j).0           (attentions.j: .1)
    up_blocks.i.upsamplers      <-> output_blocks.((L+1) i + L).K.conv      K = 2 if up block i has attention else 1
    VAE decoder.up_blocks.i     <-> decoder.up.(N-1-i)                      (ldm numbers decoder levels backwards)
    VAE mid attention to_q/k/v/to_out.0 (Linear) <-> mid.attn_1.q/k/v/proj_out (1x1 conv: weight[:, :, 0, 0])
    bigG q_proj, k_proj, v_proj <-> rows [0:C], [C:2C], [2C:3C] of attn.in_proj_weight / in_proj_bias
    bigG text_projection.weight <-> text_projection.T (open_clip computes x @ P, nn.Linear x @ W.T)

The single file carries no config.json: sizes are read off the tensor shapes (head width 64, GroupNorm 32, as in
SDXL), and no tokenizer: `tokenizers=DIR` names a folder holding tokenizer/ and tokenizer_2/.

Loading builds each module on the meta device (no memory), checks every key and shape, then takes one tensor at a
time from the memory-mapped file, casts it straight to the target dtype and device and assigns it
(`load_state_dict(assign=True)`): a model is never held twice (a tensor already in the target dtype on the CPU
even stays memory-mapped). Only safetensors is read; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .pipeline import SDXL_SCHEDULER

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_L_PREFIX, CLIP_G_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
IGNORED = re.compile(r".*(position_ids|logit_scale|attn_mask)$")  # buffers / CLIP training leftovers

def file_hash(path) -> str:
    """sha256 of a file (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------- files
class Tensors:
    """The tensors of one safetensors file, or of a sharded set (`*.safetensors.index.json`), read lazily."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no such file: {path}")
        files = [path]
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: not a safetensors index (expected a 'weight_map'): {e}") from None
            files = [path.parent / f for f in dict.fromkeys(weight_map.values())]
        elif path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors files are read (no pickled .ckpt/.bin/.pt)")
        self.path, self.handles, self.where = path, {}, {}
        for f in files:
            try:
                self.handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except FileNotFoundError:
                raise CheckpointError(f"missing shard {f} (listed in {path})") from None
            except Exception as e:  # SafetensorError: truncated download, not a safetensors file, ...
                raise CheckpointError(f"cannot read {f}: truncated or not a safetensors file ({e})") from None
            self.where.update({k: f for k in self.handles[f].keys()})

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key) -> list[int]:
        return self.handles[self.where[key]].get_slice(key).get_shape()

    def get(self, key, rows=None) -> torch.Tensor:
        """The tensor `key`, or only its rows [a:b] (read from disk without the other rows)."""
        f = self.handles[self.where[key]]
        try:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key} from {self.where[key]}: {e}") from None


def detect_layout(keys) -> str:
    """What a state dict's keys are: 'sdxl-single-file', 'sd-single-file' (SD 1.x/2.x), 'diffusers-unet',
    'ldm-unet', 'diffusers-vae', 'ldm-vae', 'diffusers-clip' or 'unknown'."""
    keys = list(keys)
    has = lambda pattern: any(re.match(pattern, k) for k in keys)  # noqa: E731
    if has(re.escape(UNET_PREFIX)) or has(re.escape(VAE_PREFIX)):
        return "sd-single-file" if has(r"cond_stage_model\.") else "sdxl-single-file"
    if has(r"conditioner\.embedders\."):
        return "sdxl-single-file"
    if has(r"down_blocks\.\d+\.resnets\.") and has(r"conv_in\."):
        return "diffusers-unet"
    if has(r"input_blocks\.\d+\.") and has(r"middle_block\."):
        return "ldm-unet"
    if has(r"encoder\.down_blocks\.") or has(r"decoder\.up_blocks\."):
        return "diffusers-vae"
    if has(r"encoder\.down\.\d+\.block\.") or has(r"decoder\.up\.\d+\.block\."):
        return "ldm-vae"
    if has(r"(text_model\.)?encoder\.layers\.\d+\.self_attn\."):
        return "diffusers-clip"
    return "unknown"


# --------------------------------------------------------------------------------------------------- UNet rules
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _swap(key, table, reverse=False):
    """Replace a leading module path of `key` found in `table` ({ldm: diffusers}); None if none matches."""
    for a, b in table.items():
        a, b = (b, a) if reverse else (a, b)
        if key == a or key.startswith(a + "."):
            return b + key[len(a):]
    return None


def _resnet_rest(rest, reverse=False):
    """'.in_layers.0.weight' -> '.norm1.weight' inside a ResBlock (or back); '' stays ''."""
    return "." + (_swap(rest[1:], RESNET, reverse) or rest[1:]) if rest else ""


def _unet_shape(config):
    """(L = layers_per_block, [up block i has attention]) from a UNetConfig or a diffusers config dict."""
    if hasattr(config, "transformer_depth"):  # our UNetConfig: depth 0 = a level without attention
        return config.layers_per_block, [d > 0 for d in reversed(config.transformer_depth)]
    return config["layers_per_block"], ["CrossAttn" in t for t in config["up_block_types"]]


def ldm_to_diffusers_unet_key(key: str, config) -> str | None:
    """Original (sgm/ldm) UNet key -> diffusers key, by the rules of the module docstring; None if not a UNet key.
    Works for parameter keys and module paths, with or without the `model.diffusion_model.` prefix."""
    key = key[len(UNET_PREFIX):] if key.startswith(UNET_PREFIX) else key
    L, up_attn = _unet_shape(config)
    if (top := _swap(key, UNET_TOP)) is not None:
        return top
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)(\..+)?", key):
        (i, j), k, rest = divmod(int(m[1]) - 1, L + 1), int(m[2]), m[3] or ""
        if j == L:  # the downsampler closing level i
            return f"down_blocks.{i}.downsamplers.0.conv" + rest.removeprefix(".op")
        if k == 0:
            return f"down_blocks.{i}.resnets.{j}" + _resnet_rest(rest)
        return f"down_blocks.{i}.attentions.{j}{rest}"
    if m := re.fullmatch(r"middle_block\.(\d)(\..+)?", key):
        k, rest = int(m[1]), m[2] or ""
        if k == 1:
            return f"mid_block.attentions.0{rest}"
        return f"mid_block.resnets.{k // 2}" + _resnet_rest(rest)
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)(\..+)?", key):
        (i, j), k, rest = divmod(int(m[1]), L + 1), int(m[2]), m[3] or ""
        if k == 0:
            return f"up_blocks.{i}.resnets.{j}" + _resnet_rest(rest)
        if k == 1 and up_attn[i]:
            return f"up_blocks.{i}.attentions.{j}{rest}"
        return f"up_blocks.{i}.upsamplers.0{rest}"
    return None


def diffusers_to_ldm_unet_key(key: str, config) -> str | None:
    """diffusers UNet key -> original (sgm/ldm) key without the `model.diffusion_model.` prefix; None if unknown.
    The inverse of `ldm_to_diffusers_unet_key` (kohya LoRA names are ldm names with '.' -> '_')."""
    L, up_attn = _unet_shape(config)
    if (top := _swap(key, UNET_TOP, reverse=True)) is not None:
        return top
    m = re.fullmatch(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                     r"\.(\d+)(\..+)?", key)
    if not m:
        return None
    where, i, part, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5] or ""
    if part == "resnets":
        rest = _resnet_rest(rest, reverse=True)
    if where == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{(L + 1) * (i + 1)}.0.op" + rest.removeprefix(".conv")
        return f"input_blocks.{(L + 1) * i + j + 1}.{int(part == 'attentions')}{rest}"
    if where == "mid_block":
        return f"middle_block.{1 if part == 'attentions' else 2 * j}{rest}"
    if part == "upsamplers":
        return f"output_blocks.{(L + 1) * i + L}.{2 if up_attn[i] else 1}{rest}"
    return f"output_blocks.{(L + 1) * i + j}.{int(part == 'attentions')}{rest}"


# ------------------------------------------------------------------------------------------- VAE and CLIP rules
# (pattern, replacement, how to reshape the tensor): each matching rule rewrites the ldm key in turn.
VAE_RULES = [
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", None),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", None),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv.", None),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.{N-1-\1}.resnets.\2.", None),
    (r"^decoder\.up\.(\d+)\.upsample\.conv\.", r"decoder.up_blocks.{N-1-\1}.upsamplers.0.conv.", None),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", None),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", None),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm.", None),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2.", "1x1"),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0.", "1x1"),
    (r"\.nin_shortcut\.", ".conv_shortcut.", None),
]
OPEN_CLIP_RULES = [
    (r"^token_embedding\.", "text_model.embeddings.token_embedding.", None),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight", None),
    (r"^transformer\.resblocks\.(\d+)\.ln_(1|2)\.", r"text_model.encoder.layers.\1.layer_norm\2.", None),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"text_model.encoder.layers.\1.self_attn.out_proj.", None),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"text_model.encoder.layers.\1.mlp.fc1.", None),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"text_model.encoder.layers.\1.mlp.fc2.", None),
    (r"^ln_final\.", "text_model.final_layer_norm.", None),
    (r"^text_projection$", "text_projection.weight", "T"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"text_model.encoder.layers.\1.self_attn."
     r"{q,k,v}_proj.\2", "qkv"),
]


def _apply_rules(key, rules, **numbers):
    """[(new key, reshape)] for an ldm key: every matching rule rewrites it in turn; [] when none matches.
    `{N-1-\\1}` in a replacement is evaluated with `numbers`; `{q,k,v}` expands into three keys."""
    new, how, matched = key, None, False
    for pattern, repl, tag in rules:
        if re.search(pattern, new):
            new, how, matched = re.sub(pattern, repl, new), tag or how, True
    if not matched:
        return []
    new = re.sub(r"\{N-1-(\d+)\}", lambda m: str(numbers["N"] - 1 - int(m[1])), new)
    if how == "qkv":
        return [(new.replace("{q,k,v}", x), ("rows", i)) for i, x in enumerate("qkv")]
    return [(new, how)]


def convert_keys(keys, layout, config=None, n_levels=None) -> tuple[dict, list]:
    """({module key: (file key, reshape)}, [file keys no rule knows]) for one component (prefix stripped)."""
    plan, unknown = {}, []
    for k in keys:
        if IGNORED.match(k):
            continue
        if layout == "ldm-unet":
            new = ldm_to_diffusers_unet_key(k, config)
            targets = [(new, None)] if new else []
        elif layout == "ldm-vae":
            targets = _apply_rules(k, VAE_RULES, N=n_levels) or [(k, None)]  # conv_in, quant_conv, ...: same
        elif layout == "open-clip":
            targets = _apply_rules(k, OPEN_CLIP_RULES)
        else:
            targets = [(k, None)]
        unknown += [] if targets else [k]
        plan.update({new: (k, how) for new, how in targets})
    return plan, unknown


# --------------------------------------------------------------------------------------------- building modules
class _View:
    """One component of a file: its tensors seen without the component's key prefix."""

    def __init__(self, tensors: Tensors, prefix=""):
        self.tensors, self.prefix = tensors, prefix

    def keys(self):
        return [k[len(self.prefix):] for k in self.tensors.keys() if k.startswith(self.prefix)]

    def shape(self, key, how=None) -> list[int]:
        """The tensor's shape after its reshape rule ('T', '1x1', ('rows', i))."""
        s = list(self.tensors.shape(self.prefix + key))
        return s[::-1] if how == "T" else s[:2] if how == "1x1" else [s[0] // 3, *s[1:]] if how else s

    def get(self, key, how=None) -> torch.Tensor:
        key = self.prefix + key
        if isinstance(how, tuple):  # ('rows', i): the i-th third of a fused q,k,v tensor, read alone
            n = self.tensors.shape(key)[0] // 3
            return self.tensors.get(key, (how[1] * n, (how[1] + 1) * n))
        t = self.tensors.get(key)
        return t.T.contiguous() if how == "T" else t[:, :, 0, 0] if how == "1x1" and t.ndim == 4 else t


def _on_meta(make):
    """Build a module without allocating or initialising its weights (`fill` assigns them)."""
    with torch.device("meta"):
        return make()


def fill(module, plan, view: _View, dtype=None, device="cpu", what="model", unknown=()):
    """Fill `module` (built on the meta device) from plan {module key: (file key, reshape)}. Every key and shape
    is checked first; then each tensor is read, cast to `dtype` (None: as stored), moved to `device`, assigned."""
    want = module.state_dict()
    missing = [k for k in want if k not in plan]
    unexpected = list(unknown) + [src for k, (src, _) in plan.items() if k not in want]
    if missing or unexpected:
        raise CheckpointError(f"{what}: the weights do not fit the model: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected; first missing {missing[:3]}, first unexpected "
                              f"{unexpected[:3]}")
    for k, (src, how) in plan.items():
        if view.shape(src, how) != list(want[k].shape):
            raise CheckpointError(f"{what}: {src} has shape {view.shape(src, how)} but the model's {k} is "
                                  f"{list(want[k].shape)} (weights of another size or architecture)")
    state = {}
    for k, (src, how) in plan.items():
        t = view.get(src, how)
        state[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    module.load_state_dict(state, assign=True)
    for name, buf in list(module.named_buffers()):  # buffers no file stores (CLIP's position_ids)
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            if leaf != "position_ids":
                raise CheckpointError(f"{what}: buffer {name} is not in the file")
            module.get_submodule(owner)._buffers[leaf] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
    return module.eval()


# ------------------------------------------------------------------------------------------- finding the weights
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing {path} (each diffusers component folder holds its config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _weights_in(folder: Path, stem: str, dtype) -> Tensors:
    """folder/stem[.fp16].safetensors[.index.json]: the fp16 variant first when loading in fp16, else the full one."""
    names = [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    fp16 = [f"{stem}.fp16.safetensors", f"{stem}.fp16.safetensors.index.json"]
    for name in fp16 + names if dtype == torch.float16 else names + fp16:
        if (folder / name).is_file():
            return Tensors(folder / name)
    found = sorted(p.name for p in folder.iterdir())
    pickled = [f for f in found if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    raise CheckpointError(f"no {stem}.safetensors in {folder} (found: {', '.join(found) or 'nothing'})"
                          + (f"; {pickled[0]} is a pickle, which minidiff never loads" if pickled else ""))


PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX, "text_encoder_2": CLIP_G_PREFIX}
STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
        "text_encoder_2": "model"}
KIND = {"unet": ("diffusers-unet", "UNet2DConditionModel"), "vae": ("diffusers-vae", "AutoencoderKL"),
        "text_encoder": ("diffusers-clip", "CLIPTextModel"), "text_encoder_2": ("diffusers-clip", "CLIPTextModel")}


def _locate(path, component: str, dtype=None):
    """(view, config dict or None, layout) of one component in a pipeline folder, component folder or file."""
    path = Path(path)
    if path.is_dir():
        folder = path / component if (path / component).is_dir() else path
        if not (folder / "config.json").is_file() and not any(folder.glob("*.safetensors*")):
            raise CheckpointError(f"{path} has no {component}/ folder (expected a diffusers pipeline folder)")
        config = _read_json(folder / "config.json")
        found = config.get("_class_name") or (config.get("architectures") or [""])[0]
        if found and not found.startswith(KIND[component][1]):
            raise CheckpointError(f"{folder} holds {found} weights, not {KIND[component][1]} ones")
        return _View(_weights_in(folder, STEM[component], dtype)), config, "diffusers"
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path} (expected a diffusers folder or a .safetensors file)")
    tensors = Tensors(path)
    layout = detect_layout(tensors.keys())
    if layout == "sd-single-file":
        sd = [k for k in tensors.keys() if k.startswith("cond_stage_model.")][:3]
        raise CheckpointError(f"{path} is a Stable Diffusion 1.x/2.x single file, not SDXL: missing "
                              f"{CLIP_G_PREFIX}*, unexpected {sd}")
    if layout.startswith("diffusers"):
        if layout != KIND[component][0]:
            raise CheckpointError(f"{path}: expected {component} weights, found {layout} keys")
        return _View(tensors), _read_json(path.parent / "config.json"), "diffusers"
    view = _View(tensors, PREFIX[component] if layout == "sdxl-single-file" else "")
    if not view.keys():
        raise CheckpointError(f"{path} holds no {component} (its keys look like {layout})")
    return view, None, layout


def _count(keys, pattern) -> int:
    """How many distinct values the group in `pattern` takes over `keys` (levels, layers, blocks)."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def _infer_unet_config(view: _View, pooled_dim=None):
    """The original file has no config.json: read the SDXL-family sizes off the tensor shapes (head width 64,
    GroupNorm 32, the rest as in SDXL)."""
    from .unet import UNetConfig

    keys, shape = view.keys(), view.shape
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.") + 1
    L = _count(keys, r"input_blocks\.(\d+)\.") // levels - 1
    widths = [shape(f"input_blocks.{(L + 1) * i + L}.0.out_layers.3.weight")[0] for i in range(levels)]
    depth = [_count(keys, rf"input_blocks\.{(L + 1) * i + 1}\.1\.transformer_blocks\.(\d+)\.") for i in range(levels)]
    to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in keys if k.endswith(".proj_in.weight")]
    adm = shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in keys else None
    time_dim = (adm - pooled_dim) // 6 if adm and pooled_dim else 256
    return UNetConfig(
        in_channels=shape("input_blocks.0.0.weight")[1], out_channels=shape("out.2.weight")[0],
        block_out_channels=tuple(widths), layers_per_block=L, transformer_depth=tuple(depth),
        mid_transformer_depth=_count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        num_heads=tuple(max(w // 64, 1) for w in widths), cross_attention_dim=shape(to_k[0])[1] if to_k else None,
        use_linear_projection=bool(proj_in) and len(shape(proj_in[0])) == 2,
        addition_embed_type="text_time" if adm else None, addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=adm or 2816)


def _infer_vae_config(view: _View):
    """Sizes of an ldm-layout VAE read off its shapes; scaling factor and upcasting as SDXL's."""
    from .vae import VAEConfig

    keys, shape = view.keys(), view.shape
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    d = VAEConfig.sdxl().to_diffusers()
    d.update(in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0],
             block_out_channels=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)],
             layers_per_block=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
             latent_channels=shape("post_quant_conv.weight")[0],
             down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    return VAEConfig.from_diffusers(d)


def _infer_clip_config(plan, view: _View, hidden_act: str):
    """A CLIPTextConfig read off the (converted) shapes; head width 64 as in CLIP-L and bigG."""
    from transformers import CLIPTextConfig

    shape = {k: view.shape(src, how) for k, (src, how) in plan.items()}
    vocab, width = shape["text_model.embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=shape["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(plan, r"text_model\.encoder\.layers\.(\d+)\."), num_attention_heads=width // 64,
        max_position_embeddings=shape["text_model.embeddings.position_embedding.weight"][0], hidden_act=hidden_act,
        projection_dim=shape.get("text_projection.weight", [width])[0], bos_token_id=0, pad_token_id=1,
        eos_token_id=2, layer_norm_eps=1e-5)  # eos 2 = the hub configs' value: pool at argmax(ids) = <|endoftext|>


# ---------------------------------------------------------------------------------------------------- loaders
def load_unet(path, dtype=None, device="cpu"):
    """The UNet of a diffusers folder (pipeline or unet/), a diffusers unet file, or an original single file."""
    from .unet import UNet, UNetConfig

    view, config, layout = _locate(path, "unet", dtype)
    if layout == "diffusers":
        config, (plan, unknown) = UNetConfig.from_diffusers(config), convert_keys(view.keys(), "diffusers")
    elif layout in ("sdxl-single-file", "ldm-unet"):
        proj = CLIP_G_PREFIX + "text_projection"
        pooled = view.tensors.shape(proj)[1] if proj in view.tensors.where else None
        config = _infer_unet_config(view, pooled)
        plan, unknown = convert_keys(view.keys(), "ldm-unet", config)
    else:
        raise CheckpointError(f"{path}: expected UNet weights, found a {layout} layout")
    return fill(_on_meta(lambda: UNet(config)), plan, view, dtype, device, f"unet ({path})", unknown)


def load_vae(path, dtype=None, device="cpu"):
    """The AutoencoderKL of a diffusers folder (pipeline or vae/), a diffusers vae file, an ldm-layout VAE file
    (e.g. sdxl_vae.safetensors) or an original single file."""
    from .vae import AutoencoderKL, VAEConfig

    view, config, layout = _locate(path, "vae", dtype)
    if layout == "diffusers":
        config, (plan, unknown) = VAEConfig.from_diffusers(config), convert_keys(view.keys(), "diffusers")
    elif layout in ("sdxl-single-file", "ldm-vae"):
        config = _infer_vae_config(view)
        plan, unknown = convert_keys(view.keys(), "ldm-vae", n_levels=len(config.block_out_channels))
    else:
        raise CheckpointError(f"{path}: expected VAE weights, found a {layout} layout")
    return fill(_on_meta(lambda: AutoencoderKL(config)), plan, view, dtype, device, f"vae ({path})", unknown)


def _text_model_level(key, bare):
    """transformers >= 5 dropped CLIPTextModel's `text_model.` level; files are written with and without it."""
    if bare:
        return key.removeprefix("text_model.")
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def load_text_encoder(path, component="text_encoder", dtype=None, device="cpu"):
    """CLIP-L (`text_encoder`, transformers CLIPTextModel) or bigG (`text_encoder_2`, CLIPTextModelWithProjection)
    from a diffusers folder or an original single file (bigG converted from open_clip names)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    view, config, layout = _locate(path, component, dtype)
    if layout == "diffusers":
        plan, unknown = convert_keys(view.keys(), "diffusers")
        config = CLIPTextConfig.from_dict(config)
    else:
        plan, unknown = convert_keys(view.keys(), "open-clip" if component == "text_encoder_2" else "diffusers")
        config = _infer_clip_config(plan, view, "gelu" if component == "text_encoder_2" else "quick_gelu")
    model = _on_meta(lambda: cls(config))
    plan = {_text_model_level(k, bare=not hasattr(model, "text_model")): v for k, v in plan.items()}
    return fill(model, plan, view, dtype, device, f"{component} ({path})", unknown)


def load_tokenizer(folder):
    """A CLIP tokenizer from its own files (vocab.json + merges.txt or tokenizer.json, and its special tokens)."""
    from transformers import CLIPTokenizerFast

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no tokenizer folder {folder}")
    try:
        return CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the tokenizer in {folder}: {e}") from None


def load_text(path, dtype=None, device="cpu", tokenizers=None):
    """TextConditioner: both encoders from `path`, tokenizers from `tokenizers` (a folder holding tokenizer/ and
    tokenizer_2/) or from `path` when it is a diffusers folder."""
    from .text import TextConditioner

    tok_dir = Path(tokenizers) if tokenizers else Path(path)
    if not (tok_dir / "tokenizer").is_dir() or not (tok_dir / "tokenizer_2").is_dir():
        if Path(path).is_file() and not tokenizers:
            raise CheckpointError(f"{path} is a single file, which carries no tokenizer: pass tokenizers=DIR "
                                  "(sample.py --tokenizers DIR), a folder holding tokenizer/ and tokenizer_2/ (as in "
                                  "the diffusers repo stabilityai/stable-diffusion-xl-base-1.0)")
        raise CheckpointError(f"{tok_dir} has no tokenizer/ and tokenizer_2/ folders")
    encoders = [load_text_encoder(path, c, dtype, device) for c in ("text_encoder", "text_encoder_2")]
    return TextConditioner(load_tokenizer(tok_dir / "tokenizer"), encoders[0], load_tokenizer(tok_dir / "tokenizer_2"),
                           encoders[1])


def schedule_from_config(config: dict):
    """The training noise schedule of `scheduler/scheduler_config.json` (diffusers keys; missing ones = SDXL's)."""
    from .schedule import Schedule

    c = {**SDXL_SCHEDULER, **config}
    if c["prediction_type"] != "epsilon":
        raise CheckpointError(f"scheduler: prediction_type {c['prediction_type']!r} is not supported (epsilon only)")
    T, kind = c["num_train_timesteps"], c["beta_schedule"]
    if kind in ("scaled_linear", "linear"):
        return getattr(Schedule, kind)(T, c["beta_start"], c["beta_end"])
    if kind == "squaredcos_cap_v2":
        return Schedule.cosine(T)
    raise CheckpointError(f"scheduler: beta_schedule {kind!r} is not one of scaled_linear, linear, squaredcos_cap_v2")


def load_pipeline(path, dtype=None, device="cpu", vae=None, tokenizers=None):
    """A whole Pipeline from a diffusers folder or an original single file (+ tokenizers=DIR). `vae` replaces the
    VAE (a folder or file, e.g. the fp16-fix VAE). The VAE runs in float32 unless its config says it is fp16-safe
    (force_upcast false) or dtype is bfloat16. A folder without vae/ whose UNet takes RGB is pixel space."""
    from .pipeline import Pipeline

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such model folder or file: {path}")
    unet = load_unet(path, dtype, device)
    vae_model = None
    if vae or path.is_file() or (path / "vae").is_dir() or unet.config.in_channels != 3:
        vae_model = load_vae(vae or path, torch.float32 if dtype in (None, torch.float16) else dtype, device)
        if dtype == torch.float16 and not getattr(vae_model.config, "force_upcast", True):
            vae_model.to(dtype)  # an fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix says force_upcast false)
    scheduler = dict(SDXL_SCHEDULER)
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler.update(_read_json(path / "scheduler" / "scheduler_config.json"))
    return Pipeline(unet=unet, vae=vae_model, text=load_text(path, dtype, device, tokenizers),
                    schedule=schedule_from_config(scheduler), name=path.stem if path.is_file() else path.name,
                    scheduler_config=scheduler)


# ------------------------------------------------------------------------------------------------------ saving
def _write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def save_pipeline(pipe, out_dir) -> Path:
    """Write `pipe` as a diffusers folder (model_index.json, unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/
    tokenizer_2/ scheduler/ with their configs; safetensors, each file atomic) that load_pipeline and diffusers'
    StableDiffusionXLPipeline.from_pretrained both read. A pixel-space pipeline (vae None) writes no vae/."""
    from .training import atomic_save_file

    out = Path(out_dir)
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
             "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae)):
        cls = "UNet2DConditionModel" if name == "unet" else "AutoencoderKL"
        index[name] = ["diffusers", cls] if module is not None else [None, None]
        if module is not None:
            _write_json(out / name / "config.json", {**module.config.to_diffusers(), "_class_name": cls})
            atomic_save_file(module.state_dict(), out / name / "diffusion_pytorch_model.safetensors")
    text = pipe.text
    for suffix, tok, te in (("", text.tokenizer, text.text_encoder), ("_2", text.tokenizer_2, text.text_encoder_2)):
        state = {_text_model_level(k, bare=False): v for k, v in te.state_dict().items()}  # files keep `text_model.`
        _write_json(out / f"text_encoder{suffix}" / "config.json",
                    {**te.config.to_dict(), "architectures": [type(te).__name__]})
        atomic_save_file(state, out / f"text_encoder{suffix}" / "model.safetensors")
        folder, tmp = out / f"tokenizer{suffix}", out / f"tokenizer{suffix}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        index[f"text_encoder{suffix}"] = ["transformers", type(te).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    _write_json(out / "scheduler" / "scheduler_config.json", {**SDXL_SCHEDULER, **pipe.scheduler_config})
    _write_json(out / "model_index.json", index)
    return out
