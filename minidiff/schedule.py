"""The DDPM noise schedule: betas, alpha_bar, sigmas, the forward process and its posterior.

Forward (noising) process of Ho et al. 2020 (arXiv 2006.11239), with `T` steps and `t` in `0 .. T-1`:

    q(x_t | x_{t-1}) = N( sqrt(1 - beta_t) x_{t-1},  beta_t I )                                     (eq. 2)
    alpha_t = 1 - beta_t,    alpha_bar_t = prod_{s<=t} alpha_s
    q(x_t | x_0)     = N( sqrt(alpha_bar_t) x_0,  (1 - alpha_bar_t) I )                              (eq. 4)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)

The same process in "sigma space" (Karras et al. 2022, used by Euler and DPM-Solver in diffusers): divide x_t by
sqrt(alpha_bar_t) and it becomes x_0 + sigma_t eps with

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t),       SNR(t) = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2

Everything is kept in float64 (as a [T] tensor on the CPU); the methods index with `t` (LongTensor [B]), broadcast
to the shape of `x` and return `x`'s dtype and device.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import MinidiffError

ALPHA_BAR_FLOOR = (
    2.0**-24
)  # diffusers' sigma-space schedulers under rescale_betas_zero_snr: alphas_cumprod[-1] = 2**-24
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class Schedule:
    """A discrete variance-preserving schedule, defined by its `betas` (float64 [T])."""

    betas: Tensor
    alphas: Tensor = field(init=False)
    alpha_bar: Tensor = field(init=False)
    sigmas: Tensor = field(init=False)

    def __post_init__(self):
        self.betas = torch.as_tensor(self.betas, dtype=torch.float64).cpu()
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        # sigma space cannot hold alpha_bar = 0 (zero terminal SNR, sigma = inf): like diffusers' Euler and DPM
        # schedulers, sigmas read a zero alpha_bar as 2^-24 (sigma = 4096); alpha_bar itself stays exact
        ab = torch.where(self.alpha_bar == 0, ALPHA_BAR_FLOOR, self.alpha_bar)
        self.sigmas = ((1.0 - ab) / ab).sqrt()

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    # ---- the three beta schedules -----------------------------------------------------------------------------

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """Ho et al. 2020 §4: beta_t rises linearly from beta_start = 1e-4 to beta_end = 0.02 over T = 1000 steps."""
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "Schedule":
        """Stable Diffusion / SDXL: betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2.

        (diffusers calls this "scaled_linear"; the original sgm code calls the same formula "linear".)
        """
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal 2021 (iDDPM, arXiv 2102.09672) eq. 17:

            f(t) = cos( (t/T + s) / (1 + s) * pi/2 )^2,   alpha_bar_t = f(t) / f(0)
            beta_t = min(1 - alpha_bar_{t+1} / alpha_bar_t, max_beta)     (clipped at 0.999 to avoid a singularity)

        Index `i` of `betas` is the step from time i/T to (i+1)/T (diffusers' "squaredcos_cap_v2").
        """
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    def zero_terminal_snr(self) -> "Schedule":
        """The same schedule rescaled to zero terminal SNR (Lin et al. 2024, arXiv 2305.08891, Algorithm 1):

            s_t      = sqrt(alpha_bar_t)
            s'_t     = (s_t - s_{T-1}) * s_0 / (s_0 - s_{T-1})     (shift so s'_{T-1} = 0, scale so s'_0 = s_0)
            alpha_bar'_t = s'_t^2,  beta'_t = 1 - alpha_bar'_t / alpha_bar'_{t-1}   (beta'_{T-1} = 1)

        At t = T-1 the image is gone (x_t = eps): a model started from pure noise sees what it was trained on, and
        the image mean is no longer left in x_T for it to guess.
        """
        s = self.alpha_bar.sqrt()
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        ab = s**2
        return Schedule(1.0 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> "Schedule":
        """A schedule by name: "linear", "scaled_linear" or "cosine", with its default betas."""
        makers = {"linear": cls.linear, "scaled_linear": cls.scaled_linear, "cosine": cls.cosine}
        if name not in makers:
            raise MinidiffError(f"unknown schedule {name!r}: expected one of {', '.join(makers)}")
        return makers[name](T)

    # ---- indexing helper ----------------------------------------------------------------------------------------

    @staticmethod
    def _at(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """values[t] (float64 [T] indexed by LongTensor [B]) reshaped to [B, 1, 1, ...] in x's dtype and device."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        out = values[t].reshape(-1, *([1] * (x.dim() - 1)))
        return out.to(device=x.device, dtype=x.dtype)

    # ---- forward process ----------------------------------------------------------------------------------------

    def q_step(self, x_prev: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """One forward step, q(x_t | x_{t-1}):  x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps."""
        return self._at(self.alphas.sqrt(), t, x_prev) * x_prev + self._at(self.betas.sqrt(), t, x_prev) * eps

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The closed form q(x_t | x_0):  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        ab = self.alpha_bar
        return self._at(ab.sqrt(), t, x0) * x0 + self._at((1 - ab).sqrt(), t, x0) * eps

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The forward posterior q(x_{t-1} | x_t, x_0) = N(mean, var)  (Ho et al. eq. 6-7):

            mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) * x_0
                 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * x_t
            var  = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t          ("beta tilde", fixed_small)

        with alpha_bar_{-1} = 1, so at t = 0 the mean is x_0 and the variance is 0. `var` is returned broadcastable
        to x ([B, 1, 1, 1]).
        """
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        ab, b, a = self.alpha_bar, self.betas, self.alphas
        coef_x0 = ab_prev.sqrt() * b / (1 - ab)
        coef_xt = a.sqrt() * (1 - ab_prev) / (1 - ab)
        var = (1 - ab_prev) / (1 - ab) * b
        mean = self._at(coef_x0, t, x_t) * x0 + self._at(coef_xt, t, x_t) * x_t
        return mean, self._at(var, t, x_t)

    # ---- what a network predicts --------------------------------------------------------------------------------

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert the closed form:  x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        ab = self.alpha_bar
        return (x_t - self._at((1 - ab).sqrt(), t, x_t) * eps) / self._at(ab.sqrt(), t, x_t)

    def split(self, out: Tensor, x_t: Tensor, t: Tensor, prediction: str = "epsilon") -> tuple[Tensor, Tensor]:
        """(x_0, eps) from a network output `out` at x_t (alpha space), for both parametrisations:

            epsilon:       eps = out,                                   x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
            v_prediction:  x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v
                           eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t

        (v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 and x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t)
        eps, solved for x_0 and eps.) v stays finite at alpha_bar_t = 0, where eps-prediction cannot give x_0.
        """
        return split_at(out, x_t, self._at(self.alpha_bar, t, x_t), prediction)

    def v_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v-prediction target (Salimans & Ho 2022, appendix D):

        v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
        """
        ab = self.alpha_bar
        return self._at(ab.sqrt(), t, x0) * eps - self._at((1 - ab).sqrt(), t, x0) * x0

    # ---- loss weights -------------------------------------------------------------------------------------------

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float64 [B]."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        return self.alpha_bar[t] / (1 - self.alpha_bar[t])

    def min_snr_weight(self, t: Tensor, gamma: float = 5.0, prediction: str = "epsilon") -> Tensor:
        """Min-SNR-gamma loss weight (Hang et al. 2023, arXiv 2303.09556, eq. 6 and Table 1), float64 [B]:

            eps-prediction:  w_t = min(SNR(t), gamma) / SNR(t)
            v-prediction:    w_t = min(SNR(t), gamma) / (SNR(t) + 1)

        Multiply each example's MSE by w_t. (x0-prediction would use min(SNR, gamma) itself.)
        """
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=gamma)
        if prediction == "epsilon":
            return clipped / snr
        if prediction == "v_prediction":  # SNR = 0 (zero terminal SNR) gets weight 1, as diffusers' SDXL scripts do
            return torch.where(snr == 0, torch.ones_like(snr), clipped / (snr + 1))
        raise MinidiffError(f"min_snr_weight: prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")

    # ---- sigma space --------------------------------------------------------------------------------------------

    def sigma_at(self, t: Tensor) -> Tensor:
        """sigma at (possibly fractional) timesteps t, float64: linear interpolation between the two neighbouring
        integer steps (diffusers' EulerDiscreteScheduler `np.interp(timesteps, arange(T), sigmas)`)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.T - 1)
        lo = t.floor().long().clamp(max=self.T - 2)
        w = t - lo
        return (1 - w) * self.sigmas[lo] + w * self.sigmas[lo + 1]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional timestep whose sigma is `sigma`, interpolating linearly in log sigma between the two
        neighbouring training sigmas (diffusers' `_sigma_to_t`, used for Karras sigmas), float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigmas = self.sigmas.log()
        log_sigma = sigma.clamp(min=1e-10).log()
        # index of the last training log-sigma <= log_sigma (log_sigmas increase with t)
        lo = ((log_sigma[..., None] - log_sigmas) >= 0).long().cumsum(-1).argmax(-1).clamp(max=self.T - 2)
        low, high = log_sigmas[lo], log_sigmas[lo + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return (1 - w) * lo + w * (lo + 1)


def split_at(out: Tensor, x_t: Tensor, alpha_bar, prediction: str = "epsilon") -> tuple[Tensor, Tensor]:
    """`Schedule.split` at a given alpha_bar (a float, or a tensor broadcastable to x_t): (x_0, eps)."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction == "epsilon":
        return (x_t - s * out) / a, out
    if prediction == "v_prediction":
        return a * x_t - s * out, a * out + s * x_t
    raise MinidiffError(f"prediction_type must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def timesteps(n: int, spacing: str = "leading", T: int = 1000, steps_offset: int = 1) -> Tensor:
    """The n sampling timesteps, descending, float64 [n] (Lin et al. 2023, arXiv 2305.08891, Table 2; diffusers'
    `set_timesteps`):

        leading:   t_i = i * (T // n) + steps_offset,        i = n-1 .. 0     (SDXL hub default: 981 .. 1 for n=50)
        trailing:  t_i = round(T - i * T / n) - 1,            i = 0 .. n-1     (999 .. 19 for n=50; = sgm's sampler)
        linspace:  t_i = linspace(0, T - 1, n) reversed                        (fractional for most n)

    `steps_offset` only applies to "leading". (For a few n, e.g. 61 and 103, diffusers' "trailing" returns n + 1
    steps ending in -1, an artefact of np.arange with a float step; this function always returns n.)
    """
    if n < 1 or n > T:
        raise MinidiffError(f"number of sampling steps must be in 1..{T}, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    if spacing == "leading":
        return (i * (T // n)).round().flip(0) + steps_offset
    if spacing == "trailing":
        step = (T - T / n) - T  # computed like numpy's arange(T, 0, -T/n) does, so rounding ties match diffusers
        return (T + i * step).round() - 1
    if spacing == "linspace":
        if n == 1:
            return torch.zeros(1, dtype=torch.float64)
        t = i * ((T - 1) / (n - 1))  # computed like numpy.linspace, so that .round() ties match diffusers
        t[-1] = T - 1
        return t.flip(0)
    raise MinidiffError(f"unknown timestep spacing {spacing!r}: expected leading, trailing or linspace")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (EDM, arXiv 2206.00364) eq. 5, n noise levels descending from sigma_max to sigma_min:

        sigma_i = ( sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)) )^rho,   i = 0 .. n-1

    rho = 7 spends more steps at small sigma. Returns float64 [n] (without the final 0 a sampler appends).
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
