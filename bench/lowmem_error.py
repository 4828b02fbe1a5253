"""What the two memory savers cost in output: fp8 base storage against fp16 storage, tiled VAE decode against the
whole decode, each on identical weights and inputs.

    python bench/lowmem_error.py fp8 --model miniature                 # the bundled trained miniature (minutes)
    python bench/lowmem_error.py fp8 --model PATH --prompt "..." --size 1024 --device cuda   # a real SDXL folder
    flock /tmp/fullsize.lock python bench/lowmem_error.py fp8 --model sdxl --latent 32   # full size, ~11 GB RAM
    python bench/lowmem_error.py tiles --model tiny --latent 64 --tile 16
    flock /tmp/fullsize.lock python bench/lowmem_error.py tiles --model sdxl --latent 96  # the SDXL VAE, 768 px

fp8: the UNet's weights are first rounded to fp16 (what `--base-precision fp16` stores), then the same model is
stored in fp8 (weights/base_precision.store: e4m3 + a per-output-channel scale); both compute in fp32 here (the
CPU), so the difference is the storage alone. Reported: the relative L2 error of the UNet output
|eps8 - eps16| / |eps16| at t = 999, 500, 50, and the PSNR of the sampled image (same seed, same noise; for SDXL
decoded by the VAE) against the fp16-stored one. `--model sdxl` has random weights at SDXL's exact shapes
(bench/weights.py: N(0, 1/fan_in)), random text states and a few Euler steps at a small latent: no SDXL weights
can be downloaded here. `--model miniature` is minidiff/assets/tiny-sdxl, a trained model (pixel space, 32 px):
its real prompts through its real text encoders, 30 Euler-a steps as its preview.

tiles: vae.decode_tiled(z, tile, tile // 4) (pipeline.decode's default above 64 latent cells) against vae.decode(z):
max |difference|, PSNR, and the RMS error inside the blending bands where tiles overlap (the seams) against the
rest. Images in [-1, 1] are compared as [0, 1]: PSNR = 10 log10(1 / MSE).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minidiff.weights.base_precision import store  # noqa: E402

TIMESTEPS = (999, 500, 50)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], compared in [0, 1]."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def round_to_fp16(model: torch.nn.Module):
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.copy_(t.half().float())


@torch.no_grad()
def fp8_error(model: torch.nn.Module, unet_calls, sample) -> dict:
    """unet_calls(): {t: eps}; sample(): an image [N, 3, H, W] in [-1, 1]. Both run before and after the UNet
    `model` is stored in fp8 (in place)."""
    round_to_fp16(model)
    eps16, image16 = unet_calls(), sample()
    store(model, "fp8", torch.float32)
    eps8, image8 = unet_calls(), sample()
    return (
        {
            "unet_relative_error": {str(t): round(relative(eps8[t], eps16[t]), 5) for t in eps16},
            "image_psnr_db": round(psnr(image8, image16), 2),
            "image_max_abs": round((image8 - image16).abs().max().item(), 4),
        },
        image16,
        image8,
    )


def fp8_pipeline(path=None, prompts=None, steps=30, sampler="euler_a", size=None, device="cpu"):
    """A model folder's UNet outputs for `prompts` and their images sampled with the same seed, fp16 vs fp8 storage:
    (result, images16, images8). Default: the bundled miniature, its 24 preview prompts and its preview settings (a
    real SDXL folder: --model PATH --prompt ... --size 1024, best on a GPU)."""
    from minidiff.bundled import assets_dir, tiny
    from minidiff.pipeline import generate
    from minidiff.weights.pretrained import load_pipeline

    pipe = load_pipeline(path or assets_dir() / "tiny-sdxl", torch.float32, device)
    prompts = prompts or tiny.preview_prompts()
    size = size or tiny.SIZE
    settings = {
        "steps": steps,
        "cfg": 5.0,
        "sampler": sampler,
        "seed": 0,
        "width": size,
        "height": size,
        "guidance_rescale": 0.7 if path is None else 0.0,
    }
    context, pooled = pipe.text.encode(prompts)
    n, side = len(prompts), size // pipe.scale
    x = torch.randn(n, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(n, 1)
    x, ids = x.to(pipe.device), ids.to(pipe.device)

    def unet_calls():
        return {
            t: pipe.unet(x, torch.full((n,), t, device=pipe.device), context=context, text_embeds=pooled, time_ids=ids)
            for t in TIMESTEPS
        }

    def sample():
        return generate(pipe, prompts, progress=False, **settings)

    res, a, b = fp8_error(pipe.unet, unet_calls, sample)
    name = "miniature (minidiff/assets/tiny-sdxl, trained)" if path is None else str(path)
    return {"model": name, "prompts": n, **settings, **res}, a, b


def fp8_sdxl(args):
    from weights import SDXL_SCHEDULER, build_unet, build_vae, unet_inputs

    from minidiff.samplers import cfg as guide
    from minidiff.samplers import sample as run_sampler
    from minidiff.weights.pretrained import schedule_from_config

    unet, call, cfg = build_unet("ours", "sdxl", torch.float32, "cpu", seed=0)
    unet.eval()
    x, _, ctx, pooled, ids = unet_inputs(cfg, 2, args.latent, torch.float32, "cpu")
    schedule = schedule_from_config(SDXL_SCHEDULER)

    def unet_calls():
        return {t: call(x[:1], torch.full((1,), t), ctx[1:], pooled[1:], ids[1:]) for t in TIMESTEPS}

    def sample():
        noise = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))

        def denoise(xt, t):
            eps = call(torch.cat([xt, xt]), t.expand(2), ctx, pooled, ids)
            return guide(*eps.chunk(2), 5.0)

        return run_sampler(denoise, schedule, noise, steps=args.steps, sampler="euler", progress=True)

    res, z16, z8 = fp8_error(unet, unet_calls, lambda: sample())
    del unet
    vae = build_vae("ours", "sdxl", torch.float32, "cpu", seed=0).eval()
    with torch.no_grad():
        a, b = (vae.decode(z / vae.scaling_factor).clamp(-1, 1) for z in (z16, z8))
    res.pop("image_max_abs")
    res.update(
        {
            "latent_relative_error": round(relative(z8, z16), 5),
            "image_psnr_db": round(psnr(b, a), 2),
            "image_max_abs": round((b - a).abs().max().item(), 4),
        }
    )
    return (
        {
            "model": "SDXL shapes, random weights (bench/weights.py), random text states",
            "latent": args.latent,
            "steps": args.steps,
            "sampler": "euler",
            "cfg": 5.0,
            **res,
        },
        a,
        b,
    )


# ------------------------------------------------------------------------------------------------------ tiles
def seam_bands(n: int, tile: int, overlap: int, f: int) -> torch.Tensor:
    """[n * f] bool along one axis: pixels inside a band where two tiles overlap (decode_tiled's tile origins)."""
    starts = [0] if n <= tile else sorted(set(range(0, n - tile, tile - overlap)) | {n - tile})
    band = torch.zeros(n * f, dtype=torch.bool)
    for a, b in zip(starts, starts[1:]):
        band[b * f : (a + tile) * f] = True
    return band


@torch.no_grad()
def tile_error(vae, z: torch.Tensor, tile: int, overlap: int) -> dict:
    whole = vae.decode(z).clamp(-1, 1)
    tiled = vae.decode_tiled(z, tile, overlap).clamp(-1, 1)
    f = vae.config.downscale
    rows, cols = seam_bands(z.shape[-2], tile, overlap, f), seam_bands(z.shape[-1], tile, overlap, f)
    seam = rows[:, None] | cols[None, :]
    err = ((tiled - whole) / 2).square().mean(dim=(0, 1))  # per pixel, in [0, 1] units
    return {
        "max_abs": round((tiled - whole).abs().max().item(), 5),
        "psnr_db": round(psnr(tiled, whole), 2),
        "rms_in_seams": round(err[seam].mean().sqrt().item(), 6),
        "rms_elsewhere": round(err[~seam].mean().sqrt().item(), 6),
        "seam_fraction": round(seam.float().mean().item(), 3),
    }


def tiles(args):
    from weights import build_vae

    name = "sdxl" if args.model == "sdxl" else "tiny_sdxl"
    vae = build_vae("ours", name, torch.float32, "cpu", seed=0).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, vae.config.latent_channels, args.latent, args.latent, generator=g)
    smooth = torch.nn.functional.interpolate(
        torch.randn(1, vae.config.latent_channels, args.latent // 8, args.latent // 8, generator=g),
        size=z.shape[-2:],
        mode="bicubic",
    )
    tile = args.tile
    return {
        "model": f"{name} VAE, random weights (bench/weights.py)",
        "latent": args.latent,
        "tile": tile,
        "overlap": tile // 4,
        "white_noise_latent": tile_error(vae, z, tile, tile // 4),
        "smooth_latent": tile_error(vae, smooth, tile, tile // 4),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["fp8", "tiles"])
    p.add_argument(
        "--model",
        default="miniature",
        help="fp8: miniature | sdxl (random weights) | a model folder; tiles: tiny | sdxl",
    )
    p.add_argument("--prompt", help="fp8 with a model folder: the prompt")
    p.add_argument("--size", type=int, help="fp8 with a model folder: image side in pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", type=int, default=32, help="latent side (fp8 --model sdxl; tiles)")
    p.add_argument("--steps", type=int, default=8, help="Euler steps of the SDXL sample")
    p.add_argument("--tile", type=int, default=64, help="tiles: tile side in latent cells (overlap: a quarter)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--png", help="fp8: write the fp16 / fp8 images side by side here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if a.what == "fp8":
        res, img16, img8 = (
            fp8_sdxl(a)
            if a.model == "sdxl"
            else fp8_pipeline(
                None if a.model == "miniature" else a.model, a.prompt and [a.prompt], size=a.size, device=a.device
            )
        )
        if a.png:
            from minidiff.images import make_grid, save_png

            grid = make_grid(torch.cat([img16, img8]).cpu(), nrow=len(img16))
            save_png(
                grid.resize((grid.width * 4, grid.height * 4), 0) if a.model != "sdxl" else grid,
                a.png,
                {"rows": ["fp16 storage", "fp8 storage"], **res},
            )
    else:
        res = tiles(a)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1))
    if a.json:
        from minidiff import io

        io.write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
