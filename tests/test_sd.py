"""Stable Diffusion 1.x / 2.x against diffusers' StableDiffusionPipeline on the same tiny random weights: loading a
folder diffusers wrote, the original single file (made by an independent converter: the literal tables of diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py), encode_prompt (last layer; SD 2.x's penultimate layer +
final LayerNorm), sampling, saving; full-size SD 1.5 / 2.1 keys and shapes on the meta device; finetune.py and
sample.py on an SD folder; the wrong pipeline type in one line.

The tiny UNet has SD 1.5's structure (4 levels, attention on the top three, no added conditioning) at head width 64,
so the single file's config read off the shapes fits it exactly."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import perturb_weights
from test_pretrained import (
    MID,
    OPEN_CLIP,
    UNET_TOP,
    VAE_KW,
    original_unet_key,
    unet_layer_rules,
    vae_to_original,
    with_text_model,
)
from test_text import clip_configs, make_tokenizer_dir
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

from minidiff.errors import CheckpointError
from minidiff.pipeline import generate
from minidiff.weights.pretrained import load_pipeline, model_family, save_pipeline

UNET_SD_KW = dict(
    block_out_channels=(64, 64, 128, 128),
    layers_per_block=2,
    sample_size=16,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(1, 1, 2, 2),
    cross_attention_dim=64,
    norm_num_groups=32,
)
PROMPTS = ["a cat", "robot, a dog"]


def tiny_sd_parts(tmp_path, seed=0, sd2=False, text_layers=3):
    """(tokenizer, text encoder, unet, vae) of a tiny SD 1.x (quick_gelu, conv proj_in, pads with <|endoftext|>)
    or SD 2.x (gelu, linear proj_in, pads with "!") with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = clip_configs()[0].to_dict()
    cfg.update(num_hidden_layers=text_layers, hidden_act="gelu" if sd2 else "quick_gelu")
    te = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    tok = CLIPTokenizerFast.from_pretrained(make_tokenizer_dir(tmp_path / "tokenizer", "!" if sd2 else "<|endoftext|>"))
    unet = UNet2DConditionModel(**UNET_SD_KW, use_linear_projection=sd2).eval()
    vae = AutoencoderKL(**{**VAE_KW, "scaling_factor": 0.18215}).eval()
    perturb_weights(unet, vae)
    return tok, te, unet, vae


def diffusers_sd(tok, te, unet, vae):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    ref = diffusers_sd(*tiny_sd_parts(root / "parts"))
    ref.save_pretrained(root / "model")
    return ref, root / "model"


# ------------------------------------------------------------------ an independent diffusers -> original converter
# Re-typed from diffusers scripts/convert_diffusers_to_original_stable_diffusion.py: SD 1.x's 4 levels, attention on
# levels 0-2 going down and 1-3 going up, 2 resnets per down level, 3 per up level.
SD_TOP = UNET_TOP[:5]  # no label_emb: SD has no pooled / time_ids embedding
SD_LAYER = unet_layer_rules(4, attn_down={0, 1, 2}, attn_up={1, 2, 3}) + MID


def sd_unet_key(k):
    return original_unet_key(k, SD_TOP, SD_LAYER)


def sd_original_state(unet, vae, te, open_clip=False) -> dict:
    """v1-5-pruned / v2-1 layout: model.diffusion_model., first_stage_model., cond_stage_model.transformer.
    (transformers names) or cond_stage_model.model. (open_clip names, fused in_proj)."""
    out = {"model.diffusion_model." + sd_unet_key(k): v for k, v in unet.items()}
    out.update(vae_to_original(vae))
    te = with_text_model(te)
    if not open_clip:
        out.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
        return out
    pattern, qkv = re.compile("|".join(re.escape(hf) for _, hf in OPEN_CLIP)), {}
    for k, v in te.items():
        if m := re.fullmatch(r"(.*)\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        else:
            out["cond_stage_model.model." + pattern.sub(lambda m: {hf: sd for sd, hf in OPEN_CLIP}[m[0]], k)] = v
    for (pre, kind), t in qkv.items():
        pre = pattern.sub(lambda m: {hf: sd for sd, hf in OPEN_CLIP}[m[0]], pre)
        out[f"cond_stage_model.model.{pre}.in_proj_{kind}"] = torch.cat([t["q"], t["k"], t["v"]])
    width = te["text_model.final_layer_norm.weight"].shape[0]
    out["cond_stage_model.model.text_projection"] = torch.randn(width, width)  # in the file, unused by SD 2.x
    out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    return out


@torch.no_grad()
def assert_same_unet(ours, ref_unet, atol=1e-5):
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 700]), torch.randn(2, 77, 64, generator=g)
    torch.testing.assert_close(ours(x, t, ctx), ref_unet(x, t, ctx).sample, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------------- tests
@torch.no_grad()
def test_folder_loads_and_encodes_like_diffusers(saved):
    ref, folder = saved
    assert model_family(folder) == "sd"
    pipe = load_pipeline(folder)
    assert pipe.text.text_encoder_2 is None and set(pipe.modules()) == {"unet", "text_encoder"}
    assert pipe.unet.config.addition_embed_type is None and pipe.vae.scaling_factor == 0.18215
    assert_same_unet(pipe.unet, ref.unet)
    for negative in (None, ["robot", ""]):  # None: diffusers encodes "" (no zeros in SD 1.x / 2.x)
        want, want_neg = ref.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negative)
        ctx, pooled = pipe.text.encode(PROMPTS, negative="" if negative is None else negative)
        assert ctx.shape == (4, 77, 64) and pooled.shape == (4, 0)
        torch.testing.assert_close(ctx, torch.cat([want_neg, want]), rtol=0, atol=1e-6)
        assert want_neg.abs().sum() > 0


@torch.no_grad()
def test_sampling_matches_diffusers(saved):
    ref, folder = saved
    pipe = load_pipeline(folder)
    noise = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(5))
    for kw, ours in (({}, {}), ({"negative_prompt": ["robot"] * 2}, {"negative": "robot"})):
        want = (
            ref(
                prompt=PROMPTS,
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
            pipe, PROMPTS, steps=4, cfg=5.0, width=128, height=64, noise=noise, sampler="euler", progress=False, **ours
        )
        assert (want - want.mean()).abs().mean() > 0.01  # a real image, not a constant
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_single_file_sd1_loads_like_the_folder(saved, tmp_path):
    ref, folder = saved
    state = sd_original_state(
        *(
            load_file(folder / f)
            for f in (
                "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors",
            )
        )
    )
    save_file(state, tmp_path / "v1-tiny.safetensors")
    assert model_family(tmp_path / "v1-tiny.safetensors") == "sd"
    with pytest.raises(CheckpointError, match=r"carries no tokenizer.*holding tokenizer/ \(as in"):
        load_pipeline(tmp_path / "v1-tiny.safetensors")
    pipe = load_pipeline(tmp_path / "v1-tiny.safetensors", tokenizers=folder)
    assert pipe.unet.config.use_linear_projection is False and pipe.unet.config.sample_size == 64
    assert_same_unet(pipe.unet, ref.unet, atol=0)
    assert pipe.vae.scaling_factor == 0.18215 and pipe.text.layer == -1
    with torch.no_grad():
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(pipe.vae.decode(z), ref.vae.decode(z).sample, rtol=0, atol=1e-5)
        want, _ = ref.encode_prompt(PROMPTS, "cpu", 1, False)
        torch.testing.assert_close(pipe.text.encode(PROMPTS)[0], want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_single_file_sd2_uses_the_penultimate_layer_of_openclip(tmp_path):
    """The original SD 2.x file keeps all text layers and says `layer: penultimate`; diffusers' folder drops the last
    layer. Our single file (3 layers) must encode like diffusers on the same encoder cut to 2 layers."""
    tok, te3, unet, vae = tiny_sd_parts(tmp_path / "parts", seed=3, sd2=True, text_layers=3)
    te2 = CLIPTextModel(CLIPTextConfig(**{**te3.config.to_dict(), "num_hidden_layers": 2})).eval()
    te2.load_state_dict({k: v for k, v in te3.state_dict().items() if ".layers.2." not in k})
    ref = diffusers_sd(tok, te2, unet, vae)
    ref.save_pretrained(tmp_path / "sd2")
    save_file(
        sd_original_state(unet.state_dict(), vae.state_dict(), te3.state_dict(), open_clip=True),
        tmp_path / "v2-tiny.safetensors",
    )
    pipe = load_pipeline(tmp_path / "v2-tiny.safetensors", tokenizers=tmp_path / "sd2")
    assert pipe.text.layer == -2 and pipe.text.text_encoder.config.num_hidden_layers == 3
    assert pipe.text.text_encoder.config.hidden_act == "gelu" and pipe.unet.config.use_linear_projection
    assert_same_unet(pipe.unet, ref.unet, atol=0)
    want, want_neg = ref.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["robot"] * 2)
    torch.testing.assert_close(pipe.text.encode(PROMPTS, "robot")[0], torch.cat([want_neg, want]), rtol=0, atol=1e-5)
    assert (pipe.text.tokenize(tok, te3, ["a cat"])[0, 4:] == 0).all()  # pads with "!" = id 0
    folder = load_pipeline(tmp_path / "sd2")  # the folder's 2-layer encoder: its last layer, layer -1
    assert folder.text.layer == -1
    torch.testing.assert_close(folder.text.encode(PROMPTS)[0], want, rtol=0, atol=1e-6)


SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280],
    attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
    sample_size=64,
)
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_keys_shapes_and_config_inference_on_meta(name):
    """diffusers' own full-size UNet and VAE (meta device, no memory) against ours: every key and shape; the single
    file's sizes read off the shapes give back the same config (8 heads for SD 1.x, head width 64 for 2.x)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from test_pretrained import _Shapes

    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL as OurVAE
    from minidiff.vae import VAEConfig
    from minidiff.weights.layouts import View, infer_unet_config, infer_vae_config

    d = SD15_UNET if name == "sd15" else SD21_UNET
    vae_kw = dict(
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    config = UNetConfig.from_diffusers(d)
    if name == "sd15":
        assert config == UNetConfig.sd15()
    with torch.device("meta"):
        theirs, ours = UNet2DConditionModel(**d).state_dict(), UNet(config).state_dict()
        their_vae, our_vae = AutoencoderKL(**vae_kw).state_dict(), OurVAE(VAEConfig.sd15()).state_dict()
    assert len(ours) == len(theirs) == (686 if name == "sd15" else 686)
    assert {k: list(v.shape) for k, v in ours.items()} == {k: list(v.shape) for k, v in theirs.items()}
    assert {k: list(v.shape) for k, v in our_vae.items()} == {k: list(v.shape) for k, v in their_vae.items()}
    shapes = _Shapes(sd_original_state(theirs, their_vae, {}))
    assert infer_unet_config(View(shapes, "model.diffusion_model.")) == config
    assert infer_vae_config(View(shapes, "first_stage_model."), sdxl=False) == VAEConfig.sd15()


def test_other_pipelines_and_mismatches_are_one_line(saved, tmp_path):
    ref, folder = saved
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux/model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(
        CheckpointError,
        match="holds a FluxPipeline; minidiff loads StableDiffusionXLPipeline and StableDiffusionPipeline",
    ):
        load_pipeline(tmp_path / "flux")
    from test_pretrained import saved_diffusers_pipeline

    from minidiff.errors import LoRAError
    from minidiff.lora import inject_lora, load_lora, save_lora

    _, sdxl_folder = saved_diffusers_pipeline(tmp_path / "sdxl")
    sdxl = load_pipeline(sdxl_folder)
    inject_lora(sdxl.unet, "attn", 2)
    save_lora(sdxl.unet, tmp_path / "sdxl-lora.safetensors")
    with pytest.raises(LoRAError):
        load_lora(load_pipeline(folder).modules(), tmp_path / "sdxl-lora.safetensors")


def test_saved_folder_is_read_by_diffusers(saved, tmp_path):
    from diffusers import StableDiffusionPipeline

    ref, folder = saved
    ours = load_pipeline(folder)
    save_pipeline(ours, tmp_path / "out")
    index = json.loads((tmp_path / "out/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and not (tmp_path / "out/text_encoder_2").exists()
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert_same_unet(ours.unet, again.unet, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            load_pipeline(tmp_path / "out").text.encode(PROMPTS)[0],
            again.encode_prompt(PROMPTS, "cpu", 1, False)[0],
            rtol=0,
            atol=1e-6,
        )


def test_finetune_and_sample_run_on_an_sd_folder(saved, tmp_path):
    import finetune
    import sample

    ref, folder = saved
    out = tmp_path / "ft"
    assert (
        finetune.main(
            [
                "--model",
                folder,
                "--out",
                out,
                "--no-prior",
                "--steps",
                "2",
                "--resolution",
                "32",
                "--validation-images",
                "1",
                "--validation-steps",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        sample.main(
            [
                "--model",
                str(folder),
                "--prompt",
                "a cat",
                "--steps",
                "2",
                "--width",
                "32",
                "--height",
                "32",
                "--lora",
                str(out / "lora.safetensors"),
                "--out",
                str(tmp_path / "s"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "s" / "grid.png").is_file()
