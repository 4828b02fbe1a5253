#!/usr/bin/env python
r"""Generate images with an SDXL-family model, optionally with LoRAs: one PNG per image + grid.png.

    python sample.py --prompt "a picture of sks girl" --lora runs/finetune/lora.safetensors
    python sample.py --model sdxl-base/ --vae sdxl-vae-fp16-fix/ --prompts comic.txt --seed 7 --num 2
    python sample.py --model sd_xl_base_1.0.safetensors --tokenizers sdxl-base/ --prompt "a robot" --steps 30
    python sample.py --prompt "a picture of a girl" --control sketch.png:scribble:0.9      (pose from a sketch)

--control IMAGE[:TYPE[:SCALE]] (repeatable; TYPE canny, scribble or image, default image; SCALE default 1) steers
the pose with a ControlNet: the i-th --control uses the i-th --controlnet PATH (or the only one; with the bundled
miniature, its tiny ControlNet minidiff/assets/tiny-controlnet).

    python sample.py --page examples/page.json              a comic page: panels, lettering, page.png, strip.png
    python sample.py --page examples/page.json --panel 3    re-render panel 3 only (the others stay byte-identical)

Prompts are read in A1111's syntax: (word:1.3), (word) = 1.1, [word] = 1/1.1, \( \) literal; longer than 75 tokens
they are encoded in chunks (with a note), never cut. --prompts FILE holds one prompt per line (blank lines and lines
starting with # are skipped). Image i of a run has seed --seed + i, so the same seed gives the same image whatever
--batch-size. Each PNG carries prompt, negative, seed, steps, cfg, sampler, model and LoRAs in its PNG text metadata
(minidiff.images.read_png_metadata reads them back). User errors print one line and exit with status 2.
"""

import math
import sys
import time
from pathlib import Path

import torch

from minidiff import cli, run_folder
from minidiff.bundled import tiny
from minidiff.cli import ArgumentParser as Parser
from minidiff.cli import exit_code
from minidiff.comic import render_page
from minidiff.control_images import KINDS, read_control
from minidiff.control_images import parse_control as split_control
from minidiff.controlnet import Control
from minidiff.errors import MinidiffError
from minidiff.images import make_grid, save_png
from minidiff.lora import load_lora
from minidiff.page_file import read_page
from minidiff.pipeline import default_guidance_rescale, generate, model_sampler
from minidiff.train import memory_plan
from minidiff.train.hardware import PeakMemory, check_fits, check_gpu, resolve_device
from minidiff.controlnet import load_controlnet
from minidiff.weights.embedding_files import load_embedding
from minidiff.weights.pretrained import file_hash, load_pipeline

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "minidiff" / "assets" / "tiny-sdxl"
DEFAULT_CONTROLNET = ROOT / "minidiff" / "assets" / "tiny-controlnet"
DEFAULT_PROMPTS = (
    "a picture of a girl",
    "a picture of a robot jumping",
    "a picture of a zombie walking",
    "a picture of a boy climbing",
)
SAMPLERS = ("euler", "euler_a", "ddim", "ddpm", "dpmpp_2m")
# flags passed to pipeline.generate as they are (and, but for seed and batch size, recorded in every PNG)
GENERATE_FLAGS = ("negative", "prompt_2", "negative_2", "steps", "cfg", "sampler", "seed", "guidance_rescale")
GENERATE_FLAGS += ("batch_size", "spacing", "karras")


def build_parser():
    p = Parser(prog=Path(__file__).name, description="Text to image with an SDXL-family model (and LoRAs).")
    a = p.add_argument
    a(
        "--model",
        default=None,
        help="diffusers SDXL folder or original single .safetensors file "
        "(default: the bundled miniature, minidiff/assets/tiny-sdxl)",
    )
    a("--vae", default=None, help="VAE folder or file to use instead of the model's (e.g. the SDXL fp16-fix VAE)")
    a(
        "--unet",
        default=None,
        help="a UNet to use instead of the model's: a folder (e.g. a full fine-tune's "
        "OUT/unet) or file of the same architecture",
    )
    a("--tokenizers", default=None, help="folder holding tokenizer/ and tokenizer_2/ (needed with a single file)")
    a("--prompt", action="append", default=None, help="repeatable")
    a("--prompts", default=None, help="a text file, one prompt per line")
    a("--negative", default="", help="negative prompt (empty: SDXL's all-zero unconditional embedding)")
    a("--prompt-2", default=None, help="prompt for the second text encoder (OpenCLIP bigG; default: the prompt)")
    a("--negative-2", default=None, help="negative prompt for the second text encoder (default: --negative)")
    a("--page", default=None, help="a comic page file (JSON, see minidiff/page_file.py and examples/page.json)")
    a(
        "--panel",
        type=int,
        action="append",
        default=None,
        metavar="N",
        help="with --page: re-render only panel N (repeatable); the other panel files are left as they are",
    )
    a("--steps", type=int, default=30)
    a(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale (1 = no guidance; default 5, and 2 for "
        "the bundled miniature: minidiff/bundled/tiny.py GUIDANCE)",
    )
    a(
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="default: the one the model's scheduler config names (euler for SDXL, euler_a for the miniature)",
    )
    a(
        "--spacing",
        choices=("leading", "trailing", "linspace"),
        default=None,
        help="timestep spacing (default: the model's scheduler config, 'leading' for SDXL)",
    )
    a("--karras", action="store_true", help="Karras sigmas (euler, euler_a, dpmpp_2m)")
    a(
        "--guidance-rescale",
        type=float,
        default=None,
        help="phi of Lin et al. 2023 (0 = off; default: 0.7 for a "
        "zero-terminal-SNR model such as the miniature, else 0)",
    )
    a("--seed", type=int, default=0)
    a("--width", type=int, default=None, help="default: the model's native size (1024 for SDXL)")
    a("--height", type=int, default=None)
    a("--num", type=int, default=1, help="images per prompt")
    a("--batch-size", type=int, default=4)
    a("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="repeatable; scale defaults to 1")
    a(
        "--control",
        action="append",
        default=[],
        metavar="IMAGE[:TYPE[:SCALE]]",
        help="control image (repeatable): TYPE canny, scribble (made here from IMAGE) or image (used as is: a ready "
        "pose or depth image; their estimators need weights minidiff does not have); SCALE defaults to 1",
    )
    a(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="ControlNet folder or file for the --control images, in order (default: the miniature's tiny one)",
    )
    a(
        "--guess-mode",
        action="store_true",
        help="the ControlNets steer only the prompt's half of the guided batch, "
        "so guidance amplifies the control image too (diffusers' guess_mode)",
    )
    a(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE[:TOKEN]",
        help="textual-inversion embedding "
        "(.safetensors from A1111, ComfyUI, diffusers or finetune.py --train ti), repeatable; write its token (default: "
        "the file's stem) in the prompt",
    )
    a("--out", default="runs/sample")
    a("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    a("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    a(
        "--base-precision",
        choices=("fp16", "bf16", "fp8"),
        default=None,
        help="how the UNet's weights are stored (default: --dtype); fp8: e4m3, cast up per layer at use",
    )
    a("--vae-tile", type=int, default=64, help="decode latents wider than this in overlapping tiles (0: whole)")
    a(
        "--low-memory",
        action="store_true",
        help="simulate first and pick what fits the detected card: fp8 base "
        "weights, smaller VAE tiles (docs/memory-budget.md)",
    )
    return p


def parse_lora(spec):
    """'path/to/x.safetensors:0.8' -> (path, 0.8); a bare path has scale 1 (so has a Windows 'C:\\...' or a file
    whose own name holds ':'). MinidiffError naming the scale when it is not a finite number."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or Path(spec).is_file() or (len(path) == 1 and path.isalpha()):
        return spec, 1.0
    try:
        value = float(scale)
    except ValueError:
        raise MinidiffError(
            f"--lora {spec}: the scale {scale!r} is not a number (expected PATH or PATH:SCALE)"
        ) from None
    if not math.isfinite(value):
        raise MinidiffError(f"--lora {spec}: the scale must be a finite number, got {scale}")
    return path, value


def parse_embedding(spec):
    """'sks.safetensors' -> (path, None: the file's own token); 'x.safetensors:<tok>' -> (path, '<tok>')."""
    path, sep, token = spec.rpartition(":")
    return (path, token) if sep and path.endswith(".safetensors") else (spec, None)


def read_prompts(args):
    prompts = cli.read_prompts(args)
    if not prompts and Path(args.model) == DEFAULT_MODEL:
        prompts = list(DEFAULT_PROMPTS)  # `python sample.py` alone: a few things the bundled miniature knows
    if not prompts:
        raise MinidiffError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE (one prompt per line)")
    return prompts


def check_args(args):
    """User errors visible before anything loads: one line each."""
    for flag, v in {"--steps": args.steps, "--num": args.num, "--batch-size": args.batch_size}.items():
        if v <= 0:
            raise MinidiffError(f"{flag} must be a positive integer, got {v}")
    if args.vae_tile < 0:
        raise MinidiffError(f"--vae-tile must be >= 0 (0: decode whole), got {args.vae_tile}")
    for flag, v in {"--width": args.width, "--height": args.height}.items():
        if v is not None and (v <= 0 or v % 8):
            raise MinidiffError(f"{flag} must be a positive multiple of 8, got {v}")
    if args.karras and args.sampler in ("ddim", "ddpm"):
        raise MinidiffError(f"--karras works with euler, euler_a and dpmpp_2m, not {args.sampler}")
    if args.model is None:
        if not DEFAULT_MODEL.exists():
            raise MinidiffError(
                "no model given: pass --model (a diffusers SDXL folder or an original .safetensors "
                "file); the bundled miniature minidiff/assets/tiny-sdxl is not there"
            )
        args.model = str(DEFAULT_MODEL)
    if args.cfg is None:
        args.cfg = tiny.default_cfg(args.model)
    for spec in args.lora:
        if not Path(parse_lora(spec)[0]).is_file():
            raise MinidiffError(f"--lora {spec}: no such file (expected PATH or PATH:SCALE)")
    for spec in args.embedding:
        if not Path(parse_embedding(spec)[0]).is_file():
            raise MinidiffError(f"--embedding {spec}: no such file (expected FILE or FILE:TOKEN)")
    args.control = [parse_control(spec) for spec in args.control]
    if args.control and not args.controlnet:
        if Path(args.model) != DEFAULT_MODEL or not DEFAULT_CONTROLNET.exists():
            raise MinidiffError("--control needs --controlnet PATH (a ControlNet made for this model)")
        args.controlnet = [str(DEFAULT_CONTROLNET)]
    if args.controlnet and len(args.controlnet) not in (1, len(args.control)):
        raise MinidiffError(
            f"{len(args.control)} --control images but {len(args.controlnet)} --controlnet: give one "
            "ControlNet for all, or one per control image"
        )


def parse_control(spec):
    """'sketch.png:scribble:0.8' -> (path, 'scribble', 0.8); the type defaults to 'image', the scale to 1."""
    path, kind, scale = split_control(spec)
    if not Path(path).is_file():
        raise MinidiffError(
            f"--control {spec}: no such image file (expected IMAGE[:TYPE[:SCALE]], TYPE one of {', '.join(KINDS)})"
        )
    return path, kind, scale


def read_controls(args, width, height):
    """[(ControlNet, control image [1, 3, height, width] in [0, 1], scale)] from --control and --controlnet."""
    nets = [load_controlnet(p) for p in args.controlnet]
    return [
        (nets[min(i, len(nets) - 1)], read_control(path, kind, height, width), scale)
        for i, (path, kind, scale) in enumerate(args.control)
    ]


def run(args):
    check_args(args)  # before any model loads: a typo costs no wait
    if args.panel and not args.page:
        raise MinidiffError("--panel N needs --page PAGE.json")
    if args.page:
        return run_page(args)
    prompts = read_prompts(args)
    lock = run_folder.claim(args.out)  # noqa: F841 (a writable folder, ours until run returns)

    peaks = PeakMemory(resolve_device(args.device))
    pipe, dtype_name = load(args)
    loras = []
    if args.lora:
        for spec in args.lora:
            path, scale = parse_lora(spec)
            load_lora(pipe.modules(), path, scale=scale)
            loras.append({"file": Path(path).name, "scale": scale, "sha256": file_hash(path)})

    embeddings = []
    for spec in args.embedding:
        path, token = parse_embedding(spec)
        embeddings.append(
            {"file": Path(path).name, "token": load_embedding(pipe.text, path, token), "sha256": file_hash(path)}
        )
    args.sampler = args.sampler or model_sampler(pipe)
    if args.guidance_rescale is None:
        args.guidance_rescale = default_guidance_rescale(pipe)
    native = pipe.unet.config.sample_size * pipe.scale
    width, height = args.width or native, args.height or native
    memory = memory_plan.prepare(
        pipe,
        memory_plan.Job(
            "sample",
            latent=max(width, height) // pipe.scale,
            batch=min(args.batch_size, len(prompts) * args.num),
            precision=dtype_name,
            base_precision=args.base_precision or dtype_name,
            guidance=args.cfg > 1,
            vae_tile=args.vae_tile or None,
        ),
        pipe.device,
        args.low_memory,
    )
    runs = [p for p in prompts for _ in range(args.num)]
    rows = min(args.batch_size, len(runs)) * (2 if args.cfg > 1 else 1)  # (batches of 1 for euler_a and ddpm)
    first_level = 3 * rows * pipe.unet.config.block_out_channels[0] * (width // pipe.scale) * (height // pipe.scale)
    check_fits(
        first_level * next(pipe.unet.parameters()).element_size(),
        pipe.device,
        "the first UNet level's activations",
        f"{width}x{height} is too large; the model's native size is {native}x{native}",
    )
    controls = [
        Control(net.to(pipe.device, pipe.unet.dtype), image, scale, guess_mode=args.guess_mode)
        for net, image, scale in read_controls(args, width, height)
    ]
    peaks.end("load")
    t0 = time.perf_counter()
    gen = {k: getattr(args, k) for k in GENERATE_FLAGS}
    images = generate(pipe, runs, width=width, height=height, controls=controls, **gen)
    seconds = time.perf_counter() - t0
    peaks.end("generate")
    print(
        f"{len(runs)} image(s) in {seconds:.1f} s ({seconds / len(runs):.2f} s/image"
        + (f"; peak {peaks.what} {peaks.gib['generate']:.2f} GiB)" if peaks.gib else ")")
    )

    out = Path(args.out)
    spacing = args.spacing or pipe.scheduler_config.get("timestep_spacing", "leading")
    controls_meta = [
        {"image": Path(p).name, "type": k, "scale": sc, "controlnet": args.controlnet[min(i, len(args.controlnet) - 1)]}
        for i, (p, k, sc) in enumerate(args.control)
    ]
    settings = {k: v for k, v in gen.items() if k not in ("seed", "batch_size")} | {
        **{k: getattr(args, k) for k in ("unet", "vae", "guess_mode")},
        **{"spacing": spacing, "width": width, "height": height, "model": str(args.model), "dtype": dtype_name},
        **{"loras": loras, "embeddings": embeddings, "controls": controls_meta},
        **{k: memory[k] for k in ("base_precision", "vae_tile")},
    }
    for i, (prompt, img) in enumerate(zip(runs, images)):
        path = save_png(
            img, out / f"{i:04d}-seed{args.seed + i}.png", {"prompt": prompt, "seed": args.seed + i, **settings}
        )
        print(path)
    grid = make_grid(images, nrow=args.num if args.num > 1 else None)
    print(
        save_png(
            grid, out / "grid.png", {"prompts": runs, "seeds": [args.seed + i for i in range(len(runs))], **settings}
        )
    )
    return images


def load(args):
    """(pipeline, dtype name) on the chosen device, as --model/--vae/--tokenizers/--device/--dtype say."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        check_gpu(device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    pipe = load_pipeline(
        args.model, dtype=dtype, device=device, vae=args.vae, tokenizers=args.tokenizers, unet=args.unet
    )
    return pipe, dtype_name


def run_page(args):
    """--page: read and check the whole page file first (one line naming panel and field), then render."""
    page, notes = read_page(args.page)
    for n in args.panel or ():
        if not 1 <= n <= len(page.panels):
            raise MinidiffError(f"--panel {n}: the page has panels 1..{len(page.panels)}")
    for note in notes:
        print(note, file=sys.stderr)
    if args.lora:
        extra = [(Path(p), s) for p, s in map(parse_lora, args.lora)]
        for panel in page.panels:
            panel.loras = panel.loras + extra
    for panel in page.panels:  # a panel's own 'controlnet', else --controlnet, else the miniature's tiny one
        if panel.controls and not panel.controlnets:
            default = Path(args.model) == DEFAULT_MODEL and DEFAULT_CONTROLNET.exists()
            if not (args.controlnet or default):
                raise MinidiffError(
                    f"panel {panel.number}: 'control' needs a 'controlnet' (or --controlnet PATH): "
                    "a ControlNet made for this model"
                )
            panel.controlnets = [Path(p) for p in args.controlnet] or [DEFAULT_CONTROLNET]
    out = Path(args.out if args.out != "runs/sample" else "runs/page")
    lock = run_folder.claim(out)  # noqa: F841 (a writable folder, ours until run returns)
    pipe, _ = load(args)
    t0 = time.perf_counter()
    files = render_page(pipe, page, out, only=set(args.panel) if args.panel else None, model=str(args.model))
    print(f"{len(files['panels'])} panel(s) in {time.perf_counter() - t0:.1f} s")
    print(files["page"])
    print(files["strip"])
    return files


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    return exit_code(run, args)


if __name__ == "__main__":
    sys.exit(main())
