"""The autoencoder between pixels and latents: z ~ q(z|x) = N(mean(x), std(x)^2), x_hat = decode(z).

Stable Diffusion runs the diffusion in this 8x smaller latent space (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"). The UNet sees latents scaled to about unit variance:

    z_unet = scaling_factor * z,   z ~ encode(x)            (SDXL 0.13025, SD 1.5 0.18215)
    x      = decode(z_unet / scaling_factor)                x in about [-1, 1], not clamped here

Attribute names are diffusers' AutoencoderKL keys (`encoder.down_blocks.0.resnets.0.conv1.weight`,
`decoder.mid_block.attentions.0.to_q.weight`, `quant_conv`, ...). References: diffusers
`autoencoders/autoencoder_kl.py`, `autoencoders/vae.py`; sgm `diffusionmodules/model.py`;
https://github.com/huggingface/diffusers/blob/58eb52c0803e/src/diffusers/models/autoencoders/autoencoder_kl.py.
The SDXL VAE overflows in fp16 (madebyollin/sdxl-vae-fp16-fix): with `force_upcast` it runs in fp32 instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import CheckpointError, MinidiffError
from .unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(std^2)) from the encoder's 2 * latent channels [mean | logvar], logvar clamped to
    [-30, 20]. sample = mean + std * eps;  kl = KL(q || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar) per image.
    (diffusers `autoencoders/vae.py` DiagonalGaussianDistribution; sgm `distributions.py`.)"""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * torch.sum(self.mean**2 + self.std**2 - 1.0 - self.logvar, dim=[1, 2, 3])


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions of the mid block, with its own GroupNorm and residual:
    out = x + to_out.0(softmax(q k^T / sqrt(C)) v), q, k, v = to_q/to_k/to_v(GroupNorm(x)) (Linear with bias; sgm
    stores them as 1x1 convs). (diffusers `attention_processor.py` Attention(residual_connection=True); sgm
    `model.py` AttnBlock.)"""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:]  # x [B, C, H, W]
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # [B, HW, C]
        q, k, v = (f(h)[:, None] for f in (self.to_q, self.to_k, self.to_v))  # one head: [B, 1, HW, C]
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])  # [B, HW, C]
        return x + rearrange(h, "b (h w) c -> b c h w", h=H, w=W)


class MidBlock(nn.Module):
    """ResBlock -> Attention -> ResBlock at the lowest resolution (diffusers UNetMidBlock2D; sgm `mid`)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, None, groups, eps=1e-6) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(ch, groups)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class EncoderBlock(nn.Module):
    """n ResBlocks [-> Downsample2D with (0,1,0,1) padding] (diffusers DownEncoderBlock2D; sgm `down.N`)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, 1e-6) for i in range(n))
        self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)]) if downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        return self.downsamplers[0](h) if self.downsamplers is not None else h


class DecoderBlock(nn.Module):
    """n + 1 ResBlocks [-> Upsample2D] (diffusers UpDecoderBlock2D; sgm `up.N`, numbered in reverse)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, 1e-6) for i in range(n))
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        return self.upsamplers[0](h) if self.upsamplers is not None else h


class Encoder(nn.Module):
    """x -> conv_in -> down blocks (halving all but the last) -> mid -> GroupNorm-SiLU-conv_out -> [mean | logvar]."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, n, g = c.block_out_channels, len(c.block_out_channels), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, i < n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h)), inplace=True))


class Decoder(nn.Module):
    """z -> conv_in -> mid -> up blocks (doubling all but the last) -> GroupNorm-SiLU-conv_out -> x."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, n, g = c.block_out_channels[::-1], len(c.block_out_channels), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, i < n - 1) for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))


# diffusers vae/config.json settings this family does not vary.
_DIFFUSERS_FIXED = dict(
    act_fn="silu",
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


@dataclass
class VAEConfig:
    """AutoencoderKL shape; defaults = SDXL's VAE (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/vae/config.json): 4 levels, downsampling 2^(levels-1) = 8."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder; the decoder has one more per level
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.13025
    force_upcast: bool = True  # run in fp32 when the weights are fp16 (the SDXL VAE overflows in fp16)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise MinidiffError(
                f"VAEConfig: widths {self.block_out_channels} must divide by norm_num_groups {self.norm_num_groups}"
            )

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sdxl(cls) -> VAEConfig:
        return cls()

    @classmethod
    def sd15(cls) -> VAEConfig:
        return cls(sample_size=512, scaling_factor=0.18215)

    @classmethod
    def tiny(
        cls,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.13025,
        sample_size=64,
    ) -> VAEConfig:
        """The same family at toy width (still 8x down) for tests and the bundled miniature."""
        return cls(
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            scaling_factor=scaling_factor,
            sample_size=sample_size,
        )

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        """Read a diffusers `vae/config.json` dict (AutoencoderKL)."""
        odd = {k: d[k] for k, v in _DIFFUSERS_FIXED.items() if k in d and d[k] != v}
        n = len(d.get("block_out_channels", (64,)))
        if (
            list(d.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n
            or list(d.get("up_block_types", ["UpDecoderBlock2D"] * n)) != ["UpDecoderBlock2D"] * n
        ):
            odd["block_types"] = (d.get("down_block_types"), d.get("up_block_types"))
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            odd["_class_name"] = d["_class_name"]
        if odd:
            raise CheckpointError(f"vae config.json: settings outside AutoencoderKL as used by SD/SDXL: {odd}")
        sample = d.get("sample_size", 32)
        try:  # diffusers' own defaults where a key is missing
            return cls(
                in_channels=d.get("in_channels", 3),
                out_channels=d.get("out_channels", 3),
                block_out_channels=tuple(d.get("block_out_channels", (64,))),
                layers_per_block=d.get("layers_per_block", 1),
                latent_channels=d.get("latent_channels", 4),
                norm_num_groups=d.get("norm_num_groups", 32),
                sample_size=sample[0] if isinstance(sample, (list, tuple)) else sample,
                scaling_factor=d.get("scaling_factor", 0.18215),
                force_upcast=d.get("force_upcast", True),
            )
        except MinidiffError as e:
            raise CheckpointError(f"vae config.json: {e}") from None

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        d = asdict(self)
        d.update(
            _DIFFUSERS_FIXED,
            _class_name="AutoencoderKL",
            block_out_channels=list(self.block_out_channels),
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
        )
        return d


class AutoencoderKL(nn.Module):
    """encode(x) = DiagonalGaussian(quant_conv(encoder(x))); decode(z) = decoder(post_quant_conv(z)).
    (diffusers `autoencoder_kl.py` AutoencoderKL; sgm `AutoencodingEngine`.)"""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = c = config or VAEConfig.sdxl()
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        """force_upcast: fp16 weights are converted to fp32 once (what diffusers' pipelines do before decoding)."""
        if self.config.force_upcast and self.dtype == torch.float16:
            self.float()
        return t.to(self.dtype)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x [B, 3, H, W] in [-1, 1] -> q(z|x); z = posterior.sample(generator) * scaling_factor for the UNet."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise MinidiffError(
                f"VAE.encode: expected images [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(self._prepare(x))))

    def decode(self, z: torch.Tensor, batch_slice: int | None = None) -> torch.Tensor:
        """z [B, latent, h, w] (unscaled: divide UNet latents by scaling_factor first) -> x [B, 3, 8h, 8w].
        batch_slice=k decodes k images at a time (same result, less peak memory)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise MinidiffError(
                f"VAE.decode: expected latents [B, {self.config.latent_channels}, h, w], got {tuple(z.shape)}"
            )
        dtype, z = z.dtype, self._prepare(z)
        chunks = z.split(batch_slice) if batch_slice else (z,)
        return torch.cat([self.decoder(self.post_quant_conv(c)) for c in chunks]).to(dtype)

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """Decode overlapping tile x tile latent windows one at a time and blend them: each output pixel is the
        weighted mean of the tiles covering it, each tile's weight ramping linearly from ~0 to 1 across its
        overlapping borders (so seams fade instead of cut). Peak memory is that of one tile plus the output.
        Not identical to decode(): GroupNorm statistics and the mid-block attention see one tile, not the image."""
        if tile <= overlap or overlap < 0:
            raise MinidiffError(f"VAE.decode_tiled: need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
        B, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        f, dtype, z = self.config.downscale, z.dtype, self._prepare(z)

        def starts(n):  # tile origins along one axis; the last tile ends exactly at the border
            return [0] if n <= tile else sorted(set(range(0, n - tile, tile - overlap)) | {n - tile})

        def ramp(n_px, first, last):  # per-pixel weight of one tile along one axis
            r = torch.ones(n_px, device=z.device, dtype=z.dtype)
            e = overlap * f
            up = (torch.arange(e, device=z.device, dtype=z.dtype) + 0.5) / e
            if not first and e:
                r[:e] = up
            if not last and e:
                r[-e:] = up.flip(0)
            return r

        out = torch.zeros(B, self.config.out_channels, h * f, w * f, device=z.device, dtype=z.dtype)
        weight = torch.zeros(h * f, w * f, device=z.device, dtype=z.dtype)
        ys, xs = starts(h), starts(w)
        for i in ys:
            for j in xs:
                part = self.decoder(self.post_quant_conv(z[:, :, i : i + tile, j : j + tile]))
                th, tw = part.shape[-2:]
                wgt = ramp(th, i == ys[0], i == ys[-1])[:, None] * ramp(tw, j == xs[0], j == xs[-1])[None, :]
                out[:, :, i * f : i * f + th, j * f : j * f + tw] += part * wgt
                weight[i * f : i * f + th, j * f : j * f + tw] += wgt
        return (out / weight).to(dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction through a posterior sample: decode(sample(encode(x)))."""
        return self.decode(self.encode(x).sample(generator))
