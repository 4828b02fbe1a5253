"""Control images: what a ControlNet reads, made from a picture or a sketch without any downloaded weights.

    canny      the textbook edge detector (Canny 1986): Gaussian blur -> Sobel gradients -> non-maximum suppression
               -> double threshold + hysteresis. White 1-px edges on black (what canny ControlNets were trained on).
    scribble   a user's drawing (dark strokes on light paper, or light on dark): threshold, then thin every stroke
               to a 1-px skeleton (Zhang & Suen 1984) and widen it again to `width`. White lines on black.
    image      used as it is: a ready pose skeleton (OpenPose-style colours), depth map, line art, ...

Pose (OpenPose, DWPose) and depth (MiDaS, Depth Anything) estimators are neural networks with downloaded weights;
minidiff has none, so it accepts a pose or depth image someone made elsewhere, as `image`.

Tensors here are [H, W] or [3, H, W] floats in [0, 1] (a ControlNet's input range), not the [-1, 1] of images.py.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

KINDS = ("canny", "scribble", "image")


def gray(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] or [H, W] in [0, 1] -> [H, W] luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B)."""
    if image.ndim == 2:
        return image.float()
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)
    return (image.float()[:3] * w[:, None, None]).sum(0) if image.shape[0] == 3 else image.float()[0]


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """[H, W] * kernel [kh, kw] (correlation), edges replicated so a border is not an edge."""
    kh, kw = kernel.shape
    x = F.pad(x[None, None], (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    return F.conv2d(x, kernel[None, None].float())[0, 0]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """G_sigma * x with g(k) = exp(-k^2 / (2 sigma^2)) / sum, k = -r..r, r = ceil(3 sigma); separable (rows, then
    columns)."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    return _conv(_conv(x, k[None, :]), k[:, None])


SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_x, g_y): Sobel derivatives (x to the right, y downwards), each sum |k| = 8 times a unit-step's height / 2."""
    return _conv(x, SOBEL_X), _conv(x, SOBEL_X.T)


def non_max_suppression(mag: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep mag where it is a maximum along the gradient direction: the direction is rounded to 0, 45, 90 or 135
    degrees and mag compared with its two neighbours that way (>= the one ahead, > the one behind, so a plateau two
    pixels wide keeps one). Returns the thinned magnitude (0 elsewhere)."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180  # y down: 45 degrees points to the lower right
    sector = (((angle + 22.5) // 45) % 4).long()  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135
    p = F.pad(mag, (1, 1, 1, 1))
    H, W = mag.shape

    def at(dy, dx):
        return p[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]

    ahead = torch.stack([at(0, 1), at(1, 1), at(1, 0), at(1, -1)])
    behind = torch.stack([at(0, -1), at(-1, -1), at(-1, 0), at(-1, 1)])
    a, b = ahead.gather(0, sector[None])[0], behind.gather(0, sector[None])[0]
    return torch.where((mag >= a) & (mag > b), mag, torch.zeros_like(mag))


def hysteresis(thin: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Edges = pixels >= high, plus pixels >= low 8-connected to them through pixels >= low (grown until stable)."""
    weak = thin >= low
    edges = (thin >= high).float()
    while True:
        grown = (F.max_pool2d(edges[None, None], 3, stride=1, padding=1)[0, 0] > 0) & weak
        if torch.equal(grown.float(), edges):
            return grown
        edges = grown.float()


def canny(image: torch.Tensor, low: float = 100, high: float = 200, sigma: float = 1.0) -> torch.Tensor:
    """Canny edges of an image [3, H, W] or [H, W] in [0, 1] -> bool [H, W]. Thresholds are on the Sobel gradient
    magnitude sqrt(g_x^2 + g_y^2) of the 0..255 image (OpenCV's units with L2gradient: 100 / 200 are the usual
    ControlNet settings; a unit step of height 255 gives 4 * 255 = 1020)."""
    if low > high:
        raise DataError(f"canny: need low <= high, got {low} > {high}")
    x = gaussian_blur(gray(image) * 255, sigma)
    gx, gy = sobel(x)
    mag = torch.sqrt(gx**2 + gy**2)
    return hysteresis(non_max_suppression(mag, gx, gy), low, high)


# ------------------------------------------------------------------------------------------------------ scribble
def _zhang_suen_pass(img: np.ndarray, first: bool) -> np.ndarray:
    """One sub-iteration of Zhang & Suen (1984) thinning on a 0/1 array; returns the pixels to delete."""
    p = np.pad(img, 1)
    n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
    B = sum(n)  # P2..P9 clockwise from north
    A = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).astype(int) for i in range(8))  # 0 -> 1 transitions
    P2, P4, P6, P8 = n[0], n[2], n[4], n[6]
    c = (P2 * P4 * P6 == 0) & (P4 * P6 * P8 == 0) if first else (P2 * P4 * P8 == 0) & (P2 * P6 * P8 == 0)
    return (img == 1) & (B >= 2) & (B <= 6) & (A == 1) & c


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: peel boundary pixels that are not needed for connectivity (two alternating sub-passes)
    until nothing changes; a stroke becomes its 1-px wide skeleton."""
    img = mask.astype(np.uint8).copy()
    while True:
        changed = False
        for first in (True, False):
            kill = _zhang_suen_pass(img, first)
            if kill.any():
                img[kill], changed = 0, True
        if not changed:
            return img.astype(bool)


def scribble(image: torch.Tensor, threshold: float = 0.5, width: int = 1) -> torch.Tensor:
    """A drawing [3, H, W] or [H, W] in [0, 1] -> bool [H, W] strokes, thinned to 1 px then widened to `width`.
    Strokes are the pixels on the other side of `threshold` from the paper (the paper: the majority side)."""
    g = gray(image)
    ink = g < threshold
    if ink.float().mean() > 0.5:  # light strokes on dark paper
        ink = ~ink
    lines = torch.from_numpy(thin(ink.numpy()))
    if width > 1:
        lines = (
            F.max_pool2d(lines[None, None].float(), width, stride=1, padding=width // 2)[
                0, 0, : g.shape[0], : g.shape[1]
            ]
            > 0
        )
    return lines


def to_control(mask: torch.Tensor) -> torch.Tensor:
    """bool [H, W] -> [3, H, W] in {0, 1}: white lines on black."""
    return mask.float()[None].expand(3, -1, -1).contiguous()


def make_control(image: torch.Tensor, kind: str = "canny", **kw) -> torch.Tensor:
    """The control image [3, H, W] in [0, 1] of `kind` (canny, scribble, image) made from `image` [3, H, W] in
    [0, 1]."""
    if kind == "canny":
        return to_control(canny(image, **kw))
    if kind == "scribble":
        return to_control(scribble(image, **kw))
    if kind == "image":
        return image.float()[:3] if image.ndim == 3 else image.float()[None].expand(3, -1, -1)
    raise DataError(
        f"unknown control type {kind!r}: expected one of {', '.join(KINDS)} (pose and depth images made "
        "elsewhere are used as 'image': their estimators need downloaded weights)"
    )


# ------------------------------------------------------------------------------------------------- to a ControlNet
def parse_control(spec: str) -> tuple[str, str, float]:
    """'sketch.png:scribble:0.8' -> ('sketch.png', 'scribble', 0.8): IMAGE[:TYPE[:SCALE]], TYPE one of KINDS
    (default image), SCALE a number (default 1); the image path may itself contain ':' (sample.py --control and a
    page panel's "control" read the same syntax)."""
    parts, kind, scale = spec.split(":"), "image", 1.0
    if len(parts) > 1:
        try:
            scale, parts = float(parts[-1]), parts[:-1]
        except ValueError:
            pass
    if not math.isfinite(scale):
        raise DataError(f"control {spec}: the scale must be a finite number, got {scale}")
    if len(parts) > 1 and parts[-1] in KINDS:
        kind, parts = parts[-1], parts[:-1]
    return ":".join(parts), kind, scale


def read_control(path, kind: str, height: int, width: int) -> torch.Tensor:
    """The control image [1, 3, height, width] in [0, 1] of an image file: read (alpha onto white), resized to the
    images' size (with a notice when it differs), then made into `kind` (make_control) at that size."""
    from .data import load_image

    return make_control(control_tensor(load_image(path), height, width)[0], kind)[None]


def control_tensor(image, height: int, width: int) -> torch.Tensor:
    """A control image as a ControlNet takes it: [1 or N, 3, height, width] float in [0, 1]. Accepts a PIL image or
    a tensor [3, H, W] / [N, 3, H, W] in [0, 1]; another size is resized (bilinear, antialiased) with a notice."""
    if hasattr(image, "convert"):  # PIL
        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1) / 255.0
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-3] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(
            f"control image: expected a PIL image or a [3, H, W] / [N, 3, H, W] tensor in [0, 1], got {got}"
        )
    image = image.float()[None] if image.ndim == 3 else image.float()
    if tuple(image.shape[-2:]) != (height, width):
        print(f"notice: control image {image.shape[-1]}x{image.shape[-2]} resized to {width}x{height}", file=sys.stderr)
        image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return image.clamp(0, 1)
