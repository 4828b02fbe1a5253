"""The UNet that predicts the noise: eps = unet(x_t, t, context, text_embeds, time_ids).

One config-driven family covers the SDXL base UNet, SD 1.5, a tiny SDXL for tests and the pixel-space DDPM baseline.
Class and attribute names copy diffusers (as minSDXL does), so a diffusers `unet/` state dict loads with
`load_state_dict(strict=True)`: `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`, ...

Shape of the network (SDXL numbers; sgm `UNetModel`,
https://github.com/Stability-AI/generative-models/blob/0ad7de9a5cb5/sgm/modules/diffusionmodules/openaimodel.py):

    temb = MLP(sinusoid(t)) + MLP([pooled | sinusoid(time_ids)])              1280
    h = conv_in(x_t)                                                           skip s0
    down level l: (ResBlock -> Transformer2D x depth_l) x layers_per_block      skips s1..
                  -> Downsample2D (not after the last level)                    one more skip
    mid: ResBlock -> Transformer2D x mid_depth -> ResBlock
    up level l: (concat(h, skip.pop()) -> ResBlock -> Transformer2D) x (layers_per_block + 1) -> Upsample2D
    eps = conv_out(SiLU(GroupNorm(h)))

The skips of SDXL at 1024 px (latent 4 x 128 x 128), pushed by the down path and popped LIFO by the up path
(channels @ side; minSDXL `sdxl_rewrite.py` names them s0..s8 the same way):

    conv_in                      4 -> 320 @128   s0 320
    down_blocks.0 (no attention)  320 @128        s1 320, s2 320, downsample s3 320 @64
    down_blocks.1 (depth 2)       320 -> 640 @64  s4 640, s5 640, downsample s6 640 @32
    down_blocks.2 (depth 10)      640 -> 1280 @32 s7 1280, s8 1280
    mid_block (depth 10)          1280 @32
    up_blocks.0 (depth 10)   cat s8: 1280+1280 -> 1280, s7: 1280+1280 -> 1280, s6: 1280+640 -> 1280, upsample @64
    up_blocks.1 (depth 2)    cat s5: 1280+640 -> 640,   s4: 640+640 -> 640,    s3: 640+320 -> 640,   upsample @128
    up_blocks.2 (no attn.)   cat s2: 640+320 -> 320,    s1: 320+320 -> 320,    s0: 320+320 -> 320
    conv_out                     320 -> 4 @128

The config (UNetConfig, its presets and the diffusers config.json mapping) is in unet_config.py and imported here,
so `from minidiff.unet import UNet, UNetConfig` is the whole model.
A level with transformer depth 0 has no attention (diffusers' DownBlock2D/UpBlock2D, otherwise CrossAttn*Block2D).
Without a context (`cross_attention_dim=None`, the pixel DDPM) each transformer block is self-attention + FF only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimestepEmbedding, Timesteps, add_time_embedding, embed_time  # noqa: F401 (re-exported)
from .errors import MinidiffError
from .unet_blocks import (
    BasicTransformerBlock,
    Downsample2D,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    maybe_checkpoint,
)
from .unet_config import UNetConfig


class DownBlock2D(nn.Module):
    """n x (ResBlock [-> Transformer2D]) [-> Downsample2D]; returns h and every intermediate output as skips.
    With depth > 0 this is diffusers' CrossAttnDownBlock2D, else DownBlock2D
    (`unet_2d_blocks.py`; sgm `input_blocks`)."""

    def __init__(self, cin, cout, temb_dim, n, depth, heads, cfg: UNetConfig, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)
            for i in range(n)
        )
        self.attentions = (
            nn.ModuleList(
                Transformer2DModel(
                    cout, heads, depth, cfg.cross_attention_dim, cfg.use_linear_projection, cfg.norm_num_groups
                )
                for _ in range(n)
            )
            if depth
            else None
        )
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, h, temb, context=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = maybe_checkpoint(resnet, h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock2D(nn.Module):
    """n x (concat(h, skips.pop()) -> ResBlock [-> Transformer2D]) [-> Upsample2D to the next skip's size], with
    n = layers_per_block + 1. With depth > 0 this is diffusers' CrossAttnUpBlock2D, else UpBlock2D
    (`unet_2d_blocks.py`; sgm `output_blocks`)."""

    def __init__(self, cin_skips, cprev, cout, temb_dim, n, depth, heads, cfg: UNetConfig, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (cprev if i == 0 else cout) + cin_skips[i],
                cout,
                temb_dim,
                cfg.norm_num_groups,
                cfg.norm_eps,
                cfg.dropout,
            )
            for i in range(n)
        )
        self.attentions = (
            nn.ModuleList(
                Transformer2DModel(
                    cout, heads, depth, cfg.cross_attention_dim, cfg.use_linear_projection, cfg.norm_num_groups
                )
                for _ in range(n)
            )
            if depth
            else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, h, skips: list, temb, context=None, size=None):
        for i, resnet in enumerate(self.resnets):
            h = maybe_checkpoint(resnet, torch.cat([h, skips.pop()], dim=1), temb)  # [B, C + C_skip, H, W] -> C
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResBlock -> Transformer2D (mid depth) -> ResBlock (diffusers `unet_2d_blocks.py`; sgm `middle_block`)."""

    def __init__(self, ch, temb_dim, depth, heads, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(ch, ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout) for _ in range(2)
        )
        self.attentions = nn.ModuleList(
            [
                Transformer2DModel(
                    ch, heads, depth, cfg.cross_attention_dim, cfg.use_linear_projection, cfg.norm_num_groups
                )
            ]
        )

    def forward(self, h, temb, context=None):
        h = maybe_checkpoint(self.resnets[0], h, temb)
        return maybe_checkpoint(self.resnets[1], self.attentions[0](h, context), temb)


def check_inputs(net: nn.Module, x, context, text_embeds, time_ids, what="UNet"):
    """One-line errors for inputs that do not fit `net` (a UNet or a ControlNet: its config and add_embedding)."""
    c = net.config
    if x.ndim != 4 or x.shape[1] != c.in_channels:
        raise MinidiffError(f"{what}: expected x of shape [B, {c.in_channels}, H, W], got {tuple(x.shape)}")
    got = None if context is None else tuple(context.shape)
    if c.cross_attention_dim and (got is None or len(got) != 3 or got[-1] != c.cross_attention_dim):
        raise MinidiffError(f"{what}: expected context [B, tokens, {c.cross_attention_dim}] (text states), got {got}")
    if net.add_embedding is not None:
        width = (
            None
            if text_embeds is None or time_ids is None
            else (text_embeds.shape[-1] + time_ids.shape[-1] * c.addition_time_embed_dim)
        )
        if width != c.projection_class_embeddings_input_dim:
            raise MinidiffError(
                f"{what}: 'text_time' needs text_embeds [B, P] and time_ids [B, 6] with P + 6 * "
                f"{c.addition_time_embed_dim} = {c.projection_class_embeddings_input_dim}"
            )


def add_stem(net: nn.Module, c: UNetConfig) -> int:
    """conv_in and the time / text_time embeddings, set on `net` under diffusers' names: built alike (same keys, same
    order of random init) by the UNet and its ControlNet. Returns temb's width, 4 * block_out_channels[0]."""
    net.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], 3, padding=1)
    return add_time_embedding(net, c)


def down_path(c: UNetConfig, temb: int) -> nn.ModuleList:
    """down_blocks: level i takes ch[i-1] (ch[0] at the first) to ch[i], then halves H, W (not after the last)."""
    ch, n = c.block_out_channels, len(c.block_out_channels)
    return nn.ModuleList(
        DownBlock2D(
            ch[max(i - 1, 0)], ch[i], temb, c.layers_per_block, c.transformer_depth[i], c.num_heads[i], c, i < n - 1
        )
        for i in range(n)
    )


def mid_path(c: UNetConfig, temb: int) -> UNetMidBlock2DCrossAttn:
    return UNetMidBlock2DCrossAttn(c.block_out_channels[-1], temb, c.mid_transformer_depth, c.num_heads[-1], c)


def skip_channels(c: UNetConfig) -> list[int]:
    """Channels of the skips s0, s1, ... as the down path pushes them (the table in the module docstring)."""
    ch, L = c.block_out_channels, c.layers_per_block
    return [ch[0]] + [ch[i] for i in range(len(ch)) for _ in range(L + (i < len(ch) - 1))]


def encode(net: nn.Module, h, temb, context=None):
    """The down path and the middle block of a UNet or a ControlNet, from h = conv_in(x) (+ the control):
    (h_mid, skips s0, s1, ... as pushed). SDXL shapes, latent x [B, 4, H, W]:"""
    skips = [h]  # s0 [B, 320, H, W]
    for block in net.down_blocks:  # -> [B, 320, H/2, W/2] -> [B, 640, H/4, W/4] -> [B, 1280, H/4, W/4]
        h, s = block(h, temb, context)  # s1..s3, s4..s6, s7..s8 (module docstring)
        skips += s
    return net.mid_block(h, temb, context), skips  # h_mid [B, 1280, H/4, W/4]


class UNet2DConditionModel(nn.Module):
    """eps = UNet(x_t, t, context, text_embeds, time_ids) (diffusers `unet_2d_condition.py`; sgm `openaimodel.py`
    `UNetModel`; minSDXL `sdxl_rewrite.py`). temb = time_embedding(sinusoid(t)) [+ add_embedding(
    [text_embeds | sinusoid(time_ids)])]; then conv_in, down blocks pushing skips, mid block, up blocks popping
    them (LIFO), and conv_out(SiLU(conv_norm_out(h)))."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config or UNetConfig.sdxl()
        ch, n, L = c.block_out_channels, len(c.block_out_channels), c.layers_per_block
        temb = add_stem(self, c)  # conv_in, time_proj, time_embedding, add_time_proj, add_embedding
        self.down_blocks = down_path(c, temb)
        self.mid_block = mid_path(c, temb)
        skip_ch = skip_channels(c)  # popped from the end: each up block takes the last L + 1
        self.up_blocks = nn.ModuleList(
            UpBlock2D(
                [skip_ch.pop() for _ in range(L + 1)],
                ch[min(i + 1, n - 1)],
                ch[i],
                temb,
                L + 1,
                c.transformer_depth[i],
                c.num_heads[i],
                c,
                i > 0,
            )
            for i in reversed(range(n))
        )
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def enable_gradient_checkpointing(self, on: bool = True):
        """Recompute every ResBlock and transformer block (mid block included) in backward (sgm use_checkpoint)."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)):
                m.gradient_checkpointing = on
        return self

    def forward(
        self, x, t, context=None, text_embeds=None, time_ids=None, down_residuals=None, mid_residual=None
    ) -> torch.Tensor:
        """x [B, C, H, W], t scalar or [B] (int or float), context [B, tokens, D], text_embeds [B, P], time_ids
        [B, 6] -> eps [B, C_out, H, W]. `down_residuals` (one per skip, as pushed) and `mid_residual` are a
        ControlNet's: added to the skips and to the middle block's output (diffusers' down_block_additional_residuals,
        mid_block_additional_residual)."""
        # SDXL shapes: x [B, 4, H, W] latents (H = image height / 8), context [B, 77, 2048], text_embeds [B, 1280]
        check_inputs(self, x, context, text_embeds, time_ids)
        temb = embed_time(self, x, t, text_embeds, time_ids)  # [B, 1280]
        h = self.conv_in(x)  # [B, 320, H, W]
        h, skips = encode(self, h, temb, context)  # h [B, 1280, H/4, W/4]; skips s0..s8 (docstring)
        if down_residuals is not None:  # a ControlNet's r_k, each the shape of its s_k
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            h = h + mid_residual  # [B, 1280, H/4, W/4]
        # up_blocks, each popping L + 1 skips: -> [B, 1280, H/2, W/2] (s8 s7 s6) -> [B, 640, H, W] (s5 s4 s3)
        #                                      -> [B, 320, H, W] (s2 s1 s0)
        for block in self.up_blocks:
            n = len(block.resnets)
            size = skips[-n - 1].shape[-2:] if len(skips) > n else None  # the skip waiting after this block's
            h = block(h, skips, temb, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))  # eps [B, 4, H, W]


UNet = UNet2DConditionModel
