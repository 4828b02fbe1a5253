"""The GAN baseline: a DCGAN generator and discriminator, DiffAugment, the BCE and hinge losses, lazy R1.

Two recipes (`GANConfig.dcgan()`, `GANConfig.data_efficient()`), see docs/04-gan.md:

* `dcgan` is the seed project's Keras notebook, faithfully: 64 px, latent 128, BatchNorm in both nets, sigmoid + BCE,
  Adam(2e-4, beta1=0.5), no augmentation. On six images the discriminator wins outright (D(x) -> 1, D(G(z)) -> 0) and
  G produces noise, which is exactly what the seed reported.
* `data-efficient` keeps a DCGAN-sized net and adds what makes GANs train on tiny data: DiffAugment T on real AND fake
  images in BOTH the D and the G step (Zhao et al. 2020), spectral norm in D instead of BatchNorm (Miyato et al. 2018),
  the hinge loss, an EMA copy of G to sample from, and optionally a lazy R1 penalty (Mescheder et al. 2018).

Notation: x real images, z ~ N(0, I) latents, G(z) fakes, D(.) raw discriminator scores (logits), T(.) DiffAugment.
Images are [N, 3, S, S] in [-1, 1].
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TrainingError

RECIPES = ("dcgan", "data-efficient")


@dataclass
class GANConfig:
    recipe: str = "data-efficient"
    size: int = 64  # image side S, a power of two >= 16
    latent: int = 128  # dim of z
    g_width: int = 64  # G's last hidden width; each earlier layer doubles it (512, 256, 128, 64)
    d_width: int = 64  # D's first width; each later layer doubles it (64, 128, 256, 512)
    d_norm: str = "spectral"  # "batch" (seed) | "spectral"
    loss: str = "hinge"  # "bce" (seed, non-saturating) | "hinge"
    augment: str = "color,translation,cutout"  # DiffAugment policy; "" = none
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    ema_decay: float = 0.999  # 0 = no EMA copy of G
    r1_gamma: float = 0.0  # 0 = no R1; ADA's heuristic is 0.0002 * S^2 / batch
    r1_every: int = 16  # lazy regularisation: R1 on every 16th D step, scaled by 16

    @classmethod
    def dcgan(cls, size=64, **kw):
        """The seed's GAN_Model_Version1 (Keras): BN everywhere, sigmoid + BCE, no augmentation, no EMA."""
        return cls(recipe="dcgan", size=size, d_norm="batch", loss="bce", augment="", ema_decay=0.0, **kw)

    @classmethod
    def data_efficient(cls, size=64, **kw):
        """DiffAugment(color, translation, cutout) + spectral-norm D + hinge + EMA(0.999) (Zhao et al. 2020, arXiv:2006.10738;
        https://github.com/mit-han-lab/data-efficient-gans/blob/0b633951/DiffAugment_pytorch.py)."""
        return cls(recipe="data-efficient", size=size, **kw)

    @classmethod
    def from_recipe(cls, recipe, **kw):
        if recipe not in RECIPES:
            raise TrainingError(f"unknown GAN recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
        return cls.dcgan(**kw) if recipe == "dcgan" else cls.data_efficient(**kw)

    def __post_init__(self):
        if self.size < 16 or self.size & (self.size - 1):
            raise TrainingError(f"GAN image size must be a power of two >= 16, got {self.size}")


# ------------------------------------------------------------------------------------------------------------------
# Networks (Radford et al. 2016, "DCGAN"; the seed's Keras layout)


class Generator(nn.Module):
    """z [B, latent] -> G(z) [B, 3, S, S] in [-1, 1].

    1x1 -> ConvTranspose 4x4 valid -> 4x4, then ConvTranspose 4x4 stride 2 (x2 each) with BatchNorm + ReLU, widths
    g_width * (8, 4, 2, 1) at 64 px, then ConvTranspose to 3 channels and tanh. log2(S) - 2 hidden layers.
    """

    def __init__(self, latent=128, size=64, width=64):
        super().__init__()
        n = int(math.log2(size)) - 2
        widths = [width * 2**k for k in reversed(range(n))]
        layers = [nn.ConvTranspose2d(latent, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent = latent

    def forward(self, z):
        return self.net(z[:, :, None, None])


class SNConv2d(nn.Conv2d):
    """Conv2d with a spectrally normalised weight (Miyato et al. 2018, Algorithm 1).

    With W the weight reshaped to [C_out, C_in*kh*kw] and u, v unit vectors kept as buffers, each training forward
    runs one power iteration
        v <- W^T u / ||W^T u||,   u <- W v / ||W v||,
    and convolves with W_sn = W / sigma, sigma = u^T W v (gradients flow through W only; u, v are constants).
    sigma converges to the largest singular value of W, so ||W_sn||_2 -> 1: D is (about) 1-Lipschitz per layer.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        c_out, fan_in = self.weight.shape[0], self.weight[0].numel()
        self.register_buffer("u", F.normalize(torch.randn(c_out), dim=0, eps=1e-12))
        self.register_buffer("v", F.normalize(torch.randn(fan_in), dim=0, eps=1e-12))

    def normalized_weight(self):
        W = self.weight.flatten(1)
        if self.training:
            with torch.no_grad():
                self.v.copy_(F.normalize(W.t() @ self.u, dim=0, eps=1e-12))
                self.u.copy_(F.normalize(W @ self.v, dim=0, eps=1e-12))
        sigma = self.u.clone() @ W @ self.v.clone()  # clones: later forwards update u, v in place
        return self.weight / sigma

    def forward(self, x):
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class Discriminator(nn.Module):
    """x [B, 3, S, S] -> D(x) [B], raw scores (logits; the seed's sigmoid lives inside the BCE loss).

    Conv 4x4 stride 2 (/2 each), widths d_width * (1, 2, 4, 8) at 64 px, LeakyReLU(0.2), down to 4x4, then a 4x4
    valid conv to one score. norm="batch": bias-free convs with BatchNorm on every layer (the seed's Keras D);
    norm="spectral": SNConv2d everywhere, no BatchNorm.
    """

    def __init__(self, size=64, width=64, norm="batch"):
        super().__init__()
        if norm not in ("batch", "spectral"):
            raise TrainingError(f"discriminator norm must be 'batch' or 'spectral', got {norm!r}")
        n = int(math.log2(size)) - 2
        widths = [3] + [width * 2**k for k in range(n)]
        conv = SNConv2d if norm == "spectral" else nn.Conv2d
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers.append(conv(c_in, c_out, 4, 2, 1, bias=norm == "spectral"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
        layers.append(conv(widths[-1], 1, 4, 1, 0, bias=norm == "spectral"))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


def build(config):
    """(G, D) for a GANConfig."""
    G = Generator(config.latent, config.size, config.g_width)
    D = Discriminator(config.size, config.d_width, config.d_norm)
    return G, D


# ------------------------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020, mit-han-lab/data-efficient-gans DiffAugment_pytorch.py): every op is differentiable
# in x, draws its parameters independently per image, and T is applied to real and fake images alike.


def _rand(n, x, generator):
    return torch.rand(n, 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype)


def brightness(x, generator=None):
    """x' = x + (b - 0.5),  b ~ U[0, 1) per image."""
    return x + (_rand(x.shape[0], x, generator) - 0.5)


def saturation(x, generator=None):
    """x' = (x - mean_c x) * 2s + mean_c x,  s ~ U[0, 1) per image (mean over channels, per pixel)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x.shape[0], x, generator) * 2) + mean


def contrast(x, generator=None):
    """x' = (x - mean_chw x) * (c + 0.5) + mean_chw x,  c ~ U[0, 1) per image."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x.shape[0], x, generator) + 0.5) + mean


def translate(x, dy, dx):
    """x'[n, :, i, j] = x[n, :, i + dy_n, j + dx_n] where that pixel exists, else 0 (zero padding).

    dy, dx: integer tensors [N]. The content moves by (-dy, -dx); uncovered pixels are 0, i.e. mid-grey in [-1, 1].
    A gather from the image padded by one zero pixel at a clamped index, so the gradient reaches x.
    """
    N, C, H, W = x.shape
    rows = (torch.arange(H, device=x.device)[None, :, None] + dy.view(N, 1, 1) + 1).clamp(0, H + 1)  # [N, H, 1]
    cols = (torch.arange(W, device=x.device)[None, None, :] + dx.view(N, 1, 1) + 1).clamp(0, W + 1)  # [N, 1, W]
    batch = torch.arange(N, device=x.device)[:, None, None]
    x_pad = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # [N, H+2, W+2, C]
    return x_pad[batch, rows, cols].permute(0, 3, 1, 2)


def random_translation(x, ratio=0.125, generator=None):
    """translate(x, dy, dx) with dy, dx ~ U{-r, ..., r} per image, r = int(ratio * S + 0.5) (8 px at 64 px)."""
    N, _, H, W = x.shape
    ry, rx = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-ry, ry + 1, (N,), generator=generator, device=x.device)
    dx = torch.randint(-rx, rx + 1, (N,), generator=generator, device=x.device)
    return translate(x, dy, dx)


def cut_out(x, top, left, h, w):
    """x' = x * m, m = 0 on rows [top_n, top_n + h) x cols [left_n, left_n + w) (clipped to the image), else 1."""
    N, _, H, W = x.shape
    rows = torch.arange(H, device=x.device)[None, :, None]
    cols = torch.arange(W, device=x.device)[None, None, :]
    top, left = top.view(N, 1, 1), left.view(N, 1, 1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return x * (~inside).to(x.dtype)[:, None]


def random_cutout(x, ratio=0.5, generator=None):
    """cut_out of one h x w square per image, h = int(ratio * H + 0.5), centre (cy, cx) uniform on the image
    (cy ~ U{0, ..., H - h % 2}), top = cy - h // 2: the square is clipped at the borders (32 px square at 64 px)."""
    N, _, H, W = x.shape
    h, w = int(H * ratio + 0.5), int(W * ratio + 0.5)
    cy = torch.randint(0, H + (1 - h % 2), (N,), generator=generator, device=x.device)
    cx = torch.randint(0, W + (1 - w % 2), (N,), generator=generator, device=x.device)
    return cut_out(x, cy - h // 2, cx - w // 2, h, w)


AUGMENTATIONS = {
    "color": [brightness, saturation, contrast],
    "translation": [random_translation],
    "cutout": [random_cutout],
}


def diff_augment(x, policy="color,translation,cutout", generator=None):
    """T(x): the ops of `policy` in order (color = brightness, saturation, contrast). policy "" returns x."""
    for name in filter(None, policy.split(",")):
        if name not in AUGMENTATIONS:
            raise TrainingError(f"unknown DiffAugment op {name!r}: expected some of {', '.join(AUGMENTATIONS)}")
        for op in AUGMENTATIONS[name]:
            x = op(x, generator=generator)
    return x


# ------------------------------------------------------------------------------------------------------------------
# Losses. real = D(T(x)), fake = D(T(G(z))), raw scores.


def d_loss_bce(real, fake):
    """L_D = -E[log sigmoid(D(x))] - E[log(1 - sigmoid(D(G(z))))] = E[softplus(-D(x))] + E[softplus(D(G(z)))].

    (Goodfellow et al. 2014; the seed's BinaryCrossentropy on sigmoid outputs, real+fake, computed from logits.)"""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss_bce(fake):
    """Non-saturating L_G = -E[log sigmoid(D(G(z)))] = E[softplus(-D(G(z)))] (the seed: BCE with ones on fakes)."""
    return F.softplus(-fake).mean()


def d_loss_hinge(real, fake):
    """L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))] (Lim & Ye 2017; SN-GAN, SAGAN)."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_loss_hinge(fake):
    """L_G = -E[D(G(z))]."""
    return -fake.mean()


LOSSES = {"bce": (d_loss_bce, g_loss_bce), "hinge": (d_loss_hinge, g_loss_hinge)}


def r1_penalty(D, x, policy=""):
    """E_x ||grad_x D(T(x))||^2 on real x (Mescheder et al. 2018); the loss adds gamma/2 times this.

    As in DiffAugment-stylegan2-pytorch, the gradient is taken w.r.t. the un-augmented real image (through T).
    create_graph=True so the penalty itself can be back-propagated into D's weights.
    """
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(diff_augment(x, policy)).sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# ------------------------------------------------------------------------------------------------------------------
# One training step


def train_step(G, D, opt_g, opt_d, reals, config, step, ema=None):
    """One D step then one G step; returns the logged values as floats.

    D step:  L_D(D(T(x)), D(T(G(z).detach())))  [+ r1_every * gamma/2 * R1 on every r1_every-th step]
             (logged: loss_d = the adversarial part, r1 = R1 itself on the steps that have it)
    G step:  L_G(D(T(G(z'))))  with fresh z', gradients flowing back through T and D into G
    All random draws (z, T) come from torch's global RNG, so a checkpoint that stores it resumes bit for bit.
    """
    d_loss_fn, g_loss_fn = LOSSES[config.loss]
    T = lambda x: diff_augment(x, config.augment)  # noqa: E731
    B = reals.shape[0]

    # D step
    z = torch.randn(B, config.latent, device=reals.device)
    with torch.no_grad():
        fakes = G(z)
    real, fake = D(T(reals)), D(T(fakes))
    loss_d = d_loss_fn(real, fake)
    logs = {}
    total = loss_d
    if config.r1_gamma > 0 and step % config.r1_every == 0:
        r1 = r1_penalty(D, reals, config.augment)
        total = loss_d + config.r1_every * config.r1_gamma / 2 * r1
        logs["r1"] = r1.item()
    opt_d.zero_grad(set_to_none=True)
    total.backward()
    opt_d.step()

    # G step (D's weights are frozen for it: only the gradient w.r.t. D's input is needed)
    z = torch.randn(B, config.latent, device=reals.device)
    D.requires_grad_(False)
    loss_g = g_loss_fn(D(T(G(z))))
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    D.requires_grad_(True)
    if ema is not None:
        ema.decay = ema_decay(step, config.ema_decay)
        ema.update(G)

    real, fake = real.detach(), fake.detach()
    logs.update(
        loss_d=loss_d.item(),
        loss_g=loss_g.item(),
        d_x=torch.sigmoid(real).mean().item(),
        d_g_z=torch.sigmoid(fake).mean().item(),
        score_real=real.mean().item(),
        score_fake=fake.mean().item(),
    )
    return logs


def ema_decay(step, decay):
    """decay_t = min(decay, (1 + t) / (10 + t)): the EMA warm-up of tf.train.ExponentialMovingAverage(num_updates).

    p_ema <- decay_t p_ema + (1 - decay_t) p. Without it, after t steps the random initial weights would still
    weigh decay^t in p_ema (22% after 1500 steps at 0.999); with it, p_ema tracks G early and averages over
    ~t/9 recent steps until the window reaches 1 / (1 - decay)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def sample(G, z):
    """G(z) in eval mode (BatchNorm uses its running statistics), restoring G's mode afterwards."""
    was_training = G.training
    G.eval()
    x = G(z)
    G.train(was_training)
    return x
