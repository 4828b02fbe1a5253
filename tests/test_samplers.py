"""samplers.py against diffusers' schedulers (the reference oracle), run side by side on the same denoiser and noise.

The denoiser is a fixed analytic function eps = 0.1 x + sin(t / 100) (no network), so any difference comes from the
sampler arithmetic. diffusers keeps its betas and sigmas in float32 while we use float64; after a whole loop the two
agree to ~1e-6 of the sample's magnitude, so the tolerance is 1e-5 relative to max|x|.
"""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg  # noqa: E402

from minidiff.errors import MinidiffError  # noqa: E402
from minidiff.samplers import cfg, init_noise_sigma, plan, sample  # noqa: E402
from minidiff.schedule import Schedule  # noqa: E402

SDXL = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
CLASSES = {
    "ddpm": (DDPMScheduler, dict(clip_sample=False, variance_type="fixed_small")),
    "ddim": (DDIMScheduler, dict(set_alpha_to_one=False, clip_sample=False)),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True),
    ),
}
KARRAS_OK = ("euler", "dpmpp_2m")  # the diffusers schedulers that take use_karras_sigmas
CASES = [
    (name, spacing, karras)
    for name in CLASSES
    for spacing in ("leading", "trailing", "linspace")
    for karras in ((False, True) if name in KARRAS_OK else (False,))
]


def reference(name, spacing, karras, config=SDXL, **overrides):
    cls, extra = CLASSES[name]
    kw = {**config, **extra, **overrides, "timestep_spacing": spacing}
    if karras:
        kw["use_karras_sigmas"] = True
    return cls(**kw)


def denoiser(x, t):
    return 0.1 * x + torch.sin(t / 100)


def diffusers_loop(scheduler, noise, steps, seed, eta=None):
    """The loop of diffusers' pipelines: init_noise_sigma, scale_model_input, step(generator=...)."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = denoiser(scheduler.scale_model_input(x, t), t)
        kw = {"eta": eta} if eta is not None else {}
        x = scheduler.step(eps, t, x, generator=g, **kw).prev_sample
    return x


@pytest.mark.parametrize("name,spacing,karras", CASES)
@pytest.mark.parametrize("steps", [7, 30, 50])
def test_plan_matches_diffusers_timesteps_and_sigmas(name, spacing, karras, steps):
    ref = reference(name, spacing, karras)
    ref.set_timesteps(steps)
    ts, sigmas = plan(Schedule.scaled_linear(), steps, name, spacing, karras)
    if name in ("ddpm", "ddim", "dpmpp_2m"):  # integer timesteps: identical
        assert torch.equal(ts.long(), ref.timesteps.long())
    else:  # float32 in diffusers (sigma_to_t on float32 sigmas for karras): 1e-3 of a step
        torch.testing.assert_close(ts, ref.timesteps.double(), rtol=0, atol=2e-3)
    if hasattr(ref, "sigmas") and name not in ("ddpm", "ddim"):
        torch.testing.assert_close(sigmas, ref.sigmas.double(), rtol=1e-5, atol=1e-7)
        assert sigmas[-1] == 0
    init = init_noise_sigma(sigmas, name, spacing)
    assert init == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)


@pytest.mark.parametrize("name,spacing,karras", CASES)
def test_full_loop_matches_diffusers(name, spacing, karras):
    steps = 13  # < 15 exercises DPM-Solver's lower_order_final; not a divisor of 1000
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want = diffusers_loop(reference(name, spacing, karras), noise, steps, seed=5)
    got = sample(
        denoiser,
        Schedule.scaled_linear(),
        noise,
        steps,
        name,
        spacing,
        karras=karras,
        generator=torch.Generator().manual_seed(5),
        progress=False,
    )
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_pixel_config_with_x0_clipping_matches_diffusers(name):
    """Pixel DDPM settings: linear betas 1e-4..0.02, clip x_0 to [-1, 1] (diffusers' clip_sample=True)."""
    config = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", steps_offset=1)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    want = diffusers_loop(reference(name, "leading", False, config, clip_sample=True), noise, 20, seed=3)
    got = sample(
        denoiser,
        Schedule.linear(),
        noise,
        20,
        name,
        "leading",
        generator=torch.Generator().manual_seed(3),
        progress=False,
        clip_x0=1.0,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_ddim_eta_matches_diffusers():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    want = diffusers_loop(reference("ddim", "trailing", False), noise, 10, seed=6, eta=0.7)
    got = sample(
        denoiser,
        Schedule.scaled_linear(),
        noise,
        10,
        "ddim",
        "trailing",
        eta=0.7,
        generator=torch.Generator().manual_seed(6),
        progress=False,
    )
    torch.testing.assert_close(got / want.abs().max(), want / want.abs().max(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name,karras",
    [
        ("ddpm", False),
        ("ddim", False),
        ("euler", False),
        ("euler", True),
        ("euler_a", False),
        ("dpmpp_2m", False),
        ("dpmpp_2m", True),
    ],
)
def test_exact_denoiser_of_one_image_returns_that_image(name, karras):
    """If the data set is one image x0, the exact noise prediction is eps(x_t, t) = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
    with ab = 1 / (sigma(t)^2 + 1), and every sampler must land on x0 (a closed-form check of the scalings: which x
    the denoiser sees, and how eps turns into x_0). DDIM stops at alpha_bar_0 (set_alpha_to_one=False), leaving
    sqrt(1 - alpha_bar_0) * eps ~ 0.03 * eps of noise; the others end at sigma = 0."""
    schedule = Schedule.scaled_linear()
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def exact(x_t, t):
        ab = 1 / (schedule.sigma_at(t.double()).item() ** 2 + 1)
        return (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)

    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = sample(
        exact,
        schedule,
        noise,
        20,
        name,
        "trailing",
        karras=karras,
        generator=torch.Generator().manual_seed(2),
        progress=False,
    )
    torch.testing.assert_close(got, x0, rtol=0, atol=0.1 if name == "ddim" else 1e-4)


def test_ddim_eta0_is_deterministic():
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda seed, eta: sample(
        denoiser,
        Schedule.linear(),
        noise,
        10,
        "ddim",
        eta=eta,  # noqa: E731
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    assert torch.equal(run(1, 0.0), run(2, 0.0))
    assert not torch.allclose(run(1, 1.0), run(2, 1.0))  # the check can fail: eta > 0 does use the generator


@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_same_seed_same_result(name):
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda seed: sample(
        denoiser,
        Schedule.linear(),
        noise,
        8,
        name,  # noqa: E731
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_cfg_and_guidance_rescale_match_diffusers(rescale):
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c = torch.randn(3, 4, 8, 8, generator=g), 1.5 * torch.randn(3, 4, 8, 8, generator=g)
    scale = 7.5
    want = eps_u + scale * (eps_c - eps_u)  # the pipeline's guidance line
    if rescale > 0:
        want = rescale_noise_cfg(want, eps_c, guidance_rescale=rescale)
    torch.testing.assert_close(cfg(eps_u, eps_c, scale, rescale), want, rtol=1e-6, atol=1e-6)
    if rescale == 1.0:  # fully rescaled: each image's std equals the conditional prediction's
        got = cfg(eps_u, eps_c, scale, rescale)
        torch.testing.assert_close(got.flatten(1).std(1), eps_c.flatten(1).std(1), rtol=1e-5, atol=0)


def test_cfg_scale_one_is_the_conditional_prediction():
    eps_u, eps_c = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(cfg(eps_u, eps_c, 1.0), eps_c)
    torch.testing.assert_close(cfg(eps_u, eps_c, 0.0), eps_u)


def test_denoiser_gets_scaled_input_and_timestep():
    """Euler hands the UNet x / sqrt(sigma^2 + 1) (= alpha-space x_t, unit variance at the first step) and t."""
    seen = []

    def spy(x, t):
        seen.append((x.std().item(), t))
        return torch.zeros_like(x)

    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sample(spy, Schedule.scaled_linear(), noise, 10, "euler", "leading", progress=False)
    assert seen[0][0] == pytest.approx(noise.std().item(), rel=1e-5)
    assert seen[0][1].dtype == torch.float32 and seen[0][1].dim() == 0 and seen[0][1].item() == 901
    seen.clear()
    sample(spy, Schedule.scaled_linear(), noise, 10, "ddim", "trailing", progress=False)
    assert seen[0][1].dtype == torch.long and [t.item() for _, t in seen][:2] == [999, 899]


def test_bad_arguments_raise_minidiff_errors():
    with pytest.raises(MinidiffError, match="unknown sampler"):
        plan(Schedule.linear(), 10, "heun")
    with pytest.raises(MinidiffError, match="karras"):
        plan(Schedule.linear(), 10, "ddim", karras=True)
    with pytest.raises(MinidiffError, match="spacing"):
        plan(Schedule.linear(), 10, "euler", spacing="uniform")
    with pytest.raises(MinidiffError, match="steps"):
        plan(Schedule.linear(), 0, "euler")
    assert math.isfinite(init_noise_sigma(torch.tensor([3.0, 0.0]), "euler", "leading"))
