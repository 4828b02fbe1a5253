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
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .embeddings import TimestepEmbedding, Timesteps, add_time_embedding, embed_time  # noqa: F401 (re-exported)
from .errors import MinidiffError
from .unet_config import UNetConfig


def maybe_checkpoint(module: nn.Module, *args):
    """module(*args); with gradient checkpointing on (sgm `use_checkpoint`), its activations are recomputed in
    backward instead of stored (torch.utils.checkpoint, use_reentrant=False)."""
    if module.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class ResnetBlock2D(nn.Module):
    """h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb));  out = shortcut(x) + conv2(dropout(SiLU(norm2(h)))).
    shortcut is a 1x1 conv when channels change. temb_dim=None drops the time term (the VAE's ResBlocks).
    (diffusers `resnet.py` `ResnetBlock2D`; sgm `openaimodel.py` `ResBlock`.)"""

    def __init__(self, cin: int, cout: int, temb_dim: int | None, groups=32, eps=1e-5, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # in place where autograd allows: on fresh GroupNorm/conv outputs that no backward formula needs
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if self.time_emb_proj is not None:
            h = h.add_(self.time_emb_proj(F.silu(temb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v per head, q = to_q(x), k, v = to_k(ctx), to_v(ctx) (ctx = x for self-attention),
    out = to_out.0(concat heads). q/k/v without bias. Runs F.scaled_dot_product_attention.
    (diffusers `attention_processor.py` `Attention` + `AttnProcessor2_0`; sgm `attention.py` `CrossAttention`.)"""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner, context_dim = heads * head_dim, context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # a list only so the key reads `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # [B, M, C_ctx]; self-attention: M = N
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # views, no copy
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))  # [B, N, C]


class GEGLU(nn.Module):
    """GEGLU(x) = a * GELU(g), [a | g] = proj(x) (exact erf GELU; Shazeer 2020; diffusers `activations.py` GEGLU)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.proj(x).chunk(2, dim=-1)  # [B, N, inner] each: views, no copy
        return a * F.gelu(g) if torch.is_grad_enabled() else F.gelu(g).mul_(a)  # inference: one buffer less


class FeedForward(nn.Module):
    """ff(x) = net.2(net.1(GEGLU(x))), inner width 4 * dim (diffusers `attention.py` FeedForward; sgm FeedForward)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](self.net[0](x)))  # [B, N, dim] -> [B, N, 4 dim] -> [B, N, dim]


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).
    Without context_dim (pixel DDPM) attn2/norm2 do not exist. (diffusers `attention.py`; sgm `attention.py`.)"""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.attn2 = Attention(dim, heads, head_dim, context_dim) if context_dim else None
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, N, dim] throughout; context [B, 77k, context_dim]
        x = self.attn1(self.norm1(x)).add_(x)  # Linear outputs: safe to add into in place
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Transformer2DModel(nn.Module):
    """out = x + proj_out(blocks(proj_in(GroupNorm(x)))) over the H*W tokens; GroupNorm eps 1e-6.
    linear=True (SDXL): flatten to [B, HW, C] then Linear proj_in/proj_out; linear=False (SD 1.5): 1x1 convs
    before flattening. (diffusers `transformer_2d.py`; sgm `attention.py` `SpatialTransformer`.)"""

    def __init__(self, dim, heads, depth, context_dim, linear=True, groups=32):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(dim, heads, dim // heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        H, W = x.shape[2:]  # x [B, C, H, W]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")  # tokens [B, HW, C]
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = maybe_checkpoint(block, h, context)  # [B, HW, C]
        if self.linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)  # [B, C, H, W], a channels-last view
        if not self.linear:
            return x + self.proj_out(h.contiguous())
        return x + h  # x first: the sum comes out contiguous NCHW, no extra .contiguous() copy


class Downsample2D(nn.Module):
    """conv 3x3 stride 2. padding=1: symmetric (UNet); padding=0: pad (0,1,0,1) first (the VAE).
    (diffusers `downsampling.py` Downsample2D; sgm `openaimodel.py` Downsample, `model.py` Downsample.)"""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """conv 3x3 after nearest upsampling x2, or to `size` (the next skip's, so odd latent sizes still concatenate;
    ComfyUI `Upsample(output_shape)`). (diffusers `upsampling.py` Upsample2D; sgm `openaimodel.py` Upsample.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size)
        return self.conv(x)


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
