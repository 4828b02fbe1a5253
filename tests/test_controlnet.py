"""minidiff.controlnet against diffusers' ControlNetModel and StableDiffusionXLControlNetPipeline (the oracles) on
identical random weights: residuals, the UNet taking them, full sampling (one and two ControlNets, start / end,
guess mode), files (diffusers folder, original `control_model.*` file), full-size SDXL keys on the meta device."""

import pytest
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import UNet2DConditionModel as DiffusersUNet
from safetensors.torch import save_file
from test_pipeline import PROMPTS, unit_noise
from test_pretrained import saved_diffusers_pipeline
from test_unet import SD15_HUB, SDXL_HUB, diffusers_kwargs, inputs, shapes, small_sdxl

from minidiff.controlnet import Control, ControlNetModel
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.pipeline import generate
from minidiff.unet import UNet, UNetConfig
from minidiff.controlnet import load_controlnet
from minidiff.weights.controlnet_files import save_controlnet
from minidiff.weights.pretrained import load_pipeline

HINT = (16, 32, 32, 64)  # a smaller condition encoder than SDXL's (16, 32, 96, 256), same 8x downsampling


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(tiny diffusers SDXL pipeline, ours loaded from the folder it saved)."""
    ref, folder = saved_diffusers_pipeline(tmp_path_factory.mktemp("pipe"))
    return ref, load_pipeline(folder)


def perturbed(module, seed, std=0.05):
    """Every weight nudged (diffusers zero-inits the zero convs and conv_out: make every one of them matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def controlnet_pair(ref_unet, seed=0, hint=HINT):
    """(diffusers ControlNetModel.from_unet(ref_unet) with perturbed weights, ours holding the same weights)."""
    ref = perturbed(DiffusersControlNet.from_unet(ref_unet, conditioning_embedding_out_channels=hint), seed)
    ours = ControlNetModel(
        UNetConfig.from_diffusers(dict(ref_unet.config)), conditioning_embedding_out_channels=hint
    ).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def small():
    """A small SDXL-shaped UNet (ours and diffusers', same weights) and a ControlNet pair made from it."""
    cfg = small_sdxl()
    ref_unet = perturbed(DiffusersUNet(**diffusers_kwargs(cfg.to_diffusers())), 1)
    unet = UNet(cfg).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    return cfg, ref_unet, unet, *controlnet_pair(ref_unet)


@pytest.mark.parametrize("guess_mode, scale", [(False, 1.0), (False, 0.6), (True, 0.8)])
def test_residuals_match_diffusers(small, guess_mode, scale):
    cfg, _, _, ref, ours = small
    x, kw = inputs(cfg, B=2, H=8, W=8)
    cond = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want_down, want_mid = ref(
            x,
            torch.tensor([10, 700]),
            kw["context"],
            cond,
            scale,
            added_cond_kwargs={"text_embeds": kw["text_embeds"], "time_ids": kw["time_ids"]},
            guess_mode=guess_mode,
            return_dict=False,
        )
        down, mid = ours(
            x,
            torch.tensor([10, 700]),
            kw["context"],
            kw["text_embeds"],
            kw["time_ids"],
            cond,
            scale,
            guess_mode=guess_mode,
        )
    assert len(down) == len(want_down) == 1 + 3 * 2 + 2  # conv_in + L per level + a downsampler per level but last
    assert min(r.abs().max() for r in want_down) > 1e-3  # perturbed zero convs: no all-zero comparison
    for a, b in zip(down, want_down):
        assert (a - b).abs().max() <= 1e-5
    assert (mid - want_mid).abs().max() <= 1e-5


def test_unet_takes_residuals_as_diffusers(small):
    cfg, ref_unet, unet, _, ours = small
    x, kw = inputs(cfg, B=2, H=8, W=8)
    with torch.no_grad():
        down, mid = ours(x, 500, kw["context"], kw["text_embeds"], kw["time_ids"], torch.rand(2, 3, 64, 64))
        want = ref_unet(
            x,
            500,
            kw["context"],
            added_cond_kwargs={"text_embeds": kw["text_embeds"], "time_ids": kw["time_ids"]},
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        got = unet(x, 500, down_residuals=down, mid_residual=mid, **kw)
        plain = unet(x, 500, **kw)
    assert (got - plain).abs().max() > 1e-2  # the residuals matter
    assert (got - want).abs().max() <= 1e-4


def test_from_unet_copies_the_encoder_and_starts_at_zero(small):
    cfg, _, unet, _, _ = small
    net = ControlNetModel.from_unet(unet)
    a, b = net.down_blocks[1].attentions[0], unet.down_blocks[1].attentions[0]
    assert torch.equal(a.proj_in.weight, b.proj_in.weight)
    assert torch.equal(net.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)
    x, kw = inputs(cfg, B=1, H=8, W=8)
    with torch.no_grad():
        down, mid = net(x, 3, kw["context"], kw["text_embeds"], kw["time_ids"], torch.rand(1, 3, 64, 64))
    assert all(r.abs().max() == 0 for r in down) and mid.abs().max() == 0  # zero convs: an untrained net is a no-op


# ------------------------------------------------------------------------------------------------ full sampling
def diffusers_controlnet_pipe(ref, controlnets):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    parts = {k: getattr(ref, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")}
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLControlNetPipeline(**parts, scheduler=sched, controlnet=controlnets, add_watermarker=False)


@pytest.fixture(scope="module")
def nets(saved):
    ref, _ = saved
    return [controlnet_pair(ref.unet, seed) for seed in (3, 4)]


@pytest.mark.parametrize("case", ["one", "two-start-end", "guess-mode"])
def test_sampling_matches_diffusers_controlnet_pipeline(saved, nets, case):
    ref, pipe = saved
    noise = unit_noise(2, h=8)
    images = [torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    if case == "one":
        refs, controls, kw = nets[0][0], [(nets[0][1], images[0], 0.7)], {"controlnet_conditioning_scale": 0.7}
    elif case == "two-start-end":
        refs = [nets[0][0], nets[1][0]]
        controls = [Control(nets[0][1], images[0], 0.7, 0.0, 0.5), Control(nets[1][1], images[1], 1.2, 0.25, 1.0)]
        kw = {
            "controlnet_conditioning_scale": [0.7, 1.2],
            "control_guidance_start": [0.0, 0.25],
            "control_guidance_end": [0.5, 1.0],
        }
    else:
        refs, controls = nets[0][0], [Control(nets[0][1], images[0], 0.9, guess_mode=True)]
        kw = {"controlnet_conditioning_scale": 0.9, "guess_mode": True}
    dpipe = diffusers_controlnet_pipe(ref, refs)
    image = images[0] if len(controls) == 1 else images
    with torch.no_grad():
        want = (
            dpipe(
                prompt=PROMPTS,
                image=image,
                latents=noise.clone(),
                height=64,
                width=128,
                num_inference_steps=4,
                guidance_scale=5.0,
                output_type="pt",
                **kw,
            ).images
            * 2
            - 1
        )
    got = generate(
        pipe,
        PROMPTS,
        steps=4,
        cfg=5.0,
        width=128,
        height=64,
        noise=noise,
        progress=False,
        sampler="euler",
        controls=controls,
    )
    plain = generate(
        pipe, PROMPTS, steps=4, cfg=5.0, width=128, height=64, noise=noise, progress=False, sampler="euler"
    )
    assert (got - plain).abs().max() > 1e-2  # the control changed the images
    assert (got - want).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------------------- files
# The original (ldm cldm) layout, written by an independent table: diffusers' own converter
# (single_file_utils.convert_controlnet_checkpoint) must give back the diffusers keys from it.
def to_original(state, L=2, levels=3):
    from test_pretrained import unet_to_original_key

    out = {}
    n_blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    for k, v in state.items():
        if k.startswith("controlnet_cond_embedding."):
            part = k.split(".")[1]
            i = 0 if part == "conv_in" else 2 * (n_blocks + 1) if part == "conv_out" else 2 * (int(k.split(".")[2]) + 1)
            new = f"input_hint_block.{i}.{k.rsplit('.', 1)[1]}"
        elif k.startswith("controlnet_down_blocks."):
            new = f"zero_convs.{k.split('.')[1]}.0.{k.rsplit('.', 1)[1]}"
        elif k.startswith("controlnet_mid_block."):
            new = f"middle_block_out.0.{k.rsplit('.', 1)[1]}"
        else:
            new = unet_to_original_key(k)
        out["control_model." + new] = v.contiguous()
    return out


def test_loads_diffusers_folder_file_and_original_layout(saved, nets, tmp_path):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    ref, ours = nets[0]
    ref.save_pretrained(tmp_path / "controlnet")
    original = to_original(ref.state_dict())
    back = convert_controlnet_checkpoint(original, dict(ref.config))  # it has no rule for SDXL's label_emb (yet)
    assert set(back) == {k for k in ref.state_dict() if not k.startswith("add_embedding.")}
    assert all(torch.equal(back[k], ref.state_dict()[k]) for k in back)
    save_file(original, tmp_path / "control_sdxl.safetensors")
    for path in (
        tmp_path / "controlnet",
        tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors",
        tmp_path / "control_sdxl.safetensors",
    ):
        net = load_controlnet(path)
        assert net.conditioning_embedding_out_channels == HINT
        for k, v in ref.state_dict().items():
            assert torch.equal(net.state_dict()[k], v), (path, k)
    half = load_controlnet(tmp_path / "control_sdxl.safetensors", dtype=torch.float16)
    assert half.conv_in.weight.dtype == torch.float16
    save_controlnet(ours, tmp_path / "mine")  # diffusers reads what we write
    back = DiffusersControlNet.from_pretrained(tmp_path / "mine")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_errors_are_one_line(saved, nets, tmp_path):
    _, pipe = saved
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(tmp_path / "nope")
    state = {k: v.contiguous() for k, v in nets[0][0].state_dict().items()}
    save_file(state, tmp_path / "lone.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        load_controlnet(tmp_path / "lone.safetensors")
    save_file({"a.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors")
    # a ControlNet of another base: an SD 1.5-like encoder (no text_time, other widths) on this SDXL-like UNet
    sd15 = ControlNetModel(
        UNetConfig(
            block_out_channels=(32, 64, 64),
            transformer_depth=(1, 1, 0),
            mid_transformer_depth=1,
            num_heads=(1, 2, 2),
            cross_attention_dim=192,
            use_linear_projection=False,
            addition_embed_type=None,
        ),
        conditioning_embedding_out_channels=HINT,
    )
    with pytest.raises(MinidiffError, match=r"another base model: first mismatched key \S+ is"):
        generate(
            pipe, PROMPTS, steps=1, width=128, height=64, progress=False, controls=[(sd15, torch.rand(3, 64, 128), 1.0)]
        )
    with pytest.raises(MinidiffError, match="start < end"):
        Control(nets[0][1], torch.rand(3, 64, 128), 1.0, 0.5, 0.5)


def test_wrong_size_control_image_is_resized_with_a_notice(saved, nets, capsys):
    _, pipe = saved
    kw = dict(steps=2, cfg=3.0, width=128, height=64, progress=False, noise=unit_noise(2, h=8))
    small_img = torch.rand(1, 3, 32, 64)
    a = generate(pipe, PROMPTS, controls=[(nets[0][1], small_img, 1.0)], **kw)
    assert "control image 64x32 resized to 128x64" in capsys.readouterr().err
    resized = torch.nn.functional.interpolate(small_img, size=(64, 128), mode="bilinear", antialias=True)
    b = generate(pipe, PROMPTS, controls=[(nets[0][1], resized, 1.0)], **kw)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("hub, tensors", [(SDXL_HUB, None), (SD15_HUB, None)])
def test_full_size_controlnet_keys_and_shapes_match_diffusers(hub, tensors):
    """diffusers/controlnet-canny-sdxl-1.0 is ControlNetModel.from_unet(SDXL base) (and lllyasviel's SD 1.5 ones of
    SD 1.5): built on the meta device, no memory."""
    with torch.device("meta"):
        ref_unet = DiffusersUNet(**diffusers_kwargs(hub))
        ref = DiffusersControlNet.from_unet(ref_unet, load_weights_from_unet=False)
        ours = ControlNetModel(UNetConfig.from_diffusers(hub))
    assert shapes(ours) == shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


# ------------------------------------------------------------------------------------------------------- sample.py
def test_sample_py_control_flags(saved, nets, tmp_path, capsys):
    from PIL import Image

    import sample
    from minidiff.images import read_png_metadata

    ref, _ = saved
    ref.save_pretrained(tmp_path / "model")
    save_controlnet(nets[0][1], tmp_path / "cn")
    sketch = Image.new("RGB", (50, 40), "white")
    sketch.paste((0, 0, 0), (10, 18, 40, 22))  # a black bar
    sketch.save(tmp_path / "sketch.png")
    fast = [
        "--model",
        str(tmp_path / "model"),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
    ]
    control = ["--control", f"{tmp_path / 'sketch.png'}:scribble:0.8", "--controlnet", str(tmp_path / "cn")]
    for name, extra in (("plain", []), ("control", control), ("guess", [*control, "--guess-mode"])):
        assert sample.main([*fast, *extra, "--out", str(tmp_path / name)]) == 0
    assert "control image 50x40 resized to 64x64" in capsys.readouterr().err
    meta = read_png_metadata(tmp_path / "control" / "0000-seed0.png")
    assert meta["controls"] == [
        {"image": "sketch.png", "type": "scribble", "scale": 0.8, "controlnet": str(tmp_path / "cn")}
    ]
    assert meta["guess_mode"] is False and read_png_metadata(tmp_path / "guess" / "0000-seed0.png")["guess_mode"]
    a, b, c = (Image.open(tmp_path / n / "0000-seed0.png").tobytes() for n in ("plain", "control", "guess"))
    assert len({a, b, c}) == 3  # the control changes the image, and guess mode changes how
    for bad, message in (
        ([f"--control={tmp_path / 'missing.png'}:canny"], "no such image file"),
        ([f"--control={tmp_path / 'sketch.png'}"], "needs --controlnet"),
    ):
        assert sample.main([*fast, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
