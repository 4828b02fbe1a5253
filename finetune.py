#!/usr/bin/env python
"""Teach a diffusion model a subject from a few images: DreamBooth with prior preservation, as a LoRA or full UNet.

    python finetune.py                      # the bundled miniature SDXL, the six Kenney drawings, "sks girl"
    python finetune.py --model sdxl-base/ --vae sdxl-vae-fp16-fix/ --instance-dir drawings/ \
        --instance-prompt "a picture of sks girl" --class-prompt "a picture of a girl" \
        --steps 1000 --rank 8 --gradient-checkpointing --validation-prompt "a picture of sks girl riding a bike" \
        --validate-every 250 --save-every 100
    python finetune.py --instance-dir captioned_style/ --no-prior --caption-dropout 0.1    # a style LoRA
    torchrun --nproc_per_node 2 finetune.py ...same flags...      # two GPUs: --batch-size per GPU (docs/kaggle.md)

Writes to --out: lora.safetensors (kohya names + alpha: loads in ComfyUI, A1111 and diffusers) and/or
pytorch_lora_weights.safetensors (diffusers names), lora-step-XXXXXX.safetensors every --save-every steps with a
resumable checkpoints/step-XXXXXX.safetensors, loss.csv + loss.png, samples/*.png validation grids and
manifest.json (settings, what trained, files, timings). `--train full` writes unet/ (diffusers layout) instead,
and links the base's frozen parts next to it: OUT is then a model folder (`sample.py --model OUT`).
The loop itself lives in minidiff/dreambooth.py; this file parses flags, loads, caches, and writes files.
"""

import hashlib
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from minidiff.cli import ArgumentParser as Parser

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "minidiff" / "assets" / "tiny-sdxl"
# what a checkpoint must share with the run that resumes it (minidiff/train/resume.py: changes are refused, listed);
# --steps, the output, validation, device and precision flags may change, and so may the number of processes as
# long as the global batch (--batch-size x processes) stays the same
RESUME_KEYS = ("instance_dir", "instance_prompt", "class_prompt", "num_class_images", "prior_weight", "no_prior",
               "resolution", "fit", "train", "rank", "alpha", "targets", "train_text_encoder", "lr",
               "global_batch_size", "grad_accum", "lr_schedule", "warmup", "seed", "min_snr_gamma", "noise_offset",
               "caption_dropout")


def build_parser():
    p = Parser(prog=Path(__file__).name,
               description="DreamBooth fine-tuning (LoRA or full UNet) with prior preservation.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers SDXL folder or single .safetensors file "
                   "(default: the bundled miniature, minidiff/assets/tiny-sdxl)")
    g.add_argument("--vae", default=None, help="VAE to use instead of the model's (e.g. the SDXL fp16-fix VAE)")
    g.add_argument("--instance-dir", default=None, help="instance images; sidecar .txt/.caption captions and kohya "
                   "'N_trigger class' folders are read (default: the six bundled Kenney drawings)")
    g.add_argument("--instance-prompt", default="a picture of sks girl", help="caption of images that have none")
    g.add_argument("--class-prompt", default="a picture of a girl")
    g.add_argument("--class-dir", default=None, help="class images; missing ones are generated here "
                   "(default: OUT/class-images)")
    g.add_argument("--num-class-images", type=int, default=100)
    g.add_argument("--class-steps", type=int, default=30, help="sampler steps per generated class image")
    g.add_argument("--class-batch-size", type=int, default=4)
    g.add_argument("--prior-weight", type=float, default=1.0, help="lambda of the prior-preservation loss")
    g.add_argument("--no-prior", action="store_true", help="train on the instance images only")
    g.add_argument("--no-generate", action="store_true", help="never generate class images (use what is there)")
    g.add_argument("--resolution", type=int, default=None, help="training size (default: the model's native size)")
    g.add_argument("--fit", choices=("pad", "crop"), default="pad", help="square images by padding or center crop")
    g.add_argument("--buckets", action="store_true", help="aspect-ratio bucketing: each image at the bucket of about "
                   "resolution^2 pixels nearest its shape, batches from one bucket (kohya enable_bucket)")
    g.add_argument("--bucket-step", type=int, default=None, help="bucket sides are multiples of this (default: 64 "
                   "from 512 px up, else 8)")
    g = p.add_argument_group("what trains")
    g.add_argument("--train", choices=("lora", "full", "ti"), default="lora",
                   help="full = classic DreamBooth UNet fine-tune; ti = textual inversion (a new token's vectors only)")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    g.add_argument("--targets", choices=("attn", "attn-ff", "all-linear"), default="attn")
    g.add_argument("--train-text-encoder", action="store_true", help="LoRA on both text encoders' attention too")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (kohya network_dropout)")
    g.add_argument("--rank-dropout", type=float, default=0.0, help="drop each rank of A x per sample (kohya)")
    g.add_argument("--module-dropout", type=float, default=0.0, help="skip each adapter per forward (kohya)")
    g.add_argument("--train-ti", action="store_true", help="with --train lora: also learn --ti-token's vectors "
                   "(pivotal tuning)")
    g.add_argument("--ti-token", default="sks", help="the new token textual inversion learns; it must appear in the "
                   "captions (default 'sks', as in the default --instance-prompt)")
    g.add_argument("--ti-vectors", type=int, default=1, help="vectors per text encoder for the new token")
    g.add_argument("--ti-init", default=None, help="word whose embedding starts the vectors (default: the last word "
                   "of --class-prompt)")
    g.add_argument("--ti-lr", type=float, default=5e-3, help="learning rate of the token vectors")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--epochs", type=int, default=None, help="train this many passes over the instance images "
                   "(each counted as often as its kohya 'N_' folder repeats it) instead of --steps")
    g.add_argument("--lr", type=float, default=None, help="default 1e-4 for LoRA, 5e-6 for --train full (SDXL); "
                   "1e-3 and 1e-4 for the bundled miniature")
    g.add_argument("--text-encoder-lr", type=float, default=None, help="learning rate of text-encoder LoRA "
                   "(default: --lr; kohya's text_encoder_lr)")
    g.add_argument("--optimizer", choices=("adamw", "adafactor", "sgd"), default="adamw", help="torch's own "
                   "optimizers (8-bit AdamW would need bitsandbytes, which minidiff does not depend on)")
    g.add_argument("--batch-size", type=int, default=1, help="instance images per step (as many class images again)")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default="constant")
    g.add_argument("--warmup", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR loss weighting (5 is usual)")
    g.add_argument("--noise-offset", type=float, default=0.0)
    g.add_argument("--caption-dropout", type=float, default=0.0, help="probability of training a row uncaptioned")
    g.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--base-precision", choices=("fp16", "bf16", "fp8"), default=None,
                   help="how the frozen UNet is stored (default: the mixed precision's dtype); fp8: e4m3, cast up per "
                   "layer at use (LoRA only)")
    g.add_argument("--low-memory", action="store_true", help="simulate the step first and pick what fits the "
                   "detected card: checkpointing, then fp8 base weights (docs/memory-budget.md)")
    g = p.add_argument_group("validation, saving, resuming")
    g.add_argument("--validation-prompt", action="append", default=None,
                   help="repeatable (default: the instance prompt); a grid is written at the end")
    g.add_argument("--validate-every", type=int, default=0, help="also write a grid every N steps")
    g.add_argument("--validation-images", type=int, default=4, help="images per validation prompt (0: none)")
    g.add_argument("--validation-steps", type=int, default=30)
    g.add_argument("--save-every", type=int, default=0, help="write lora-step-XXXXXX + a resumable checkpoint")
    g.add_argument("--resume", default=None, help="a checkpoint file, an output folder, or 'latest' (in --out)")
    g.add_argument("--out", default="runs/finetune")
    g.add_argument("--format", choices=("kohya", "diffusers", "both"), default="kohya")
    g.add_argument("--save-precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the saved LoRA and embedding files")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    return p


def check_args(args):
    """User errors we can see before loading anything: one line each."""
    from minidiff.errors import MinidiffError

    positive = {"--steps": args.steps, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
                "--class-steps": args.class_steps, "--class-batch-size": args.class_batch_size,
                "--validation-steps": args.validation_steps}
    if args.train == "lora":
        positive["--rank"] = args.rank
    for flag, v in positive.items():
        if v <= 0:
            raise MinidiffError(f"{flag} must be a positive integer, got {v}")
    for flag, v in {"--num-class-images": args.num_class_images, "--warmup": args.warmup,
                    "--save-every": args.save_every, "--validate-every": args.validate_every,
                    "--validation-images": args.validation_images, "--prior-weight": args.prior_weight,
                    "--noise-offset": args.noise_offset}.items():
        if v < 0:
            raise MinidiffError(f"{flag} must be >= 0, got {v}")
    if args.alpha is not None and args.alpha <= 0:
        raise MinidiffError(f"--alpha must be positive, got {args.alpha}")
    if args.lr is not None and not args.lr > 0:
        raise MinidiffError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise MinidiffError(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    if args.min_snr_gamma is not None and args.min_snr_gamma <= 0:
        raise MinidiffError(f"--min-snr-gamma must be positive, got {args.min_snr_gamma}")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise MinidiffError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.train != "lora" and args.base_precision == "fp8":
        raise MinidiffError("--base-precision fp8 stores frozen weights: use it with --train lora")
    if args.train != "lora" and (args.train_text_encoder or args.train_ti):
        raise MinidiffError("--train-text-encoder and --train-ti go with --train lora (--train ti learns the token alone)")
    if (args.train == "ti" or args.train_ti) and not args.instance_dir and args.ti_token not in args.instance_prompt:
        raise MinidiffError(f"--ti-token {args.ti_token!r} is not in --instance-prompt {args.instance_prompt!r}")
    if args.ti_vectors <= 0 or args.ti_lr <= 0:
        raise MinidiffError("--ti-vectors and --ti-lr must be positive")
    if not all(0 <= p < 1 for p in (args.lora_dropout, args.rank_dropout, args.module_dropout)):
        raise MinidiffError("--lora-dropout, --rank-dropout and --module-dropout must be in [0, 1)")
    if args.epochs is not None and args.epochs <= 0 or args.bucket_step is not None and args.bucket_step % 8:
        raise MinidiffError("--epochs must be positive and --bucket-step a positive multiple of 8")
    if args.text_encoder_lr is not None and args.text_encoder_lr <= 0:
        raise MinidiffError(f"--text-encoder-lr must be positive, got {args.text_encoder_lr}")
    if not args.no_prior and args.num_class_images == 0:
        raise MinidiffError("prior preservation needs --num-class-images > 0 (or pass --no-prior)")
    if not Path(args.model).exists():
        hint = " (the bundled miniature is not built yet: pass --model with an SDXL folder or file)" \
            if Path(args.model) == DEFAULT_MODEL else ""
        raise MinidiffError(f"model not found: {args.model}{hint}")


def model_geometry(model, vae=None):
    """(native size, channels of the UNet's first level, pixels per latent cell) of a diffusers folder: the size it
    was trained at is sample_size x the VAE's downscale (1 in pixel space). A single file: SDXL's (1024, 320, 8)."""
    try:
        unet = json.loads((Path(model) / "unet" / "config.json").read_text())
    except (OSError, ValueError):  # a single-file checkpoint: SD 1.x / 2.x at 512, SDXL at 1024
        from minidiff.weights.pretrained import model_family

        return (512, 320, 8) if Path(model).is_file() and model_family(model) == "sd" else (1024, 320, 8)
    vae_cfg = Path(vae) / "config.json" if vae else Path(model) / "vae" / "config.json"
    try:
        scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError):
        scale = 8 if vae else 1
    channels = (unet.get("block_out_channels") or [320])[0]
    return int(unet.get("sample_size") or 128) * scale, int(channels), scale


def check_memory(args, size, device):
    """Refuse a --resolution whose smallest possible footprint does not fit, before anything is allocated: the
    decoded images (uint8, 3 x S^2 each, instance and class) in RAM, and the first UNet level's activations that
    the backward pass keeps (>= 10 fp32 tensors of rows x C x (S / scale)^2) on the device. Both are lower bounds."""
    from minidiff.train import hardware

    native, channels, scale = model_geometry(args.model, args.vae)
    prior = not args.no_prior
    images = (1 + (args.num_class_images if prior else 0)) * 3 * size**2
    rows = args.batch_size * (2 if prior else 1)
    activations = 10 * rows * channels * (size // scale) ** 2 * 4
    hint = f"--resolution {size} is too large; the model's native size is {native}"
    hardware.check_fits(images, "cpu", "the decoded training images", hint)
    hardware.check_fits(activations, device, "the first UNet level's activations", hint)


def model_hash(path):
    """sha256 of a single-file model, or of the UNet weight files of a diffusers folder (the part a LoRA fits)."""
    from minidiff.weights.pretrained import file_hash

    path = Path(path)
    if path.is_file():
        return file_hash(path)
    files = sorted((path / "unet").glob("*.safetensors")) or sorted(path.glob("*.safetensors"))
    files = [f for f in files if ".fp16." not in f.name] or files
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_hash(f)}\n".encode())
    return h.hexdigest()


def dataset_hash(examples):
    """sha256 over the instance images' bytes and captions: which data a LoRA was trained on."""
    h = hashlib.sha256()
    for path, caption in sorted(zip(examples.paths, examples.captions)):
        h.update(hashlib.sha256(Path(path).read_bytes()).hexdigest().encode() + caption.encode() + b"\n")
    return h.hexdigest()


def run(args, ctx=None):
    """Check, load, make class images, cache, train, save: returns the manifest dict (also in OUT/manifest.json).
    Under torchrun (`ctx` from minidiff.train.ddp.init) every process trains; only process 0 prints and writes
    files (other processes write only their share of the class images) and only it returns the manifest."""
    from minidiff import data, io, run_folder
    from minidiff.bundled import tiny
    from minidiff.eval import audit
    from minidiff.train import ddp, hardware, memory_plan, resume, state
    from minidiff.weights import pretrained
    from minidiff import dreambooth as db

    t0, timings = time.perf_counter(), {}
    out, prior = Path(args.out), not args.no_prior
    if ctx is None:
        ctx = ddp.Context(device=hardware.resolve_device(args.device))
    device = ctx.device
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # one copy of every message
    if device.type == "cuda":
        hardware.check_gpu(device)
    autocast_dtype, use_scaler = hardware.resolve_precision(args.mixed_precision, device)
    peaks = hardware.PeakMemory(device)  # peak memory of each phase, into the manifest (docs/performance.md)
    lr = args.lr or default_lr(args)

    # 1. what can be checked before loading the model: images, class images, the checkpoint, the output folder
    size = args.resolution or model_geometry(args.model, args.vae)[0]
    check_memory(args, size, device)
    run_settings = {k: getattr(args, k, None) for k in RESUME_KEYS} | {
        "lr": lr, "resolution": size, "global_batch_size": args.batch_size * ctx.world_size}
    if args.resume is not None:
        file, _, extra = state.checkpoint_extra(args.resume, out)
        resume.check_settings(extra.get("settings", {}), run_settings, RESUME_KEYS, file)
    buckets = data.bucket_sizes(size, args.bucket_step or (64 if size >= 512 else 8)) if args.buckets else None
    instance_set = data.ImageFolder(args.instance_dir or data.instance_images(), size, fit=args.fit, buckets=buckets)
    if not args.instance_dir:  # the bundled drawings, captioned with their action as an artist would caption them
        instance_set.captions = tiny.instance_captions(args.instance_prompt, instance_set.paths)
    if args.epochs:  # an epoch: every instance row (repeats counted) once, in optimizer steps
        rows_per_step = args.batch_size * args.grad_accum * ctx.world_size
        args.steps = args.epochs * -(-len(instance_set.index) // rows_per_step)
        print(f"{args.epochs} epoch(s) of {len(instance_set.index)} instance rows = {args.steps} steps")
    class_dir = Path(args.class_dir) if args.class_dir else out / "class-images"
    if prior and ctx.is_main:  # (it probes the folder with a test file: one process at a time)
        db.check_class_images(class_dir, args.num_class_images, can_generate=not args.no_generate)
    lock = run_folder.claim(out, also=[class_dir]) if ctx.is_main else None  # noqa: F841 (held until run returns)
    state.seed_all(args.seed)

    # 2. the model: frozen weights in the autocast dtype (LoRA), fp32 where they train (full) and in the VAE
    frozen_dtype = autocast_dtype if args.train == "lora" and autocast_dtype is not None else torch.float32
    print(f"loading {args.model} on {device} ({str(frozen_dtype).removeprefix('torch.')} weights)")
    pipe = pretrained.load_pipeline(args.model, dtype=frozen_dtype, device=device, vae=args.vae)
    args.gradient_checkpointing |= args.low_memory
    memory = memory_plan.prepare(pipe, memory_plan.Job(
        args.train, latent=size // pipe.scale, batch=args.batch_size * (1 + prior), precision=_name(frozen_dtype),
        base_precision=args.base_precision or _name(frozen_dtype), rank=args.rank, targets=args.targets,
        checkpointing=args.gradient_checkpointing, train_text_encoder=args.train_text_encoder), device, args.low_memory)
    pipe.unet.requires_grad_(False)
    pipe.text.requires_grad_(False)
    if pipe.vae is not None:
        pipe.vae.requires_grad_(False).float()
    job = Run(args, pipe, device, autocast_dtype, size, lr, out, ctx)
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
    models, params, job.ti_tables = make_trainable(args, pipe, lr)
    ddp.broadcast_parameters([p for g in params for p in g["params"]], ctx)  # same seed: cheap insurance
    everything = pipe.modules()  # unet and the one (SD 1.x / 2.x) or two (SDXL) text encoders
    if pipe.vae is not None:
        everything["vae"] = pipe.vae
    table = audit.trainable_table(everything)
    print(audit.format_table(table))
    job.models = models

    # 5. train: LoRA files every --save-every steps, grids every --validate-every steps
    cfg = db.TrainConfig(steps=args.steps, lr=lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         lr_schedule=args.lr_schedule, warmup=args.warmup, prior_weight=args.prior_weight,
                         min_snr_gamma=args.min_snr_gamma, noise_offset=args.noise_offset,
                         caption_dropout=args.caption_dropout, prediction_type=job.prediction_type,
                         optimizer=args.optimizer,
                         save_every=args.save_every, validate_every=args.validate_every)
    primary = "diffusers" if args.format == "diffusers" else "kohya"
    on_save = None if args.train == "full" else peaks.around("save", lambda step: job.save_step(step, primary))
    on_validate = peaks.around("validation", lambda step: job.validate(f"step-{step:06d}"))
    peaks.end("setup")
    result = db.train(pipe.unet, params, pipe.schedule, job.instance, job.klass, job.embed, cfg, out,
                      {name: state.Trainable(m) for name, m in models.items()}, (autocast_dtype, use_scaler),
                      resume=args.resume, on_save=on_save, on_validate=on_validate, ctx=ctx, settings=run_settings)
    peaks.end("train")
    if not ctx.is_main:
        return None
    timings.update(train_s=result["seconds"], s_per_step=result["s_per_step"])
    job.files += [str(out / "loss.csv"), str(out / "loss.png")]

    # 6. the result, a last grid, the manifest
    t = time.perf_counter()
    if args.train == "full":  # the run folder becomes a whole model: unet/ + the base's frozen parts linked in
        from minidiff.weights.model_folder import complete_model_folder

        job.files += [str(p) for p in save_unet(pipe.unet, out / "unet")]
        job.files += complete_model_folder(out, args.model, pipe, args.vae)
    for fmt, name in (("kohya", "lora.safetensors"), ("diffusers", "pytorch_lora_weights.safetensors")):
        if args.train == "lora" and args.format in (fmt, "both"):
            job.save_lora(out / name, fmt, args.steps)
    if job.ti_tables:  # the token's vectors, A1111 SDXL layout: OUT/sks.safetensors
        job.save_embedding(out / f"{args.ti_token}.safetensors")
    timings["save_s"] = time.perf_counter() - t
    peaks.end("save")
    t = time.perf_counter()
    job.validate("final")
    timings["validation_s"] = time.perf_counter() - t
    peaks.end("validation")
    timings["total_s"] = time.perf_counter() - t0
    settings = {k: v for k, v in vars(args).items() if k != "argv"}
    settings.update(lr=lr, resolution=size, prediction_type=job.prediction_type, device=str(device),
                    precision=str(autocast_dtype or "fp32").removeprefix("torch."), grad_scaler=use_scaler,
                    processes=ctx.world_size, global_batch_size=args.batch_size * ctx.world_size,
                    class_dir=str(class_dir) if prior else None)
    manifest = {
        "command": "python finetune.py " + shlex.join(args.argv), "settings": settings,
        "model": {"path": str(args.model), "hash": job.base_hash},
        "data": {"instance_images": job.instance.paths, "captions": job.instance.captions, "hash": job.data_hash,
                 "class_images": job.klass.paths if prior else []},
        "trainable": table, "files": sorted(set(job.files)), "timings": timings,
        "peak_memory_gib": {"of": peaks.what, **peaks.gib},
        "final_loss": result["loss"], "resumed_from_step": result["resumed_from"], "memory_plan": memory,
    }
    io.write_json(manifest, out / "manifest.json")
    print(f"done in {timings['total_s']:.1f}s ({timings['s_per_step']:.3f} s/step); wrote {out}")
    if peaks.gib:
        print(f"peak {peaks.what} by phase, GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.gib.items()))
    return manifest


def _name(dtype):
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def make_trainable(args, pipe, lr):
    """LoRA adapters (fp32) on the frozen UNet (and text encoders), or the whole UNet, and/or a new token's vectors
    (textual inversion): (modules to checkpoint, parameter groups with their learning rates, the TI tables)."""
    from minidiff import lora
    from minidiff.textual_inversion import learn_token

    models, groups, tables = {"unet": pipe.unet}, [], {}
    if args.train == "full":
        pipe.unet.requires_grad_(True)
        groups.append({"params": list(pipe.unet.parameters())})
    elif args.train == "lora":
        drop = dict(dropout=args.lora_dropout, rank_dropout=args.rank_dropout, module_dropout=args.module_dropout)
        lora.inject_lora(pipe.unet, args.targets, args.rank, args.alpha, **drop)
        groups.append({"params": lora.lora_parameters(pipe.unet)})
        if args.train_text_encoder:
            text = {k: m for k, m in pipe.modules().items() if k != "unet"}
            for m in text.values():
                lora.inject_lora(m, "text", args.rank, args.alpha, **drop)
                m.train()
            models.update(text)
            groups.append({"params": [p for m in text.values() for p in lora.lora_parameters(m)],
                           "lr": args.text_encoder_lr or lr})
    if args.train == "ti" or args.train_ti:  # the token's vectors V in every text encoder (textual_inversion.py)
        tables = learn_token(pipe.text, args.ti_token, args.ti_vectors, args.ti_init or args.class_prompt.split()[-1])
        models.update({f"ti_{k}": t for k, t in tables.items()})
        groups.append({"params": [t.new for t in tables.values()], "lr": args.ti_lr})
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing(True)
        for name in ("text_encoder", "text_encoder_2"):
            if name in models:  # transformers' switch (renamed activation_checkpointing_enable in v5)
                te = models[name]
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    return models, groups, tables


class Run:
    """What the steps of `run` share: the pipeline, the cached data, and the files written so far."""

    def __init__(self, args, pipe, device, autocast_dtype, size, lr, out, ctx):
        self.args, self.pipe, self.device, self.autocast_dtype, self.ctx = args, pipe, device, autocast_dtype, ctx
        self.size, self.lr, self.out, self.files, self.models = size, lr, out, [], {"unet": pipe.unet}
        self.ti_tables = {}  # textual inversion: {'clip_l' | 'clip_g' | 'emb_params': NewTokenEmbedding}
        self.save_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_precision]
        self.prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
        self.base_hash = model_hash(args.model)
        self.validation_prompts = [p for p in (args.validation_prompt or default_validation_prompts(args)) if p]

    def autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=enabled)

    def class_images(self, class_dir):
        """The missing class images, sampled with the base model (seed + i for image i); their ImageFolder."""
        from minidiff import data
        from minidiff.train import ddp
        from minidiff import dreambooth as db
        from minidiff.bundled import tiny
        from minidiff.pipeline import generate, model_sampler

        a, size = self.args, self.size
        cfg = tiny.default_cfg(a.model)
        settings = {"model": Path(a.model).name, "steps": a.class_steps, "sampler": model_sampler(self.pipe),
                    "cfg": cfg, "width": size, "height": size}

        def make(prompts, seeds):  # seeds are consecutive: generate gives image i the seed seed + i
            with self.autocast():
                return generate(self.pipe, prompts, steps=a.class_steps, cfg=cfg, seed=seeds[0], width=size,
                                height=size, batch_size=len(prompts), progress=False)

        paths, written = db.generate_class_images(make, class_dir, a.num_class_images, a.class_prompt,
                                                  a.class_batch_size, seed=a.seed, settings=settings,
                                                  progress=self.ctx.is_main, ctx=self.ctx)
        ddp.barrier(self.ctx)  # every process's share is on disk
        print(f"class images: {len(paths)} in {class_dir} ({written} generated now"
              + (f" by process 0 of {self.ctx.world_size})" if self.ctx.world_size > 1 else ")"))
        return data.ImageFolder(paths, size, fit=a.fit, caption=a.class_prompt)

    def cache(self, instance_set, klass_set):
        """Latents (VAE once) and, while the text encoders are frozen, text embeddings (once per caption); then the
        VAE and text encoders leave the GPU."""
        from minidiff import dreambooth as db

        a, pipe, device = self.args, self.pipe, self.device
        batch = 1 if self.size >= 512 else 8
        show = self.ctx.is_main
        if a.buckets:
            from minidiff.buckets import encode_buckets

            self.instance = encode_buckets(instance_set, pipe.vae, device, a.instance_prompt, show)
        else:
            self.instance = db.encode_examples(instance_set, pipe.vae, device, a.instance_prompt, batch, show)
        self.klass = db.encode_examples(klass_set, pipe.vae, device, a.class_prompt, batch, show) if klass_set else None
        self.text_cache = None
        if a.train_text_encoder or a.train == "ti" or a.train_ti:  # gradients flow through the encoders
            self.embed = lambda captions: db.encode_captions(pipe.text, captions)
        else:
            captions = self.instance.captions + (self.klass.captions if self.klass else []) + self.validation_prompts
            self.embed = self.text_cache = db.PromptCache(pipe.text, captions, device)
            pipe.text.to("cpu")
        if pipe.vae is not None:
            pipe.vae.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.data_hash = dataset_hash(self.instance)
        print(f"cached {len(self.instance)} instance" + (f" and {len(self.klass)} class" if self.klass else "")
              + f" images at {self.size}px, {len(set(self.instance.captions))} distinct instance caption(s)")

    def save_lora(self, path, fmt, steps_done):
        from minidiff import lora

        meta = lora_metadata(self.args, self.lr, steps_done, self.size, self.base_hash, self.data_hash,
                             self.instance, self.klass, self.prediction_type)
        carriers = {k: m for k, m in self.models.items() if not k.startswith("ti_")}
        lora.save_lora(carriers if len(carriers) > 1 else self.pipe.unet, path, format=fmt, metadata=meta,
                       dtype=self.save_dtype)
        self.files.append(str(path))

    def save_embedding(self, path):
        from minidiff.weights.embedding_files import write_embedding

        vectors = {name: table.new for name, table in self.ti_tables.items()}
        write_embedding(path, vectors, self.args.ti_token, self.save_dtype, {"minidiff.base_model_hash": self.base_hash})
        self.files.append(str(path))

    def save_step(self, step, fmt):
        """Every --save-every steps: the LoRA and/or the token's vectors so far."""
        if self.args.train == "lora":
            self.save_lora(self.out / f"lora-step-{step:06d}.safetensors", fmt, step)
        if self.ti_tables:
            self.save_embedding(self.out / f"{self.args.ti_token}-step-{step:06d}.safetensors")

    def validate(self, label):
        """A grid of --validation-images per prompt (fixed seeds): no grad, eval mode, one image at a time, text from
        the cache, the VAE on the GPU only for the decode."""
        import dataclasses

        from minidiff.bundled import tiny
        from minidiff.images import labelled_grid, save_png
        from minidiff.pipeline import generate, model_sampler

        a, pipe, cfg = self.args, self.pipe, tiny.default_cfg(self.args.model)
        if not a.validation_images or not self.validation_prompts:
            return
        pipe.unet.eval()
        vpipe = dataclasses.replace(pipe, text=self.text_cache) if self.text_cache is not None else pipe
        if pipe.vae is not None:
            pipe.vae.to(self.device)
        prompts = [p for p in self.validation_prompts for _ in range(a.validation_images)]
        with self.autocast():
            images = generate(vpipe, prompts, steps=a.validation_steps, cfg=cfg, seed=a.seed, width=self.size,
                              height=self.size, batch_size=1, progress=False)
        if pipe.vae is not None:
            pipe.vae.to("cpu")
        grid = labelled_grid(images, self.validation_prompts, [f"seed {a.seed + i}" for i in range(a.validation_images)])
        path = save_png(grid, self.out / "samples" / f"{label}.png",
                        {"prompts": self.validation_prompts, "seed": a.seed, "steps": a.validation_steps,
                         "sampler": model_sampler(vpipe), "cfg": cfg, "training_step": label,
                         "model": str(a.model)})
        self.files.append(str(path))


def default_lr(args):
    """SDXL's usual rates (LoRA 1e-4, full UNet 5e-6); the bundled miniature (1.2 M parameters) takes 10x / 20x
    more: at 1e-4 its LoRA had not learned the character in 1000 steps (docs/dreambooth-table.md)."""
    if args.train == "ti":
        return args.ti_lr
    if Path(args.model) == DEFAULT_MODEL:
        return 1e-3 if args.train == "lora" else 1e-4
    return 1e-4 if args.train == "lora" else 5e-6


def default_validation_prompts(args):
    """The instance prompt in the actions the bundled miniature knows (when it is the model), and the class prompt
    (with prior preservation): the grid shows the subject in new poses beside what the class word still draws."""
    prompts = [args.instance_prompt]
    if Path(args.model) == DEFAULT_MODEL:
        prompts = [f"{args.instance_prompt} {action}" for action in ("climbing", "walking", "jumping")]
    return prompts + ([args.class_prompt] if not args.no_prior else [])


def save_unet(unet, folder):
    """--train full: the UNet in diffusers layout (config.json + diffusion_pytorch_model.safetensors), atomic."""
    from minidiff import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = io.save_safetensors(unet.state_dict(), folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    io.write_json(unet.config.to_diffusers(), folder / "config.json")
    return [weights, folder / "config.json"]


def lora_metadata(args, lr, steps, size, base_hash, data_hash, instance, klass, prediction_type):
    """safetensors metadata: kohya's ss_* keys (ComfyUI / A1111 / civitai read them) and minidiff.* settings.
    (lora.save_lora adds ss_network_module/dim/alpha/args and ss_base_model_version itself.)"""
    return {
        "ss_v2": "False", "ss_sd_model_name": Path(args.model).name, "ss_sd_model_hash": base_hash[:12],
        "ss_new_sd_model_hash": base_hash, "ss_learning_rate": str(lr), "ss_unet_lr": str(lr),
        "ss_max_train_steps": str(args.steps), "ss_steps": str(steps), "ss_seed": str(args.seed),
        "ss_resolution": f"({size}, {size})", "ss_num_train_images": str(len(instance)),
        "ss_num_reg_images": str(len(klass) if klass is not None else 0),
        "ss_prior_loss_weight": str(args.prior_weight if klass is not None else 0.0),
        "ss_min_snr_gamma": str(args.min_snr_gamma), "ss_noise_offset": str(args.noise_offset),
        "ss_caption_dropout_rate": str(args.caption_dropout), "ss_lr_scheduler": args.lr_schedule,
        "ss_lr_warmup_steps": str(args.warmup), "ss_gradient_accumulation_steps": str(args.grad_accum),
        "ss_batch_size_per_device": str(args.batch_size), "ss_mixed_precision": args.mixed_precision,
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_optimizer": "torch.optim." + {"adamw": "AdamW", "adafactor": "Adafactor", "sgd": "SGD"}[args.optimizer],
        "ss_text_encoder_lr": str(args.text_encoder_lr or lr),
        "ss_max_grad_norm": "1.0", "ss_training_comment": f"minidiff DreamBooth: {args.instance_prompt!r}",
        "minidiff.base_model_hash": base_hash, "minidiff.dataset_hash": data_hash,
        "minidiff.instance_prompt": args.instance_prompt,
        "minidiff.class_prompt": args.class_prompt if klass is not None else "",
        "minidiff.steps": str(steps), "minidiff.lr": str(lr), "minidiff.resolution": str(size),
        "minidiff.prediction_type": prediction_type, "minidiff.train_text_encoder": str(args.train_text_encoder),
    }


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv
    from minidiff.cli import exit_code
    from minidiff.train import ddp

    def body():
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            check_args(args)
            run(args, ddp.init(args.device))  # a single process (no torchrun) initialises nothing

    try:
        return exit_code(body)
    finally:
        ddp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
