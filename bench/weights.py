"""Identical random weights at SDXL's exact shapes, for both implementations, without a download.

    python bench/weights.py OUT_DIR                      # a diffusers folder of random full-size SDXL (fp16, 6.9 GB)
    python bench/weights.py OUT_DIR --config tiny_sdxl   # the same layout at a tiny config (seconds, for tests)

Every tensor is filled from a generator seeded by (seed, crc32 of its state-dict key), so minidiff's model and
diffusers' model get the same numbers although each process builds only its own (on the meta device first: the
peak is one copy of the model). bench.py measures both implementations on these weights; the folder written by
`write_random_sdxl` lets finetune.py and sample.py run end to end at full size where no real weights can be
downloaded (the GPU session in bench/gpu_session.sh). The text encoders are transformers' CLIPs at SDXL's sizes with
a small BPE tokenizer (minidiff.bundled.tiny.build_tokenizer): the token ids differ from CLIP's, the shapes and costs do not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# diffusers' unet/config.json and vae/config.json of stabilityai/stable-diffusion-xl-base-1.0 (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/unet/config.json,
# .../vae/config.json), written out here rather than derived from minidiff's config so that the oracle does not depend on our code.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)
# text_encoder/config.json and text_encoder_2/config.json of the same repo (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/tree/main/text_encoder_2): CLIP ViT-L/14 and
# OpenCLIP ViT-bigG/14, 123,060,480 and 694,659,840 parameters.
SDXL_CLIP_L = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SDXL_CLIP_G = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def init_value(key: str, shape, dtype, device, seed=0) -> torch.Tensor:
    """The tensor every implementation gets for state-dict `key`: N(0, 1/fan_in) for weights with >= 2 dims, ones
    for norm weights, N(0, 0.02^2) for biases; drawn from a generator seeded by (seed, crc32(key)) on `device`."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        t = torch.randn(shape, generator=g, device=device).mul_(fan_in**-0.5)
    elif key.endswith("weight"):
        t = torch.ones(shape, device=device)
    else:
        t = torch.randn(shape, generator=g, device=device).mul_(0.02)
    return t.to(dtype)


def materialize(model: torch.nn.Module, dtype, device, seed=0) -> torch.nn.Module:
    """Fill a model built on the meta device, tensor by tensor (peak = the model itself, never a second copy)."""
    for key, meta in model.state_dict(keep_vars=True).items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        value = init_value(key, meta.shape, dtype if meta.is_floating_point() else meta.dtype, device, seed)
        if isinstance(meta, torch.nn.Parameter):
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=meta.requires_grad))
        else:
            module._buffers[attr] = value
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors still on the meta device after init: {left[:3]}")
    return model


def unet_config(name: str) -> tuple[dict, object]:
    """(diffusers config dict, minidiff UNetConfig) for "sdxl" or any UNetConfig preset (e.g. tiny_sdxl)."""
    from minidiff.unet import UNetConfig

    ours = getattr(UNetConfig, name)()
    theirs = (
        dict(SDXL_UNET) if name == "sdxl" else {k: v for k, v in ours.to_diffusers().items() if not k.startswith("_")}
    )
    return theirs, ours


def build_unet(impl, name, dtype, device, seed):
    """A UNet with the shared deterministic weights, and a call eps = f(x, t, context, pooled, time_ids)."""
    theirs, ours = unet_config(name)
    with torch.device("meta"):
        if impl == "ours":
            from minidiff.unet import UNet

            model = UNet(ours)
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(theirs)
    materialize(model, dtype, device, seed)
    if impl == "ours":

        def call(x, t, ctx, pooled, ids):
            return model(x, t, context=ctx, text_embeds=pooled, time_ids=ids)
    else:

        def call(x, t, ctx, pooled, ids):
            return model(
                x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
            ).sample

    return model, call, ours


def build_vae(impl, name, dtype, device, seed):
    with torch.device("meta"):
        if impl == "ours":
            from minidiff.vae import AutoencoderKL, VAEConfig

            vae = AutoencoderKL(VAEConfig.sdxl() if name == "sdxl" else VAEConfig.tiny())
        else:
            from diffusers import AutoencoderKL
            from minidiff.vae import VAEConfig

            cfg = (
                SDXL_VAE
                if name == "sdxl"
                else {k: v for k, v in VAEConfig.tiny().to_diffusers().items() if not k.startswith("_")}
            )
            vae = AutoencoderKL.from_config(cfg)
    return materialize(vae, dtype, device, seed + 1)


def unet_inputs(cfg, batch, latent, dtype, device, seed=0):
    """x_t, t, context, pooled, time_ids of a batch, from a fixed seed (the same in every worker)."""
    g = torch.Generator().manual_seed(seed + 12345)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, pooled_dim, generator=g)
    size = float(latent * 8)
    ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1)
    t = torch.full((batch,), 500, dtype=torch.long)
    return (x.to(device, dtype), t.to(device), ctx.to(device, dtype), pooled.to(device, dtype), ids.to(device, dtype))


def random_pipeline(tok_dir, name="sdxl", dtype=torch.float16, device="cpu", seed=0):
    """minidiff Pipeline with the shared random weights: UNet and VAE of `name` (sdxl or tiny_sdxl), both CLIPs
    (SDXL's sizes, or minidiff.bundled.tiny's for tiny_sdxl), tokenizers written to tok_dir, SDXL's scheduler."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from minidiff.bundled import tiny
    from minidiff.bundled.tokenizer import build_tokenizer
    from minidiff.weights.pretrained import schedule_from_config
    from minidiff.pipeline import Pipeline
    from minidiff.text import TextConditioner

    tok_dir = Path(tok_dir)
    tok = build_tokenizer(tok_dir / "tokenizer", tiny.all_words(), "<|endoftext|>")
    tok2 = build_tokenizer(tok_dir / "tokenizer_2", tiny.all_words(), "!")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    if name == "sdxl":
        c1, c2 = CLIPTextConfig(**SDXL_CLIP_L, **ids), CLIPTextConfig(**SDXL_CLIP_G, **ids)
    else:
        c1, c2 = tiny.text_configs(len(tok))
    with torch.device("meta"):
        encoders = CLIPTextModel(c1), CLIPTextModelWithProjection(c2)
    for i, (te, c) in enumerate(zip(encoders, (c1, c2))):
        for module in te.modules():  # CLIP's position_ids: a buffer that is not saved, so not materialized
            if "position_ids" in module._buffers:
                module.register_buffer(
                    "position_ids",
                    torch.arange(c.max_position_embeddings, device=device).expand(1, -1),
                    persistent=False,
                )
        materialize(te, dtype, device, seed + 2 + i).eval()
    unet, _, _ = build_unet("ours", name, dtype, device, seed)
    vae = build_vae("ours", name, torch.float32, device, seed)  # SDXL's VAE runs in fp32 (force_upcast)
    text = TextConditioner(tok, encoders[0], tok2, encoders[1])
    return Pipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text=text,
        schedule=schedule_from_config(SDXL_SCHEDULER),
        name=f"random-{name}",
        scheduler_config=dict(SDXL_SCHEDULER, _class_name="EulerDiscreteScheduler"),
    )


def write_random_sdxl(out_dir, name="sdxl", dtype=torch.float16, device="cpu", seed=0) -> Path:
    """A diffusers folder (model_index.json, unet/ vae/ text_encoder*/ tokenizer*/ scheduler/) of random weights
    that minidiff.weights.pretrained.load_pipeline and diffusers' StableDiffusionXLPipeline.from_pretrained both read."""
    from minidiff.weights.pretrained import save_pipeline

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tok_dir:  # save_pipeline copies the tokenizers into out/
        save_pipeline(random_pipeline(tok_dir, name, dtype, device, seed), out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (a diffusers SDXL layout)")
    p.add_argument("--config", default="sdxl", choices=["sdxl", "tiny_sdxl"])
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="UNet and text encoders (VAE: fp32)")
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is faster)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = write_random_sdxl(a.out, a.config, DTYPES[a.dtype], a.device, a.seed)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
