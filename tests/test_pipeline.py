"""pipeline.generate against diffusers' StableDiffusionXLPipeline.__call__ on the same tiny weights and the same
initial latents (text -> context -> Euler / DPM++ loop with batched CFG -> VAE decode), pixel space against diffusers'
output_type="latent", and the seed rules (image i = seed + i, whatever the batch size)."""

import pytest
import torch

from minidiff.weights.pretrained import load_pipeline, save_pipeline
from minidiff.errors import MinidiffError
from minidiff.pipeline import Pipeline, generate
from test_pretrained import saved_diffusers_pipeline, tiny_diffusers_pipeline

PROMPTS = ["a cat", "a robot and a dog"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ref, folder = saved_diffusers_pipeline(tmp_path_factory.mktemp("pipe"))
    return ref, load_pipeline(folder)


def unit_noise(n, channels=4, h=16, w=16, seed=5):
    return torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def diffusers_images(ref, noise, **kw):
    out = ref(prompt=PROMPTS, latents=noise.clone(), height=64, width=128, output_type="pt", **kw).images
    return out * 2 - 1  # diffusers hands back [0, 1]


@pytest.mark.parametrize("case", ["euler", "euler-negative-rescale", "dpmpp_2m-trailing-karras"])
def test_text_to_image_matches_diffusers(saved, case):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    ref, pipe = saved
    noise = unit_noise(2, h=8)  # not square: (h, w) order matters in the size ids
    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    if case == "euler":
        ref.scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **common)
        kw, ours = {}, {}
    elif case == "euler-negative-rescale":
        ref.scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **common)
        kw = dict(negative_prompt=["robot", "robot"], guidance_rescale=0.7)
        ours = dict(negative="robot", guidance_rescale=0.7)
    else:
        ref.scheduler = DPMSolverMultistepScheduler(timestep_spacing="trailing", use_karras_sigmas=True, **common)
        kw, ours = {}, dict(sampler="dpmpp_2m", spacing="trailing", karras=True)
    want = diffusers_images(ref, noise, num_inference_steps=4, guidance_scale=5.0, **kw)
    got = generate(
        pipe,
        PROMPTS,
        steps=4,
        cfg=5.0,
        width=128,
        height=64,
        noise=noise,
        progress=False,
        **{"sampler": "euler", **ours},
    )
    assert got.shape == (2, 3, 64, 128)
    assert (want - want.mean()).abs().mean() > 0.01  # a real image, not a constant
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_no_guidance_makes_one_unconditioned_call_per_step(saved):
    ref, pipe = saved
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        generate(pipe, PROMPTS, steps=3, cfg=5.0, width=128, height=128, progress=False)
        assert calls == [4, 4, 4]  # [uncond ; cond] of 2 prompts, one call per step
        calls.clear()
        generate(pipe, PROMPTS, steps=3, cfg=1.0, width=128, height=128, progress=False)
        assert calls == [2, 2, 2]
    finally:
        hook.remove()


def test_same_seed_same_image_whatever_the_batch(saved):
    ref, pipe = saved
    prompts = ["a cat", "a dog", "robot"]
    kw = dict(steps=2, cfg=3.0, width=64, height=64, progress=False)
    together = generate(pipe, prompts, seed=7, batch_size=3, **kw)
    alone = generate(pipe, prompts, seed=7, batch_size=1, **kw)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    third = generate(pipe, ["robot"], seed=9, **kw)  # image 2 of seed 7 is image 0 of seed 9
    torch.testing.assert_close(third[0], together[2], rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], generate(pipe, ["a cat"], seed=8, **kw)[0])
    a = generate(pipe, prompts[:2], seed=3, sampler="euler_a", batch_size=2, **kw)  # stochastic sampler
    b = generate(pipe, prompts[1:2], seed=4, sampler="euler_a", **kw)
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=1e-5)


def test_pixel_space_pipeline_matches_diffusers_latent_output(tmp_path):
    """vae=None: the UNet denoises RGB directly; diffusers with output_type="latent" returns the same x_0."""
    from diffusers import UNet2DConditionModel

    from minidiff.weights.pretrained import schedule_from_config
    from minidiff.unet import UNet, UNetConfig
    from test_pretrained import UNET_KW

    ref = tiny_diffusers_pipeline(tmp_path)
    ref.unet = UNet2DConditionModel(**{**UNET_KW, "in_channels": 3, "out_channels": 3}).eval()
    ref.vae = None
    unet = UNet(UNetConfig.from_diffusers(dict(ref.unet.config)))
    unet.load_state_dict(ref.unet.state_dict())
    from minidiff.text import TextConditioner

    text = TextConditioner(ref.tokenizer, ref.text_encoder, ref.tokenizer_2, ref.text_encoder_2)
    pipe = Pipeline(unet=unet.eval(), vae=None, text=text, schedule=schedule_from_config({}))
    noise = unit_noise(2, channels=3)
    with torch.no_grad():
        want = ref(
            prompt=PROMPTS,
            latents=noise.clone(),
            height=16,
            width=16,
            num_inference_steps=3,
            guidance_scale=4.0,
            output_type="latent",
        ).images
    got = generate(pipe, PROMPTS, steps=3, cfg=4.0, width=16, height=16, noise=noise, progress=False)
    torch.testing.assert_close(got, want.clamp(-1, 1), rtol=0, atol=1e-4)
    save_pipeline(pipe, tmp_path / "pixel")  # what the bundled miniature is: no vae/, a 3-channel UNet
    again = load_pipeline(tmp_path / "pixel")
    assert again.vae is None and not (tmp_path / "pixel" / "vae").exists()
    torch.testing.assert_close(
        generate(again, PROMPTS, steps=3, cfg=4.0, width=16, height=16, noise=noise, progress=False),
        got,
        rtol=0,
        atol=0,
    )


def test_bad_sizes_and_empty_prompts(saved):
    ref, pipe = saved
    with pytest.raises(MinidiffError, match="multiples of 8"):
        generate(pipe, ["a cat"], width=100, height=64, progress=False)
    with pytest.raises(MinidiffError, match="need prompts"):
        generate(pipe, [], progress=False)
