"""What a run holds on the GPU, simulated before it starts, and the settings that make it fit a card.

    simulate(Job("lora", latent=128, batch=2, base_precision="fp8"), unet_cfg)       # {"peak": GiB, phases ...}
    plan(job, card_gib, unet_cfg, ...) -> (job, peaks, fits)                        # what --low-memory picks

Each job is run for real, minidiff's own code on meta tensors under CUDA's rules (memsim.py): the UNet built from
its config on the meta device, LoRA injected, the base weights stored in the chosen precision, and then
  lora / full   a training step with AdamW's state already there (any step after the first): forward under
                autocast with gradient checkpointing, fp32 MSE, backward, gradient clipping, AdamW (foreach, as on
                CUDA); a GradScaler's scaling is a multiply and an in-place unscale, counted as such;
                --train-text-encoder adds both CLIP encoders (LoRA on their attention) to the forward and backward
  sample        one guided denoising step ([uncond ; cond] in one UNet call, as pipeline.generate) and the VAE
                decode of every image of the batch (pipeline.decode: one at a time, tiled above `vae_tile`)
The caption embeddings (text encoders off the GPU, as finetune.py caches them) and the latents are inputs.
`track(job, world, modules, params, Calls(...))` is that run for any implementation's calls: simulate() passes
minidiff's, bench/memsim.py diffusers + peft's, so both run one job definition.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from ..weights.base_precision import store
from . import memsim

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Job:
    kind: str = "lora"  # lora | full | sample
    latent: int = 128  # latent side (pixels / 8)
    batch: int = 1  # UNet rows per training step (instance + class rows), or images per sampling batch
    precision: str = "fp16"  # autocast / compute dtype
    base_precision: str = "fp16"  # how the frozen UNet is stored: fp16 | bf16 | fp8
    rank: int = 4
    targets: str = "attn"
    checkpointing: bool = True
    train_text_encoder: bool = False
    guidance: bool = True  # sampling: classifier-free guidance doubles the UNet batch
    vae_tile: int | None = 64  # sampling: decode in tiles of this many latent cells (None: whole)
    steps: int = 1  # training steps simulated (AdamW's state exists from the start, as from the second step on)


def simulate(job: Job, unet_config, vae_config=None, text_configs=None, cpu: bool = False, fake: bool = False) -> dict:
    """Peak GiB of `job` (and of each phase: weights, forward, backward, optimizer, unet, decode). cpu=True runs the
    same code on real CPU tensors (random weights) with the same tracker: the check that the fake run counts right
    (use precision fp32 there: the CPU has no fp16 autocast)."""
    from ..pipeline import Pipeline, decode

    dtype = DTYPES[job.precision]
    where = torch.device("cpu" if cpu else "meta")  # meta: shapes only, made fake inside the mode
    with where:
        unet, texts, vae, params = _build(job, unet_config, vae_config, text_configs, dtype)
    with contextlib.nullcontext() if cpu else memsim.fake_cuda() if fake else memsim.meta_cuda() as mode:
        if fake:
            unet, vae = memsim.fake_module(unet, mode), vae and memsim.fake_module(vae, mode)
            texts = [memsim.fake_module(te, mode) for te in texts]
        params = _trainable(job, unet, texts)
        if job.kind != "full":
            store(unet, job.base_precision, dtype)
        world, pipe = World(mode, cpu, dtype), Pipeline(unet, vae, None, None, vae_tile=job.vae_tile)
        calls = Calls(
            unet.config,
            lambda x, t, ctx, pooled, ids: unet(x, t, context=ctx, text_embeds=pooled, time_ids=ids),
            (lambda tokens: _text_forward(texts, tokens)) if texts else None,
            None if vae is None else lambda z: decode(pipe, z),
        )
        return track(job, world, [unet, *texts, *([vae] if vae is not None else [])], params, calls)


@dataclass
class Calls:
    """What a simulated job calls, so that another implementation (bench/memsim.py: diffusers + peft) runs the same
    job: eps = unet(x, t, context, pooled, time_ids); (context, pooled) = text(token ids) when the text encoders
    train; images = decode(x_0 latents) when sampling; latents kept in latent_dtype between sampling steps."""

    config: object  # UNetConfig: the input shapes
    unet: object
    text: object = None
    decode: object = None
    latent_dtype: torch.dtype = torch.float32


def track(job: Job, world, modules, params, calls: Calls) -> dict:
    """Run `job` through `calls` under the peak tracker, `modules` (weights) resident from the start: peak GiB per
    phase."""
    with memsim.PeakTracker() as mem:
        mem.adopt(*modules)
        mem.phase("weights")
        if job.kind == "sample":
            _sample(job, calls, world, mem)
        else:
            _train(job, calls, params, world, mem)
    return {k: round(v, 4) for k, v in mem.gib().items()}


@dataclass
class World:
    """Where tensors of a simulated job live: fake CUDA (mode) or real CPU."""

    mode: object
    cpu: bool
    dtype: torch.dtype

    def tensor(self, shape, dtype=torch.float32):
        if self.mode is not None:
            return memsim.fake_like(self.mode, shape, dtype)
        return torch.zeros(shape, dtype=dtype, device="cpu" if self.cpu else "meta")

    def autocast(self):
        return torch.autocast("cpu" if self.cpu else "cuda", dtype=self.dtype, enabled=self.dtype != torch.float32)


def _build(job, unet_config, vae_config, text_configs, dtype):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..unet import UNet
    from ..vae import AutoencoderKL

    unet = UNet(unet_config).to(torch.float32 if job.kind == "full" else dtype)
    unet.enable_gradient_checkpointing(job.checkpointing and job.kind != "sample")
    texts = (
        [CLIPTextModel(text_configs[0]).to(dtype), CLIPTextModelWithProjection(text_configs[1]).to(dtype)]
        if job.train_text_encoder
        else []
    )
    vae = AutoencoderKL(vae_config).float().requires_grad_(False) if job.kind == "sample" and vae_config else None
    return unet.requires_grad_(job.kind == "full"), [te.requires_grad_(False) for te in texts], vae, None


def _trainable(job, unet, texts):
    from ..lora import inject_lora, lora_parameters

    if job.kind == "full":
        return list(unet.parameters())
    if job.kind != "lora":
        return []
    inject_lora(unet, job.targets, job.rank)
    params = lora_parameters(unet)
    for te in texts:
        inject_lora(te, "text", job.rank)
        params += lora_parameters(te)
    return params


def unet_inputs(world, cfg, batch, latent):
    """x, t, context, pooled, time_ids of `batch` rows."""
    pooled = (
        cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        if cfg.addition_embed_type == "text_time"
        else 0
    )
    t = world.tensor
    return (
        t((batch, cfg.in_channels, latent, latent)),
        t((batch,), torch.long),
        t((batch, 77, cfg.cross_attention_dim), world.dtype),
        t((batch, pooled), world.dtype),
        t((batch, 6), world.dtype),
    )


def _text_forward(texts, ids):
    """context [B, 77, C1 + C2] and pooled [B, P] through both encoders (text.TextConditioner.encode_prompts)."""
    out_l = texts[0](ids, output_hidden_states=True)
    out_g = texts[1](ids, output_hidden_states=True)
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


def _train(job, calls, params, world, mem):
    x, t, ctx, pooled, ids = unet_inputs(world, calls.config, job.batch, job.latent)
    target = world.tensor(x.shape)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, foreach=True)
    for p in params:  # the state AdamW creates at its first step (so one simulated step is any later step)
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    scale = 1024.0 if world.dtype == torch.float16 else 1.0  # GradScaler: loss * scale, grads / scale in place
    for step in range(job.steps):
        mem.phase(f"forward {step + 1}")
        with world.autocast():
            if calls.text:
                ctx, pooled = calls.text(world.tensor((job.batch, 77), torch.long))
            pred = calls.unet(x, t, ctx, pooled, ids)
        loss = torch.nn.functional.mse_loss(pred.float(), target) * scale
        del pred
        mem.phase(f"backward {step + 1}")
        loss.backward()
        del loss
        mem.phase(f"optimizer {step + 1}")
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1 / scale)
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # (per-tensor norms: scalars)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _sample(job, calls, world, mem):
    rows = job.batch * (2 if job.guidance else 1)
    _, t, ctx, pooled, ids = unet_inputs(world, calls.config, rows, job.latent)
    latents = world.tensor((job.batch, calls.config.in_channels, job.latent, job.latent), calls.latent_dtype)
    with torch.no_grad():
        mem.phase("unet")
        x_in = torch.cat([latents, latents]) if job.guidance else latents
        eps = calls.unet(x_in.to(world.dtype), t, ctx, pooled, ids).to(calls.latent_dtype)
        if job.guidance:
            u, c = eps.chunk(2)
            eps = u + 5.0 * (c - u)
            del u, c
        latents = latents - 0.1 * eps  # one Euler update: x + (sigma_next - sigma) eps
        del eps, x_in
        mem.phase("decode")
        calls.decode(latents)


def card_gib(device) -> float | None:
    """Memory of the CUDA card `device` in GiB (None on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


# What a real GPU adds above max_memory_allocated (docs/memory-budget.md, "the real-GPU margin"): the CUDA context
# (~0.3-0.5 GiB, not in torch's own figures at all), cuBLAS workspaces, and caching-allocator slack.
MARGIN_GIB = 1.5


def plan(job: Job, card: float | None, unet_config, vae_config=None, text_configs=None):
    """The first of: `job` as asked, then fp8 base weights, then (sampling) smaller VAE tiles, whose simulated peak +
    MARGIN_GIB fits `card` GiB. Returns (job, its simulated peaks, fits). With card None (CPU) the job as asked."""
    candidates = [job]
    if job.kind != "full":
        candidates.append(dataclasses.replace(job, base_precision="fp8", checkpointing=True))
    if job.kind == "sample":
        candidates.append(dataclasses.replace(candidates[-1], vae_tile=32))
    for cand in candidates:
        peaks = simulate(cand, unet_config, vae_config, text_configs)
        if card is None or peaks["peak"] + MARGIN_GIB <= card:
            return cand, peaks, True
    return cand, peaks, False


def prepare(pipe, job: Job, device, low_memory: bool = False) -> dict:
    """Settle and apply what a run keeps on the GPU: with `low_memory`, the first of plan()'s jobs that fits the
    card (on the CPU: the job as asked); the UNet's frozen weights stored in job.base_precision; the pipeline's VAE
    tile. The job is simulated on a CUDA device or with `low_memory` (seconds to a minute at full size). Returns
    what the manifest records: {base_precision, vae_tile, card_gib, simulated_peak_gib, simulated_phases, fits}."""
    device = torch.device(device)
    card, peaks, fits = card_gib(device), None, None
    if low_memory or device.type == "cuda":
        texts = (pipe.text.text_encoder.config, pipe.text.text_encoder_2.config) if job.train_text_encoder else None
        vae_cfg = pipe.vae.config if pipe.vae is not None else None
        if low_memory:
            job, peaks, fits = plan(job, card, pipe.unet.config, vae_cfg, texts)
        else:
            peaks = simulate(job, pipe.unet.config, vae_cfg, texts)
            fits = card is None or peaks["peak"] + MARGIN_GIB <= card
    if job.kind != "full" and job.base_precision != job.precision:
        store(pipe.unet, job.base_precision, DTYPES[job.precision])
    if peaks:
        print(
            f"memory: simulated peak {peaks['peak']:.2f} GiB (+ ~{MARGIN_GIB} GiB CUDA context and allocator)"
            + (f" on a {card:.1f} GiB card" if card else "")
            + f"; base weights {job.base_precision}"
            + (f", VAE tiles of {job.vae_tile}" if job.kind == "sample" and job.vae_tile else "")
        )
    if job.kind == "sample":
        pipe.vae_tile = job.vae_tile
    return {
        "base_precision": job.base_precision,
        "vae_tile": job.vae_tile,
        "card_gib": card and round(card, 2),
        "simulated_peak_gib": peaks and peaks["peak"],
        "simulated_phases": peaks,
        "fits": fits,
        "margin_gib": MARGIN_GIB,
    }
