"""Identities the walkthrough (docs/*.md) states that no module's own test checks: each against an independent
computation (a closed form, another sampler, a real file). The docs name these tests next to their equations."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from minidiff import lora
from minidiff.samplers import ddim_step, ddpm_step, euler_step
from minidiff.schedule import Schedule
from minidiff.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = [Schedule.linear, Schedule.cosine, Schedule.scaled_linear]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("make", SCHEDULES)
def test_eps_form_of_the_posterior_mean(make):
    """Ho et al. eq. 11: with x_0 = predict_x0(x_t, t, eps), the posterior mean is
    mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)."""
    s = make()
    x0, eps = _randn(5, 3, 4, 4), _randn(5, 3, 4, 4, seed=1)
    t = torch.tensor([1, 10, 200, 600, 999])
    x_t = s.q_sample(x0, t, eps)
    mean, _ = s.posterior(s.predict_x0(x_t, t, eps), x_t, t)
    b, a, ab = (v[t].view(-1, 1, 1, 1) for v in (s.betas, s.alphas, s.alpha_bar))
    torch.testing.assert_close(mean, (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", SCHEDULES)
def test_ddpm_step_is_the_posterior_at_the_predicted_x0(make):
    """samplers.ddpm_step(t -> t-1) = mean + sqrt(var) z of Schedule.posterior(predict_x0(x_t, t, eps), x_t, t)."""
    s = make()
    x_t, eps, z = _randn(1, 3, 4, 4), _randn(1, 3, 4, 4, seed=1), _randn(1, 3, 4, 4, seed=2)
    for t in (1, 50, 500, 999):
        tt = torch.tensor([t])
        mean, var = s.posterior(s.predict_x0(x_t, tt, eps), x_t, tt)
        got = ddpm_step(x_t, eps, s.alpha_bar[t].item(), s.alpha_bar[t - 1].item(), z)
        torch.testing.assert_close(got, mean + var.sqrt() * z, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", SCHEDULES)
def test_ddim_with_eta_one_is_the_ddpm_step(make):
    """DDIM's sigma_t at eta = 1 is the posterior's std and its mean the posterior mean: same z, same x_prev."""
    s = make()
    x_t, eps, z = _randn(2, 3, 4, 4), _randn(2, 3, 4, 4, seed=1), _randn(2, 3, 4, 4, seed=2)
    for t, t_prev in ((999, 979), (500, 480), (100, 50), (20, 0)):
        ab, ab_prev = s.alpha_bar[t].item(), s.alpha_bar[t_prev].item()
        torch.testing.assert_close(
            ddim_step(x_t, eps, ab, ab_prev, eta=1.0, z=z), ddpm_step(x_t, eps, ab, ab_prev, z), rtol=1e-9, atol=1e-9
        )
        assert not torch.allclose(ddim_step(x_t, eps, ab, ab_prev, eta=0.0), ddpm_step(x_t, eps, ab, ab_prev, z))


@pytest.mark.parametrize("make", SCHEDULES)
def test_euler_in_sigma_space_is_ddim_eta0_in_alpha_space(make):
    """x = x_t / sqrt(alpha_bar) = x_0 + sigma eps; the model sees x / sqrt(sigma^2 + 1) = x_t; and one Euler step
    sigma -> sigma_next is exactly one DDIM (eta = 0) step t -> t_prev, rescaled by sqrt(alpha_bar_prev)."""
    s = make()
    x0, eps = _randn(2, 3, 4, 4), _randn(2, 3, 4, 4, seed=1)
    for t, t_prev in ((999, 899), (600, 300), (40, 0)):
        tt = torch.tensor([t])
        x_t = s.q_sample(x0, tt, eps)
        sigma, sigma_next = s.sigmas[t].item(), s.sigmas[t_prev].item()
        ab, ab_prev = s.alpha_bar[t].item(), s.alpha_bar[t_prev].item()
        x = x_t / math.sqrt(ab)
        torch.testing.assert_close(x, x0 + sigma * eps, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x / math.sqrt(sigma**2 + 1), x_t, rtol=1e-9, atol=1e-9)
        eps_hat = _randn(2, 3, 4, 4, seed=t)  # any prediction, not only the true eps
        torch.testing.assert_close(
            euler_step(x, eps_hat, sigma, sigma_next),
            ddim_step(x_t, eps_hat, ab, ab_prev) / math.sqrt(ab_prev),
            rtol=1e-9,
            atol=1e-9,
        )


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_give_one_loss_in_eps_v_and_x0_space(gamma):
    """For any prediction, converted between parameterisations: ||eps - eps^||^2 = ||x_0 - x_0^||^2 SNR and
    ||v - v^||^2 = ||x_0 - x_0^||^2 (SNR + 1); so min_snr_weight(eps) and min_snr_weight(v) both turn the loss
    into min(SNR, gamma) ||x_0 - x_0^||^2 (Hang et al. 2023 Table 1)."""
    s = Schedule.scaled_linear()
    t = torch.tensor([0, 30, 150, 400, 999])
    x0, eps, v_hat = _randn(5, 4, 8, 8), _randn(5, 4, 8, 8, seed=1), _randn(5, 4, 8, 8, seed=2)
    x_t = s.q_sample(x0, t, eps)
    ab = s.alpha_bar[t].view(-1, 1, 1, 1)
    x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * v_hat  # the v-parameterisation's x_0 and eps
    eps_hat = (1 - ab).sqrt() * x_t + ab.sqrt() * v_hat
    per_row = lambda d: d.pow(2).flatten(1).sum(1)  # noqa: E731
    snr = s.snr(t)
    want = torch.clamp(snr, max=gamma) * per_row(x0 - x0_hat)
    torch.testing.assert_close(s.min_snr_weight(t, gamma) * per_row(eps - eps_hat), want, rtol=1e-8, atol=1e-10)
    v = s.v_target(x0, eps, t)
    torch.testing.assert_close(
        s.min_snr_weight(t, gamma, "v_prediction") * per_row(v - v_hat), want, rtol=1e-8, atol=1e-10
    )


def _make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset, fmt", [("attn", "kohya"), ("attn-ff", "kohya"), ("all-linear", "peft")])
def test_lora_counts_are_r_in_plus_out_and_file_sizes_are_exact(tmp_path, preset, fmt):
    """A LoRA on W0 [out, in] adds r (in + out) parameters; the docs' size table (make_figures.lora_file_bytes,
    computed without writing) equals the size of the file save_lora really writes, in fp16 and fp32."""
    mf = _make_figures()
    unet = UNet(UNetConfig.tiny_sdxl())
    r = 3
    names = lora.inject_lora(unet, preset, rank=r)
    by_hand = sum(r * sum(unet.get_submodule(n).weight.shape[:2]) for n in names)
    assert sum(p.numel() for p in lora.lora_parameters(unet)) == by_hand
    for dtype in (torch.float16, torch.float32):
        path = lora.save_lora(unet, tmp_path / f"{preset}-{dtype}.safetensors", format=fmt, dtype=dtype)
        assert mf.lora_file_bytes(unet, dtype, fmt) == path.stat().st_size


def test_optimal_bce_discriminator_and_the_jensen_shannon_divergence():
    """Goodfellow et al. 2014, Prop. 1 and Thm. 1, on a 4-point space: minimising gan.d_loss_bce over one logit a_k
    per point gives sigmoid(a_k) = p_k / (p_k + q_k), and the minimum is 2 log 2 - 2 JSD(p || q). Real and fake
    scores are weighted by repeating points in proportion to p (data) and q (generator)."""
    from minidiff.baselines import gan

    p_counts, q_counts = torch.tensor([3, 2, 1, 0]), torch.tensor([0, 1, 2, 3])  # data: 6 "images"
    p, q = p_counts / p_counts.sum(), q_counts / q_counts.sum()
    a = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15)

    def loss():
        opt.zero_grad()
        value = gan.d_loss_bce(a.repeat_interleave(p_counts), a.repeat_interleave(q_counts))
        value.backward()
        return value

    opt.step(loss)
    both = (p > 0) & (q > 0)  # where only one of p, q has mass, the optimum is at +-infinity
    torch.testing.assert_close(torch.sigmoid(a)[both].double(), (p / (p + q))[both].double(), rtol=1e-4, atol=1e-6)
    m = (p + q) / 2
    kl = lambda u: (u[u > 0] * (u[u > 0] / m[u > 0]).log()).sum()  # noqa: E731
    jsd = (kl(p) + kl(q)) / 2
    assert loss().item() == pytest.approx(2 * math.log(2) - 2 * jsd.item(), abs=2e-3)
