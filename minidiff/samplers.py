"""Samplers: turn a denoiser `out = denoise(x_in, t)` (eps or v) into images. Plus classifier-free guidance.

Five samplers, each reproducing the diffusers scheduler of the same name step for step (tests/test_samplers.py runs
both loops side by side):

    ddpm      DDPMScheduler (variance "fixed_small")       ancestral, Ho et al. 2020           alpha space
    ddim      DDIMScheduler (set_alpha_to_one=False)       eta = 0 deterministic, Song et al.  alpha space
    euler     EulerDiscreteScheduler                       Karras et al. 2022 Alg. 1 (churn 0) sigma space
    euler_a   EulerAncestralDiscreteScheduler              k-diffusion's sample_euler_ancestral sigma space
    dpmpp_2m  DPMSolverMultistepScheduler (dpmsolver++,    Lu et al. 2022, arXiv 2211.01095    alpha space
              order 2, lower_order_final)

"alpha space" is x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps (what the UNet was trained on);
"sigma space" is x = x_0 + sigma eps = x_t / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar). The Euler
samplers therefore hand the denoiser x / sqrt(sigma^2 + 1), which is x_t again ("scale_model_input").

The denoiser's output is eps or v (`prediction`, the model's scheduler config); each step first turns it into
(x_0, eps) with `schedule.split_at`, so every sampler handles v-prediction as the diffusers scheduler does. Zero
terminal SNR (alpha_bar_{T-1} = 0): alpha-space samplers use alpha_bar exactly (x_0 = -v at t = T-1), sigma-space
ones use sigma_max = 4096 (alpha_bar floored at 2^-24, `Schedule.sigmas`), both as diffusers.

The denoiser receives `t` as a 0-dim tensor on x's device (long for ddpm/ddim/dpmpp_2m, float32 for the Euler
samplers, whose Karras timesteps are fractional) and broadcasts it over the batch, as diffusers' UNet does. The loop
itself runs in float32; a denoiser in half precision casts its input and output itself.
"""

import math
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import MinidiffError
from .schedule import Schedule, karras_sigmas, split_at, timesteps

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")
Denoiser = Callable[[Tensor, Tensor], Tensor]


# ---- classifier-free guidance ---------------------------------------------------------------------------------------


def cfg(eps_uncond: Tensor, eps_cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al. 2023, arXiv
    2305.08891 §3.4; diffusers' `rescale_noise_cfg`):

        eps_cfg  = eps_uncond + scale * (eps_cond - eps_uncond)
        eps_resc = eps_cfg * std(eps_cond) / std(eps_cfg)        std over all dims but the batch
        eps      = rescale * eps_resc + (1 - rescale) * eps_cfg

    Rescaling pulls the guided prediction's spread back to the conditional one's, which stops over-exposure at
    high `scale`.
    """
    eps = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale > 0:
        dims = list(range(1, eps.dim()))
        eps_resc = eps * (eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
        eps = rescale * eps_resc + (1 - rescale) * eps
    return eps


# ---- one step of each sampler ---------------------------------------------------------------------------------------


def ddpm_step(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    z: Optional[Tensor] = None,
    clip_x0: Optional[float] = None,
    x0: Optional[Tensor] = None,
) -> Tensor:
    """Ancestral DDPM step t -> t_prev (Ho et al. 2020 eq. 6-7 and Alg. 2, generalised to skipped steps):

        alpha'_t = alpha_bar_t / alpha_bar_prev,  beta'_t = 1 - alpha'_t
        x_0      = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)                  (clipped to +-clip_x0)
        mean     = sqrt(alpha_bar_prev) beta'_t / (1 - alpha_bar_t) * x_0
                 + sqrt(alpha'_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t
        var      = max((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta'_t, 1e-20)           ("fixed_small")
        x_prev   = mean + sqrt(var) z,   z ~ N(0, I)   (no z at t = 0)

    `x0` given (v-prediction, `split_at`) replaces the x_0 line.
    """
    a_t, b_t = alpha_bar_t / alpha_bar_prev, 1 - alpha_bar_t / alpha_bar_prev
    if x0 is None:
        x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = (math.sqrt(alpha_bar_prev) * b_t / (1 - alpha_bar_t)) * x0 + (
        math.sqrt(a_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    ) * x_t
    if z is None:
        return mean
    var = max((1 - alpha_bar_prev) / (1 - alpha_bar_t) * b_t, 1e-20)
    return mean + math.sqrt(var) * z


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    eta: float = 0.0,
    z: Optional[Tensor] = None,
    clip_x0: Optional[float] = None,
    x0: Optional[Tensor] = None,
) -> Tensor:
    """DDIM step t -> t_prev (Song et al. 2021, eq. 12 and 16):

        x_0     = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)                     (clipped to +-clip_x0)
        sigma_t = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)
        x_prev  = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps + sigma_t z

    eta = 0 is deterministic (an ODE solver); eta = 1 has the DDPM posterior's variance. `x0` given
    (v-prediction, `split_at`) replaces the x_0 line.
    """
    if x0 is None:
        x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    sigma_t = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev - sigma_t**2) * eps
    if eta > 0 and z is not None:
        x_prev = x_prev + sigma_t * z
    return x_prev


def euler_step(x: Tensor, eps: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Euler step of the probability-flow ODE dx/dsigma = (x - x_0)/sigma in sigma space (Karras et al. 2022
    Alg. 1 without churn; diffusers' EulerDiscreteScheduler.step):

        x_0    = x - sigma eps
        d      = (x - x_0) / sigma          (= eps)
        x_next = x + d (sigma_next - sigma)
    """
    x0 = x - sigma * eps
    d = (x - x0) / sigma
    return x + d * (sigma_next - sigma)


def euler_ancestral_step(x: Tensor, eps: Tensor, sigma: float, sigma_next: float, z: Tensor) -> Tensor:
    """Euler-ancestral step (k-diffusion `sample_euler_ancestral`, eta = 1): step deterministically down to
    sigma_down, then add fresh noise of std sigma_up so that sigma_down^2 + sigma_up^2 = sigma_next^2:

        sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        x_0        = x - sigma eps,   d = (x - x_0) / sigma
        x_next     = x + d (sigma_down - sigma) + sigma_up z
    """
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x0 = x - sigma * eps
    d = (x - x0) / sigma
    return x + d * (sigma_down - sigma) + sigma_up * z


def dpmpp_2m_step(
    x: Tensor,
    x0: Tensor,
    sigma: float,
    sigma_next: float,
    x0_prev: Optional[Tensor] = None,
    sigma_prev: Optional[float] = None,
) -> Tensor:
    """DPM-Solver++(2M) step in alpha space (Lu et al. 2022, arXiv 2211.01095, Alg. 2, "midpoint" form as in
    diffusers). With sigma in sigma space, the VP quantities are

        a = 1 / sqrt(sigma^2 + 1),   s = sigma * a,   lambda = log(a / s) = -log(sigma)
        h = lambda_next - lambda  ->  exp(-h) = sigma_next / sigma

    first order (the first step, the last step, or without history; this is DDIM):
        x_next = (s_next / s) x - a_next (exp(-h) - 1) x_0
    second order, with the previous step's x_0 and h_0 = lambda - lambda_prev, r = h_0 / h:
        D = x_0 + (x_0 - x0_prev) / (2 r)
        x_next = (s_next / s) x - a_next (exp(-h) - 1) D

    `x0` is the data prediction (x - s eps) / a. At sigma_next = 0 the step returns D (first order: x_0).
    """
    s = sigma / math.sqrt(sigma**2 + 1)  # a = 1 / sqrt(sigma^2 + 1) enters only through x0
    a_next, s_next = 1 / math.sqrt(sigma_next**2 + 1), sigma_next / math.sqrt(sigma_next**2 + 1)
    exp_neg_h = sigma_next / sigma
    D = x0
    if x0_prev is not None:
        h = math.log(sigma / sigma_next)
        h_0 = math.log(sigma_prev / sigma)
        D = x0 + (x0 - x0_prev) * (h / h_0) * 0.5
    return (s_next / s) * x - (a_next * (exp_neg_h - 1.0)) * D


# ---- the timesteps and sigmas of a sampling run ---------------------------------------------------------------------


def plan(
    schedule: Schedule,
    steps: int,
    sampler: str = "euler",
    spacing: str = "leading",
    karras: bool = False,
    steps_offset: int = 1,
) -> tuple[Tensor, Tensor]:
    """The timesteps (float64 [steps], descending) and sigmas (float64 [steps + 1], ending in 0) a sampler visits,
    exactly as the matching diffusers scheduler's `set_timesteps` makes them:

      ddpm, ddim:   integer timesteps `timesteps(steps, spacing)` (rounded); sigma_i = sigma(t_i).
      euler(_a):    timesteps(steps, spacing) may be fractional; sigma_i = linear interpolation of the training
                    sigmas at t_i. With karras: sigma_i = karras_sigmas(sigma_{last}, sigma_{first}, steps), and
                    t_i = sigma_to_t(sigma_i) (fractional, log-sigma interpolation).
      dpmpp_2m:     "leading"/"linspace" lay out steps + 1 points and drop the last (diffusers does so because the
                    solver's last step goes all the way to sigma = 0); "trailing" as above. With karras: sigmas
                    from the full training range sigma(0)..sigma(T-1), timesteps rounded to integers.
    """
    if sampler not in SAMPLERS:
        raise MinidiffError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    T = schedule.T
    if sampler in ("ddpm", "ddim"):
        if karras:
            raise MinidiffError(f"karras sigmas work with euler, euler_a and dpmpp_2m, not {sampler}")
        ts = timesteps(steps, spacing, T, steps_offset).round()
        sig = schedule.sigmas[ts.long()]
    elif sampler in ("euler", "euler_a"):
        ts = timesteps(steps, spacing, T, steps_offset)
        sig = schedule.sigma_at(ts)
        if karras:
            sig = karras_sigmas(sig[-1].item(), sig[0].item(), steps)
            ts = schedule.sigma_to_t(sig)
    else:  # dpmpp_2m
        if karras:
            sig = karras_sigmas(schedule.sigmas[0].item(), schedule.sigmas[-1].item(), steps)
            ts = schedule.sigma_to_t(sig).round()
        else:
            if spacing == "trailing":
                ts = timesteps(steps, spacing, T, steps_offset)
            else:
                ts = timesteps(steps + 1, spacing, T, steps_offset)[:-1].round()
            sig = schedule.sigma_at(ts)
    return ts, torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def init_noise_sigma(sigmas: Tensor, sampler: str, spacing: str) -> float:
    """The factor the unit noise is multiplied by before the first step (diffusers' `init_noise_sigma`).

    Alpha-space samplers: 1. Euler samplers: sigma_max for "linspace"/"trailing" (x = x_0 + sigma eps with x_0
    ignored), but sqrt(sigma_max^2 + 1) for "leading" (= x_T / sqrt(alpha_bar) with x_T ~ N(0, I): pure noise in
    alpha space seen in sigma space).
    """
    if sampler not in ("euler", "euler_a"):
        return 1.0
    s = sigmas.max().item()
    return s if spacing in ("linspace", "trailing") else math.sqrt(s**2 + 1)


def start_index(steps: int, strength: float) -> int:
    """Where img2img / inpainting begins in a `steps`-step plan (diffusers' `get_timesteps`): the last
    int(steps * strength) steps are run, so strength 1 runs them all and strength 0.5 of 30 runs the last 15.

        start = steps - min(int(steps * strength), steps)
    """
    if not 0 < strength <= 1:
        raise MinidiffError(f"strength must be in (0, 1], got {strength}")
    start = steps - min(int(steps * strength), steps)
    if start >= steps:
        raise MinidiffError(f"strength {strength} of {steps} steps runs no step: need steps * strength >= 1")
    return start


def noised(x0: Tensor, noise: Tensor, sigma: float, sampler: str) -> Tensor:
    """q(x_t | x_0) at noise level sigma, in the space the sampler works in (diffusers' `add_noise`):

    sigma space (euler, euler_a):  x   = x_0 + sigma eps
    alpha space (the others):      x_t = (x_0 + sigma eps) / sqrt(sigma^2 + 1) = sqrt(alpha_bar) x_0
                                                                              + sqrt(1 - alpha_bar) eps
    """
    x = x0.float() + sigma * noise.float()
    return x if sampler in ("euler", "euler_a") else x / math.sqrt(sigma**2 + 1)


def _randn(x: Tensor, generator) -> Tensor:
    """Unit noise shaped like x, drawn from `generator` on its own device (the global RNG if None), then moved.
    A list of generators draws row i of the batch from generator i (a batch then gives each row the noise it
    would get alone)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([_randn(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=torch.float32, device=device).to(x.device)


# ---- the loop -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    denoise: Denoiser,
    schedule: Schedule,
    noise: Tensor,
    steps: int = 30,
    sampler: str = "euler",
    spacing: str = "leading",
    eta: float = 0.0,
    karras: bool = False,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    steps_offset: int = 1,
    clip_x0: Optional[float] = None,
    init: Optional[Tensor] = None,
    start: int = 0,
    mask: Optional[Tensor] = None,
    prediction: str = "epsilon",
) -> Tensor:
    """Run `sampler` for `steps` steps from unit Gaussian `noise` [B, C, H, W] and return x_0 (float32).
    `prediction`: what the denoiser outputs, "epsilon" or "v_prediction".

    `generator` (one, or one per row) is the only source of randomness for the stochastic samplers (ddpm,
    euler_a, ddim with eta > 0): same noise + same generator seed -> same result. `clip_x0` clamps the predicted x_0 of ddpm/ddim (pixel
    models: 1.0, as diffusers' `clip_sample`); latent models leave it None.

    Editing an image x_0 = `init` (docs/07-sdedit-inpainting.md), as diffusers' img2img and inpaint pipelines do:
      img2img (SDEdit):  begin at step `start` (= start_index(steps, strength)) from
                         x = noised(init, noise, sigma_start)
      inpainting:        `mask` [B, 1, H, W], 1 = repaint; before each later step i the known region is put back at
                         that step's noise level, with the same noise:  x = mask x + (1 - mask) noised(init, noise,
                         sigma_i), and at the end x = mask x + (1 - mask) init. At start = 0 (strength 1) it begins
                         from pure noise, like text to image.
    """
    ts, sigmas = plan(schedule, steps, sampler, spacing, karras, steps_offset)
    ab = schedule.alpha_bar
    if init is None or (mask is not None and start == 0):
        x = noise.float() * init_noise_sigma(sigmas, sampler, spacing)
    else:
        x = noised(init, noise, sigmas[start].item(), sampler)
    x0_prev = None
    bar = tqdm(
        range(start, len(ts)), desc=f"sampling ({sampler}, {len(ts) - start} steps)", disable=not progress, leave=False
    )
    for i in bar:
        if i > start and mask is not None:  # the known region, re-noised to this step's level
            x = mask * x + (1 - mask) * noised(init, noise, sigmas[i].item(), sampler)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        if sampler in ("euler", "euler_a"):
            t_in = torch.tensor(ts[i].item(), dtype=torch.float32, device=x.device)
            x_in = x / math.sqrt(sigma**2 + 1)  # = x_t, at alpha_bar = 1 / (sigma^2 + 1)
            _, eps = split_at(denoise(x_in, t_in).float(), x_in, 1 / (sigma**2 + 1), prediction)
            if sampler == "euler":
                x = euler_step(x, eps, sigma, sigma_next)
            else:
                x = euler_ancestral_step(x, eps, sigma, sigma_next, _randn(x, generator))
            continue

        t = int(ts[i].item())
        out = denoise(x, torch.tensor(t, dtype=torch.long, device=x.device)).float()
        if sampler == "ddpm":
            x0, eps = split_at(out, x, ab[t].item(), prediction)
            t_prev = int(ts[i + 1].item()) if i + 1 < len(ts) else -1
            ab_prev = ab[t_prev].item() if t_prev >= 0 else 1.0
            z = _randn(x, generator) if t > 0 else None
            x = ddpm_step(x, eps, ab[t].item(), ab_prev, z, clip_x0, x0)
        elif sampler == "ddim":
            t_prev = t - schedule.T // steps  # diffusers' DDIMScheduler: a fixed stride, whatever the spacing
            ab_prev = ab[t_prev].item() if t_prev >= 0 else ab[0].item()  # set_alpha_to_one=False
            x0, eps = split_at(out, x, ab[t].item(), prediction)
            z = _randn(x, generator) if eta > 0 else None
            x = ddim_step(x, eps, ab[t].item(), ab_prev, eta, z, clip_x0, x0)
        else:  # dpmpp_2m
            x0, _ = split_at(out, x, 1 / (sigma**2 + 1), prediction)  # alpha_bar = a^2 = 1 / (sigma^2 + 1)
            second_order = x0_prev is not None and i < len(ts) - 1  # lower_order_final: last step is first order
            x = dpmpp_2m_step(
                x,
                x0,
                sigma,
                sigma_next,
                x0_prev if second_order else None,
                sigmas[i - 1].item() if second_order else None,
            )
            x0_prev = x0
    return x if mask is None else mask * x + (1 - mask) * init.float()
