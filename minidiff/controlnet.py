"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv 2302.05543): steer a frozen UNet with an image (edges, a scribble,
a pose skeleton, a depth map) through a trainable copy of its encoder.

    c     = controlnet_cond_embedding(cond)            small convs: control image -> the UNet's first feature size
    h     = conv_in(x_t) + c                           then the UNet's own down blocks and middle block (a copy)
    r_k   = controlnet_down_blocks.k(skip_k)           one zero-initialised 1x1 conv per skip  (k = 0 .. n_skips-1)
    r_mid = controlnet_mid_block(h_mid)                and one on the middle block's output
    r     = scale * r                                  (guess mode: scale * 10^(-1 + k / n_skips), 0.1 .. 1)

The UNet then adds r_k to its skip k and r_mid to its middle output (`UNet.forward(down_residuals, mid_residual)`).
The 1x1 convs start at zero, so an untrained ControlNet changes nothing, and training starts from the UNet itself.
Several ControlNets add their residuals (diffusers' MultiControlNetModel); each may act only on a fraction
[start, end) of the steps: at step i of n it counts iff not (i / n < start or (i + 1) / n > end).

Attribute names are diffusers' ControlNetModel state-dict keys (`controlnet_cond_embedding.conv_in.weight`,
`controlnet_down_blocks.3.weight`, `down_blocks.1.attentions.0...`), so a diffusers ControlNet folder loads by name
(weights/controlnet_files.py; the original `control_model.*` layout through rules as for the UNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MinidiffError
from .embeddings import embed_time
from .weights.controlnet_files import read_controlnet
from .weights.tensors import fill
from .unet import UNetConfig, add_stem, check_inputs, down_path, encode, mid_path, skip_channels


class ControlNetConditioningEmbedding(nn.Module):
    """c = conv_out(SiLU(blocks(SiLU(conv_in(cond))))): conv 3x3 at each width, a stride-2 conv 3x3 between widths,
    SiLU after each; conv_out (3x3, zero-initialised) to the UNet's first width. len(widths) - 1 halvings: 3 for
    latent models (8x, the VAE's), none for the pixel-space miniature. (diffusers `controlnet.py`
    ControlNetConditioningEmbedding; the paper's E(.), ldm `input_hint_block`.)"""

    def __init__(self, out_channels: int, in_channels: int = 3, widths=(16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.conv_out = zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


def zero(module: nn.Module) -> nn.Module:
    """The paper's "zero convolution": weights and bias start at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNetModel(nn.Module):
    """(down_residuals, mid_residual) = ControlNet(x_t, t, context, text_embeds, time_ids, cond, scale).

    Built from the UNetConfig of the UNet it steers (its encoder half: conv_in, time and text_time embeddings, down
    blocks, mid block) plus the condition encoder and the zero convs. `cond` is the control image in [0, 1],
    [B, conditioning_channels, H * f, W * f] with f = 2^(len(conditioning_embedding_out_channels) - 1).
    (diffusers `models/controlnets/controlnet.py` ControlNetModel; ldm `cldm/cldm.py` ControlNet.)"""

    def __init__(
        self,
        config: UNetConfig,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels=(16, 32, 96, 256),
        global_pool_conditions: bool = False,
    ):
        super().__init__()
        self.config = c = config
        self.conditioning_channels = conditioning_channels
        self.conditioning_embedding_out_channels = tuple(conditioning_embedding_out_channels)
        self.global_pool_conditions = global_pool_conditions
        ch = c.block_out_channels
        temb = add_stem(self, c)  # the UNet's conv_in, time_proj, time_embedding, add_time_proj, add_embedding
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], conditioning_channels, self.conditioning_embedding_out_channels
        )
        self.down_blocks = down_path(c, temb)
        self.controlnet_down_blocks = nn.ModuleList(zero(nn.Conv2d(k, k, 1)) for k in skip_channels(c))
        self.mid_block = mid_path(c, temb)
        self.controlnet_mid_block = zero(nn.Conv2d(ch[-1], ch[-1], 1))

    @property
    def factor(self) -> int:
        """Control-image pixels per UNet input cell: 2^(number of stride-2 convs in the condition encoder)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: nn.Module, load_weights: bool = True, **kw) -> ControlNetModel:
        """A ControlNet for `unet` whose encoder starts as a copy of the UNet's (the paper's "trainable copy"; diffusers
        ControlNetModel.from_unet). The condition encoder is random, the zero convs zero."""
        net = cls(unet.config, **kw).to(device=unet.device, dtype=unet.dtype)
        if load_weights:
            own = net.state_dict()
            net.load_state_dict({**own, **{k: v for k, v in unet.state_dict().items() if k in own}}, strict=True)
        return net

    def to_diffusers(self) -> dict:
        """A diffusers `controlnet/config.json` dict (ControlNetModel)."""
        d = self.config.to_diffusers()
        for k in ("up_block_types", "out_channels", "conv_out_kernel", "sample_size", "dropout"):
            d.pop(k, None)
        d.update(
            _class_name="ControlNetModel",
            conditioning_channels=self.conditioning_channels,
            conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order="rgb",
            global_pool_conditions=self.global_pool_conditions,
        )
        return d

    def forward(self, x, t, context=None, text_embeds=None, time_ids=None, cond=None, scale=1.0, guess_mode=False):
        """x [B, C, H, W], t, context, text_embeds, time_ids as the UNet's; cond [B, 3, H * f, W * f] in [0, 1]
        -> (down_residuals [one per UNet skip, as pushed], mid_residual [B, ch_mid, h, w]), each times `scale`."""
        check_inputs(self, x, context, text_embeds, time_ids, "ControlNet")
        want = (x.shape[0], self.conditioning_channels, x.shape[2] * self.factor, x.shape[3] * self.factor)
        if cond is None or tuple(cond.shape) != want:
            raise MinidiffError(
                f"ControlNet: expected a control image of shape {list(want)}, got "
                f"{None if cond is None else list(cond.shape)}"
            )
        temb = embed_time(self, x, t, text_embeds, time_ids)
        h = self.conv_in(x) + self.controlnet_cond_embedding(cond.to(x.dtype))
        h, skips = encode(self, h, temb, context)
        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        scales = guess_mode_scales(len(down), scale) if guess_mode else [scale] * (len(down) + 1)
        down, mid = [r * s for r, s in zip(down, scales)], mid * scales[-1]
        if self.global_pool_conditions:  # "shuffle"-style ControlNets: one vector per channel
            down, mid = [r.mean(dim=(2, 3), keepdim=True) for r in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


ControlNet = ControlNetModel


def load_controlnet(path, dtype=None, device="cpu") -> ControlNetModel:
    """A ControlNet from a diffusers folder (`controlnet/` or a pipeline folder holding one), its safetensors file
    (config.json beside it), or an original single file (`control_model.*` keys or none; weights/controlnet_files.py
    reads the file and maps its keys). Every key and shape is checked (strict); a float dtype casts the weights."""
    config, extras, plan, view, what = read_controlnet(path)
    with torch.device("meta"):
        net = ControlNetModel(config, **extras)
    return fill(net, plan, view, dtype, device, what)


def guess_mode_scales(n: int, scale: float = 1.0) -> list[float]:
    """Guess mode's scales of the n skips and the middle: scale * 10^(-1 + k / n), k = 0 .. n (0.1 .. 1, the deep
    residuals strongest: the ControlNet must work without the prompt's help)."""
    return [scale * math.pow(10, -1 + k / n) for k in range(n + 1)]


# ---------------------------------------------------------------------------------------------- control at sampling
@dataclass
class Control:
    """One ControlNet at sampling time: its control image [1 or N, 3, H, W] in [0, 1] (already the size of the
    images), its conditioning scale, the fraction [start, end) of the steps it acts on, and guess mode (the ControlNet
    sees only the conditional half of a guided batch, the unconditional half gets no residuals)."""

    net: nn.Module
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def __post_init__(self):
        if not (0.0 <= self.start < self.end <= 1.0):
            raise MinidiffError(f"control: need 0 <= start < end <= 1, got start {self.start}, end {self.end}")

    def active(self, i: int, n: int) -> bool:
        """Step i of n counts iff not (i / n < start or (i + 1) / n > end) (diffusers' controlnet_keep)."""
        return not (i / n < self.start or (i + 1) / n > self.end)


class ControlledDenoiser:
    """The residuals of a list of Controls, step by step: call once per sampler step with the UNet's inputs (batched
    [uncond ; cond] when `guided`); returns the keyword arguments to add to the UNet call ({} without controls).
    `steps` is the number of steps the sampler runs (the step counter drives start / end)."""

    def __init__(self, controls, steps: int, guided: bool):
        self.controls, self.steps, self.guided, self.i = list(controls), steps, guided, 0

    def __call__(self, x_in, t, context, pooled, ids, rows: slice) -> dict:
        """x_in [b or 2b, C, h, w] (2b: [uncond ; cond]), t, context, pooled, ids as the UNet gets them; `rows` are the
        images of this batch (a control image per image, or one for all)."""
        i, self.i = self.i, self.i + 1
        down = mid = None
        for c in self.controls:
            if not c.active(i, self.steps) or c.scale == 0:
                continue
            image = (c.image if len(c.image) == 1 else c.image[rows]).to(x_in.device, x_in.dtype)
            if c.guess_mode and self.guided:  # the conditional half only; the unconditional half gets zeros
                half = slice(len(x_in) // 2, None)
                d, m = c.net(
                    x_in[half],
                    t,
                    context[half],
                    pooled[half],
                    ids[half],
                    image.repeat(len(x_in) // 2 // len(image), 1, 1, 1),
                    c.scale,
                    guess_mode=True,
                )
                d, m = [torch.cat([torch.zeros_like(r), r]) for r in d], torch.cat([torch.zeros_like(m), m])
            else:  # under guidance [uncond ; cond] both see the image
                d, m = c.net(
                    x_in,
                    t,
                    context,
                    pooled,
                    ids,
                    image.repeat(len(x_in) // len(image), 1, 1, 1),
                    c.scale,
                    guess_mode=c.guess_mode,
                )
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return {} if down is None else {"down_residuals": down, "mid_residual": mid}


def check_fits(net: nn.Module, unet: nn.Module, pixels_per_cell: int):
    """One line when a ControlNet was made for another base: its encoder's keys and shapes must be the UNet's (an SD
    1.5 ControlNet on SDXL, other channels), and its condition encoder must downsample as the VAE does."""
    if not isinstance(net, ControlNetModel):
        raise MinidiffError(f"control: expected a ControlNetModel (minidiff.controlnet), got {type(net).__name__}")
    mine = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("controlnet_")}
    theirs = {
        k: tuple(v.shape)
        for k, v in unet.state_dict().items()
        if not k.startswith(("up_blocks.", "conv_out", "conv_norm_out")) and ".lora_" not in k
    }
    for k in sorted(set(mine) | set(theirs), key=lambda k: (k not in mine, k)):
        if mine.get(k) != theirs.get(k):
            raise MinidiffError(
                f"control: this ControlNet is for another base model: first mismatched key {k} is "
                f"{list(mine[k]) if k in mine else 'missing'} in the ControlNet, "
                f"{list(theirs[k]) if k in theirs else 'missing'} in the UNet"
            )
    if net.factor != pixels_per_cell:
        raise MinidiffError(
            f"control: this ControlNet reads control images at {net.factor} px per UNet cell, but the "
            f"model's images have {pixels_per_cell} (a ControlNet for another base)"
        )


def prepare_controls(controls, unet: nn.Module, height: int, width: int, pixels_per_cell: int) -> list[Control]:
    """Controls from [(net, image, scale[, start, end])] or Control: each net checked against the UNet (check_fits),
    each image made a [1 or N, 3, height, width] tensor in [0, 1] (resized with a notice when its size differs)."""
    from .control_images import control_tensor

    out = []
    for c in controls or ():
        c = c if isinstance(c, Control) else Control(*c)
        check_fits(c.net, unet, pixels_per_cell)
        out.append(replace(c, image=control_tensor(c.image, height, width)))
    return out
