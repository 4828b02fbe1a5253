"""UNetConfig: every number that shapes the UNet (minidiff/unet.py), its presets (SDXL base, SD 1.5, the tiny SDXL of
the tests and the miniature, the pixel-space DDPM), and the mapping to and from a diffusers `unet/config.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import CheckpointError, MinidiffError


# diffusers config.json settings this UNet family does not vary: any other value is another architecture.
_DIFFUSERS_FIXED = dict(
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_type="UNetMidBlock2DCrossAttn",
    only_cross_attention=False,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    dual_cross_attention=False,
    class_embed_type=None,
    num_class_embeds=None,
    resnet_time_scale_shift="default",
    resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0,
    time_embedding_type="positional",
    time_embedding_dim=None,
    time_embedding_act_fn=None,
    timestep_post_act=None,
    time_cond_proj_dim=None,
    conv_in_kernel=3,
    conv_out_kernel=3,
    attention_type="default",
    class_embeddings_concat=False,
    mid_block_only_cross_attention=None,
    cross_attention_norm=None,
    reverse_transformer_layers_per_block=None,
)


@dataclass
class UNetConfig:
    """Everything that shapes the UNet. Defaults = SDXL base
    (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/unet/config.json). Per-level tuples run top (full
    resolution) to bottom. transformer_depth[l] = 0 means no attention at level l; num_heads are true head counts
    (diffusers' `attention_head_dim` [5, 10, 20] is, despite its name, the same head counts)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_depth: tuple = (0, 2, 10)
    mid_transformer_depth: int = 10
    num_heads: tuple = (5, 10, 20)  # head dim 64 everywhere
    cross_attention_dim: int | None = 2048  # None: no text; transformer blocks are self-attention + FF
    use_linear_projection: bool = True
    addition_embed_type: str | None = "text_time"  # SDXL's [pooled | sinusoid(6 size/crop ids)]
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816  # 1280 + 6 * 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0  # inside every ResBlock (DDPM uses 0.1)
    sample_size: int = 128  # latent size the model was trained at (informative only)

    def __post_init__(self):
        self.block_out_channels, self.transformer_depth = tuple(self.block_out_channels), tuple(self.transformer_depth)
        self.num_heads = tuple(self.num_heads)
        n, g = len(self.block_out_channels), self.norm_num_groups
        if not (len(self.transformer_depth) == len(self.num_heads) == n):
            raise MinidiffError(
                f"UNetConfig: block_out_channels, transformer_depth and num_heads need one entry per "
                f"level, got {n}, {len(self.transformer_depth)}, {len(self.num_heads)}"
            )
        if any(c % g or c % h for c, h in zip(self.block_out_channels, self.num_heads)):
            raise MinidiffError(
                f"UNetConfig: every width in {self.block_out_channels} must divide by norm_num_groups "
                f"{g} and by its head count {self.num_heads}"
            )
        if self.addition_embed_type not in (None, "text_time"):
            raise MinidiffError(
                f"UNetConfig: addition_embed_type must be None or 'text_time', got {self.addition_embed_type!r}"
            )

    @classmethod
    def sdxl(cls) -> UNetConfig:
        """SDXL base 1.0: 2,567,463,684 parameters in 1,680 tensors."""
        return cls()

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.5: 4 levels, attention on the top three, 8 heads, CLIP-L context 768, conv proj."""
        return cls(
            block_out_channels=(320, 640, 1280, 1280),
            transformer_depth=(1, 1, 1, 0),
            mid_transformer_depth=1,
            num_heads=(8, 8, 8, 8),
            cross_attention_dim=768,
            use_linear_projection=False,
            addition_embed_type=None,
            sample_size=64,
        )

    @classmethod
    def tiny_sdxl(
        cls,
        block_out_channels=(32, 64, 128),
        layers_per_block=2,
        transformer_depth=(0, 1, 1),
        mid_transformer_depth=1,
        head_dim=16,
        cross_attention_dim=96,
        pooled_dim=64,
        addition_time_embed_dim=8,
        in_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ) -> UNetConfig:
        """SDXL's family at toy width, for tests and the bundled miniature: context = two tiny CLIPs' hidden states
        concatenated (32 + 64 = 96 by default), pooled text embedding pooled_dim, 6 ids embedded at
        addition_time_embed_dim each."""
        return cls(
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            transformer_depth=transformer_depth,
            mid_transformer_depth=mid_transformer_depth,
            num_heads=tuple(c // head_dim for c in block_out_channels),
            cross_attention_dim=cross_attention_dim,
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=pooled_dim + 6 * addition_time_embed_dim,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
        )

    @classmethod
    def pixel(
        cls,
        image_size=32,
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        attention_resolutions=(16,),
        head_dim=32,
        dropout=0.1,
        channels=3,
        norm_num_groups=32,
    ) -> UNetConfig:
        """The pixel-space DDPM baseline (Ho et al. 2020): no text, one self-attention + FF transformer block at the
        levels whose resolution is in attention_resolutions (16x16) and in the middle, dropout in the ResBlocks."""
        res = [image_size // 2**i for i in range(len(block_out_channels))]
        return cls(
            in_channels=channels,
            out_channels=channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            transformer_depth=tuple(int(r in attention_resolutions) for r in res),
            mid_transformer_depth=1,
            num_heads=tuple(max(c // head_dim, 1) for c in block_out_channels),
            cross_attention_dim=None,
            addition_embed_type=None,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            sample_size=image_size,
        )

    @classmethod
    def from_diffusers(cls, d: dict) -> UNetConfig:
        """Read a diffusers `unet/config.json` dict (UNet2DConditionModel)."""
        same = lambda a, b: a == b or (isinstance(a, list) and all(x == b for x in a))  # noqa: E731
        odd = {k: d[k] for k, v in _DIFFUSERS_FIXED.items() if k in d and not same(d[k], v)}
        down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or up != [t.replace("Down", "Up") for t in down[::-1]]:
            odd["down/up_block_types"] = (down, up)
        if not isinstance(d.get("layers_per_block", 2), int) or isinstance(d.get("cross_attention_dim"), list):
            odd["per-block layers_per_block/cross_attention_dim"] = True
        if odd:
            raise CheckpointError(f"unet config.json: settings outside the SD/SDXL UNet family: {odd}")
        n = len(down)
        per_level = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
        depth = per_level(d.get("transformer_layers_per_block", 1))
        heads = per_level(d.get("num_attention_heads") or d.get("attention_head_dim", 8))
        try:
            return cls(
                in_channels=d.get("in_channels", 4),
                out_channels=d.get("out_channels", 4),
                block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
                layers_per_block=d.get("layers_per_block", 2),
                transformer_depth=tuple(k if t.startswith("CrossAttn") else 0 for k, t in zip(depth, down)),
                mid_transformer_depth=depth[-1],
                num_heads=tuple(heads),
                cross_attention_dim=d.get("cross_attention_dim", 1280),
                use_linear_projection=d.get("use_linear_projection", False),
                addition_embed_type=d.get("addition_embed_type"),
                addition_time_embed_dim=d.get("addition_time_embed_dim") or 256,
                projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim") or 2816,
                norm_num_groups=d.get("norm_num_groups", 32),
                norm_eps=d.get("norm_eps", 1e-5),
                dropout=d.get("dropout", 0.0),
                sample_size=d.get("sample_size") or 64,
            )
        except MinidiffError as e:
            raise CheckpointError(f"unet config.json: {e}") from None

    def to_diffusers(self) -> dict:
        """A diffusers `unet/config.json` dict. diffusers reads the mid block's depth from the last entry of
        transformer_layers_per_block, so that entry carries it when the last level has no attention."""
        depth = [k or 1 for k in self.transformer_depth]
        if self.transformer_depth[-1] and self.transformer_depth[-1] != self.mid_transformer_depth:
            raise MinidiffError(
                "UNetConfig.to_diffusers: diffusers needs mid_transformer_depth == transformer_depth[-1]"
            )
        depth[-1] = self.mid_transformer_depth
        kinds = ["CrossAttn" if k else "" for k in self.transformer_depth]
        d = asdict(self)
        for k in ("transformer_depth", "mid_transformer_depth", "num_heads"):
            d.pop(k)
        d.update(
            _DIFFUSERS_FIXED,
            _class_name="UNet2DConditionModel",
            block_out_channels=list(self.block_out_channels),
            down_block_types=[k + "DownBlock2D" for k in kinds],
            up_block_types=[k + "UpBlock2D" for k in kinds[::-1]],
            transformer_layers_per_block=depth,
            attention_head_dim=list(self.num_heads),
            num_attention_heads=None,
        )
        if self.addition_embed_type is None:
            d.update(addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
        return d
