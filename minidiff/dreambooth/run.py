"""One run of `python finetune.py`, in the order it happens:

    1. checks that need no model: memory for --resolution, the checkpoint's settings, images, class images, OUT/
    2. the frozen pipeline (weights.pretrained.load_pipeline), its memory plan
    3. class images from the base model (the missing ones); every image and caption encoded once (job.py)
    4. what trains (job.make_trainable), printed as a table before it does
    5. train (loop.py): LoRA files every --save-every steps, grids every --validate-every steps
    6. the result (LoRA / embedding / UNet files), a last grid, manifest.json

finetune.py turns flags into a `FinetuneConfig` and calls `finetune`; the flags' defaults and help live there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data, io, run_folder
from ..bundled import tiny
from ..eval import audit
from ..train import ddp, hardware, memory_plan, resume, state
from ..weights import pretrained
from ..weights.model_folder import complete_model_folder
from .class_images import check_class_images
from .job import Job, make_trainable, save_unet
from .loop import TrainConfig, train

# what a checkpoint must share with the run that resumes it (minidiff/train/resume.py: changes are refused, listed);
# --steps, the output, validation, device and precision flags may change, and so may the number of processes as
# long as the global batch (--batch-size x processes) stays the same
RESUME_KEYS = (
    "instance_dir",
    "instance_prompt",
    "class_prompt",
    "num_class_images",
    "prior_weight",
    "no_prior",
    "resolution",
    "fit",
    "train",
    "rank",
    "alpha",
    "targets",
    "train_text_encoder",
    "lr",
    "global_batch_size",
    "grad_accum",
    "lr_schedule",
    "warmup",
    "seed",
    "min_snr_gamma",
    "noise_offset",
    "caption_dropout",
)


@dataclass
class FinetuneConfig:
    """finetune.py's flags, one field each (see `python finetune.py --help`); `lr` and `validation_prompt` arrive
    resolved (finetune.default_lr, finetune.default_validation_prompts) and `argv` is the command line."""

    # model and data
    model: str
    vae: str | None
    instance_dir: str | None
    instance_prompt: str
    class_prompt: str
    class_dir: str | None
    num_class_images: int
    class_steps: int
    class_batch_size: int
    prior_weight: float
    no_prior: bool
    no_generate: bool
    resolution: int | None
    fit: str
    buckets: bool
    bucket_step: int | None
    # what trains
    train: str
    rank: int
    alpha: float | None
    targets: str
    train_text_encoder: bool
    lora_dropout: float
    rank_dropout: float
    module_dropout: float
    train_ti: bool
    ti_token: str
    ti_vectors: int
    ti_init: str | None
    ti_lr: float
    # optimization
    steps: int
    epochs: int | None
    lr: float
    text_encoder_lr: float | None
    optimizer: str
    batch_size: int
    grad_accum: int
    lr_schedule: str
    warmup: int
    seed: int
    min_snr_gamma: float | None
    noise_offset: float
    caption_dropout: float
    mixed_precision: str
    gradient_checkpointing: bool
    base_precision: str | None
    low_memory: bool
    # validation, saving, resuming
    validation_prompt: list
    validate_every: int
    validation_images: int
    validation_steps: int
    save_every: int
    resume: str | None
    out: str
    format: str
    save_precision: str
    device: str | None
    argv: list = dataclasses.field(default_factory=list)


def model_geometry(model, vae=None):
    """(native size, channels of the UNet's first level, pixels per latent cell) of a diffusers folder: the size it
    was trained at is sample_size x the VAE's downscale (1 in pixel space). A single file: SDXL's (1024, 320, 8)."""
    try:
        unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    except (OSError, ValueError):  # a single-file checkpoint: SD 1.x / 2.x at 512, SDXL at 1024
        return (512, 320, 8) if Path(model).is_file() and pretrained.model_family(model) == "sd" else (1024, 320, 8)
    vae_cfg = Path(vae) / "config.json" if vae else Path(model) / "vae" / "config.json"
    try:
        scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError):
        scale = 8 if vae else 1
    channels = (unet.get("block_out_channels") or [320])[0]
    return int(unet.get("sample_size") or 128) * scale, int(channels), scale


def check_memory(cfg, size, device):
    """Refuse a --resolution whose smallest possible footprint does not fit, before anything is allocated: the
    decoded images (uint8, 3 x S^2 each, instance and class) in RAM, and the first UNet level's activations that
    the backward pass keeps (>= 10 fp32 tensors of rows x C x (S / scale)^2) on the device. Both are lower bounds."""
    native, channels, scale = model_geometry(cfg.model, cfg.vae)
    prior = not cfg.no_prior
    images = (1 + (cfg.num_class_images if prior else 0)) * 3 * size**2
    rows = cfg.batch_size * (2 if prior else 1)
    activations = 10 * rows * channels * (size // scale) ** 2 * 4
    hint = f"--resolution {size} is too large; the model's native size is {native}"
    hardware.check_fits(images, "cpu", "the decoded training images", hint)
    hardware.check_fits(activations, device, "the first UNet level's activations", hint)


def dtype_name(dtype):
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def finetune(cfg: FinetuneConfig, ctx=None):
    """Check, load, make class images, cache, train, save: returns the manifest dict (also in OUT/manifest.json).
    Under torchrun (`ctx` from minidiff.train.ddp.init) every process trains; only process 0 prints and writes
    files (other processes write only their share of the class images) and only it returns the manifest."""
    t0, timings = time.perf_counter(), {}
    out, prior, lr = Path(cfg.out), not cfg.no_prior, cfg.lr
    if ctx is None:
        ctx = ddp.Context(device=hardware.resolve_device(cfg.device))
    device = ctx.device
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # one copy of every message
    if device.type == "cuda":
        hardware.check_gpu(device)
    autocast_dtype, use_scaler = hardware.resolve_precision(cfg.mixed_precision, device)
    peaks = hardware.PeakMemory(device)  # peak memory of each phase, into the manifest (docs/performance.md)

    # 1. what can be checked before loading the model: images, class images, the checkpoint, the output folder
    size = cfg.resolution or model_geometry(cfg.model, cfg.vae)[0]
    check_memory(cfg, size, device)
    run_settings = {k: getattr(cfg, k, None) for k in RESUME_KEYS} | {
        "lr": lr,
        "resolution": size,
        "global_batch_size": cfg.batch_size * ctx.world_size,
    }
    if cfg.resume is not None:
        file, _, extra = state.checkpoint_extra(cfg.resume, out)
        resume.check_settings(extra.get("settings", {}), run_settings, RESUME_KEYS, file)
    buckets = data.bucket_sizes(size, cfg.bucket_step or (64 if size >= 512 else 8)) if cfg.buckets else None
    instance_set = data.ImageFolder(cfg.instance_dir or data.instance_images(), size, fit=cfg.fit, buckets=buckets)
    if not cfg.instance_dir:  # the bundled drawings, captioned with their action as an artist would caption them
        instance_set.captions = tiny.instance_captions(cfg.instance_prompt, instance_set.paths)
    if cfg.epochs:  # an epoch: every instance row (repeats counted) once, in optimizer steps
        rows_per_step = cfg.batch_size * cfg.grad_accum * ctx.world_size
        cfg.steps = cfg.epochs * -(-len(instance_set.index) // rows_per_step)
        print(f"{cfg.epochs} epoch(s) of {len(instance_set.index)} instance rows = {cfg.steps} steps")
    class_dir = Path(cfg.class_dir) if cfg.class_dir else out / "class-images"
    if prior and ctx.is_main:  # (it probes the folder with a test file: one process at a time)
        check_class_images(class_dir, cfg.num_class_images, can_generate=not cfg.no_generate)
    lock = run_folder.claim(out, also=[class_dir]) if ctx.is_main else None  # noqa: F841 (held until run returns)
    state.seed_all(cfg.seed)

    # 2. the model: frozen weights in the autocast dtype (LoRA), fp32 where they train (full) and in the VAE
    frozen_dtype = autocast_dtype if cfg.train == "lora" and autocast_dtype is not None else torch.float32
    print(f"loading {cfg.model} on {device} ({str(frozen_dtype).removeprefix('torch.')} weights)")
    pipe = pretrained.load_pipeline(cfg.model, dtype=frozen_dtype, device=device, vae=cfg.vae)
    cfg.gradient_checkpointing |= cfg.low_memory
    memory = memory_plan.prepare(
        pipe,
        memory_plan.Job(
            cfg.train,
            latent=size // pipe.scale,
            batch=cfg.batch_size * (1 + prior),
            precision=dtype_name(frozen_dtype),
            base_precision=cfg.base_precision or dtype_name(frozen_dtype),
            rank=cfg.rank,
            targets=cfg.targets,
            checkpointing=cfg.gradient_checkpointing,
            train_text_encoder=cfg.train_text_encoder,
        ),
        device,
        cfg.low_memory,
    )
    pipe.unet.requires_grad_(False)
    pipe.text.requires_grad_(False)
    if pipe.vae is not None:
        pipe.vae.requires_grad_(False).float()
    job = Job(cfg, pipe, device, autocast_dtype, size, lr, out, ctx)
    timings["load_s"] = time.perf_counter() - t0
    peaks.end("load")

    # 3. class images from the base model (the missing ones), then every image and caption encoded once
    t = time.perf_counter()
    klass_set = job.class_images(class_dir) if prior else None
    timings["class_images_s"] = time.perf_counter() - t
    peaks.end("class_images")
    t = time.perf_counter()
    job.cache(instance_set, klass_set)
    timings["cache_s"] = time.perf_counter() - t
    peaks.end("cache")

    # 4. what trains, printed before it does
    job.models, params, job.ti_tables = make_trainable(cfg, pipe, lr)
    ddp.broadcast_parameters([p for g in params for p in g["params"]], ctx)  # same seed: cheap insurance
    everything = pipe.modules()  # unet and the one (SD 1.x / 2.x) or two (SDXL) text encoders
    if pipe.vae is not None:
        everything["vae"] = pipe.vae
    table = audit.trainable_table(everything)
    print(audit.format_table(table))

    # 5. train: LoRA files every --save-every steps, grids every --validate-every steps
    knobs = TrainConfig(
        steps=cfg.steps,
        lr=lr,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        lr_schedule=cfg.lr_schedule,
        warmup=cfg.warmup,
        prior_weight=cfg.prior_weight,
        min_snr_gamma=cfg.min_snr_gamma,
        noise_offset=cfg.noise_offset,
        caption_dropout=cfg.caption_dropout,
        prediction_type=job.prediction_type,
        optimizer=cfg.optimizer,
        save_every=cfg.save_every,
        validate_every=cfg.validate_every,
    )
    primary = "diffusers" if cfg.format == "diffusers" else "kohya"
    on_save = None if cfg.train == "full" else peaks.around("save", lambda step: job.save_step(step, primary))
    on_validate = peaks.around("validation", lambda step: job.validate(f"step-{step:06d}"))
    peaks.end("setup")
    result = train(
        unet=pipe.unet,
        params=params,
        schedule=pipe.schedule,
        instance=job.instance,
        klass=job.klass,
        embed=job.embed,
        cfg=knobs,
        out_dir=out,
        modules={name: state.Trainable(m) for name, m in job.models.items()},
        autocast_dtype=autocast_dtype,
        use_scaler=use_scaler,
        resume=cfg.resume,
        on_save=on_save,
        on_validate=on_validate,
        ctx=ctx,
        settings=run_settings,
    )
    peaks.end("train")
    if not ctx.is_main:
        return None
    timings.update(train_s=result["seconds"], s_per_step=result["s_per_step"])
    job.files += [str(out / "loss.csv"), str(out / "loss.png")]

    # 6. the result, a last grid, the manifest
    t = time.perf_counter()
    if cfg.train == "full":  # the run folder becomes a whole model: unet/ + the base's frozen parts linked in
        job.files += [str(p) for p in save_unet(pipe.unet, out / "unet")]
        job.files += complete_model_folder(out, cfg.model, pipe, cfg.vae)
    for fmt, name in (("kohya", "lora.safetensors"), ("diffusers", "pytorch_lora_weights.safetensors")):
        if cfg.train == "lora" and cfg.format in (fmt, "both"):
            job.save_lora(out / name, fmt, cfg.steps)
    if job.ti_tables:  # the token's vectors, A1111 SDXL layout: OUT/sks.safetensors
        job.save_embedding(out / f"{cfg.ti_token}.safetensors")
    timings["save_s"] = time.perf_counter() - t
    peaks.end("save")
    t = time.perf_counter()
    job.validate("final")
    timings["validation_s"] = time.perf_counter() - t
    peaks.end("validation")
    timings["total_s"] = time.perf_counter() - t0
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "argv"}
    settings.update(
        lr=lr,
        resolution=size,
        prediction_type=job.prediction_type,
        device=str(device),
        precision=str(autocast_dtype or "fp32").removeprefix("torch."),
        grad_scaler=use_scaler,
        processes=ctx.world_size,
        global_batch_size=cfg.batch_size * ctx.world_size,
        class_dir=str(class_dir) if prior else None,
    )
    manifest = {
        "command": "python finetune.py " + shlex.join(cfg.argv),
        "settings": settings,
        "model": {"path": str(cfg.model), "hash": job.base_hash},
        "data": {
            "instance_images": job.instance.paths,
            "captions": job.instance.captions,
            "hash": job.data_hash,
            "class_images": job.klass.paths if prior else [],
        },
        "trainable": table,
        "files": sorted(set(job.files)),
        "timings": timings,
        "peak_memory_gib": {"of": peaks.what, **peaks.gib},
        "final_loss": result["loss"],
        "resumed_from_step": result["resumed_from"],
        "memory_plan": memory,
    }
    io.write_json(manifest, out / "manifest.json")
    print(f"done in {timings['total_s']:.1f}s ({timings['s_per_step']:.3f} s/step); wrote {out}")
    if peaks.gib:
        print(f"peak {peaks.what} by phase, GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.gib.items()))
    return manifest
