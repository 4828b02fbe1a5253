"""minidiff.baselines.gan: DiffAugment, losses, spectral norm, R1 and the two recipes' networks, against hand computations,
closed forms (SVD, autograd of a quadratic) and torch's own BCELoss."""

import math

import pytest
import torch
import torch.nn as nn

from minidiff.baselines import gan
from minidiff.errors import TrainingError


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------- DiffAugment


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diff_augment_is_differentiable(policy):
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    y = gan.diff_augment(x * 2 - 1, policy)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_diff_augment_same_draws_transform_real_and_fake_alike():
    real = torch.rand(3, 3, 16, 16) * 2 - 1
    fake = real.clone().requires_grad_(True)  # a "fake" batch: same pixels, but it carries a graph
    both = torch.cat([gan.diff_augment(real, generator=_gen(7)), gan.diff_augment(fake, generator=_gen(7))])
    assert torch.equal(both[:3], both[3:])  # same random draws -> the same transform, real or fake
    other = gan.diff_augment(real, generator=_gen(8))
    assert not torch.allclose(other, both[:3])  # other draws -> another transform
    # and the draws are per image (as in DiffAugment): one call on two copies changes them differently
    twice = gan.diff_augment(torch.cat([real, real]), generator=_gen(7))
    assert not torch.allclose(twice[:3], twice[3:])
    assert torch.equal(gan.diff_augment(real, ""), real)


def test_translate_hand_computed():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)  # 1..16, so the zero padding is visible
    out = gan.translate(x, torch.tensor([1]), torch.tensor([-1]))  # out[i, j] = x[i + 1, j - 1]
    expected = torch.tensor([[0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15], [0, 0, 0, 0.0]])
    assert torch.equal(out[0, 0], expected)
    out = gan.translate(x, torch.tensor([3]), torch.tensor([0]))  # only the last row survives, moved to the top
    assert torch.equal(out[0, 0], torch.tensor([[13, 14, 15, 16.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert torch.equal(gan.translate(x, torch.tensor([0]), torch.tensor([0])), x)


def test_random_translation_range_is_one_eighth():
    # a single bright pixel at the centre of a 64 px image moves by at most int(64/8 + 0.5) = 8 on each axis
    x = torch.zeros(512, 1, 64, 64)
    x[:, :, 32, 32] = 1
    out = gan.random_translation(x, generator=_gen(0))
    idx = out.flatten(1).argmax(1)
    moved_y, moved_x = 32 - idx // 64, 32 - idx % 64  # content moves by -dy
    assert out.flatten(1).sum(1).eq(1).all()
    assert moved_y.abs().max() == 8 and moved_x.abs().max() == 8
    assert set(moved_y.tolist()) == set(range(-8, 9))


def test_cutout_hand_computed():
    x = torch.ones(2, 1, 4, 4)
    out = gan.cut_out(x, torch.tensor([-1, 1]), torch.tensor([2, 0]), 2, 2)
    # image 0: rows -1..0 x cols 2..3 (clipped to row 0); image 1: rows 1..2 x cols 0..1
    assert torch.equal(out[0, 0], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1.0]]))
    assert torch.equal(out[1, 0], torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1.0]]))


def test_random_cutout_is_a_half_size_square():
    x = torch.ones(256, 3, 64, 64)
    out = gan.random_cutout(x, generator=_gen(0))
    zero = out[:, 0] == 0
    assert torch.equal(out, x * (~zero)[:, None])  # the same mask on every channel
    rows, cols = zero.any(2).sum(1), zero.any(1).sum(1)
    assert rows.max() == 32 and cols.max() == 32 and rows.min() >= 16  # side 32, clipped to >= 16 at the borders
    assert torch.equal(zero.sum((1, 2)), rows * cols)  # a rectangle


def test_color_ops_hand_computed():
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    b = torch.rand(5, 1, 1, 1, generator=_gen(3))
    assert torch.allclose(gan.brightness(x, _gen(3)), x + b - 0.5)
    s = torch.rand(5, 1, 1, 1, generator=_gen(4))
    grey = x.mean(1, keepdim=True)
    assert torch.allclose(gan.saturation(x, _gen(4)), grey + (x - grey) * 2 * s, atol=1e-6)
    c = torch.rand(5, 1, 1, 1, generator=_gen(5))
    m = x.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(gan.contrast(x, _gen(5)), m + (x - m) * (c + 0.5), atol=1e-6)
    flat = torch.full((2, 3, 8, 8), 0.3)  # a grey image is a fixed point of saturation and contrast
    assert torch.allclose(gan.saturation(flat), flat) and torch.allclose(gan.contrast(flat), flat)


def test_unknown_augment_op_is_a_clear_error():
    with pytest.raises(TrainingError, match="DiffAugment"):
        gan.diff_augment(torch.zeros(1, 3, 16, 16), "color,rotate")


# --------------------------------------------------------------------------------------------------------------- losses


def test_hinge_losses_hand_computed():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 1.5]
    assert gan.d_loss_hinge(real, fake).item() == pytest.approx(2.5 / 3 + 2.5 / 3)
    assert gan.g_loss_hinge(fake).item() == pytest.approx(0.5)


def test_bce_losses_hand_computed_and_match_torch_bceloss():
    zero = torch.zeros(4)
    assert gan.d_loss_bce(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert gan.g_loss_bce(zero).item() == pytest.approx(math.log(2))
    l3 = torch.tensor([math.log(3.0)])  # sigmoid = 3/4
    assert gan.d_loss_bce(l3, l3).item() == pytest.approx(-math.log(0.75) + math.log(4))
    assert gan.g_loss_bce(l3).item() == pytest.approx(-math.log(0.75))
    real, fake = torch.randn(16), torch.randn(16)  # the seed: sigmoid + BCELoss, real label 1, fake 0, G labels 1
    bce = nn.BCELoss()
    ref_d = bce(torch.sigmoid(real), torch.ones(16)) + bce(torch.sigmoid(fake), torch.zeros(16))
    assert torch.allclose(gan.d_loss_bce(real, fake), ref_d, atol=1e-6)
    assert torch.allclose(gan.g_loss_bce(fake), bce(torch.sigmoid(fake), torch.ones(16)), atol=1e-6)


def test_r1_against_autograd_of_a_quadratic_discriminator():
    a = nn.Parameter(torch.rand(3, 4, 4))

    def D(x):  # D(x) = sum_k a_k x_k^2  ->  grad_x D = 2 a x,  ||grad||^2 = sum 4 a^2 x^2
        return (a * x**2).flatten(1).sum(1)

    x = torch.randn(5, 3, 4, 4)
    r1 = gan.r1_penalty(D, x)
    expected = (4 * a**2 * x**2).flatten(1).sum(1).mean()
    assert torch.allclose(r1, expected)
    r1.backward()  # d/da of mean sum 4 a^2 x^2 = 8 a mean_n x^2
    assert torch.allclose(a.grad, 8 * a.detach() * (x**2).mean(0), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- spectral norm


def test_spectral_norm_keeps_largest_singular_value_at_one():
    conv = gan.SNConv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5)
    x = torch.randn(2, 8, 6, 6)
    for _ in range(60):  # each training forward is one power iteration
        conv(x)
    W = conv.weight.detach().flatten(1)
    assert (conv.u @ W @ conv.v).item() == pytest.approx(torch.linalg.svdvals(W)[0].item(), rel=1e-3)
    conv.eval()
    W_sn = conv.normalized_weight().flatten(1)
    assert torch.linalg.matrix_norm(W_sn.detach(), ord=2).item() == pytest.approx(1.0, abs=1e-3)
    u = conv.u.clone()
    y = conv(x)  # eval mode: no power iteration, output = conv with W / sigma
    assert torch.equal(conv.u, u)
    ref = nn.functional.conv2d(x, conv.weight / torch.linalg.svdvals(W)[0], conv.bias, padding=1)
    assert torch.allclose(y, ref, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("recipe", gan.RECIPES)
@pytest.mark.parametrize("size", [64, 32])
def test_shapes_for_both_recipes(recipe, size):
    cfg = gan.GANConfig.from_recipe(recipe, size=size)
    G, D = gan.build(cfg)
    x = G(torch.randn(3, 128))
    assert x.shape == (3, 3, size, size) and x.abs().max() <= 1
    assert D(x).shape == (3,)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == int(math.log2(size)) - 1
    if recipe == "dcgan":
        assert len(bns) == len(convs) - 1 and not any(isinstance(m, gan.SNConv2d) for m in convs)
        assert (cfg.loss, cfg.augment, cfg.ema_decay, cfg.lr, cfg.betas) == ("bce", "", 0.0, 2e-4, (0.5, 0.999))
    else:
        assert not bns and all(isinstance(m, gan.SNConv2d) for m in convs)
        assert (cfg.loss, cfg.augment) == ("hinge", "color,translation,cutout")


def test_dcgan_matches_the_seed_layer_sizes():
    G, D = gan.build(gan.GANConfig.dcgan())
    convs_t = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in convs_t] == [512, 256, 128, 64, 3]
    assert convs_t[0].weight.numel() == 1_048_576  # the seed notebook's first G layer
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 1]
    assert convs[0].weight.numel() == 3072 and all(m.bias is None for m in convs)


def test_bad_settings_are_clear_errors():
    with pytest.raises(TrainingError, match="power of two"):
        gan.GANConfig.data_efficient(size=48)
    with pytest.raises(TrainingError, match="recipe"):
        gan.GANConfig.from_recipe("stylegan")


# ------------------------------------------------------------------------------------------------------ training step


def _tiny(recipe, **kw):
    cfg = gan.GANConfig.from_recipe(recipe, size=16, g_width=8, d_width=8, **kw)
    G, D = gan.build(cfg)
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=cfg.betas)
    return cfg, G, D, opt_g, opt_d


def test_augment_on_real_and_fake_in_both_steps(monkeypatch):
    cfg, G, D, opt_g, opt_d = _tiny("data-efficient")
    calls = []
    real_augment = gan.diff_augment

    def recording(x, policy="color,translation,cutout", generator=None):
        calls.append((policy, x.requires_grad))
        return real_augment(x, policy, generator)

    monkeypatch.setattr(gan, "diff_augment", recording)
    reals = torch.rand(4, 3, 16, 16) * 2 - 1
    g0 = [p.clone() for p in G.parameters()]
    logs = gan.train_step(G, D, opt_g, opt_d, reals, cfg, step=1)
    # D step: T(x), T(G(z).detach()); G step: T(G(z)) with the graph back into G
    assert calls == [(cfg.augment, False), (cfg.augment, False), (cfg.augment, True)]
    assert all(p.requires_grad for p in D.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))
    assert {"loss_d", "loss_g", "d_x", "d_g_z", "score_real", "score_fake"} <= set(logs)
    assert 0 <= logs["d_x"] <= 1 and 0 <= logs["d_g_z"] <= 1


def test_lazy_r1_runs_every_r1_every_steps():
    cfg, G, D, opt_g, opt_d = _tiny("data-efficient", r1_gamma=0.1, r1_every=4)
    reals = torch.rand(4, 3, 16, 16) * 2 - 1
    assert "r1" in gan.train_step(G, D, opt_g, opt_d, reals, cfg, step=8)
    assert "r1" not in gan.train_step(G, D, opt_g, opt_d, reals, cfg, step=9)


def test_ema_decay_warm_up():
    assert gan.ema_decay(0, 0.999) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert gan.ema_decay(90, 0.999) == pytest.approx(0.91)  # (1 + 90) / (10 + 90)
    assert gan.ema_decay(10**6, 0.999) == 0.999
