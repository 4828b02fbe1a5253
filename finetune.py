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
This file is flags -> checks -> config -> one call: the run itself is minidiff/dreambooth/run.py (load, class
images, cache, train, files), its loop minidiff/dreambooth/loop.py, its loss minidiff/dreambooth/loss.py.
"""

import sys
import warnings
from pathlib import Path

from minidiff.bundled.tiny import TINY_DIR
from minidiff.cli import ArgumentParser as Parser
from minidiff.cli import exit_code
from minidiff.dreambooth.run import FinetuneConfig, finetune
from minidiff.errors import MinidiffError
from minidiff.train import ddp

DEFAULT_MODEL = TINY_DIR  # minidiff/assets/tiny-sdxl, the bundled miniature SDXL


def build_parser():
    p = Parser(
        prog=Path(__file__).name, description="DreamBooth fine-tuning (LoRA or full UNet) with prior preservation."
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="SDXL folder or .safetensors file (default: the miniature)"
    )
    g.add_argument("--vae", default=None, help="VAE to use instead of the model's (e.g. the SDXL fp16-fix VAE)")
    g.add_argument("--instance-dir", help="images, their .txt captions, kohya 'N_word' folders (default: 6 drawings)")
    g.add_argument("--instance-prompt", default="a picture of sks girl", help="caption of images that have none")
    g.add_argument("--class-prompt", default="a picture of a girl")
    g.add_argument("--class-dir", help="class images; missing ones are made here (default: OUT/class-images)")
    g.add_argument("--num-class-images", type=int, default=100)
    g.add_argument("--class-steps", type=int, default=30, help="sampler steps per generated class image")
    g.add_argument("--class-batch-size", type=int, default=4)
    g.add_argument("--prior-weight", type=float, default=1.0, help="lambda of the prior-preservation loss")
    g.add_argument("--no-prior", action="store_true", help="train on the instance images only")
    g.add_argument("--no-generate", action="store_true", help="never generate class images (use what is there)")
    g.add_argument("--resolution", type=int, default=None, help="training size (default: the model's native size)")
    g.add_argument("--fit", choices=("pad", "crop"), default="pad", help="square images by padding or center crop")
    g.add_argument(
        "--buckets", action="store_true", help="aspect-ratio buckets of ~resolution^2 px (kohya enable_bucket)"
    )
    g.add_argument(
        "--bucket-step", type=int, help="bucket sides are multiples of this (default: 64 from 512 px, else 8)"
    )
    g = p.add_argument_group("what trains")
    g.add_argument("--train", choices=("lora", "full", "ti"), default="lora", help="full: the UNet; ti: a token only")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    g.add_argument("--targets", choices=("attn", "attn-ff", "all-linear"), default="attn")
    g.add_argument("--train-text-encoder", action="store_true", help="LoRA on both text encoders' attention too")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (kohya network_dropout)")
    g.add_argument("--rank-dropout", type=float, default=0.0, help="drop each rank of A x per sample (kohya)")
    g.add_argument("--module-dropout", type=float, default=0.0, help="skip each adapter per forward (kohya)")
    g.add_argument("--train-ti", action="store_true", help="with --train lora: learn --ti-token too (pivotal tuning)")
    g.add_argument(
        "--ti-token", default="sks", help="the new token textual inversion learns (it must be in the captions)"
    )
    g.add_argument("--ti-vectors", type=int, default=1, help="vectors per text encoder for the new token")
    g.add_argument("--ti-init", help="word whose embedding starts the vectors (default: --class-prompt's last word)")
    g.add_argument("--ti-lr", type=float, default=5e-3, help="learning rate of the token vectors")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument(
        "--epochs", type=int, help="passes over the instance images (kohya repeats counted) instead of --steps"
    )
    g.add_argument("--lr", type=float, help="default: LoRA 1e-4, full 5e-6 (SDXL); 1e-3 and 1e-4 on the miniature")
    g.add_argument(
        "--text-encoder-lr", type=float, help="text-encoder LoRA's rate (default: --lr; kohya's text_encoder_lr)"
    )
    g.add_argument(
        "--optimizer",
        choices=("adamw", "adafactor", "sgd"),
        default="adamw",
        help="torch's own (8-bit AdamW would need bitsandbytes, which minidiff does not depend on)",
    )
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
    g.add_argument(
        "--base-precision",
        choices=("fp16", "bf16", "fp8"),
        default=None,
        help="how the frozen UNet is stored (default: the mixed precision's dtype); fp8: e4m3, cast up per "
        "layer at use (LoRA only)",
    )
    g.add_argument(
        "--low-memory",
        action="store_true",
        help="simulate the step first and pick what fits the "
        "detected card: checkpointing, then fp8 base weights (docs/memory-budget.md)",
    )
    g = p.add_argument_group("validation, saving, resuming")
    g.add_argument("--validation-prompt", action="append", help="repeatable (default: the instance prompt's actions)")
    g.add_argument("--validate-every", type=int, default=0, help="also write a grid every N steps")
    g.add_argument("--validation-images", type=int, default=4, help="images per validation prompt (0: none)")
    g.add_argument("--validation-steps", type=int, default=30)
    g.add_argument("--save-every", type=int, default=0, help="write lora-step-XXXXXX + a resumable checkpoint")
    g.add_argument("--resume", default=None, help="a checkpoint file, an output folder, or 'latest' (in --out)")
    g.add_argument("--out", default="runs/finetune")
    g.add_argument("--format", choices=("kohya", "diffusers", "both"), default="kohya")
    g.add_argument("--save-precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of saved files")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    return p


def check_args(args):
    """User errors we can see before loading anything: one line each."""
    positive = ["steps", "batch_size", "grad_accum", "class_steps", "class_batch_size", "validation_steps"]
    at_least_0 = ["num_class_images", "warmup", "save_every", "validate_every", "validation_images"]
    for name in positive + ["rank"] * (args.train == "lora"):
        if getattr(args, name) <= 0:
            raise MinidiffError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in at_least_0 + ["prior_weight", "noise_offset"]:
        if getattr(args, name) < 0:
            raise MinidiffError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
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
        raise MinidiffError(
            "--train-text-encoder and --train-ti go with --train lora (--train ti learns the token alone)"
        )
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
        hint = " (the bundled miniature is missing: pass --model with an SDXL folder or file)" * (
            Path(args.model) == DEFAULT_MODEL
        )
        raise MinidiffError(f"model not found: {args.model}{hint}")


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


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def run(args):
    """flags -> checks -> config -> one call (every process of a torchrun; a single process initialises nothing)."""
    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning
        check_args(args)
        cfg = FinetuneConfig(**vars(args))
        cfg.lr = args.lr or default_lr(args)
        cfg.validation_prompt = args.validation_prompt or default_validation_prompts(args)
        try:
            finetune(cfg, ddp.init(args.device))
        finally:
            ddp.cleanup()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # the manifest's command line
    return exit_code(run, args)


if __name__ == "__main__":
    sys.exit(main())
