"""minidiff/lora/files.py: LoRA files in the kohya, diffusers and peft layouts, both ways, against diffusers' and
peft's own loaders and savers on identical weights (text encoders and UNet), and one-line errors for bad files.
"""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidiff.errors import LoRAError
from minidiff.lora import inject_lora, load_lora, lora_layers, lora_state_dict, read_lora, save_lora
from test_lora import PEFT_TARGETS, randomize_lora, run_diffusers, run_ours, tiny_unets


# ------------------------------------------------------------------------------------ text encoders against peft
def tiny_clip(with_projection=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=99,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def clip_out(te, ids):
    out = te(ids)
    return out.text_embeds if hasattr(out, "text_embeds") else out.last_hidden_state


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_text_encoder_lora_we_save_loads_in_diffusers(tmp_path, fmt):
    from diffusers import StableDiffusionXLPipeline

    ours = {"text_encoder": tiny_clip(), "text_encoder_2": tiny_clip(True)}
    ref = {c: tiny_clip(c.endswith("2")) for c in ours}  # the same seed: identical weights
    assert "encoder.layers.0.self_attn.q_proj" in inject_lora(ours["text_encoder"], "text", rank=4, alpha=2)
    assert len(inject_lora(ours["text_encoder_2"], "text-mlp", rank=2)) == 12
    randomize_lora(ours)
    path = save_lora(ours, tmp_path / "te.safetensors", format=fmt)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path))
    ids = torch.randint(3, 99, (2, 10))
    for c, te in ref.items():
        StableDiffusionXLPipeline.load_lora_into_text_encoder(state_dict, alphas, text_encoder=te, prefix=c)
        with torch.no_grad():
            want, got = clip_out(te, ids), clip_out(ours[c], ids)
        assert (want - clip_out(tiny_clip(c.endswith("2")), ids)).abs().max() > 1e-2  # the LoRA does something
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    keys = list(load_file(path))
    assert any(
        k.startswith(
            {
                "kohya": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.",
                "diffusers": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.",
                "peft": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A",
            }[fmt]
        )
        for k in keys
    )


@pytest.mark.parametrize("alpha, with_metadata, to_diffusers", [(4, False, True), (8, True, False), (8, True, True)])
def test_text_encoder_lora_made_by_peft_loads_here(tmp_path, alpha, with_metadata, to_diffusers):
    """peft's LoraConfig on a transformers CLIP, saved by diffusers' save_lora_weights (as the diffusers script does:
    alpha = r without metadata; or alpha != r with the LoraConfig in the file's metadata)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    te = tiny_clip()
    te.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        )
    )
    with torch.no_grad():
        for n, p in te.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    sd = get_peft_model_state_dict(te)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        text_encoder_lora_layers=convert_state_dict_to_diffusers(sd) if to_diffusers else sd,
        text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict() if with_metadata else None,
    )
    ours = tiny_clip()
    load_lora({"text_encoder": ours}, tmp_path / "pytorch_lora_weights.safetensors", name="peft")
    ids = torch.randint(3, 99, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(clip_out(ours, ids), clip_out(te, ids), rtol=1e-5, atol=1e-5)
    assert {a.alpha for layer in lora_layers(ours).values() for a in layer.adapters.values()} == {float(alpha)}


# ------------------------------------------------------------------------------------------------- bad files
def test_bad_files_give_lora_errors(tmp_path):
    te = tiny_clip()
    inject_lora(te, "text", rank=2)
    good = lora_state_dict({"text_encoder": te}, "kohya")
    with pytest.raises(LoRAError, match="not found"):
        load_lora(tiny_clip(), tmp_path / "missing.safetensors", prefix="text_encoder")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="not a readable safetensors"):
        load_lora(tiny_clip(), tmp_path / "junk.safetensors", prefix="text_encoder")
    save_file({"encoder.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, tmp_path / "model.safetensors")
    with pytest.raises(LoRAError, match="no LoRA tensors"):
        load_lora(tiny_clip(), tmp_path / "model.safetensors", prefix="text_encoder")
    # keys that match nothing: listed, never a silent no-op
    odd = dict(
        good,
        **{
            "lora_te1_text_model_encoder_layers_7_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
            "lora_te1_text_model_encoder_layers_7_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2),
        },
    )
    save_file(odd, tmp_path / "odd.safetensors")
    with pytest.raises(LoRAError, match=r"1 of 9 LoRA modules match nothing.*layers_7_self_attn_q_proj"):
        load_lora({"text_encoder": tiny_clip()}, tmp_path / "odd.safetensors")
    with pytest.raises(LoRAError, match="match nothing.*components given: \\['unet'\\]"):
        load_lora(tiny_clip(), tmp_path / "odd.safetensors")  # a text-encoder file given to the "unet"
    # wrong shapes (a LoRA for another architecture): the key and both shapes
    wide = dict(good)
    wide["lora_te1_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight"] = torch.zeros(2, 64)
    save_file(wide, tmp_path / "wide.safetensors")
    model = tiny_clip()
    with pytest.raises(LoRAError, match=r"layers_1_self_attn_v_proj.lora_down.weight: .*\[2, 64\].*needs \[2, 32\]"):
        load_lora({"text_encoder": model}, tmp_path / "wide.safetensors")
    assert not lora_layers(model)  # checked before anything was touched
    half = {k: v for k, v in good.items() if "layers_0_self_attn_k_proj.lora_up" not in k}
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(LoRAError, match="missing"):
        load_lora({"text_encoder": tiny_clip()}, tmp_path / "half.safetensors")
    save_file(
        dict(good, **{"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": torch.ones(1, 32)}),
        tmp_path / "dora.safetensors",
    )
    with pytest.raises(LoRAError, match="DoRA"):
        load_lora({"text_encoder": tiny_clip()}, tmp_path / "dora.safetensors")
    with pytest.raises(LoRAError, match="format"):
        lora_state_dict({"text_encoder": te}, "civitai")
    load_lora({"text_encoder": model}, {k: v for k, v in good.items()}, name="first")
    with pytest.raises(LoRAError, match="already exists"):
        load_lora({"text_encoder": model}, good, name="first")
    save_file(good, tmp_path / "lora.safetensors")  # unnamed loads of files with the same stem get lora, lora_2
    assert [load_lora({"text_encoder": model, "unet": None}, tmp_path / "lora.safetensors") for _ in range(2)] == [
        "lora",
        "lora_2",
    ]
    with pytest.raises(LoRAError, match="adapter name"):
        load_lora({"text_encoder": model}, good, name="a.b")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_unet_lora_we_save_loads_in_diffusers_pipeline(tmp_path, fmt):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    ours, ref = tiny_unets()
    base = run_ours(ours)
    inject_lora(ours, "attn-ff", rank=4, alpha=2)  # alpha != r: kohya stores it, the others fold it into B
    randomize_lora(ours)
    want = run_ours(ours)
    assert (want - base).abs().max() > 1e-2
    path = save_lora(ours, tmp_path / f"lora_{fmt}.safetensors", format=fmt, metadata={"ss_output_name": "hero"})
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=ref,
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(run_diffusers(ref), want, rtol=1e-5, atol=1e-5)
    meta = read_lora(path)[2]
    assert meta["minidiff.format"] == fmt and meta["ss_output_name"] == "hero"
    if fmt == "kohya":
        assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
        assert meta["ss_network_alpha"] == "2" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
        keys = load_file(path)
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_output_blocks_0_1_proj_out.alpha" in keys and "lora_unet_middle_block_1_proj_in.alpha" in keys
        assert not any("down_blocks" in k for k in keys)


@pytest.mark.parametrize("alpha, style", [(4, "diffusers"), (8, "peft-metadata"), (4, "kohya-diffusers-names")])
def test_unet_lora_made_by_peft_loads_here(tmp_path, alpha, style):
    """A LoRA trained the diffusers way: LoraConfig on diffusers' UNet, saved by save_lora_weights (as
    train_dreambooth_lora_sdxl.py does), or with peft keys + LoraConfig metadata, or converted to kohya names by
    diffusers' convert_state_dict_to_kohya (diffusers-flavoured kohya, https://github.com/huggingface/diffusers/blob/58eb52c0803e/src/diffusers/utils/state_dict_utils.py)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict

    ours, ref = tiny_unets()
    ref.add_adapter(
        LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=PEFT_TARGETS["attn"])
    )
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    want = run_diffusers(ref)
    sd = get_peft_model_state_dict(ref)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    if style == "diffusers":
        StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(sd))
    elif style == "peft-metadata":
        StableDiffusionXLPipeline.save_lora_weights(
            tmp_path,
            unet_lora_layers=sd,
            unet_lora_adapter_metadata=ref.peft_config["default_0"].to_dict()
            if "default_0" in ref.peft_config
            else ref.peft_config["default"].to_dict(),
        )
    else:
        save_file(convert_state_dict_to_kohya({f"unet.{k}": v for k, v in sd.items()}), file)
    assert load_lora(ours, file) == "pytorch_lora_weights"
    torch.testing.assert_close(run_ours(ours), want, rtol=1e-5, atol=1e-5)
    assert len(lora_layers(ours)) == 88


def test_kohya_and_diffusers_naming_round_trip_exactly(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ours, ref = tiny_unets()
    inject_lora(ours, "attn-ff-conv", rank=3, alpha=1.5)
    randomize_lora(ours)
    kohya = save_lora(ours, tmp_path / "k.safetensors", format="kohya")
    # diffusers' own kohya -> diffusers conversion gives exactly our diffusers names and tensors
    raw, alphas = StableDiffusionXLPipeline.lora_state_dict(str(kohya), unet_config=ref.config)
    assert set(alphas.values()) == {1.5}
    old_style = lambda k: re.sub(
        r"\.processor\.(to_[qkv]|to_out)_lora\.",
        lambda m: "." + m[1] + (".0" if m[1] == "to_out" else "") + ".lora.",
        k,
    )  # noqa: E731
    theirs = {old_style(k): v for k, v in raw.items()}  # diffusers writes attention LoRA in its old processor names
    alphas = {re.sub(r"(\.lora\.down\.weight)?\.alpha$", "", old_style(k)): v for k, v in alphas.items()}
    mine = lora_state_dict(ours, "diffusers")
    assert sorted(theirs) == sorted(mine)
    for k, v in mine.items():
        if ".lora.down." in k:
            assert torch.equal(theirs[k], v)
        else:  # ours folds alpha / r into up; diffusers keeps alpha aside
            alpha = alphas[k.removesuffix(".lora.up.weight")]
            torch.testing.assert_close(theirs[k] * alpha / 3, v, rtol=1e-6, atol=0)
    # and back: kohya -> load -> diffusers file -> load -> kohya state dict, exactly the first file's names
    a, _ = tiny_unets()
    load_lora(a, kohya, name="k")
    save_lora(a, tmp_path / "d.safetensors", format="diffusers")
    b, _ = tiny_unets()
    load_lora(b, tmp_path / "d.safetensors", name="d")
    first, again = load_file(kohya), lora_state_dict(b, "kohya")
    assert sorted(first) == sorted(again)
    for k in first:
        if k.endswith(".alpha"):
            assert first[k].item() == 1.5 and again[k].item() == 3.0  # alpha = r after the diffusers file
        elif k.endswith("lora_down.weight"):
            assert torch.equal(first[k], again[k])
        else:
            torch.testing.assert_close(again[k], first[k] * 0.5, rtol=1e-6, atol=0)
    torch.testing.assert_close(run_ours(b), run_ours(ours), rtol=1e-5, atol=1e-5)
    # diffusers' old attention-processor names (attn1.processor.to_q_lora.down.weight, alpha = r) load too
    c, _ = tiny_unets()
    load_lora(c, {k: v * 0.5 if ".up." in k else v for k, v in raw.items()}, name="old")
    torch.testing.assert_close(run_ours(c), run_ours(ours), rtol=1e-5, atol=1e-5)
    # ComfyUI's generic names: diffusion_model.<ldm path with dots>.lora_A/B.weight (ldm paths from weights/layouts.py)
    from minidiff.weights.layouts import diffusers_to_ldm_unet_key

    generic = {}
    for path, layer in lora_layers(ours).items():
        ldm = diffusers_to_ldm_unet_key(path + ".weight", ours.config).removesuffix(".weight")
        generic[f"diffusion_model.{ldm}.lora_A.weight"] = layer.lora_A["default"].detach()
        generic[f"diffusion_model.{ldm}.lora_B.weight"] = layer.lora_B["default"].detach() * 0.5
    d, _ = tiny_unets()
    load_lora(d, generic)
    torch.testing.assert_close(run_ours(d), run_ours(ours), rtol=1e-5, atol=1e-5)
