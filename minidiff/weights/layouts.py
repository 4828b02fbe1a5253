"""Key layouts: the names SDXL's weights go by in a diffusers folder and in the original single file, and the rules
between them (pretrained.py reads the files and fills the modules; this file only renames keys, reads tensors through
the renaming rules and reads sizes; it imports nothing from pretrained.py).

Two layouts hold the same SDXL weights (diffusers' converter,
https://github.com/huggingface/diffusers/blob/58eb52c0803e/scripts/convert_diffusers_to_original_sdxl.py):

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
SDXL), by the `infer_*_config` functions at the end.
"""

from __future__ import annotations

import re

from ..unet import UNetConfig
from ..vae import VAEConfig

# where each component sits in the original single file
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_L_PREFIX, CLIP_G_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
IGNORED = re.compile(r".*(position_ids|logit_scale|attn_mask)$")  # buffers / CLIP training leftovers
PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX, "text_encoder_2": CLIP_G_PREFIX}
# SD 1.x / 2.x single files: the same UNet and VAE prefixes, one text encoder: CLIP-L with transformers names (1.x)
# or OpenCLIP ViT-H with open_clip names (2.x, the same rules as SDXL's bigG)
SD_CLIP_PREFIX, SD2_CLIP_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
SD_PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}


# ---------------------------------------------------------------------------------------------------- detection
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
RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _swap(key, table, reverse=False):
    """Replace a leading module path of `key` found in `table` ({ldm: diffusers}); None if none matches."""
    for a, b in table.items():
        a, b = (b, a) if reverse else (a, b)
        if key == a or key.startswith(a + "."):
            return b + key[len(a) :]
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
    key = key[len(UNET_PREFIX) :] if key.startswith(UNET_PREFIX) else key
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
    m = re.fullmatch(
        r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
        r"\.(\d+)(\..+)?",
        key,
    )
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
    (
        r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$",
        r"text_model.encoder.layers.\1.self_attn."
        r"{q,k,v}_proj.\2",
        "qkv",
    ),
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


def text_model_level(key, bare):
    """transformers >= 5 dropped CLIPTextModel's `text_model.` level; files are written with and without it."""
    if bare:
        return key.removeprefix("text_model.")
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


# ------------------------------------------------------------------------------------ reading through the rules
class View:
    """One component of a file (`tensors`: tensors.Tensors, or anything with keys / shape / get) seen without the
    component's key prefix, and read through the reshape tags of `convert_keys` (None, 'T', '1x1', ('rows', i))."""

    def __init__(self, tensors, prefix=""):
        self.tensors, self.prefix = tensors, prefix

    def keys(self):
        return [k[len(self.prefix) :] for k in self.tensors.keys() if k.startswith(self.prefix)]

    def shape(self, key, how=None) -> list[int]:
        """The tensor's shape after its reshape rule ('T', '1x1', ('rows', i))."""
        s = list(self.tensors.shape(self.prefix + key))
        return s[::-1] if how == "T" else s[:2] if how == "1x1" else [s[0] // 3, *s[1:]] if how else s

    def get(self, key, how=None):
        key = self.prefix + key
        if isinstance(how, tuple):  # ('rows', i): the i-th third of a fused q,k,v tensor, read alone
            n = self.tensors.shape(key)[0] // 3
            return self.tensors.get(key, (how[1] * n, (how[1] + 1) * n))
        t = self.tensors.get(key)
        return t.T.contiguous() if how == "T" else t[:, :, 0, 0] if how == "1x1" and t.ndim == 4 else t


# ------------------------------------------------------------------------------------------- config from shapes
# `view` below: the tensors of one component, with keys() and shape(key, reshape) (View above).
def _count(keys, pattern) -> int:
    """How many distinct values the group in `pattern` takes over `keys` (levels, layers, blocks)."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(view, pooled_dim=None):
    """The original file has no config.json: read the SDXL-family sizes off the tensor shapes (head width 64,
    GroupNorm 32, the rest as in SDXL)."""
    keys, shape = view.keys(), view.shape
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.") + 1
    L = _count(keys, r"input_blocks\.(\d+)\.") // levels - 1
    widths = [shape(f"input_blocks.{(L + 1) * i + L}.0.out_layers.3.weight")[0] for i in range(levels)]
    depth = [_count(keys, rf"input_blocks\.{(L + 1) * i + 1}\.1\.transformer_blocks\.(\d+)\.") for i in range(levels)]
    to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in keys if k.endswith(".proj_in.weight")]
    adm = shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in keys else None
    time_dim = (adm - pooled_dim) // 6 if adm and pooled_dim else 256
    context = shape(to_k[0])[1] if to_k else None
    # SD 1.x (context 768 = CLIP-L alone): 8 heads at every level (its yaml's num_heads: 8); else head width 64
    heads = tuple(8 if context == 768 else max(w // 64, 1) for w in widths)
    return UNetConfig(
        in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0],
        block_out_channels=tuple(widths),
        layers_per_block=L,
        transformer_depth=tuple(depth),
        mid_transformer_depth=_count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        num_heads=heads,
        cross_attention_dim=context,
        use_linear_projection=bool(proj_in) and len(shape(proj_in[0])) == 2,
        addition_embed_type="text_time" if adm else None,
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=adm or 2816,
        sample_size=128 if adm else 64,
    )


def infer_vae_config(view, sdxl=True):
    """Sizes of an ldm-layout VAE read off its shapes; scaling factor and upcasting as SDXL's (or SD 1.x/2.x's)."""
    keys, shape = view.keys(), view.shape
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    d = (VAEConfig.sdxl() if sdxl else VAEConfig.sd15()).to_diffusers()
    d.update(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)],
        layers_per_block=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=shape("post_quant_conv.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return VAEConfig.from_diffusers(d)


def infer_clip_config(plan, view, hidden_act: str):
    """A CLIPTextConfig read off the (converted) shapes; head width 64 as in CLIP-L and bigG."""
    from transformers import CLIPTextConfig

    shape = {k: view.shape(src, how) for k, (src, how) in plan.items()}
    vocab, width = shape["text_model.embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=shape["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(plan, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=width // 64,
        max_position_embeddings=shape["text_model.embeddings.position_embedding.weight"][0],
        hidden_act=hidden_act,
        projection_dim=shape.get("text_projection.weight", [width])[0],
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )  # eos 2 = the hub configs' value: pool at argmax(ids) = <|endoftext|>
