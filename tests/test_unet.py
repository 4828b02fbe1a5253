"""minidiff.unet against diffusers' UNet2DConditionModel (the reference oracle) on identical weights.

Keys/shapes are compared at full size on the meta device (no memory); numerics on reduced-width configs of the same
families (SDXL: text_time + linear proj; SD 1.5: conv proj, 4 levels; pixel DDPM: self-attention only)."""

import functools
import os

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.models.attention import BasicTransformerBlock as DiffusersBlock

from minidiff.errors import CheckpointError, MinidiffError
from minidiff.unet import UNet, UNetConfig
from minidiff.unet_blocks import BasicTransformerBlock, ResnetBlock2D

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (written out here, independent of to_diffusers()).
SDXL_HUB = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_HUB = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def diffusers_kwargs(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "hub, preset, tensors, params",
    [(SDXL_HUB, UNetConfig.sdxl, 1680, 2_567_463_684), (SD15_HUB, UNetConfig.sd15, 686, 859_520_964)],
)
def test_full_size_keys_and_shapes_match_diffusers(hub, preset, tensors, params):
    assert UNetConfig.from_diffusers(hub) == preset()
    with torch.device("meta"):
        ours, ref = UNet(preset()), DiffusersUNet(**diffusers_kwargs(hub))
    assert shapes(ours) == shapes(ref)
    assert len(shapes(ours)) == tensors
    assert sum(p.numel() for p in ours.parameters()) == params


def small_sdxl():
    return UNetConfig.tiny_sdxl(block_out_channels=(32, 64, 64), head_dim=16, cross_attention_dim=40, pooled_dim=24)


def small_sd15():
    return UNetConfig(
        block_out_channels=(32, 32, 64, 64),
        transformer_depth=(1, 1, 1, 0),
        mid_transformer_depth=1,
        num_heads=(8, 8, 8, 8),
        cross_attention_dim=48,
        use_linear_projection=False,
        addition_embed_type=None,
    )


def small_pixel():
    return UNetConfig.pixel(32, block_out_channels=(32, 64, 64), head_dim=16)


@functools.lru_cache(maxsize=None)
def make_pair(make_cfg):
    """diffusers' UNet built from cfg.to_diffusers(), weights perturbed (so norms are not 1/0), loaded into ours."""
    cfg = make_cfg()
    d = cfg.to_diffusers()
    pixel = cfg.cross_attention_dim is None
    if pixel:  # diffusers needs a context width; the attn2/norm2 it builds are then removed
        d["cross_attention_dim"] = 8
    ref = DiffusersUNet(**diffusers_kwargs(d)).eval()
    if pixel:
        for m in ref.modules():
            if isinstance(m, DiffusersBlock):
                m.attn2 = m.norm2 = None
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(cfg: UNetConfig, B=2, H=16, W=16):
    kw = {}
    if cfg.cross_attention_dim:
        kw["context"] = torch.randn(B, 7, cfg.cross_attention_dim)
    if cfg.addition_embed_type:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["text_embeds"] = torch.randn(B, pooled)
        kw["time_ids"] = torch.tensor([[1024.0, 768, 0, 16, 1024, 1024]] * B)
    return torch.randn(B, cfg.in_channels, H, W), kw


def run_ref(ref, x, t, kw):
    added = {k: kw[k] for k in ("text_embeds", "time_ids") if k in kw} or None
    return ref(x, t, kw.get("context"), added_cond_kwargs=added).sample


@pytest.mark.parametrize(
    "make_cfg, t",
    [
        (small_sdxl, torch.tensor([10, 980])),
        (small_sdxl, 500),
        (small_sdxl, 37.5),
        (small_sdxl, torch.tensor(999)),
        (small_sd15, torch.tensor([10, 980])),
        (small_pixel, torch.tensor([10, 980])),
    ],
)
def test_matches_diffusers(make_cfg, t):
    """t as a [B] int tensor, python int, python float and 0-d tensor; diffusers broadcasts each the same way."""
    cfg = make_cfg()
    ours, ref = make_pair(make_cfg)
    x, kw = inputs(cfg)
    with torch.no_grad():
        want, got = run_ref(ref, x, t, kw), ours(x, t, **kw)
    assert want.abs().max() > 0.1  # not a degenerate all-zero comparison
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("make_cfg", [small_sdxl, small_sd15])
def test_odd_latent_size_matches_diffusers(make_cfg):
    """13x11 latents: each upsampler interpolates to the next skip's size, as diffusers' upsample_size does."""
    cfg = make_cfg()
    ours, ref = make_pair(make_cfg)
    x, kw = inputs(cfg, B=1, H=13, W=11)
    with torch.no_grad():
        want, got = run_ref(ref, x, 250, kw), ours(x, 250, **kw)
    assert got.shape == (1, cfg.out_channels, 13, 11)
    assert (got - want).abs().max() <= 1e-4


def test_sdxl_norm_eps():
    """ResBlock GroupNorm 1e-5, Transformer2D GroupNorm 1e-6, LayerNorm 1e-5 (diffusers and sgm defaults)."""
    with torch.device("meta"):
        m = UNet(UNetConfig.sdxl())
    mods = dict(m.named_modules())
    assert mods["down_blocks.1.resnets.0.norm1"].eps == 1e-5 and mods["conv_norm_out"].eps == 1e-5
    assert mods["down_blocks.1.attentions.0.norm"].eps == 1e-6
    assert mods["mid_block.attentions.0.transformer_blocks.9.norm2"].eps == 1e-5
    assert mods["up_blocks.0.attentions.2.transformer_blocks.0.attn1"].heads == 20


def test_gradient_checkpointing_same_output_and_grads():
    cfg = UNetConfig.tiny_sdxl(
        block_out_channels=(32, 32), transformer_depth=(0, 1), layers_per_block=1, cross_attention_dim=40, pooled_dim=24
    )
    model = UNet(cfg).train()
    x, kw = inputs(cfg, H=8, W=8)
    calls = {"res": 0, "tf": 0}
    # pre-hooks: a recomputation may stop early (checkpoint early stop), so forward hooks would not see it
    model.mid_block.resnets[1].register_forward_pre_hook(lambda *a: calls.__setitem__("res", calls["res"] + 1))
    model.mid_block.attentions[0].transformer_blocks[0].register_forward_pre_hook(
        lambda *a: calls.__setitem__("tf", calls["tf"] + 1)
    )

    def step():
        model.zero_grad()
        out = model(x, torch.tensor([3, 700]), **kw)
        (out**2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_a, grads_a = step()
    assert calls == {"res": 1, "tf": 1}
    model.enable_gradient_checkpointing()
    out_b, grads_b = step()
    assert calls == {"res": 3, "tf": 3}  # forward + recomputation in backward: checkpointing really ran
    assert torch.allclose(out_a, out_b, atol=1e-6)
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n
    kinds = (ResnetBlock2D, BasicTransformerBlock)
    assert all(m.gradient_checkpointing for m in model.modules() if isinstance(m, kinds))


@pytest.mark.parametrize("preset", [UNetConfig.sdxl, UNetConfig.sd15, UNetConfig.tiny_sdxl, small_pixel])
def test_config_round_trip(preset):
    assert UNetConfig.from_diffusers(preset().to_diffusers()) == preset()


def test_pixel_preset_puts_attention_at_16x16():
    assert UNetConfig.pixel(32).transformer_depth == (0, 1, 0)
    assert UNetConfig.pixel(64, block_out_channels=(64, 128, 256, 256)).transformer_depth == (0, 0, 1, 0)
    m = UNet(small_pixel())
    assert m.down_blocks[1].attentions[0].transformer_blocks[0].attn2 is None
    assert m.config.dropout == 0.1 and m.down_blocks[0].resnets[0].dropout.p == 0.1


def test_rejects_other_architectures_and_bad_inputs():
    with pytest.raises(CheckpointError, match="time_embedding_type"):
        UNetConfig.from_diffusers({**SD15_HUB, "time_embedding_type": "fourier"})
    with pytest.raises(CheckpointError, match="block_types"):
        UNetConfig.from_diffusers(
            {**SD15_HUB, "mid_block_type": "UNetMidBlock2DCrossAttn", "down_block_types": ["AttnDownBlock2D"] * 4}
        )
    cfg = small_sdxl()
    m = UNet(cfg)
    x, kw = inputs(cfg, B=1)
    with pytest.raises(MinidiffError, match="context"):
        m(x, 1, text_embeds=kw["text_embeds"], time_ids=kw["time_ids"])
    with pytest.raises(MinidiffError, match="text_time"):
        m(x, 1, context=kw["context"])
    with pytest.raises(MinidiffError, match="expected t"):
        m(x, torch.tensor([1, 2, 3]), **kw)
    with pytest.raises(MinidiffError, match="expected x"):
        m(x[:, :3], 1, **kw)


@pytest.mark.fullsize
def test_full_size_sdxl_forward_matches_diffusers():
    """The real SDXL shape (fp32, ~10.3 GB shared between both models): ours is built on meta and takes diffusers'
    tensors with assign=True, so no second copy exists. Run under `flock /tmp/minidiff-bigmem.lock`."""
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.device("meta"):
        ref = DiffusersUNet(**diffusers_kwargs(SDXL_HUB))
        ours = UNet(UNetConfig.sdxl())
    ref = ref.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            v.normal_(0, 0.02, generator=g)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert ours.mid_block.resnets[0].conv1.weight.data_ptr() == ref.mid_block.resnets[0].conv1.weight.data_ptr()
    x, kw = inputs(UNetConfig.sdxl(), B=1, H=32, W=32)
    with torch.no_grad():
        want, got = run_ref(ref, x, 500, kw), ours.eval()(x, 500, **kw)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
