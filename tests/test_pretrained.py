"""weights/pretrained.py and weights/layouts.py: folders written by diffusers itself, fp16 variants, shards, the
original single file (made here by an independent converter: the explicit tables of diffusers'
scripts/convert_diffusers_to_original_sdxl.py), the key rules on the full-size SDXL key set, config inference from
shapes, and every error a user can cause.

Also home of the tiny SDXL-shaped diffusers pipeline the other test files import (3 UNet levels, 2 layers per block,
attention on levels 1-2 as in SDXL; a 4-level VAE; head width 64 so the single file's inferred config fits).
"""

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidiff.weights.pretrained import file_hash, load_pipeline, load_text, load_unet, load_vae, save_pipeline
from minidiff.weights.tensors import Tensors
from minidiff.weights.layouts import (
    View,
    detect_layout,
    diffusers_to_ldm_unet_key,
    infer_unet_config,
    infer_vae_config,
    ldm_to_diffusers_unet_key,
)
from minidiff.errors import CheckpointError
from conftest import perturb_weights
from test_text import diffusers_sdxl, tiny_text_parts

UNET_KW = dict(
    block_out_channels=(64, 128, 128),
    layers_per_block=2,
    sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 2),
    cross_attention_dim=64 + 128,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=96 + 6 * 8,
    norm_num_groups=32,
)
VAE_KW = dict(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=128,
    scaling_factor=0.13025,
    force_upcast=True,
)


def tiny_diffusers_pipeline(tmp_path, seed=0):
    """A diffusers StableDiffusionXLPipeline with random tiny weights (the oracle of these tests)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    text_parts = tiny_text_parts(tmp_path, seed)
    torch.manual_seed(seed + 1)
    unet, vae = UNet2DConditionModel(**UNET_KW).eval(), AutoencoderKL(**VAE_KW).eval()
    perturb_weights(unet, vae)
    return diffusers_sdxl(text_parts, unet=unet, vae=vae)


def saved_diffusers_pipeline(tmp_path, seed=0, **save_kw):
    """(diffusers pipeline, folder it wrote with its own save_pretrained)."""
    ref = tiny_diffusers_pipeline(tmp_path / "parts", seed)
    ref.save_pretrained(tmp_path / "model", **save_kw)
    return ref, tmp_path / "model"


# ------------------------------------------------------------------ an independent diffusers -> original converter
# Re-typed from diffusers scripts/convert_diffusers_to_original_sdxl.py: literal (ldm, diffusers)
# prefix tables and sequential str.replace, for SDXL's structure (3 levels, 2 layers per block).
UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
]
UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
MID = [
    ("middle_block.1.", "mid_block.attentions.0."),
    ("middle_block.0.", "mid_block.resnets.0."),
    ("middle_block.2.", "mid_block.resnets.1."),
]


def unet_layer_rules(levels, attn_down, attn_up):
    """(ldm, diffusers) prefix pairs of the converter scripts' loop: `levels` levels, 2 resnets per down level and
    3 per up level, attention at the down levels in `attn_down` and the up levels in `attn_up`."""
    rules = []
    for i in range(levels):
        for j in range(2):
            rules.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i in attn_down:
                rules.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            rules.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i in attn_up:
                rules.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            rules.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            rules.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    return rules


def original_unet_key(k, top, layer):
    """Sequential str.replace as the converter scripts do it: top-level prefixes, resnet names, then layers."""
    v = k
    for sd, hf in top:
        v = sd + v[len(hf) :] if v.startswith(hf) else v
    if "resnets" in k:
        for sd, hf in UNET_RESNET:
            v = v.replace(hf, sd)
    for sd, hf in layer:
        v = v.replace(hf, sd)
    return v


UNET_LAYER = unet_layer_rules(3, attn_down={1, 2}, attn_up={0, 1})
UNET_LAYER.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))  # the script's SDXL fix-up
UNET_LAYER += MID


def unet_to_original_key(k):
    return original_unet_key(k, UNET_TOP, UNET_LAYER)


VAE_MAP = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
for i in range(4):
    VAE_MAP += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(2)]
    if i < 3:
        VAE_MAP += [
            (f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
            (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."),
        ]
    VAE_MAP += [(f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(3)]
VAE_MAP += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]

OPEN_CLIP = [
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]


def with_text_model(sd):
    """transformers 5 writes CLIPTextModel without its `text_model.` level; the original file has it."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


def vae_to_original(vae) -> dict:
    """first_stage_model.* of a diffusers VAE state dict (attention linears become the original 1x1 convs)."""
    out = {}
    for k, v in vae.items():
        new = k
        for sd, hf in VAE_MAP:
            new = new.replace(hf, sd)
        if "attentions" in k:
            for sd, hf in VAE_ATTN:
                new = new.replace(hf, sd)
            v = v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v
        out["first_stage_model." + new] = v
    return out


def to_original(folder: Path) -> dict:
    """The original sd_xl_base_1.0 layout of a diffusers folder, converted independently of minidiff."""
    return to_original_state(
        *(
            load_file(folder / f)
            for f in (
                "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors",
            )
        )
    )


def to_original_state(unet, vae, text_encoder, text_encoder_2) -> dict:
    """The same from four diffusers/transformers state dicts (real or meta tensors)."""
    out = {"model.diffusion_model." + unet_to_original_key(k): v for k, v in unet.items()}
    out.update(vae_to_original(vae))
    clip_l = with_text_model(text_encoder)
    out.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()})
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    big_g, qkv = with_text_model(text_encoder_2), {}
    pattern = re.compile("|".join(re.escape(hf) for _, hf in OPEN_CLIP))
    relabel = lambda k: pattern.sub(lambda m: {hf: sd for sd, hf in OPEN_CLIP}[m[0]], k)  # noqa: E731
    for k, v in big_g.items():
        if m := re.fullmatch(r"(.*)\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        elif k == "text_projection.weight":
            out["conditioner.embedders.1.model.text_projection"] = v.T.contiguous()
        else:
            out["conditioner.embedders.1.model." + relabel(k)] = v
    for (pre, kind), t in qkv.items():
        out[f"conditioner.embedders.1.model.{relabel(pre)}.in_proj_{kind}"] = torch.cat([t["q"], t["k"], t["v"]])
    out["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    return out


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_diffusers_pipeline(tmp_path_factory.mktemp("ckpt"))


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([3, 700][:batch]),
        torch.randn(batch, 77, 192, generator=g),
        torch.randn(batch, 96, generator=g),
        torch.tensor([[128.0, 128, 0, 0, 128, 128]]).repeat(batch, 1),
    )


@torch.no_grad()
def assert_same_unet(ours, ref_unet, atol=1e-5):
    x, t, ctx, pooled, ids = inputs()
    want = ref_unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    got = ours(x.to(ours.dtype), t, ctx.to(ours.dtype), text_embeds=pooled.to(ours.dtype), time_ids=ids).float()
    torch.testing.assert_close(got, want.float(), rtol=0, atol=atol)


@torch.no_grad()
def assert_same_vae(ours, ref_vae, atol=1e-5):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    want = ref_vae.decode(z.to(ref_vae.dtype)).sample.float()
    torch.testing.assert_close(ours.decode(z.to(next(ours.parameters()).dtype)).float(), want, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------------- tests
def test_folder_written_by_diffusers_loads_and_matches(saved):
    ref, folder = saved
    assert_same_unet(load_unet(folder), ref.unet)
    assert_same_unet(load_unet(folder / "unet"), ref.unet)  # the component folder itself
    assert_same_vae(load_vae(folder), ref.vae)
    text = load_text(folder)
    with torch.no_grad():
        ctx, _, pooled, _ = ref.encode_prompt(["a cat", "robot"], device="cpu")
        got_ctx, got_pooled = text.encode(["a cat", "robot"])
    torch.testing.assert_close(got_ctx, ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    pipe = load_pipeline(folder)
    assert pipe.name == "model" and pipe.scheduler_config["timestep_spacing"] == "leading"
    assert pipe.scheduler_config["steps_offset"] == 1
    torch.testing.assert_close(pipe.schedule.alpha_bar.float(), ref.scheduler.alphas_cumprod.float())


def test_fp16_variant_files(tmp_path):
    ref, folder = tiny_diffusers_pipeline(tmp_path / "parts"), tmp_path / "model"
    ref.to(dtype=torch.float16).save_pretrained(folder, variant="fp16")  # only *.fp16.safetensors
    ref.to(dtype=torch.float32)
    assert (folder / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet/diffusion_pytorch_model.safetensors").exists()
    unet = load_unet(folder, dtype=torch.float32)  # only the fp16 file there: read it, cast to fp32 on the fly
    assert unet.dtype == torch.float32
    assert_same_unet(unet, ref.unet, atol=1e-5)  # ref holds the fp16-rounded weights again in fp32
    assert load_unet(folder, dtype=torch.float16).dtype == torch.float16
    ref.unet.float().save_pretrained(folder / "unet")  # now both files: fp16 loads prefer the fp16 one
    full = Tensors(folder / "unet/diffusion_pytorch_model.safetensors")
    assert full.get("conv_in.weight").dtype == torch.float32
    assert load_unet(folder).dtype == torch.float32  # dtype None: the full-precision file, as stored
    pipe = load_pipeline(folder, dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and next(pipe.vae.parameters()).dtype == torch.float32  # force_upcast


def test_sharded_safetensors_index(saved, tmp_path):
    ref, folder = saved
    sd = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    (tmp_path / "unet").mkdir()
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / "unet" / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "unet/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "unet/config.json").write_text((folder / "unet/config.json").read_text())
    assert_same_unet(load_unet(tmp_path), ref.unet)


def test_single_file_loads_and_matches_the_diffusers_layout(saved, tmp_path):
    ref, folder = saved
    original = to_original(folder)
    assert detect_layout(original) == "sdxl-single-file"
    save_file(original, tmp_path / "sd_xl_tiny.safetensors")
    single = tmp_path / "sd_xl_tiny.safetensors"
    with pytest.raises(CheckpointError, match="carries no tokenizer.*tokenizers=DIR"):
        load_pipeline(single)
    pipe = load_pipeline(single, tokenizers=folder)
    assert pipe.name == "sd_xl_tiny"
    assert replace(pipe.unet.config, sample_size=16) == load_unet(folder).config  # sizes read off the shapes
    assert_same_unet(pipe.unet, ref.unet, atol=0)
    assert_same_vae(pipe.vae, ref.vae, atol=0)
    with torch.no_grad():
        ctx, _, pooled, _ = ref.encode_prompt(["a cat", "robot"], device="cpu")
        got_ctx, got_pooled = pipe.text.encode(["a cat", "robot"])
    torch.testing.assert_close(got_ctx, ctx, rtol=0, atol=1e-6)  # CLIP-L + bigG (in_proj split, projection.T)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    assert pipe.text.text_encoder.config.hidden_act == "quick_gelu"
    assert pipe.text.text_encoder_2.config.hidden_act == "gelu"


def test_unet_key_rules_agree_with_the_converter_table_on_full_size_sdxl():
    """All 1680 keys of the full-size SDXL UNet (built on the meta device: no memory)."""
    from minidiff.unet import UNet, UNetConfig

    config = UNetConfig.sdxl()
    with torch.device("meta"):
        keys = list(UNet(config).state_dict())
    assert len(keys) == 1680
    ldm = [diffusers_to_ldm_unet_key(k, config) for k in keys]
    assert ldm == [unet_to_original_key(k) for k in keys]
    assert "output_blocks.2.2.conv.weight" in ldm and "output_blocks.5.2.conv.weight" in ldm  # K = 2 (attention)
    assert [ldm_to_diffusers_unet_key("model.diffusion_model." + k, config) for k in ldm] == keys
    sd15 = UNetConfig.sd15()  # SD 1.5's up_blocks.0 has no attention: its upsampler is output_blocks.2.1
    assert diffusers_to_ldm_unet_key("up_blocks.0.upsamplers.0.conv.weight", sd15) == "output_blocks.2.1.conv.weight"
    assert diffusers_to_ldm_unet_key("up_blocks.1.attentions.2.proj_in", config) == "output_blocks.5.1.proj_in"


class _Shapes:
    """A Tensors stand-in that only knows shapes (full-size SDXL without its 10 GB)."""

    def __init__(self, state):
        self.shapes = {k: list(v.shape) for k, v in state.items()}
        self.where = dict.fromkeys(self.shapes)

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
BIG_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


def full_size_original():
    """sd_xl_base_1.0.safetensors' keys and shapes, as meta tensors (no memory): the four components at SDXL size,
    converted by the independent tables above."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        parts = (
            UNet(UNetConfig.sdxl()),
            AutoencoderKL(VAEConfig.sdxl()),
            CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G)),
        )
        return to_original_state(*(m.state_dict() for m in parts))


def test_config_inference_recovers_full_size_sdxl():
    """The single file has no configs: every size is read off the shapes of the real layout (1680 UNet tensors)."""
    from minidiff.weights.layouts import CLIP_G_PREFIX, CLIP_L_PREFIX, infer_clip_config, convert_keys
    from minidiff.unet import UNetConfig
    from minidiff.vae import VAEConfig

    tensors = _Shapes(full_size_original())
    assert detect_layout(tensors.keys()) == "sdxl-single-file"
    unet = View(tensors, "model.diffusion_model.")
    assert len(unet.keys()) == 1680
    assert infer_unet_config(unet, pooled_dim=1280) == UNetConfig.sdxl()
    assert infer_vae_config(View(tensors, "first_stage_model.")) == VAEConfig.sdxl()
    for prefix, layout, act, want in (
        (CLIP_L_PREFIX, "diffusers", "quick_gelu", CLIP_L),
        (CLIP_G_PREFIX, "open-clip", "gelu", BIG_G),
    ):
        view = View(tensors, prefix)
        plan, unknown = convert_keys(view.keys(), layout)
        got = infer_clip_config(plan, view, act).to_dict()
        assert not unknown and {k: got[k] for k in want} == want


def write_zero_safetensors(state, path, dtype="F16"):
    """A safetensors file of zeros with `state`'s keys and shapes, written tensor by tensor (no memory)."""
    header, offset = {}, 0
    for k, v in state.items():
        kind = "I64" if v.dtype == torch.int64 else dtype
        n = v.numel() * (8 if kind == "I64" else 2)
        header[k] = {"dtype": kind, "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k, v in header.items():
            size = v["data_offsets"][1] - v["data_offsets"][0]
            for start in range(0, size, 1 << 26):
                f.write(bytes(min(1 << 26, size - start)))


LOAD_AND_MEASURE = """
import json, sys, time, torch
from minidiff.weights.pretrained import load_pipeline
from minidiff.unet import UNetConfig
def status(key):  # resident memory in bytes: VmRSS now, VmHWM its peak (anonymous + file-backed pages)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
base, t0 = status("VmRSS"), time.time()
pipe = load_pipeline(sys.argv[1], dtype=torch.float16, tokenizers=sys.argv[2])
seconds = time.time() - t0
modules = (pipe.unet, pipe.vae, pipe.text)
touched = sum(float(p.float().sum()) for m in modules for p in m.parameters())  # every weight page read
size = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
print(json.dumps(dict(base=base, peak=status("VmHWM"), params=size, seconds=seconds, touched=touched,
                      sdxl=pipe.unet.config == UNetConfig.sdxl(), vae=str(next(pipe.vae.parameters()).dtype))))
"""


@pytest.mark.fullsize
def test_full_size_single_file_loads_holding_one_copy(tmp_path):
    """A zero-filled fp16 file in sd_xl_base_1.0's exact layout (6.9 GB): load_pipeline infers SDXL's configs and the
    process's peak resident memory stays at one copy of the weights (built on meta, filled tensor by tensor; tensors
    stored in the target dtype stay memory-mapped)."""
    import subprocess
    import sys

    from test_text import make_tokenizer_dir

    path = tmp_path / "sd_xl_base_1.0.safetensors"
    try:
        write_zero_safetensors(full_size_original(), path)
        for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
            make_tokenizer_dir(tmp_path / "tok" / name, pad)
        r = subprocess.run(
            [sys.executable, "-c", LOAD_AND_MEASURE, str(path), str(tmp_path / "tok")],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert r.returncode == 0, r.stderr[-3000:]
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(
            f"full-size load: {m['params'] / 1e9:.2f} GB of weights, peak +{(m['peak'] - m['base']) / 1e9:.2f} GB, "
            f"{m['seconds']:.0f} s"
        )
        assert m["sdxl"] and m["vae"] == "torch.float32"  # the VAE upcast (force_upcast)
        assert m["peak"] - m["base"] < 1.1 * m["params"] + 0.3e9
    finally:
        path.unlink(missing_ok=True)


def test_bad_input_gives_one_line_checkpoint_errors(saved, tmp_path):
    ref, folder = saved
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_unet(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no such model folder or file"):
        load_pipeline(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no unet/ folder"):
        load_unet(tmp_path / "empty")
    data = (folder / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_unet(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_unet(tmp_path / "junk.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_unet(tmp_path / "model.ckpt")
    (tmp_path / "pickled/unet").mkdir(parents=True)
    (tmp_path / "pickled/unet/config.json").write_text("{}")
    (tmp_path / "pickled/unet/diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin is a pickle"):
        load_unet(tmp_path / "pickled")
    with pytest.raises(CheckpointError, match="no tokenizer/ and tokenizer_2/"):
        load_text(folder, tokenizers=tmp_path / "empty")
    with pytest.raises(CheckpointError, match="holds AutoencoderKL weights, not UNet2DConditionModel ones"):
        load_unet(folder / "vae")
    with pytest.raises(CheckpointError, match="expected unet weights, found diffusers-vae keys"):
        load_unet(folder / "vae/diffusion_pytorch_model.safetensors")


def test_wrong_architecture_says_so(saved, tmp_path):
    """(SD 1.x / 2.x single files load: tests/test_sd.py.)"""
    ref, folder = saved
    # SD 1.5-shaped diffusers weights under an SDXL config: the first missing and unexpected keys are listed
    (tmp_path / "wrong/unet").mkdir(parents=True)
    (tmp_path / "wrong/unet/config.json").write_text((folder / "unet/config.json").read_text())
    sd = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    sd = {k.replace("add_embedding", "class_embedding"): v for k, v in sd.items()}
    save_file(sd, tmp_path / "wrong/unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"4 missing, 4 unexpected; first missing \['add_embedding.linear_1"):
        load_unet(tmp_path / "wrong")
    sd = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    sd["conv_in.weight"] = torch.zeros(64, 9, 3, 3)  # an inpainting UNet under a text-to-image config
    save_file(sd, tmp_path / "wrong/unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"conv_in.weight has shape \[64, 9, 3, 3\] but the model's"):
        load_unet(tmp_path / "wrong")


def test_detect_layout():
    assert detect_layout(["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]) == "diffusers-unet"
    assert detect_layout(["input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight"]) == "ldm-unet"
    assert detect_layout(["encoder.down_blocks.0.resnets.0.conv1.weight"]) == "diffusers-vae"
    assert detect_layout(["encoder.down.0.block.0.conv1.weight", "decoder.up.3.block.0.conv1.weight"]) == "ldm-vae"
    assert detect_layout(["text_model.encoder.layers.0.self_attn.q_proj.weight"]) == "diffusers-clip"
    assert detect_layout(["model.diffusion_model.out.2.weight", "cond_stage_model.x"]) == "sd-single-file"
    assert detect_layout(["something.else"]) == "unknown"


def test_save_pipeline_writes_a_folder_diffusers_reads(saved, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ref, folder = saved
    ours = load_pipeline(folder)
    save_pipeline(ours, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.tmp"))
    again = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")  # an independent reader of our folder
    assert_same_unet(ours.unet, again.unet, atol=0)
    assert_same_vae(ours.vae, again.vae, atol=0)
    assert again.tokenizer_2.pad_token == "!" and again.tokenizer.pad_token == "<|endoftext|>"
    with torch.no_grad():
        ctx, _, pooled, _ = again.encode_prompt(["a dog"], device="cpu")
        got_ctx, got_pooled = load_pipeline(tmp_path / "out").text.encode(["a dog"])
    torch.testing.assert_close(got_ctx, ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)


def test_file_hash(tmp_path):
    (tmp_path / "f").write_bytes(b"minidiff" * 300_000)
    assert file_hash(tmp_path / "f") == hashlib.sha256(b"minidiff" * 300_000).hexdigest()
