"""ControlNet weights on disk: a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors), its
file alone, or the original (ldm `cldm`) single file whose keys start with `control_model.` (or carry no prefix).

The original layout names the encoder as the UNet's (layouts.ldm_to_diffusers_unet_key) plus four control parts:

    input_hint_block.0               <-> controlnet_cond_embedding.conv_in        (ldm's nn.Sequential: conv, SiLU,
    input_hint_block.2k (k = 1..n)   <-> controlnet_cond_embedding.blocks.(k-1)    conv, SiLU, ..., so convs sit at
    input_hint_block.2(n+1)          <-> controlnet_cond_embedding.conv_out        the even indices)
    zero_convs.i.0                   <-> controlnet_down_blocks.i
    middle_block_out.0               <-> controlnet_mid_block

The single file has no config.json: sizes are read off the shapes (head width 64 and GroupNorm 32, as SD/SDXL).
"""

from __future__ import annotations

import json
import re
from pathlib import Path


from .. import io
from ..errors import CheckpointError
from ..unet_config import UNetConfig
from .layouts import View, ldm_to_diffusers_unet_key
from .tensors import Tensors

CONTROL_PREFIX = "control_model."
STEM = "diffusion_pytorch_model"


def ldm_to_diffusers_controlnet_key(key: str, config: UNetConfig, n_hint: int) -> str | None:
    """Original ControlNet key (prefix stripped) -> diffusers key; n_hint = the number of convs in input_hint_block."""
    if m := re.fullmatch(r"input_hint_block\.(\d+)\.(weight|bias)", key):
        k = int(m[1]) // 2
        part = "conv_in" if k == 0 else "conv_out" if k == n_hint - 1 else f"blocks.{k - 1}"
        return f"controlnet_cond_embedding.{part}.{m[2]}"
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(weight|bias)", key):
        return f"controlnet_down_blocks.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"middle_block_out\.0\.(weight|bias)", key):
        return f"controlnet_mid_block.{m[1]}"
    return ldm_to_diffusers_unet_key(key, config)


def _levels(keys, pattern) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def infer_config(view) -> tuple[UNetConfig, dict]:
    """(UNetConfig of the encoder, ControlNet extras) read off an original-layout file's shapes."""
    keys, shape = view.keys(), view.shape
    levels = len(_levels(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
    L = (len(_levels(keys, r"input_blocks\.(\d+)\.")) - levels) // levels  # 1 + levels * L + (levels - 1) blocks
    widths = [shape(f"input_blocks.{(L + 1) * i + 1}.0.out_layers.3.weight")[0] for i in range(levels)]
    depth = [
        len(_levels(keys, rf"input_blocks\.{(L + 1) * i + 1}\.1\.transformer_blocks\.(\d+)\.")) for i in range(levels)
    ]
    to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in keys if k.endswith(".proj_in.weight")]
    adm = shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in keys else None
    hint = _levels(keys, r"input_hint_block\.(\d+)\.weight")
    config = UNetConfig(
        in_channels=shape("input_blocks.0.0.weight")[1],
        block_out_channels=tuple(widths),
        layers_per_block=L,
        transformer_depth=tuple(depth),
        mid_transformer_depth=len(
            _levels(
                keys,
                r"middle_block\.1\.transformer_blocks"
                r"\.(\d+)\.",
            )
        ),
        num_heads=tuple(max(w // 64, 1) for w in widths),
        cross_attention_dim=shape(to_k[0])[1] if to_k else None,
        use_linear_projection=bool(proj_in) and len(shape(proj_in[0])) == 2,
        addition_embed_type="text_time" if adm else None,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=adm or 2816,
    )
    widths_hint = [shape(f"input_hint_block.{i}.weight")[0] for i in hint[:-1] if i % 4 == 0]  # conv_in, strided
    extras = dict(
        conditioning_channels=shape("input_hint_block.0.weight")[1],
        conditioning_embedding_out_channels=tuple(widths_hint),
    )
    return config, extras


def controlnet_from_diffusers(d: dict) -> tuple[UNetConfig, dict]:
    """(UNetConfig of the encoder, ControlNet extras) of a diffusers `controlnet/config.json` dict."""
    if d.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError("controlnet config.json: only controlnet_conditioning_channel_order 'rgb' is supported")
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = [t.replace("Down", "Up") for t in down[::-1]]
    config = UNetConfig.from_diffusers({**d, "up_block_types": up})
    extras = dict(
        conditioning_channels=d.get("conditioning_channels", 3),
        conditioning_embedding_out_channels=tuple(d.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
        global_pool_conditions=bool(d.get("global_pool_conditions", False)),
    )
    return config, extras


def read_controlnet(path) -> tuple[UNetConfig, dict, dict, View, str]:
    """(config, ControlNetModel extras, plan {model key: (file key, reshape)}, view, name) of a ControlNet in a
    diffusers folder (`controlnet/` or a pipeline folder holding one), its safetensors file (config.json beside it),
    or an original single file (`control_model.*` keys or none): what controlnet.load_controlnet builds and fills."""
    path = Path(path)
    if path.is_dir():
        folder = path / "controlnet" if (path / "controlnet").is_dir() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json (expected a diffusers ControlNet folder)")
        d = json.loads((folder / "config.json").read_text())
        if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{folder} holds {d['_class_name']} weights, not ControlNetModel ones")
        files = [folder / f"{STEM}{v}.safetensors{i}" for v in ("", ".fp16") for i in ("", ".index.json")]
        files = [f for f in files if f.is_file()]
        if not files:
            raise CheckpointError(f"no {STEM}.safetensors in {folder}")
        path = files[0]
    elif not path.is_file():
        raise CheckpointError(
            f"no such file or folder: {path} (expected a diffusers ControlNet folder or a .safetensors file)"
        )
    tensors = Tensors(path)
    keys = tensors.keys()
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):  # diffusers names
        config_path = path.parent / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: a diffusers ControlNet file needs its config.json beside it")
        config, extras = controlnet_from_diffusers(json.loads(config_path.read_text()))
        view, plan = View(tensors, ""), {k: (k, None) for k in keys}
    else:
        prefix = CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in keys) else ""
        view = View(tensors, prefix)
        if not any(k.startswith("input_hint_block.") for k in view.keys()):
            raise CheckpointError(
                f"{path} is not a ControlNet (no controlnet_cond_embedding.* or "
                f"{CONTROL_PREFIX}input_hint_block.* keys)"
            )
        config, extras = infer_config(view)
        n_hint = len(_levels(view.keys(), r"input_hint_block\.(\d+)\.weight"))
        plan = {}
        for k in view.keys():
            new = ldm_to_diffusers_controlnet_key(k, config, n_hint)
            plan[new or f"<unknown {k}>"] = (k, None)
    return config, extras, plan, view, f"controlnet ({path})"


def save_controlnet(net, folder) -> Path:
    """Write `net` as a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors, atomic) that
    load_controlnet and diffusers' ControlNetModel.from_pretrained both read."""
    folder = Path(folder)
    io.write_json(net.to_diffusers(), folder / "config.json")
    io.save_safetensors(net.state_dict(), folder / f"{STEM}.safetensors")
    return folder
