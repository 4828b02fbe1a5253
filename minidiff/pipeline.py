"""Text to image, the whole of it: prompts -> context -> sampler loop with guidance -> VAE decode.

    context, pooled = text.encode(prompts, negative)             [uncond ; cond], zeros for an empty negative
    x_T ~ N(0, I)  (image i drawn from its own generator seeded seed + i)
    for each step:  eps_u, eps_c = unet(cat[x, x], t, context, pooled, time_ids).chunk(2)     one UNet call
                    eps = cfg(eps_u, eps_c, scale, rescale)                                   (samplers.cfg)
                    x = sampler step(x, eps)                                                  (samplers.sample)
    image = vae.decode(x_0 / scaling_factor)          in [-1, 1]; vae None = the UNet works on pixels directly

Editing (docs/07-sdedit-inpainting.md): init_images start the loop part-way from the noised image (SDEdit, img2img);
masks put the known region back at every step (any UNet) or are fed to a 9-channel inpainting UNet beside x_t.

Same seed -> same image, whatever the batch size: the noise of image i comes from torch.Generator seeded seed + i on
the CPU. Stochastic samplers (euler_a, ddpm, ddim with eta > 0) also draw noise during the loop; they run one image
per batch so that noise is image i's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import MinidiffError
from .schedule import Schedule

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
# The sampler a model folder asks for, as diffusers reads it: scheduler/scheduler_config.json's class name.
SAMPLER_OF_SCHEDULER = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}


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
    vae_tile: int | None = 64  # decode latents wider than this in overlapping tiles (vae.decode_tiled); None: whole

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def scale(self) -> int:
        """Pixels per latent cell: 2^(levels - 1) of the VAE (8 for SDXL), 1 in pixel space."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> dict:
        """The trainable parts by their diffusers names (what minidiff.lora.load_lora takes)."""
        both = {"unet": self.unet, "text_encoder": self.text.text_encoder, "text_encoder_2": self.text.text_encoder_2}
        return {name: m for name, m in both.items() if m is not None}  # SD 1.x / 2.x: one text encoder


def initial_noise(pipe: Pipeline, generators, height: int, width: int) -> torch.Tensor:
    """x_T ~ N(0, I), row i drawn from generators[i]: [N, C, height / scale, width / scale] on the pipeline's device."""
    shape = (pipe.unet.config.out_channels, height // pipe.scale, width // pipe.scale)
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(pipe.device)


def inpainting_unet(pipe: Pipeline) -> bool:
    """SDXL's inpainting UNet takes [x_t | mask | z(masked image)]: 4 + 1 + 4 = 9 input channels."""
    c = pipe.unet.config
    return c.in_channels == 2 * c.out_channels + 1


@torch.no_grad()
def encode(pipe: Pipeline, images: torch.Tensor, generators) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> x_0 = scaling_factor * z, z ~ q(z | image) drawn from generators[i] (as
    diffusers' pipelines do: a posterior sample, not its mean). Pixel space: the images themselves."""
    if pipe.vae is None:
        return images.float().to(pipe.device)
    dtype = next(pipe.vae.parameters()).dtype
    z = [pipe.vae.encode(x[None].to(pipe.device, dtype)).sample(g).float() for x, g in zip(images, generators)]
    return torch.cat(z) * pipe.vae.scaling_factor


def _rows(texts, n: int) -> list:
    """A str, or a list of 1 or n str -> a list of n str."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) not in (1, n):
        raise MinidiffError(f"generate: expected 1 or {n} second prompts, got {len(texts)}")
    return texts * n if len(texts) == 1 else texts


def _check_edit(images, masks, n, height, width):
    """init_images / masks: tensors of shape [n or 1, 3 | 1, height, width] in [-1, 1] / [0, 1]."""
    for name, x, c, lo in (("init_images", images, 3, -1), ("masks", masks, 1, 0)):
        if x is None:
            continue
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 4
            or x.shape[0] not in (1, n)
            or x.shape[1] != c
            or tuple(x.shape[2:]) != (height, width)
        ):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MinidiffError(f"generate: {name} must be a tensor [{n} or 1, {c}, {height}, {width}], got {shape}")
        if x.min() < lo - 1e-3 or x.max() > 1 + 1e-3:
            raise MinidiffError(f"generate: {name} must lie in [{lo}, 1], got [{x.min():.3g}, {x.max():.3g}]")
    if masks is not None and images is None:
        raise MinidiffError("generate: masks need init_images (the picture whose masked part is repainted)")


@torch.no_grad()
def decode(pipe: Pipeline, x0: torch.Tensor) -> torch.Tensor:
    """x_0 latents -> images in [-1, 1] (one at a time: a 1024^2 decode is memory-heavy), float32. Latents wider than
    pipe.vae_tile are decoded in tiles overlapping by a quarter tile: the whole fp32 decode at 1024 px needs ~3 GiB,
    more than the UNet's own working set (docs/memory-budget.md)."""
    if pipe.vae is None:
        return x0.float().clamp(-1, 1)
    dtype = next(pipe.vae.parameters()).dtype
    tile = pipe.vae_tile

    def one(z):
        return pipe.vae.decode_tiled(z, tile, tile // 4) if tile else pipe.vae.decode(z)

    out = [one((z[None] / pipe.vae.scaling_factor).to(dtype)).float() for z in x0]
    return torch.cat(out).clamp(-1, 1)


def model_sampler(pipe: Pipeline) -> str:
    """The sampler the model's scheduler config names ("euler" when it names none we know)."""
    return SAMPLER_OF_SCHEDULER.get(pipe.scheduler_config.get("_class_name"), "euler")


def default_guidance_rescale(pipe: Pipeline) -> float:
    """0.7 for a zero-terminal-SNR model (Lin et al. 2024 §3.4 recommend phi = 0.7 with it), else 0 (off)."""
    return 0.7 if pipe.scheduler_config.get("rescale_betas_zero_snr") else 0.0


@torch.no_grad()
def generate(
    pipe: Pipeline,
    prompts,
    negative="",
    steps=30,
    cfg=5.0,
    sampler=None,
    seed=0,
    width=None,
    height=None,
    guidance_rescale=None,
    batch_size=4,
    progress=True,
    spacing=None,
    karras=False,
    eta=0.0,
    noise=None,
    init_images=None,
    strength=1.0,
    masks=None,
    prompt_2=None,
    negative_2=None,
    controls=(),
) -> torch.Tensor:
    """Images [N, 3, height, width] in [-1, 1] for N prompts; image i uses seed + i (or row i of `noise`, unit
    Gaussian x_T). Guidance (cfg > 1) batches [uncond ; cond] into one UNet call per step. `spacing` defaults to
    the model's scheduler config ("leading" for SDXL), `sampler` to the one its config names (Euler for SDXL),
    `guidance_rescale` to 0.7 for a zero-terminal-SNR model (Lin et al. 2024 §3.4), else 0.
    Size: width/height, else that of init_images, else 1024. Prompts are read in A1111's syntax ((word:1.3),
    [word], longer than 75 tokens in chunks; text.parse_emphasis); `prompt_2` / `negative_2` (default: the same)
    go to the second text encoder, as diffusers' prompt_2.

    Editing, as diffusers' StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline do (tested against
    both): `init_images` [N or 1, 3, H, W] in [-1, 1] alone is img2img (SDEdit): the last int(steps * strength)
    steps run from the image noised to that level. With `masks` [N or 1, 1, H, W] in [0, 1] (1 = repaint,
    binarised at 0.5) it is inpainting: a 4-channel UNet gets the known region put back at each step's noise
    level; a 9-channel inpainting UNet also sees [mask | z(image * (1 - mask))] beside x_t. Image i's generator
    draws, in order: the posterior sample of its init image (when used), x_T, that of its masked image (9-ch).

    `controls`: ControlNets as [(net, image, scale)] or controlnet.Control (with start / end / guess mode); their
    residuals are summed into every UNet call (image: [1 or N, 3, H, W] in [0, 1] or PIL, resized to the images').
    """
    from .controlnet import ControlledDenoiser, prepare_controls
    from .samplers import cfg as guide
    from .samplers import sample, start_index

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if init_images is not None and width is None and height is None:
        height, width = init_images.shape[-2:]
    width, height = width or 1024, height or 1024
    multiple = max(8, pipe.scale)
    if not prompts or width % multiple or height % multiple or min(width, height) <= 0:
        raise MinidiffError(
            f"generate: need prompts and a width and height that are positive multiples of "
            f"{multiple}, got {len(prompts)} prompts, {width}x{height}"
        )
    n = len(prompts)
    _check_edit(init_images, masks, n, height, width)
    spacing = spacing or pipe.scheduler_config.get("timestep_spacing", "leading")
    sampler = sampler or model_sampler(pipe)
    steps_offset = pipe.scheduler_config.get("steps_offset", 1)
    if guidance_rescale is None:
        guidance_rescale = default_guidance_rescale(pipe)
    start = start_index(steps, strength) if init_images is not None else 0
    nine = inpainting_unet(pipe)
    if init_images is not None:
        init_images = init_images.float().expand(n, -1, -1, -1)
    if masks is not None:
        masks = (masks.float() >= 0.5).float().expand(n, -1, -1, -1)  # diffusers' mask processor binarises
    elif nine:  # text to image (or img2img) with an inpainting UNet: everything is to be painted
        masks = torch.ones(n, 1, height, width)
        init_images = torch.zeros(n, 3, height, width) if init_images is None else init_images
    latent_size = (height // pipe.scale, width // pipe.scale)
    generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(n)]
    batch_size = max(1, batch_size)  # stochastic samplers draw each row's noise from its own generator
    unet, dtype, guided = pipe.unet, next(pipe.unet.parameters()).dtype, cfg > 1
    controls = prepare_controls(controls, unet, height, width, pipe.scale)
    out = []
    chunks = range(0, n, batch_size)
    for b in tqdm(chunks, desc="images", disable=not progress or len(chunks) < 2):
        rows = slice(b, b + batch_size)
        chunk, gens = prompts[rows], generators[rows]
        uses_init = init_images is not None and (not nine or start > 0)
        x0_init = encode(pipe, init_images[rows], gens) if uses_init else None
        x_T = initial_noise(pipe, gens, height, width) if noise is None else noise[rows]
        mask = cond = None
        if masks is not None:
            mask = F.interpolate(masks[rows], size=latent_size).to(pipe.device)  # nearest, as diffusers
            if nine:
                masked = encode(pipe, init_images[rows] * (1 - masks[rows]), gens)
                cond = torch.cat([mask, masked], dim=1)
                cond = (torch.cat([cond, cond]) if guided else cond).to(dtype)
                mask = None  # no blending: the UNet sees the known region through `cond`
        second = None if prompt_2 is None else _rows(prompt_2, n)[rows]
        context, pooled = pipe.text.encode(
            chunk, negative if guided else None, prompts_2=second, negative_2=negative_2, emphasis=True
        )
        context, pooled = context.to(pipe.device, dtype), pooled.to(pipe.device, dtype)
        ids = pipe.text.time_ids((height, width), (0, 0), (height, width), batch=len(context)).to(pipe.device, dtype)
        control = ControlledDenoiser(controls, steps - start, guided)  # the steps the sampler runs

        def denoise(x, t):
            x_in = (torch.cat([x, x]) if guided else x).to(dtype)
            residuals = control(x_in, t, context, pooled, ids, rows)  # ControlNets see x_t, not the 9-ch extras
            x_in = x_in if cond is None else torch.cat([x_in, cond], dim=1)
            eps = unet(x_in, t, context=context, text_embeds=pooled, time_ids=ids, **residuals).float()
            return guide(*eps.chunk(2), cfg, guidance_rescale) if guided else eps

        x0 = sample(
            denoise,
            pipe.schedule,
            x_T.to(pipe.device),
            steps=steps,
            sampler=sampler,
            spacing=spacing,
            eta=eta,
            karras=karras,
            generator=gens,
            progress=progress,
            steps_offset=steps_offset,
            init=x0_init,
            start=start,
            mask=mask,
            prediction=pipe.scheduler_config.get("prediction_type", "epsilon"),
        )
        out.append(decode(pipe, x0))
    return torch.cat(out)
