"""minidiff.vae against diffusers' AutoencoderKL (the reference oracle) on identical weights; tiled decode against
a closed-form identity (a local decoder makes tiling exact) and against plain decode."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersVAE

from minidiff.errors import CheckpointError, MinidiffError
from minidiff.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE_HUB = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def kwargs(d):
    return {k: v for k, v in d.items() if not k.startswith("_")}


def test_full_size_keys_and_shapes_match_diffusers():
    assert VAEConfig.from_diffusers(SDXL_VAE_HUB) == VAEConfig.sdxl()
    assert VAEConfig.from_diffusers({**SDXL_VAE_HUB, "scaling_factor": 0.18215, "sample_size": 512}) == VAEConfig.sd15()
    with torch.device("meta"):
        ours, ref = AutoencoderKL(VAEConfig.sdxl()), DiffusersVAE(**kwargs(SDXL_VAE_HUB))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert ours.scaling_factor == 0.13025 and ours.config.downscale == 8
    mods = dict(ours.named_modules())
    assert all(m.eps == 1e-6 for n, m in mods.items() if isinstance(m, torch.nn.GroupNorm))
    assert mods["encoder.down_blocks.0.downsamplers.0.conv"].padding == (0, 0)


@pytest.fixture(scope="module", params=["tiny", "two-level"])
def pair(request):
    cfg = VAEConfig.tiny() if request.param == "tiny" else VAEConfig.tiny((32, 64), layers_per_block=2)
    torch.manual_seed(0)
    ref = DiffusersVAE(**kwargs(cfg.to_diffusers())).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_encode_matches_diffusers(pair):
    ours, ref = pair
    x = torch.rand(2, 3, 40, 24) * 2 - 1  # 40x24: odd intermediate sizes go through the (0,1,0,1) padding
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.encode(x)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        sample_want, sample_got = want.sample(g1), got.sample(g2)
    for a, b in [(want.mean, got.mean), (want.std, got.std), (want.kl(), got.kl()), (sample_want, sample_got)]:
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    assert want.std.std() > 0 and want.mean.abs().max() > 0.05


def test_decode_matches_diffusers_and_slicing(pair):
    ours, ref = pair
    z = torch.randn(3, 4, 7, 9)
    with torch.no_grad():
        want, got, sliced = ref.decode(z).sample, ours.decode(z), ours.decode(z, batch_slice=1)
    assert got.shape == want.shape == (3, 3, 7 * ours.config.downscale, 9 * ours.config.downscale)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    # slicing is the same computation per image; only the conv kernels' summation order may differ with batch size
    assert (sliced - got).abs().max() <= 1e-5 * max(1.0, got.abs().max().item())


def test_posterior_closed_forms():
    """logvar clamp to [-30, 20], std = exp(logvar / 2), KL(N(m, s^2) || N(0, 1)) = 1/2 (m^2 + s^2 - 1 - log s^2)."""
    moments = torch.tensor([0.5, -1.0, 40.0, -50.0]).view(1, 4, 1, 1)  # mean (0.5, -1), logvar (40, -50)
    q = DiagonalGaussian(moments)
    assert torch.allclose(q.logvar.flatten(), torch.tensor([20.0, -30.0]))
    assert torch.allclose(q.std.flatten(), torch.exp(torch.tensor([10.0, -15.0])))
    m, lv = torch.tensor([0.5, -1.0]), torch.tensor([20.0, -30.0])
    assert torch.allclose(q.kl(), (0.5 * (m**2 + lv.exp() - 1 - lv)).sum().view(1))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q.sample(g), q.mean + q.std * eps)


class LocalDecoder(torch.nn.Module):
    """A decoder whose output pixel depends only on the latent under it: tiling then changes nothing."""

    def forward(self, z):
        return F.interpolate(torch.tanh(z[:, :3] * 2), scale_factor=8, mode="nearest")


def test_tiled_decode_blends_to_the_exact_image_for_a_local_decoder():
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    vae.decoder = LocalDecoder()
    z = torch.randn(2, 4, 21, 30)
    with torch.no_grad():
        plain, tiled = vae.decode(z), vae.decode_tiled(z, tile=8, overlap=3)
    assert tiled.shape == plain.shape
    assert (tiled - plain).abs().max() <= 1e-6  # weights of the covering tiles sum to one everywhere


def test_tiled_decode_against_plain_decode(pair):
    """With the real decoder a tile sees zero padding, its own GroupNorm statistics and its own attention, so
    tiled != plain, and with random weights (no trained locality) by a lot. What must hold: one tile covering
    everything is exactly plain decode, and at equal tile size blending overlapping tiles lands closer to the plain
    decode than abutting tiles (overlap 0) do (checked for 8 seeds x 2 configs while writing this test)."""
    ours, _ = pair
    z = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        plain = ours.decode(z)
        assert torch.equal(ours.decode_tiled(z, tile=12, overlap=4), plain)
        blended, cut = ours.decode_tiled(z, tile=6, overlap=3), ours.decode_tiled(z, tile=6, overlap=0)
    assert blended.shape == plain.shape
    assert (blended - plain).abs().mean() < (cut - plain).abs().mean()


# Tiled against whole decode at the tiny real-architecture VAE (bench/weights.py's N(0, 1/fan_in) weights: no trained
# VAE can be downloaded here), latent 32 in 16-cell tiles overlapping by 4 (pipeline.decode's quarter): the bounds
# of docs/memory-budget.md. Measured: 24.0 dB, seams 1.35x the error elsewhere; abutting tiles: 19.1 dB.
TILED_PSNR_DB, SEAM_RATIO = 22.0, 1.6


def test_tiled_decode_error_and_its_seams_stay_within_the_stated_bounds():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from lowmem_error import tile_error
    from weights import build_vae

    vae = build_vae("ours", "tiny_sdxl", torch.float32, "cpu", seed=0).eval()
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    blended, cut = tile_error(vae, z, 16, 4), tile_error(vae, z, 16, 0)
    assert blended["psnr_db"] >= TILED_PSNR_DB and blended["psnr_db"] >= cut["psnr_db"] + 3, (blended, cut)
    assert blended["rms_in_seams"] <= SEAM_RATIO * blended["rms_elsewhere"], blended


def test_force_upcast_runs_fp16_weights_in_fp32():
    vae = AutoencoderKL(VAEConfig.tiny()).half()
    out = vae.decode(torch.randn(1, 4, 4, 4, dtype=torch.float16))
    assert vae.dtype == torch.float32 and out.dtype == torch.float16


def test_config_round_trip_and_errors():
    for cfg in (VAEConfig.sdxl(), VAEConfig.sd15(), VAEConfig.tiny()):
        assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    with pytest.raises(CheckpointError, match="shift_factor"):
        VAEConfig.from_diffusers({**SDXL_VAE_HUB, "shift_factor": 0.0609})
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(MinidiffError, match="expected images"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(MinidiffError, match="expected latents"):
        vae.decode(torch.zeros(1, 3, 2, 2))
