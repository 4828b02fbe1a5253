"""img2img (SDEdit) and inpainting through pipeline.generate against diffusers' StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline on the same tiny SDXL-shaped random weights and the same generators (image i:
seed + i; each draws the init image's posterior sample, x_T, then the masked image's posterior sample, in
diffusers' order). The 9-channel inpainting UNet is loaded from the folder diffusers wrote and from the original
single file (converted by test_pretrained's independent table), and both must match."""

import pytest
import torch
from safetensors.torch import save_file
from conftest import perturb_weights
from test_pretrained import UNET_KW, saved_diffusers_pipeline, to_original

from minidiff.errors import MinidiffError
from minidiff.pipeline import generate
from minidiff.samplers import start_index
from minidiff.weights.pretrained import load_pipeline

PROMPTS = ["a cat", "a robot and a dog"]
H, W, SEED = 64, 128, 3


def init_images(n=2):
    """Smooth images in [-1, 1] (a VAE of random weights still sees structure)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    rows = [torch.stack([torch.sin(3 * x + i), torch.cos(2 * y - i), x * y]) for i in range(n)]
    return torch.stack(rows).clamp(-1, 1)


def masks(n=2):
    """A rectangle to repaint, soft edges included (values 0.3 and 0.7: diffusers binarises at 0.5)."""
    m = torch.zeros(n, 1, H, W)
    m[:, :, 16:48, 40:104] = 1.0
    m[:, :, 12:16, 40:104] = 0.3
    m[:, :, 48:52, 40:104] = 0.7
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref, folder = saved_diffusers_pipeline(tmp_path_factory.mktemp("edit"))
    return ref, load_pipeline(folder)


@pytest.fixture(scope="module")
def saved_inpainting(tmp_path_factory):
    """A 9-channel inpainting UNet (4 latent + 1 mask + 4 masked-image channels): diffusers folder + single file."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("inpaint9")
    ref, _ = saved_diffusers_pipeline(tmp / "base")
    torch.manual_seed(7)
    unet = UNet2DConditionModel(**{**UNET_KW, "in_channels": 9, "out_channels": 4}).eval()
    perturb_weights(unet)
    ref = StableDiffusionXLInpaintPipeline(**{**components(ref), "unet": unet})
    ref.save_pretrained(tmp / "model")
    save_file(to_original(tmp / "model"), tmp / "sd_xl_inpainting_tiny.safetensors")
    return (
        ref,
        load_pipeline(tmp / "model"),
        load_pipeline(tmp / "sd_xl_inpainting_tiny.safetensors", tokenizers=tmp / "model"),
    )


def components(ref):
    return {
        k: getattr(ref, k)
        for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    }


def scheduler(sampler):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    common = dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, timestep_spacing="leading"
    )
    if sampler == "euler":
        return EulerDiscreteScheduler(**common)
    if sampler == "ddim":
        return DDIMScheduler(set_alpha_to_one=False, clip_sample=False, **common)
    return DPMSolverMultistepScheduler(**common)


def generators():
    return [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]


@torch.no_grad()
def run_diffusers(cls, ref, sampler, **kw):
    pipe = cls(**{**components(ref), "scheduler": scheduler(sampler)})
    out = pipe(prompt=PROMPTS, generator=generators(), guidance_scale=5.0, output_type="pt", **kw).images
    return out * 2 - 1


def close(got, want):
    assert (want - want.mean()).abs().mean() > 0.01  # a real image, not a constant
    err = (got - want).abs().max().item()
    print(f"max |ours - diffusers| = {err:.2e}")
    assert err <= 1e-4, f"max |ours - diffusers| = {err:.2e}"
    return err


@pytest.mark.parametrize(
    "sampler,steps,strength", [("euler", 6, 0.5), ("euler", 4, 1.0), ("dpmpp_2m", 7, 0.6), ("ddim", 5, 0.8)]
)
def test_img2img_matches_diffusers(saved, sampler, steps, strength):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ref, pipe = saved
    want = run_diffusers(
        StableDiffusionXLImg2ImgPipeline,
        ref,
        sampler,
        image=init_images(),
        num_inference_steps=steps,
        strength=strength,
    )
    got = generate(
        pipe,
        PROMPTS,
        steps=steps,
        cfg=5.0,
        sampler=sampler,
        seed=SEED,
        init_images=init_images(),
        strength=strength,
        progress=False,
    )
    assert got.shape == (2, 3, H, W)
    close(got, want)


@pytest.mark.parametrize("sampler,steps,strength", [("euler", 4, 1.0), ("euler", 6, 0.7), ("dpmpp_2m", 5, 0.9)])
def test_inpainting_with_a_4_channel_unet_matches_diffusers(saved, sampler, steps, strength):
    from diffusers import StableDiffusionXLInpaintPipeline

    ref, pipe = saved
    want = run_diffusers(
        StableDiffusionXLInpaintPipeline,
        ref,
        sampler,
        image=(init_images() + 1) / 2,
        mask_image=masks(),
        num_inference_steps=steps,
        strength=strength,
        height=H,
        width=W,
    )
    got = generate(
        pipe,
        PROMPTS,
        steps=steps,
        cfg=5.0,
        sampler=sampler,
        seed=SEED,
        init_images=init_images(),
        masks=masks(),
        strength=strength,
        progress=False,
    )
    close(got, want)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_the_9_channel_unet_matches_diffusers(saved_inpainting, strength):
    from diffusers import StableDiffusionXLInpaintPipeline

    ref, pipe, single = saved_inpainting
    assert pipe.unet.config.in_channels == single.unet.config.in_channels == 9
    want = run_diffusers(
        StableDiffusionXLInpaintPipeline,
        ref,
        "euler",
        image=(init_images() + 1) / 2,
        mask_image=masks(),
        num_inference_steps=5,
        strength=strength,
        height=H,
        width=W,
    )
    kw = dict(
        steps=5,
        cfg=5.0,
        sampler="euler",
        seed=SEED,
        init_images=init_images(),
        masks=masks(),
        strength=strength,
        progress=False,
    )
    close(generate(pipe, PROMPTS, **kw), want)
    close(generate(single, PROMPTS, **kw), want)


def test_known_region_is_kept_and_strength_rule(saved):
    """Pixel-exact statements that need no oracle: strength -> steps run (diffusers' rule), and with a
    4-channel UNet the last blend puts the encoded known region back untouched (so a mask of zeros changes
    nothing but the VAE round trip)."""
    assert [start_index(30, s) for s in (1.0, 0.5, 0.3, 0.9999)] == [0, 15, 21, 1]
    with pytest.raises(MinidiffError, match="strength must be in"):
        start_index(10, 1.5)
    with pytest.raises(MinidiffError, match="runs no step"):
        start_index(4, 0.2)
    _, pipe = saved
    kw = dict(steps=3, cfg=3.0, seed=1, init_images=init_images(), progress=False)
    keep_all = generate(pipe, PROMPTS, masks=torch.zeros(2, 1, H, W), **kw)
    from minidiff.pipeline import decode, encode

    round_trip = decode(
        pipe, encode(pipe, init_images(), generators()[:0] + [torch.Generator().manual_seed(1 + i) for i in range(2)])
    )
    torch.testing.assert_close(keep_all, round_trip, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(init_images=torch.zeros(2, 3, 32, 32)), r"init_images must be a tensor \[2 or 1, 3, 64, 128\]"),
        (dict(init_images=torch.full((1, 3, H, W), 2.0)), r"init_images must lie in \[-1, 1\]"),
        (dict(init_images=init_images(), masks=torch.zeros(2, 3, H, W)), r"masks must be a tensor \[2 or 1, 1"),
        (dict(masks=torch.zeros(2, 1, H, W)), "masks need init_images"),
        (dict(init_images=init_images(), strength=0.0), r"strength must be in \(0, 1\]"),
    ],
)
def test_bad_edit_inputs_say_what_was_expected(saved, kw, message):
    _, pipe = saved
    with pytest.raises(MinidiffError, match=message):
        generate(pipe, PROMPTS, steps=2, width=W, height=H, progress=False, **kw)
