"""Inpainting and outpainting as an artist uses them: feathered masks, "only masked" at full resolution, a grown
canvas. Pixel-level work around `pipeline.generate(..., init_images, masks)`, which does the diffusion part.

    soft   = blur(mask, radius)                         Gaussian feather of the 0/1 mask (A1111's "mask blur")
    x_gen  = generate(prompt, init = x, mask = soft)    generate binarises at 0.5: the hole is ~ the drawn mask
    x_out  = soft * x_gen + (1 - soft) * x              paste back: pixels far from the mask are exactly the input's

"Only masked" (A1111's "inpaint area: only masked", diffusers' `padding_mask_crop`): the box around the mask, grown
by `padding` and widened to the generation's aspect ratio, is cropped, resized to the model's size, repainted and
resized back before the paste, so a small face in a large panel gets the model's full resolution.

Outpainting: the canvas grows by (left, top, right, bottom) pixels; the new border starts as the image's edge
pixels stretched outwards (so the sampler's x_0 there is a plausible colour), the mask is that border plus
`overlap` pixels of the old image (so the seam is repainted too), and the canvas is inpainted at strength 1.

Images here are [3, H, W] tensors in [-1, 1], masks [1, H, W] in [0, 1] (1 = repaint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import MinidiffError


def blur(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian feather of a mask [..., H, W] with sigma = radius / 2 (kernel 2 * ceil(radius) + 1 per axis,
    edges replicated); radius 0 returns the mask unchanged."""
    if radius <= 0:
        return mask.float()
    r = math.ceil(radius)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / (radius / 2)) ** 2)
    k = k / k.sum()
    shape = mask.shape
    x = mask.float().reshape(-1, 1, *shape[-2:])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))  # along W
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))  # along H
    return x.reshape(shape).clamp(0, 1)


def paste(original: torch.Tensor, generated: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """x_out = soft * x_gen + (1 - soft) * x: where the soft mask is 0 the original pixels come back exactly."""
    return soft * generated + (1 - soft) * original


def mask_box(mask: torch.Tensor, padding: int, aspect: float, multiple: int = 8) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the pixels with mask >= 0.5, grown by `padding` on every side, then widened
    (or heightened) to width / height = `aspect` and rounded up to `multiple`, all inside the image. The box is
    kept inside the image by shifting it, and shrunk only when the image itself is smaller."""
    H, W = mask.shape[-2:]
    ys, xs = torch.nonzero(mask.reshape(H, W) >= 0.5, as_tuple=True)
    if len(ys) == 0:
        raise MinidiffError("inpaint: the mask is empty (no pixel >= 0.5 to repaint)")
    top, bottom = max(int(ys.min()) - padding, 0), min(int(ys.max()) + 1 + padding, H)
    left, right = max(int(xs.min()) - padding, 0), min(int(xs.max()) + 1 + padding, W)
    h, w = bottom - top, right - left
    if w / h < aspect:
        w = math.ceil(h * aspect)
    else:
        h = math.ceil(w / aspect)
    h, w = min(math.ceil(h / multiple) * multiple, H), min(math.ceil(w / multiple) * multiple, W)

    def place(lo, hi, size, n):  # centre the grown box on the old one, then shift it inside [0, n)
        start = max(min((lo + hi - size) // 2, n - size), 0)
        return start, start + size

    top, bottom = place(top, bottom, h, H)
    left, right = place(left, right, w, W)
    return top, left, bottom, right


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] -> [C, *size], bicubic with antialiasing (what PIL's resize does), clamped to [-1, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)[0]


def inpaint(
    pipe,
    prompt: str,
    image: torch.Tensor,
    mask: torch.Tensor,
    blur_radius: float = 4.0,
    only_masked: bool = False,
    padding: int = 32,
    width: int | None = None,
    height: int | None = None,
    **generate_kw,
) -> torch.Tensor:
    """Repaint the masked part of `image` [3, H, W] (mask [1, H, W], 1 = repaint) and paste it back feathered.

    only_masked=False: the whole image is generated at its own size (H, W multiples of 8).
    only_masked=True: the box around the mask (`mask_box`) is generated at width x height (default: the model's
    native size, shaped to the box) and pasted back. Other keywords go to `generate` (steps, cfg, seed, strength,
    negative, sampler...)."""
    from .pipeline import generate

    if image.dim() != 3 or image.shape[0] != 3 or mask.shape[-2:] != image.shape[-2:]:
        raise MinidiffError(
            f"inpaint: expected an image [3, H, W] and a mask [1, H, W] of the same size, got "
            f"{tuple(image.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.reshape(1, *image.shape[-2:]).float()
    soft, generate_kw = blur(mask, blur_radius), {"progress": False, **generate_kw}
    if not only_masked:
        out = generate(pipe, [prompt], init_images=image[None], masks=soft[None], **generate_kw)[0]
        return paste(image, out, soft)
    native = pipe.unet.config.sample_size * pipe.scale
    multiple = max(8, pipe.scale)
    top, left, bottom, right = mask_box(
        mask, padding + math.ceil(blur_radius), (width or native) / (height or native), multiple
    )
    h, w = bottom - top, right - left
    if width is None or height is None:  # the model's native area, in the box's shape
        scale = native / math.sqrt(h * w)
        height, width = (max(multiple, round(v * scale / multiple) * multiple) for v in (h, w))
    crop, crop_mask = image[:, top:bottom, left:right], soft[:, top:bottom, left:right]
    gen = generate(
        pipe,
        [prompt],
        init_images=_resize(crop, (height, width)).clamp(-1, 1)[None],
        masks=_resize(crop_mask, (height, width)).clamp(0, 1)[None],
        width=width,
        height=height,
        **generate_kw,
    )[0]
    out = image.clone()
    out[:, top:bottom, left:right] = paste(crop, _resize(gen, (h, w)).clamp(-1, 1), crop_mask)
    return out


def grow_canvas(
    image: torch.Tensor, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0, overlap: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas [3, H + top + bottom, W + left + right], mask [1, ...]): the image in the middle, the new border
    filled by stretching its edge pixels outwards, and a mask of 1 on the border plus `overlap` pixels inwards."""
    if min(left, top, right, bottom) < 0 or not any((left, top, right, bottom)):
        raise MinidiffError(
            f"outpaint: grow by non-negative amounts, at least one > 0; got left={left}, top={top}, "
            f"right={right}, bottom={bottom}"
        )
    canvas = F.pad(image[None].float(), (left, right, top, bottom), mode="replicate")[0]
    H, W = canvas.shape[-2:]
    mask = torch.ones(1, H, W)
    keep = [
        top + (overlap if top else 0),
        H - bottom - (overlap if bottom else 0),
        left + (overlap if left else 0),
        W - right - (overlap if right else 0),
    ]
    mask[:, keep[0] : max(keep[1], keep[0]), keep[2] : max(keep[3], keep[2])] = 0
    return canvas, mask


def outpaint(
    pipe,
    prompt: str,
    image: torch.Tensor,
    left: int = 0,
    top: int = 0,
    right: int = 0,
    bottom: int = 0,
    overlap: int = 8,
    blur_radius: float = 4.0,
    **generate_kw,
) -> torch.Tensor:
    """Grow `image` [3, H, W] by the given pixels (the new size must be a multiple of 8) and paint the new border
    (`grow_canvas`, then `inpaint` at strength 1 over the whole canvas)."""
    canvas, mask = grow_canvas(image, left, top, right, bottom, overlap)
    return inpaint(pipe, prompt, canvas, mask, blur_radius=blur_radius, **{"strength": 1.0, **generate_kw})
