"""Zero terminal SNR, v-prediction and trailing timesteps (Lin et al. 2024) against diffusers and closed forms.

The denoiser is the fixed analytic function of test_samplers.py, read as a v-prediction: any difference between our
loop and diffusers' comes from the schedule and sampler arithmetic (diffusers keeps float32, we float64).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr  # noqa: E402
from test_samplers import CLASSES, denoiser, diffusers_loop  # noqa: E402  (the same schedulers, denoiser, loop)

from minidiff.weights.pretrained import schedule_from_config  # noqa: E402
from minidiff.dreambooth import diffusion_target  # noqa: E402
from minidiff.samplers import init_noise_sigma, plan, sample  # noqa: E402
from minidiff.schedule import Schedule, split_at  # noqa: E402

ZTSNR = dict(num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True, steps_offset=1)
BETAS = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "linear": dict(beta_start=1e-4, beta_end=0.02)}


def ours(kind):
    return schedule_from_config({"beta_schedule": kind, **BETAS[kind], **ZTSNR})


def reference(name, kind, spacing):
    cls, extra = CLASSES[name]
    return cls(beta_schedule=kind, **BETAS[kind], **ZTSNR, **extra, timestep_spacing=spacing)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_rescaled_betas_match_diffusers_and_end_at_zero_snr(kind):
    plain = Schedule.linear() if kind == "linear" else Schedule.scaled_linear()
    s = plain.zero_terminal_snr()
    want = rescale_zero_terminal_snr(plain.betas.clone())  # diffusers' function, run in float64
    torch.testing.assert_close(s.betas, want, rtol=1e-10, atol=1e-12)
    assert s.alpha_bar[-1] == 0 and s.betas[-1] == 1  # SNR(T-1) = 0: x_{T-1} is pure noise
    assert s.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-12)  # s_0 kept
    assert s.sigmas[-1].item() == pytest.approx(2**12)  # alpha_bar read as 2^-24 in sigma space, as diffusers
    torch.testing.assert_close(ours(kind).betas, s.betas)


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize(
    "kind,spacing", [("linear", "trailing"), ("scaled_linear", "trailing"), ("scaled_linear", "linspace")]
)
def test_v_prediction_zero_snr_loop_matches_diffusers(name, kind, spacing):
    steps = 13
    ref = reference(name, kind, spacing)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _, sigmas = plan(ours(kind), steps, name, spacing)
    if name in ("euler", "euler_a", "dpmpp_2m"):
        ref.set_timesteps(steps)
        torch.testing.assert_close(sigmas, ref.sigmas.double(), rtol=1e-5, atol=1e-6)
        assert init_noise_sigma(sigmas, name, spacing) == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
    want = diffusers_loop(reference(name, kind, spacing), noise, steps, seed=5)
    got = sample(
        denoiser,
        ours(kind),
        noise,
        steps,
        name,
        spacing,
        generator=torch.Generator().manual_seed(5),
        progress=False,
        prediction="v_prediction",
    )
    scale = want.abs().max()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-4)


def test_split_inverts_the_forward_process_by_hand():
    """x_t = sqrt(ab) x_0 + sqrt(1-ab) eps and v = sqrt(ab) eps - sqrt(1-ab) x_0  =>  split(v) = (x_0, eps),
    also at alpha_bar = 0 (x_t = eps, v = -x_0)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    for ab in (0.9, 0.3, 1e-3, 0.0):
        a, s = ab**0.5, (1 - ab) ** 0.5
        x_t, v = a * x0 + s * eps, a * eps - s * x0
        got_x0, got_eps = split_at(v, x_t, ab, "v_prediction")
        torch.testing.assert_close(got_x0, x0)
        torch.testing.assert_close(got_eps, eps)
        if ab > 0:
            torch.testing.assert_close(split_at(eps, x_t, ab, "epsilon")[0], x0)


def test_v_target_and_min_snr_weight_on_the_zero_snr_schedule_match_diffusers():
    """The DreamBooth loss target for v (diffusers' get_velocity) and its min-SNR weight
    min(SNR, gamma) / (SNR + 1), with SNR = 0 weighted 1 (diffusers' SDXL DreamBooth scripts)."""
    s, ref = ours("scaled_linear"), reference("ddpm", "scaled_linear", "trailing")
    g = torch.Generator().manual_seed(3)
    z0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 400, 998, 999])
    torch.testing.assert_close(
        diffusion_target(s, z0, eps, t, "v_prediction"), ref.get_velocity(z0, eps, t), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(s.q_sample(z0, t, eps), ref.add_noise(z0, eps, t), rtol=1e-5, atol=1e-5)
    ab = ref.alphas_cumprod.double()[t]
    snr = ab / (1 - ab)
    want = torch.where(snr == 0, 1.0, snr.clamp(max=5.0) / (snr + 1))
    torch.testing.assert_close(s.min_snr_weight(t, 5.0, "v_prediction"), want, rtol=1e-5, atol=1e-7)
    assert s.min_snr_weight(torch.tensor([999]), 5.0, "v_prediction").item() == 1.0


def test_scheduler_config_keys_are_read():
    plain = schedule_from_config({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})
    assert plain.alpha_bar[-1] > 0
    assert ours("linear").alpha_bar[-1] == 0
    from minidiff.errors import CheckpointError

    with pytest.raises(CheckpointError, match="prediction_type"):
        schedule_from_config({"prediction_type": "sample"})
