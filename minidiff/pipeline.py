"""Text to image, the whole of it: prompts -> context -> sampler loop with guidance -> VAE decode.

    context, pooled = text.encode(prompts, negative)             [uncond ; cond], zeros for an empty negative
    x_T ~ N(0, I)  (image i drawn from its own generator seeded seed + i)
    for each step:  eps_u, eps_c = unet(cat[x, x], t, context, pooled, time_ids).chunk(2)     one UNet call
                    eps = cfg(eps_u, eps_c, scale, rescale)                                   (samplers.cfg)
                    x = sampler step(x, eps)                                                  (samplers.sample)
    image = vae.decode(x_0 / scaling_factor)          in [-1, 1]; vae None = the UNet works on pixels directly

Same seed -> same image, whatever the batch size: the noise of image i comes from torch.Generator seeded seed + i on
the CPU. Stochastic samplers (euler_a, ddpm, ddim with eta > 0) also draw noise during the loop; they run one image
per batch so that noise is image i's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import MinidiffError
from .schedule import Schedule

SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                  "timestep_spacing": "leading", "steps_offset": 1}
# The sampler a model folder asks for, as diffusers reads it: scheduler/scheduler_config.json's class name.
SAMPLER_OF_SCHEDULER = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                        "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m"}


@dataclass
class Pipeline:
    """Everything `generate` needs. `scheduler_config` is the model's scheduler/scheduler_config.json (diffusers
    keys): `schedule` was built from it, and it names the default timestep spacing and steps_offset."""

    unet: nn.Module
    vae: nn.Module | None  # None: pixel space (the UNet denoises RGB images directly)
    text: nn.Module  # TextConditioner
    schedule: Schedule
    name: str = "minidiff"
    scheduler_config: dict = field(default_factory=lambda: dict(SDXL_SCHEDULER))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def scale(self) -> int:
        """Pixels per latent cell: 2^(levels - 1) of the VAE (8 for SDXL), 1 in pixel space."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> dict:
        """The trainable parts by their diffusers names (what minidiff.lora.load_lora takes)."""
        return {"unet": self.unet, "text_encoder": self.text.text_encoder, "text_encoder_2": self.text.text_encoder_2}


def _stochastic(sampler: str, eta: float) -> bool:
    return sampler in ("euler_a", "ddpm") or (sampler == "ddim" and eta > 0)


def initial_noise(pipe: Pipeline, generators, height: int, width: int) -> torch.Tensor:
    """x_T ~ N(0, I), row i drawn from generators[i]: [N, C, height / scale, width / scale] on the pipeline's device."""
    shape = (pipe.unet.config.in_channels, height // pipe.scale, width // pipe.scale)
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(pipe.device)


@torch.no_grad()
def decode(pipe: Pipeline, x0: torch.Tensor) -> torch.Tensor:
    """x_0 latents -> images in [-1, 1] (one at a time: a 1024^2 decode is memory-heavy), float32."""
    if pipe.vae is None:
        return x0.float().clamp(-1, 1)
    dtype = next(pipe.vae.parameters()).dtype
    out = [pipe.vae.decode((z[None] / pipe.vae.scaling_factor).to(dtype)).float() for z in x0]
    return torch.cat(out).clamp(-1, 1)


def model_sampler(pipe: Pipeline) -> str:
    """The sampler the model's scheduler config names ("euler" when it names none we know)."""
    return SAMPLER_OF_SCHEDULER.get(pipe.scheduler_config.get("_class_name"), "euler")


@torch.no_grad()
def generate(pipe: Pipeline, prompts, negative="", steps=30, cfg=5.0, sampler=None, seed=0, width=1024,
             height=1024, guidance_rescale=0.0, batch_size=4, progress=True, spacing=None, karras=False, eta=0.0,
             noise=None) -> torch.Tensor:
    """Images [N, 3, height, width] in [-1, 1] for N prompts; image i uses seed + i (or row i of `noise`, unit
    Gaussian x_T). Guidance (cfg > 1) batches [uncond ; cond] into one UNet call per step. `spacing` defaults to
    the model's scheduler config ("leading" for SDXL), `sampler` to the one its config names (Euler for SDXL)."""
    from .samplers import cfg as guide
    from .samplers import sample

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    multiple = max(8, pipe.scale)
    if not prompts or width % multiple or height % multiple or min(width, height) <= 0:
        raise MinidiffError(f"generate: need prompts and a width and height that are positive multiples of "
                            f"{multiple}, got {len(prompts)} prompts, {width}x{height}")
    spacing = spacing or pipe.scheduler_config.get("timestep_spacing", "leading")
    sampler = sampler or model_sampler(pipe)
    steps_offset = pipe.scheduler_config.get("steps_offset", 1)
    generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(len(prompts))]
    batch_size = 1 if _stochastic(sampler, eta) else max(1, batch_size)
    unet, dtype, guided = pipe.unet, next(pipe.unet.parameters()).dtype, cfg > 1
    out = []
    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="images", disable=not progress or len(chunks) < 2):
        chunk, gens = prompts[start:start + batch_size], generators[start:start + batch_size]
        x_T = initial_noise(pipe, gens, height, width) if noise is None else noise[start:start + batch_size]
        context, pooled = pipe.text.encode(chunk, negative if guided else None)
        context, pooled = context.to(pipe.device, dtype), pooled.to(pipe.device, dtype)
        ids = pipe.text.time_ids((height, width), (0, 0), (height, width), batch=len(context)).to(pipe.device, dtype)

        def denoise(x, t):
            x_in = torch.cat([x, x]) if guided else x
            eps = unet(x_in.to(dtype), t, context=context, text_embeds=pooled, time_ids=ids).float()
            return guide(*eps.chunk(2), cfg, guidance_rescale) if guided else eps

        x0 = sample(denoise, pipe.schedule, x_T.to(pipe.device), steps=steps, sampler=sampler, spacing=spacing,
                    eta=eta, karras=karras, generator=gens[0] if len(gens) == 1 else None, progress=progress,
                    steps_offset=steps_offset)
        out.append(decode(pipe, x0))
    return torch.cat(out)
