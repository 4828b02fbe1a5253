"""Sample-quality numbers that need no downloaded weights (FID, KID and LPIPS all need ImageNet nets; we have none).

Both sets are tensors [N,3,H,W] in [-1,1] of any size. `prepare` pads each image to a square with white (as
`data.fit_square(fit="pad")` does), resizes it to S x S with an antialiased bilinear filter and maps it to [0,1].
`evaluate` compares at S = min(64, side of the samples, side of the training images): 64 px for the 64 and 96 px
baselines and for SDXL, 32 px for a 32 px generator (upsampling its samples to 64 would blur them, and the blur
alone would count as distance: an exact copy at 32 px lies 0.04 from its 64 px original, 0.02 at 32 px).

Distance between two images (`pairwise_rmse`): per-pixel RMSE at S x S in [0,1] units,

    d(x, y) = sqrt( mean_{c,h,w} (x - y)^2 )          0 = identical, 1 = black vs white everywhere

* nn_distance        = mean_i d1(i),  d1(i) = min_j d(s_i, t_j)     (how close samples stay to the training images)
* memorized_fraction = mean_i [ d1(i) < d2(i) / 3 ]                 (Yoon et al. 2023 / Gu et al. 2025 ratio test:
                       d2 = distance to the second-nearest training image; NaN with fewer than 2 training images)
* diversity          = mean_{i<j} d(s_i, s_j)                        (0 = mode collapse; NaN with fewer than 2 samples)
* palette_distance   = 1/3 sum_{c in L,a,b} W1(P_c(samples), P_c(train))
                       W1 = 1-D Wasserstein-1 (earth mover's) distance between the CIELAB pixel-value distributions of
                       the two sets, in Lab units (L in 0..100; a distance of 1 is about a just noticeable difference).
                       W1(P, P shifted by delta) = |delta| exactly, so a colour shift of (dL, da, db) gives
                       (|dL| + |da| + |db|) / 3.
                       Background pixels are left out: pixels whose three sRGB values are all >= WHITE (240/255) are
                       the white canvas, and with ~75% of every Kenney image white they would drown the character's
                       colours. NaN when either set has no non-background pixel at all (e.g. blank white samples).
* background_distance = mean_i sqrt( mean_{c, p in M} (s_i[c, p] - b[c])^2 ),  M = the pixels that are background
                       (>= WHITE) in every training image (margins and corners the character never reaches), b = the
                       training images' mean colour on M (white). 0 = backgrounds as clean as the training images';
                       a uniform tint t lies |t| away; noise of std 0.1 lies ~0.1 away.
* identity           = share of samples with argmax_c p(c | sample) == target character and p >= 0.8
                       (`classifier.predict`: below that floor a sample is "unknown");
                       pose_counts / character_counts count the classifier's argmax labels over all samples.

Numbers are comparable inside this project only (same S, same classifier weights). For scale, at 64 px: two poses of
one Kenney character lie 0.09..0.16 apart, two characters 0.12..0.24, so pixel distance says how close samples stay
to the training images, not who they show (that is the classifier's job).
"""

import math

import torch

from ..data import CHARACTERS, POSES
from ..errors import DataError
from ..images import square
from . import classifier as clf

SIZE = 64
WHITE = 240 / 255  # an sRGB pixel with all three channels >= WHITE counts as background

# sRGB (D65) -> CIE XYZ, IEC 61966-2-1; reference white D65 = row sums of the matrix (so sRGB white -> a = b = 0)
_RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
_WHITE_XYZ = _RGB_TO_XYZ.sum(dim=1)  # (0.95047, 1.0, 1.08883)
_DELTA = 6 / 29


def _check(images, name):
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.numel() == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"{name}: expected a non-empty image tensor [N, 3, H, W] in [-1, 1], got {shape}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.5 or hi > 1.5 or not math.isfinite(lo + hi):
        raise DataError(
            f"{name}: expected values in [-1, 1], got min {lo:.3g} max {hi:.3g} (pass x / 127.5 - 1 for 0..255 images)"
        )


def prepare(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[N,3,H,W] in [-1,1] -> [N,3,size,size] in [0,1]: white padding to a square, antialiased bilinear resize."""
    _check(images, "images")
    x = (images.float().clamp(-1, 1) + 1) / 2
    x = square(x, size, fill=1.0)
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------------- nearest neighbours
def pairwise_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [N,3,S,S], b [M,3,S,S] in [0,1] -> [N,M] with d_ij = sqrt(mean (a_i - b_j)^2), computed in float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T  # |a|^2 + |b|^2 - 2 a.b
    return (sq.clamp_min(0) / a.shape[1]).sqrt()


def nearest_neighbours(samples, train):
    """(d1 [N], d2 [N] or None, index of the nearest training image [N]) for prepared sets."""
    d = pairwise_rmse(samples, train)
    k = min(2, d.shape[1])
    vals, idx = d.topk(k, dim=1, largest=False)
    return vals[:, 0], (vals[:, 1] if k == 2 else None), idx[:, 0]


def memorized_fraction(d1: torch.Tensor, d2) -> float:
    """Share of samples with d1 < d2 / 3 (a near copy of one training image, not of the others); NaN if d2 is None."""
    return float("nan") if d2 is None else (d1 < d2 / 3).double().mean().item()


def diversity(samples: torch.Tensor) -> float:
    """Mean of d(s_i, s_j) over the N(N-1)/2 pairs i < j of prepared samples; NaN for N < 2."""
    n = samples.shape[0]
    if n < 2:
        return float("nan")
    d = pairwise_rmse(samples, samples)
    i, j = torch.triu_indices(n, n, offset=1)
    return d[i, j].mean().item()


# --------------------------------------------------------------------------------------------------------- colour
def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0,1], channels on dim -3 ([..., 3, H, W]) -> CIELAB (D65), same shape, float64.

    1. linearise:  c_lin = c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    2. XYZ = M c_lin (M = _RGB_TO_XYZ), normalised by the white point (Xn, Yn, Zn)
    3. f(t) = t ** (1/3) if t > delta^3 else t / (3 delta^2) + 4/29, delta = 6/29
       L = 116 f(Y) - 16,  a = 500 (f(X) - f(Y)),  b = 200 (f(Y) - f(Z))
    """
    c = rgb.double().clamp(0, 1)
    lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,...jhw->...ihw", _RGB_TO_XYZ, lin) / _WHITE_XYZ.view(3, 1, 1)
    f = torch.where(xyz > _DELTA**3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of `srgb_to_lab` (without clamping: out-of-gamut colours leave [0,1]), float64."""
    L, a, b = lab.double().unbind(dim=-3)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29)) * _WHITE_XYZ.view(3, 1, 1)
    lin = torch.einsum("ij,...jhw->...ihw", torch.linalg.inv(_RGB_TO_XYZ), xyz)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp_min(0) ** (1 / 2.4) - 0.055)


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor) -> float:
    """W1 between the empirical distributions of two 1-D samples: integral over x of |F_u(x) - F_v(x)| dx."""
    u, v = u.double().sort().values, v.double().sort().values
    allv = torch.cat([u, v]).sort().values
    deltas = allv[1:] - allv[:-1]
    cdf_u = torch.searchsorted(u, allv[:-1], right=True).double() / len(u)
    cdf_v = torch.searchsorted(v, allv[:-1], right=True).double() / len(v)
    return ((cdf_u - cdf_v).abs() * deltas).sum().item()


def foreground_lab(images01: torch.Tensor) -> torch.Tensor:
    """Lab values [P,3] of the non-background pixels of prepared images (see WHITE)."""
    keep = (images01 < WHITE).any(dim=1)  # [N,S,S]
    return srgb_to_lab(images01).permute(0, 2, 3, 1)[keep]


def palette_distance(samples01: torch.Tensor, train01: torch.Tensor) -> float:
    """Mean over L, a, b of the W1 distance between the foreground pixel distributions of two prepared sets."""
    p, q = foreground_lab(samples01), foreground_lab(train01)
    if len(p) == 0 or len(q) == 0:
        return float("nan")
    return sum(wasserstein_1d(p[:, c], q[:, c]) for c in range(3)) / 3


# ------------------------------------------------------------------------------------------------------ background
def background_mask(train01: torch.Tensor) -> torch.Tensor:
    """[S, S] bool: the pixels that are background (all channels >= WHITE) in every training image."""
    return (train01 >= WHITE).all(dim=1).all(dim=0)


def background_distance(samples01: torch.Tensor, train01: torch.Tensor) -> float:
    """Mean over samples of the RMS distance of their pixels on `background_mask(train)` to the training images'
    mean colour there (white for the Kenney drawings); NaN when the training images share no background pixel."""
    mask = background_mask(train01)
    if not mask.any():
        return float("nan")
    b = train01.double()[..., mask].mean(dim=(0, 2))  # [3]
    d = samples01.double()[..., mask] - b[None, :, None]
    return d.pow(2).mean(dim=(1, 2)).sqrt().mean().item()


# ----------------------------------------------------------------------------------------------------------- all
def evaluate(
    samples: torch.Tensor, train: torch.Tensor, target_character: str = "female_adventurer", classifier=None
) -> dict:
    """All metrics of this module for generated `samples` against the `train` images (both [N,3,H,W] in [-1,1]).

    `classifier`: a loaded `classifier.CharacterClassifier`; None loads the shipped weights.
    Returns nn_distance, memorized_fraction, palette_distance, diversity, background, identity (floats), pose_counts and
    character_counts (dict name -> count over all names, zeros included), size (the comparison side S), n_samples,
    n_train.
    """
    if target_character not in CHARACTERS:
        raise DataError(f"target_character must be one of {', '.join(CHARACTERS)}, got {target_character!r}")
    _check(samples, "samples")
    _check(train, "train")
    size = min(SIZE, max(samples.shape[-2:]), max(train.shape[-2:]))
    s, t = prepare(samples, size), prepare(train, size)
    d1, d2, _ = nearest_neighbours(s, t)
    characters, poses, _ = clf.predict(samples, classifier if classifier is not None else clf.load_classifier())
    return {
        "nn_distance": d1.mean().item(),
        "memorized_fraction": memorized_fraction(d1, d2),
        "palette_distance": palette_distance(s, t),
        "diversity": diversity(s),
        "background": background_distance(s, t),
        "identity": sum(c == target_character for c in characters) / len(characters),
        "pose_counts": {p: poses.count(p) for p in POSES},
        "character_counts": {c: characters.count(c) for c in (*CHARACTERS, clf.UNKNOWN)},
        "size": size,
        "n_samples": len(s),
        "n_train": len(t),
    }
