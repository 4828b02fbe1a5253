"""The UNet's building blocks, with diffusers' class and attribute names (unet.py assembles them into levels):

ResnetBlock2D          h = conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb))))) + shortcut(x)
Attention              softmax(q k^T / sqrt(d)) v over heads, q from x, k and v from x or the context
BasicTransformerBlock  x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))  (GEGLU FF)
Transformer2DModel     norm -> proj_in -> BasicTransformerBlock x depth -> proj_out, + the input
Downsample2D           stride-2 conv;  Upsample2D: nearest x2, then conv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


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
