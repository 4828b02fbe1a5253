"""The time and added-condition embeddings of the UNet and the ControlNet: t and SDXL's (pooled, time_ids) -> temb.

    temb = time_embedding(time_proj(t))                                       [B, 4 * ch0]   (SDXL: 1280)
         + add_embedding([text_embeds | add_time_proj(time_ids)])     SDXL "text_time": 1280 + 6 * 256 = 2816 inputs

(diffusers `embeddings.py` Timesteps / TimestepEmbedding and `unet_2d_condition.py` get_aug_embed; sgm
`openaimodel.py` `time_embed` / `label_emb`.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MinidiffError


class Timesteps(nn.Module):
    """Sinusoidal embedding, cos first: emb = [cos(t * f_i), sin(t * f_i)], f_i = 10000^(-i / half), i < half.
    (diffusers `embeddings.py` `get_timestep_embedding` with flip_sin_to_cos=True, freq_shift=0; sgm `util.py`
    `timestep_embedding`.) Returns float32 [len(t), dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        arg = t.float()[:, None] * freqs[None]  # [B, half]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)  # [B, dim]


class TimestepEmbedding(nn.Module):
    """temb = linear_2(SiLU(linear_1(emb))) (diffusers `embeddings.py` `TimestepEmbedding`; sgm `time_embed`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))  # [B, in_dim] -> [B, dim]


def add_time_embedding(net: nn.Module, c) -> int:
    """Set time_proj, time_embedding and (addition_embed_type "text_time") add_time_proj, add_embedding on `net`
    (a UNet or a ControlNet: the same state-dict keys in both) from its UNetConfig `c`. Returns temb's width."""
    ch0, temb = c.block_out_channels[0], 4 * c.block_out_channels[0]
    net.time_proj = Timesteps(ch0)
    net.time_embedding = TimestepEmbedding(ch0, temb)
    text_time = c.addition_embed_type == "text_time"
    net.add_time_proj = Timesteps(c.addition_time_embed_dim) if text_time else None
    net.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb) if text_time else None
    return temb


def embed_time(net: nn.Module, x, t, text_embeds=None, time_ids=None) -> torch.Tensor:
    """temb [B, 4 * ch0] = time_embedding(sinusoid(t)) [+ add_embedding([text_embeds | sinusoid(time_ids)])], for a
    UNet or a ControlNet (both hold time_proj, time_embedding, add_time_proj, add_embedding). t: scalar or [B]."""
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device).reshape(-1)
    if t.numel() not in (1, B):
        raise MinidiffError(f"expected t as a scalar or [{B}] tensor, got {t.numel()} values")
    temb = net.time_embedding(net.time_proj(t.expand(B)).to(x.dtype))  # [B, 1280]
    if net.add_embedding is not None:
        ids = net.add_time_proj(time_ids.reshape(-1)).reshape(B, -1)  # [B, 6] -> [B, 6 * 256]
        temb = temb + net.add_embedding(torch.cat([text_embeds, ids], dim=-1).to(temb.dtype))  # [B, 1280 + 1536]
    return temb
