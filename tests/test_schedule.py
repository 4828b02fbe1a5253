"""schedule.py: each equation against an independent computation (composition of the one-step process, Bayes'
rule done by hand, Monte Carlo, hand-computed numbers) and against diffusers' schedulers on the same settings."""

import math

import numpy as np
import pytest
import torch

from minidiff.errors import MinidiffError
from minidiff.schedule import Schedule, karras_sigmas, timesteps

SCHEDULES = {"linear": Schedule.linear, "cosine": Schedule.cosine, "scaled_linear": Schedule.scaled_linear}


# ---- the betas ------------------------------------------------------------------------------------------------------


def test_betas_by_hand():
    lin = Schedule.linear()
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert lin.betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-12)
    sdxl = Schedule.scaled_linear()
    assert sdxl.betas[0].item() == pytest.approx(0.00085) and sdxl.betas[-1].item() == pytest.approx(0.012)
    # diffusers EulerDiscreteScheduler with SDXL's config: sigma_max = sigma(999) = 14.6146, sigma_min = sigma(0) = 0.0292, alpha_bar_999 = 0.00466
    assert sdxl.sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)
    assert sdxl.sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sdxl.alpha_bar[-1].item() == pytest.approx(0.00466, abs=1e-5)
    cos = Schedule.cosine()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 500, 998):  # iDDPM: alpha_bar_t = f(t+1)/f(0) with index i covering time i/T .. (i+1)/T
        assert cos.alpha_bar[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert cos.betas.max().item() == 0.999  # clipped


@pytest.mark.parametrize(
    "name,diffusers_name", [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
)
def test_betas_match_diffusers(name, diffusers_name):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(beta_start=0.00085, beta_end=0.012) if name == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(beta_schedule=diffusers_name, **kw)
    ours = SCHEDULES[name]()
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours.alpha_bar.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-7)


# ---- forward process: closed form == composition of single steps ---------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_closed_form_equals_composed_steps_analytically(name):
    """q_step is affine-Gaussian: x_t = A_t x_{t-1} + B_t eps. Composing, x_t | x_0 has mean m_t x_0 and variance
    v_t with m_t = A_t m_{t-1}, v_t = A_t^2 v_{t-1} + B_t^2 (m_{-1} = 1, v_{-1} = 0). A_t and B_t are read off
    q_step itself; the result must equal q_sample's coefficients for every t. float64 throughout: 1e-12."""
    s = SCHEDULES[name]()
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    m, v = 1.0, 0.0
    for t in range(s.T):
        tt = torch.tensor([t])
        A, B = s.q_step(one, tt, zero).item(), s.q_step(zero, tt, one).item()
        m, v = A * m, A * A * v + B * B
        mean_closed, std_closed = s.q_sample(one, tt, zero).item(), s.q_sample(zero, tt, one).item()
        assert m == pytest.approx(mean_closed, rel=1e-12, abs=1e-15)
        assert v == pytest.approx(std_closed**2, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_closed_form_equals_composed_steps_monte_carlo(name):
    """Run N = 50k chains of q_step from x_0 = 0.7 (fixed seed) and compare the empirical mean/variance at a few t
    with sqrt(alpha_bar) x_0 and 1 - alpha_bar. Standard errors: mean sqrt(v/N), variance v sqrt(2/N); the test
    allows 5 standard errors (false-alarm rate ~1e-6 per check)."""
    s, N, x0 = SCHEDULES[name](), 50_000, 0.7
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, N), x0, dtype=torch.float64)  # one "image" of N independent pixels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1000 small elementwise steps: thread hand-offs cost more than they save
    try:
        for t in range(s.T):
            x = s.q_step(x, torch.tensor([t]), torch.randn(1, N, generator=g, dtype=torch.float64))
            if t in (0, 10, 100, 500, 999):
                mean, var = math.sqrt(s.alpha_bar[t]) * x0, 1 - s.alpha_bar[t].item()
                assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / N), (t, x.mean().item(), mean)
                assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / N), (t, x.var().item(), var)
    finally:
        torch.set_num_threads(threads)


def test_q_sample_broadcasts_per_example_and_keeps_dtype():
    s = Schedule.linear()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = s.q_sample(x0, t, eps)
    assert xt.dtype == torch.float32 and xt.shape == x0.shape
    for i in range(3):
        ab = s.alpha_bar[t[i]].item()
        torch.testing.assert_close(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i])
    torch.testing.assert_close(s.predict_x0(xt, t, eps), x0, rtol=1e-4, atol=1e-4)


def test_q_sample_and_v_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = Schedule.scaled_linear()
    x0, eps, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(ours.q_sample(x0, t, eps), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.v_target(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)


def test_v_target_by_hand():
    """v = sqrt(ab) eps - sqrt(1-ab) x_0, and x_0 = sqrt(ab) x_t - sqrt(1-ab) v recovers x_0 (Salimans & Ho)."""
    s = Schedule.cosine()
    x0, eps, t = (
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
        torch.tensor([100, 700]),
    )
    v, xt = s.v_target(x0, eps, t), s.q_sample(x0, t, eps)
    ab = s.alpha_bar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ab.sqrt() * xt - (1 - ab).sqrt() * v, x0)


# ---- the posterior --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_posterior_equals_bayes(name):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): a product of two Gaussians in x_{t-1},
        N(x_t; sqrt(a_t) x_{t-1}, b_t) · N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1 - ab_{t-1})
    has precision a_t/b_t + 1/(1-ab_{t-1}) and mean var · (sqrt(a_t) x_t / b_t + sqrt(ab_{t-1}) x_0 / (1-ab_{t-1})).
    Computed here with numpy from the betas alone."""
    s = SCHEDULES[name]()
    betas = s.betas.numpy()
    a = 1 - betas
    ab = np.cumprod(a)
    x0, xt = torch.randn(6, 3, 2, 2, dtype=torch.float64), torch.randn(6, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    mean, var = s.posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        precision = a[ti] / betas[ti] + 1 / (1 - ab[ti - 1])
        want_var = 1 / precision
        want_mean = want_var * (math.sqrt(a[ti]) * xt[i] / betas[ti] + math.sqrt(ab[ti - 1]) * x0[i] / (1 - ab[ti - 1]))
        assert var[i].item() == pytest.approx(want_var, rel=1e-10)
        torch.testing.assert_close(mean[i], want_mean, rtol=1e-10, atol=1e-12)
    # t = 0: x_{-1} is x_0 itself
    m0, v0 = s.posterior(x0[:1], xt[:1], torch.tensor([0]))
    torch.testing.assert_close(m0, x0[:1])
    assert v0.item() == 0


def test_posterior_by_numerical_integration():
    """Same posterior by brute force: normalise the product density on a fine grid and take its moments."""
    s = Schedule.linear()
    t, x0, xt = 50, 0.3, -0.4
    b, a, ab_prev = s.betas[t].item(), s.alphas[t].item(), s.alpha_bar[t - 1].item()
    grid = torch.linspace(-3, 3, 600_001, dtype=torch.float64)
    logp = -((xt - math.sqrt(a) * grid) ** 2) / (2 * b) - (grid - math.sqrt(ab_prev) * x0) ** 2 / (2 * (1 - ab_prev))
    p = (logp - logp.max()).exp()
    p = p / p.sum()
    mean_num = (p * grid).sum().item()
    var_num = (p * (grid - mean_num) ** 2).sum().item()
    mean, var = s.posterior(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t])
    )
    assert mean.item() == pytest.approx(mean_num, abs=1e-8)
    assert var.item() == pytest.approx(var_num, rel=1e-6)


# ---- SNR and min-SNR weights ----------------------------------------------------------------------------------------


def test_min_snr_weight_by_hand():
    s = Schedule.linear()
    ab0 = 1 - 1e-4  # alpha_bar_0 = 1 - beta_0
    snr0 = ab0 / (1 - ab0)  # = 9999
    assert s.snr(torch.tensor([0])).item() == pytest.approx(9999.0, rel=1e-9)
    w = s.min_snr_weight(torch.tensor([0]), gamma=5.0)
    assert w.item() == pytest.approx(5 / 9999, rel=1e-9)
    assert s.min_snr_weight(torch.tensor([0]), 5.0, "v_prediction").item() == pytest.approx(5 / (snr0 + 1))
    # t = 999: SNR is tiny (< gamma): eps weight 1, v weight SNR/(SNR+1)
    snr = s.snr(torch.tensor([999])).item()
    assert snr < 5 and s.min_snr_weight(torch.tensor([999])).item() == pytest.approx(1.0)
    assert s.min_snr_weight(torch.tensor([999]), 5.0, "v_prediction").item() == pytest.approx(snr / (snr + 1))


def test_min_snr_weight_matches_diffusers_training_scripts():
    """diffusers' compute_snr + the weighting lines of examples/text_to_image/train_text_to_image.py."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    snr = training_utils.compute_snr(ref, t)
    base = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    ours = Schedule.scaled_linear()
    torch.testing.assert_close(ours.snr(t).float(), snr, rtol=2e-4, atol=0)
    torch.testing.assert_close(ours.min_snr_weight(t, 5.0).float(), base / snr, rtol=2e-4, atol=0)
    torch.testing.assert_close(ours.min_snr_weight(t, 5.0, "v_prediction").float(), base / (snr + 1), rtol=2e-4, atol=0)


# ---- timestep spacing, sigma interpolation, Karras ------------------------------------------------------------------


def test_timesteps_by_hand():
    """diffusers' timestep spacings: leading n=50: 981, 961, ..., 1; n=10: 901 .. 1; trailing n=50: 999 .. 19; n=10: 999 .. 99."""
    assert timesteps(50)[:3].tolist() == [981, 961, 941] and timesteps(50)[-1] == 1
    assert timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert timesteps(50, "trailing")[0] == 999 and timesteps(50, "trailing")[-1] == 19
    assert timesteps(10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(4, "linspace").tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing, steps_offset=1
    )
    for n in list(range(1, 61)) + [100, 250, 999, 1000]:  # (diffusers' trailing makes n+1 steps for n = 61, 103..)
        ref.set_timesteps(n)
        ts = timesteps(n, spacing)
        torch.testing.assert_close(ts, ref.timesteps.double(), rtol=0, atol=1e-4 if spacing == "linspace" else 0)


def test_sigma_interpolation_and_inverse():
    s = Schedule.scaled_linear()
    assert s.sigma_at(torch.tensor([10.0])).item() == pytest.approx(s.sigmas[10].item())
    assert s.sigma_at(torch.tensor([10.25])).item() == pytest.approx(
        0.75 * s.sigmas[10].item() + 0.25 * s.sigmas[11].item()
    )
    t = torch.tensor([0.0, 3.0, 12.5, 500.75, 999.0], dtype=torch.float64)
    # log-sigma interpolation: exact at integers, close to t between them (sigma is smooth)
    back = s.sigma_to_t(s.sigma_at(t))
    torch.testing.assert_close(back[[0, 1, 4]], t[[0, 1, 4]])
    torch.testing.assert_close(back, t, rtol=0, atol=1e-2)


def test_karras_sigmas_by_hand_and_against_diffusers():
    sig = karras_sigmas(0.1, 10.0, 3, rho=7.0)
    mid = ((10.0 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7
    torch.testing.assert_close(sig, torch.tensor([10.0, mid, 0.1], dtype=torch.float64))
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    in_sigmas = Schedule.scaled_linear().sigmas.flip(0).numpy()
    want = ref._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=25)
    got = karras_sigmas(float(in_sigmas[-1]), float(in_sigmas[0]), 25)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_bad_input_raises_minidiff_error():
    with pytest.raises(MinidiffError, match="schedule"):
        Schedule.from_name("sigmoid")
    with pytest.raises(MinidiffError, match="spacing"):
        timesteps(10, "middle")
    with pytest.raises(MinidiffError, match="1..1000"):
        timesteps(1001)
    with pytest.raises(MinidiffError, match="prediction"):
        Schedule.linear().min_snr_weight(torch.tensor([1]), prediction="sample")
