"""Weights on disk -> modules: safetensors files (fp16 variants, shards), diffusers folders and SDXL's original
single file; and back: a pipeline written as a diffusers folder.

Where a weight sits under which name is layouts.py's business (the two layouts, `detect_layout`, the ldm <->
diffusers key rules, the sizes read off tensor shapes); this file finds the files, reads them and fills the modules:

    load_unet / load_vae / load_text_encoder / load_text / load_pipeline   folder or single file -> modules
    save_pipeline                                                          Pipeline -> diffusers folder
    Tensors, file_hash                                                     one file or sharded set; its sha256

A diffusers folder holds one folder per component with its config.json and `*.safetensors` (or
`*.fp16.safetensors`, or shards + `*.safetensors.index.json`). The single file carries no config.json (sizes come
from the shapes, layouts.py) and no tokenizer: `tokenizers=DIR` names a folder holding tokenizer/ and tokenizer_2/.

Loading builds each module on the meta device (no memory), checks every key and shape, then takes one tensor at a
time from the memory-mapped file, casts it straight to the target dtype and device and assigns it
(`load_state_dict(assign=True)`): a model is never held twice (a tensor already in the target dtype on the CPU
even stays memory-mapped). Only safetensors is read; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import io
from ..errors import CheckpointError
from ..pipeline import SDXL_SCHEDULER, Pipeline
from ..schedule import PREDICTIONS, Schedule
from ..text import TextConditioner
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from .tensors import Tensors, fill, on_meta
from .layouts import (
    CLIP_G_PREFIX,
    PREFIX,
    SD2_CLIP_PREFIX,
    SD_CLIP_PREFIX,
    SD_PREFIX,
    View,
    convert_keys,
    detect_layout,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
    text_model_level,
)


def file_hash(path) -> str:
    """sha256 of a file (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    raise CheckpointError(
        f"no {stem}.safetensors in {folder} (found: {', '.join(found) or 'nothing'})"
        + (f"; {pickled[0]} is a pickle, which minidiff never loads" if pickled else "")
    )


STEM = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
KIND = {
    "unet": ("diffusers-unet", "UNet2DConditionModel"),
    "vae": ("diffusers-vae", "AutoencoderKL"),
    "text_encoder": ("diffusers-clip", "CLIPTextModel"),
    "text_encoder_2": ("diffusers-clip", "CLIPTextModel"),
}


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
        return View(_weights_in(folder, STEM[component], dtype)), config, "diffusers"
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path} (expected a diffusers folder or a .safetensors file)")
    tensors = Tensors(path)
    layout = detect_layout(tensors.keys())
    if layout.startswith("diffusers"):
        if layout != KIND[component][0]:
            raise CheckpointError(f"{path}: expected {component} weights, found {layout} keys")
        return View(tensors), _read_json(path.parent / "config.json"), "diffusers"
    prefix = PREFIX[component] if layout == "sdxl-single-file" else ""
    if layout == "sd-single-file":  # SD 1.x / 2.x: one text encoder, under one of two names
        clip = SD2_CLIP_PREFIX if any(k.startswith(SD2_CLIP_PREFIX) for k in tensors.keys()) else SD_CLIP_PREFIX
        prefix = {**SD_PREFIX, "text_encoder": clip}.get(component, "-")
    view = View(tensors, prefix)
    if not view.keys():
        raise CheckpointError(f"{path} holds no {component} (its keys look like {layout})")
    return view, None, layout


# ---------------------------------------------------------------------------------------------------- loaders
def load_unet(path, dtype=None, device="cpu"):
    """The UNet of a diffusers folder (pipeline or unet/), a diffusers unet file, or an original single file."""
    view, config, layout = _locate(path, "unet", dtype)
    if layout == "diffusers":
        config, (plan, unknown) = UNetConfig.from_diffusers(config), convert_keys(view.keys(), "diffusers")
    elif layout in ("sdxl-single-file", "sd-single-file", "ldm-unet"):
        proj = CLIP_G_PREFIX + "text_projection"
        pooled = view.tensors.shape(proj)[1] if proj in view.tensors.where else None
        config = infer_unet_config(view, pooled)
        plan, unknown = convert_keys(view.keys(), "ldm-unet", config)
    else:
        raise CheckpointError(f"{path}: expected UNet weights, found a {layout} layout")
    return fill(on_meta(lambda: UNet(config)), plan, view, dtype, device, f"unet ({path})", unknown)


def load_vae(path, dtype=None, device="cpu"):
    """The AutoencoderKL of a diffusers folder (pipeline or vae/), a diffusers vae file, an ldm-layout VAE file
    (e.g. sdxl_vae.safetensors) or an original single file."""
    view, config, layout = _locate(path, "vae", dtype)
    if layout == "diffusers":
        config, (plan, unknown) = VAEConfig.from_diffusers(config), convert_keys(view.keys(), "diffusers")
    elif layout in ("sdxl-single-file", "sd-single-file", "ldm-vae"):
        config = infer_vae_config(view, sdxl=layout != "sd-single-file")
        plan, unknown = convert_keys(view.keys(), "ldm-vae", n_levels=len(config.block_out_channels))
    else:
        raise CheckpointError(f"{path}: expected VAE weights, found a {layout} layout")
    return fill(on_meta(lambda: AutoencoderKL(config)), plan, view, dtype, device, f"vae ({path})", unknown)


def load_text_encoder(path, component="text_encoder", dtype=None, device="cpu"):
    """CLIP-L (`text_encoder`, transformers CLIPTextModel) or bigG (`text_encoder_2`, CLIPTextModelWithProjection)
    from a diffusers folder or an original single file (bigG converted from open_clip names)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    view, config, layout = _locate(path, component, dtype)
    if layout == "diffusers":
        plan, unknown = convert_keys(view.keys(), "diffusers")
        config = CLIPTextConfig.from_dict(config)
    else:  # bigG, and SD 2.x's ViT-H, carry open_clip names
        open_clip = component == "text_encoder_2" or view.prefix == SD2_CLIP_PREFIX
        plan, unknown = convert_keys(view.keys(), "open-clip" if open_clip else "diffusers")
        if cls is CLIPTextModel:
            plan.pop("text_projection.weight", None)  # SD 2.x's OpenCLIP projection: unused by its context
        config = infer_clip_config(plan, view, "gelu" if open_clip else "quick_gelu")
    model = on_meta(lambda: cls(config))
    plan = {text_model_level(k, bare=not hasattr(model, "text_model")): v for k, v in plan.items()}
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


def model_family(path) -> str:
    """'sdxl' (two text encoders, size ids) or 'sd' (SD 1.x / 2.x: one text encoder) for a folder or single file;
    any other diffusers pipeline is a one-line error."""
    path = Path(path)
    if path.is_file():
        return "sd" if detect_layout(Tensors(path).keys()) == "sd-single-file" else "sdxl"
    kind = _read_json(path / "model_index.json").get("_class_name", "") if (path / "model_index.json").is_file() else ""
    if kind.startswith("StableDiffusionXL"):
        return "sdxl"
    if kind.startswith("StableDiffusion") and not kind.startswith("StableDiffusion3"):
        return "sd"
    if kind:
        raise CheckpointError(
            f"{path} holds a {kind}; minidiff loads StableDiffusionXLPipeline and "
            "StableDiffusionPipeline (SD 1.x / 2.x) folders"
        )
    return "sd" if (path / "text_encoder").is_dir() and not (path / "text_encoder_2").is_dir() else "sdxl"


def load_text(path, dtype=None, device="cpu", tokenizers=None):
    """TextConditioner: both encoders from `path`, tokenizers from `tokenizers` (a folder holding tokenizer/ and
    tokenizer_2/) or from `path` when it is a diffusers folder. An SD 1.x / 2.x model: SDTextConditioner, one encoder
    and tokenizer/ alone (the penultimate layer for an original SD 2.x file, text_sd.py)."""
    from ..text_sd import SDTextConditioner

    sd = model_family(path) == "sd"
    tok_dir, want = Path(tokenizers) if tokenizers else Path(path), "tokenizer/" + ("" if sd else " and tokenizer_2/")
    if not (tok_dir / "tokenizer").is_dir() or not (sd or (tok_dir / "tokenizer_2").is_dir()):
        if Path(path).is_file() and not tokenizers:
            raise CheckpointError(
                f"{path} is a single file, which carries no tokenizer: pass tokenizers=DIR "
                f"(sample.py --tokenizers DIR), a folder holding {want} (as in the diffusers repo "
                + ("runwayml/stable-diffusion-v1-5)" if sd else "stabilityai/stable-diffusion-xl-base-1.0)")
            )
        raise CheckpointError(f"{tok_dir} has no {want} folder(s)")
    if sd:
        open_clip = Path(path).is_file() and any(k.startswith(SD2_CLIP_PREFIX) for k in Tensors(path).keys())
        return SDTextConditioner(
            load_tokenizer(tok_dir / "tokenizer"),
            load_text_encoder(path, "text_encoder", dtype, device),
            layer=-2 if open_clip else -1,
        )
    encoders = [load_text_encoder(path, c, dtype, device) for c in ("text_encoder", "text_encoder_2")]
    return TextConditioner(
        load_tokenizer(tok_dir / "tokenizer"), encoders[0], load_tokenizer(tok_dir / "tokenizer_2"), encoders[1]
    )


def schedule_from_config(config: dict):
    """The training noise schedule of `scheduler/scheduler_config.json` (diffusers keys; missing ones = SDXL's),
    rescaled to zero terminal SNR when `rescale_betas_zero_snr` is true (Schedule.zero_terminal_snr)."""
    c = {**SDXL_SCHEDULER, **config}
    if c["prediction_type"] not in PREDICTIONS:
        raise CheckpointError(
            f"scheduler: prediction_type {c['prediction_type']!r} is not supported "
            f"(expected one of {', '.join(PREDICTIONS)})"
        )
    T, kind = c["num_train_timesteps"], c["beta_schedule"]
    if kind in ("scaled_linear", "linear"):
        schedule = getattr(Schedule, kind)(T, c["beta_start"], c["beta_end"])
    elif kind == "squaredcos_cap_v2":
        schedule = Schedule.cosine(T)
    else:
        raise CheckpointError(
            f"scheduler: beta_schedule {kind!r} is not one of scaled_linear, linear, squaredcos_cap_v2"
        )
    return schedule.zero_terminal_snr() if c.get("rescale_betas_zero_snr") else schedule


def load_pipeline(path, dtype=None, device="cpu", vae=None, tokenizers=None, unet=None):
    """A whole Pipeline from a diffusers folder or an original single file (+ tokenizers=DIR). `vae` replaces the
    VAE (a folder or file, e.g. the fp16-fix VAE), `unet` the UNet (e.g. a full fine-tune's OUT/unet). The VAE runs in float32 unless its config says it is fp16-safe
    (force_upcast false) or dtype is bfloat16. A folder without vae/ whose UNet takes RGB is pixel space."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such model folder or file: {path}")
    model_family(path)  # another kind of pipeline: say so before reading any weights
    unet = load_unet(unet or path, dtype, device)
    vae_model = None
    if vae or path.is_file() or (path / "vae").is_dir() or unet.config.in_channels != 3:
        vae_model = load_vae(vae or path, torch.float32 if dtype in (None, torch.float16) else dtype, device)
        if dtype == torch.float16 and not getattr(vae_model.config, "force_upcast", True):
            vae_model.to(dtype)  # an fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix says force_upcast false)
    scheduler = dict(SDXL_SCHEDULER)
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler.update(_read_json(path / "scheduler" / "scheduler_config.json"))
    return Pipeline(
        unet=unet,
        vae=vae_model,
        text=load_text(path, dtype, device, tokenizers),
        schedule=schedule_from_config(scheduler),
        name=path.stem if path.is_file() else path.name,
        scheduler_config=scheduler,
    )


# ------------------------------------------------------------------------------------------------------ saving
def save_pipeline(pipe, out_dir) -> Path:
    """Write `pipe` as a diffusers folder (model_index.json, unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/
    tokenizer_2/ scheduler/ with their configs; safetensors, each file atomic) that load_pipeline and diffusers'
    StableDiffusionXLPipeline.from_pretrained both read (StableDiffusionPipeline for an SD 1.x / 2.x pipeline: no
    text_encoder_2/ tokenizer_2/). A pixel-space pipeline (vae None) writes no vae/."""
    out, sdxl = Path(out_dir), pipe.text.text_encoder_2 is not None
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    if not sdxl:
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        }
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae)):
        cls = "UNet2DConditionModel" if name == "unet" else "AutoencoderKL"
        index[name] = ["diffusers", cls] if module is not None else [None, None]
        if module is not None:
            io.write_json({**module.config.to_diffusers(), "_class_name": cls}, out / name / "config.json")
            io.save_safetensors(module.state_dict(), out / name / "diffusion_pytorch_model.safetensors")
    text = pipe.text
    for suffix, tok, te in (("", text.tokenizer, text.text_encoder), ("_2", text.tokenizer_2, text.text_encoder_2)):
        if te is None:
            continue
        state = {text_model_level(k, bare=False): v for k, v in te.state_dict().items()}  # files keep `text_model.`
        io.write_json(
            {**te.config.to_dict(), "architectures": [type(te).__name__]}, out / f"text_encoder{suffix}" / "config.json"
        )
        io.save_safetensors(state, out / f"text_encoder{suffix}" / "model.safetensors")
        with io.atomic(out / f"tokenizer{suffix}") as tmp:
            tok.save_pretrained(str(tmp))
        index[f"text_encoder{suffix}"] = ["transformers", type(te).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    io.write_json({**SDXL_SCHEDULER, **pipe.scheduler_config}, out / "scheduler" / "scheduler_config.json")
    io.write_json(index, out / "model_index.json")
    return out
