"""The bundled miniature SDXL (minidiff/bundled/tiny.py, minidiff/assets/tiny-sdxl): captions, tokenizer, shipped weights,
and the default finetune.py / sample.py path that runs on them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minidiff import data
from minidiff.bundled import tiny, world
from minidiff.bundled.tokenizer import build_tokenizer
from minidiff.weights.pretrained import load_pipeline, load_tokenizer
from minidiff.pipeline import generate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = tiny.TINY_DIR


# ------------------------------------------------------------------------------------------------------ captions
def test_caption_written_out_by_hand():
    look = {"hair": "blonde", "skin": "pale", "shirt": "red", "trousers": "grey"}
    assert world.caption("female_person", look, "walk3") == (
        "a picture of a girl with blonde hair and pale skin in a red shirt and grey trousers walking seen from the side"
    )
    assert (
        world.caption("robot", {"metal": "gold"}, "jump") == "a picture of a robot in gold metal jumping seen from "
        "the front"
    )
    assert (
        world.caption("zombie", {}, "climb1", (False, True, True, True))
        == "a picture of a zombie climbing seen from the back"
    )
    assert world.original_look("female_person") == {
        "hair": "black",
        "skin": "brown",
        "shirt": "green",
        "trousers": "purple",
    }


def test_world_excludes_both_held_out_characters_and_the_targets_look():
    assert data.TARGET_CHARACTER not in world.WORLD_BODIES and world.SECOND_CHARACTER not in world.WORLD_BODIES
    assert world.CLASS_WORD[data.TARGET_CHARACTER] == tiny.CLASS_WORD == "girl"
    assert world.CLASS_WORD[world.SECOND_CHARACTER] == "man" == world.CLASS_WORD["male_person"]  # class populated
    girls = world.looks("female_person")
    assert len(girls) == 468 and all(g["shirt"] != "blue" for g in girls)
    assert not any(g["skin"] == "pale" and g["hair"] in ("brown", "red") for g in girls)
    assert tiny.IDENTIFIER not in world.vocabulary()


def test_recoloured_original_look_reproduces_the_drawing():
    """Rendering a body in its own colours gives the drawing back (up to the nearest named colour)."""
    scene = world.World(32, bodies=("zombie",))
    x = scene.render("zombie", "idle", world.original_look("zombie"))
    ref = data.load_tensor_set([data.kenney_path("zombie", "idle")], 32)[0]
    assert (x - ref).abs().mean() < 0.02


# ------------------------------------------------------------------------------------------------------ tokenizer
def _check_tokenizer(tok, captions):
    for c in captions:
        ids = tok(c).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(c.split()) + 2, (c, tok.convert_ids_to_tokens(ids))  # every word one token
        assert tok.unk_token_id not in ids[1:-1]
        assert tok.decode(ids, skip_special_tokens=True) == c


def test_built_tokenizer_makes_every_word_one_token(tmp_path):
    tok = build_tokenizer(tmp_path / "t", tiny.all_words())
    _check_tokenizer(tok, tiny.all_captions())
    # a word outside the captions still tokenizes, into several pieces (as CLIP's BPE does with rare words)
    ids = tok("zebra").input_ids
    assert len(ids) > 3 and tok.unk_token_id not in ids[1:-1] and tok.decode(ids, skip_special_tokens=True) == "zebra"


@pytest.mark.parametrize("sub, pad, pad_id", [("tokenizer", "<|endoftext|>", None), ("tokenizer_2", "!", 0)])
def test_shipped_tokenizers_round_trip_and_pad_as_sdxl(sub, pad, pad_id):
    tok = load_tokenizer(SHIPPED / sub)
    _check_tokenizer(tok, tiny.all_captions())
    assert tok.pad_token == pad and tok.pad_token_id == (tok.eos_token_id if pad_id is None else pad_id)
    ids = tok("a picture of sks girl", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[7:] == [tok.pad_token_id] * 70


# ------------------------------------------------------------------------------------------------------ shipped weights
@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(SHIPPED)


def test_shipped_model_is_a_small_pixel_space_sdxl(pipe):
    assert pipe.vae is None and pipe.unet.config.in_channels == 3 and pipe.unet.config.sample_size == tiny.SIZE
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MiB"
    info = json.loads((SHIPPED / "train.json").read_text())
    assert info["characters"] == list(tiny.PRETRAIN_CHARACTERS)
    assert {k: pipe.scheduler_config[k] for k in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")} == {
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    }
    assert pipe.schedule.alpha_bar[-1] == 0  # zero terminal SNR


def test_shipped_weights_same_seed_same_images(pipe):
    kw = dict(steps=4, cfg=3.0, width=tiny.SIZE, height=tiny.SIZE, progress=False)
    prompts = ["a picture of a robot jumping", "a picture of a girl"]
    a = generate(pipe, prompts, seed=3, **kw)
    assert a.shape == (2, 3, tiny.SIZE, tiny.SIZE) and a.abs().max() <= 1
    assert torch.equal(a, generate(pipe, prompts, seed=3, **kw))
    # one image per batch: the same noise; only float rounding of batched matmuls differs
    torch.testing.assert_close(a, generate(pipe, prompts, seed=3, batch_size=1, **kw), atol=3e-3, rtol=0)
    assert (a - generate(pipe, prompts, seed=4, **kw)).abs().mean() > 0.02


def test_shipped_unet_matches_diffusers_on_the_same_files(pipe):
    """Independent reference: diffusers reads the same unet/ folder; both must predict the same eps."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(SHIPPED / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, tiny.SIZE, tiny.SIZE, generator=g), torch.tensor([10, 900])
    context, pooled = pipe.text.encode(["a picture of a robot jumping", "a picture of a girl"])
    ids = pipe.text.time_ids((32, 32), (0, 0), (32, 32), batch=2)
    with torch.no_grad():
        ours = pipe.unet(x, t, context=context, text_embeds=pooled, time_ids=ids)
        theirs = ref(
            x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ default path
def test_default_finetune_and_sample_run_on_the_miniature(tmp_path):
    out = tmp_path / "ft"
    cmd = [
        sys.executable,
        str(ROOT / "finetune.py"),
        "--steps",
        "3",
        "--num-class-images",
        "2",
        "--class-steps",
        "2",
        "--validation-images",
        "1",
        "--validation-steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("lora.safetensors", "loss.png", "manifest.json", "samples/final.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["model"]["path"]).resolve() == SHIPPED.resolve()
    # the six drawings are captioned with their action (climb0, fall, idle, jump, walk0, walk3; sorted by file name)
    assert manifest["data"]["captions"] == [
        "a picture of sks girl climbing",
        "a picture of sks girl falling",
        "a picture of sks girl standing",
        "a picture of sks girl jumping",
        "a picture of sks girl walking",
        "a picture of sks girl walking",
    ]
    cmd = [
        sys.executable,
        str(ROOT / "sample.py"),
        "--lora",
        str(out / "lora.safetensors"),
        "--prompt",
        "a picture of sks girl climbing",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "s"),
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted((tmp_path / "s").glob("*.png"))
    assert pngs and float(Image.open(pngs[0]).text["cfg"]) == tiny.GUIDANCE == 2.0  # the miniature's own guidance


def test_bundled_captions_and_guidance_by_hand(tmp_path):
    paths = [data.kenney_path("female_adventurer", p) for p in ("climb1", "idle", "walk6")]
    assert tiny.instance_captions("a picture of zwx girl", paths) == [
        "a picture of zwx girl climbing",
        "a picture of zwx girl standing",
        "a picture of zwx girl walking",
    ]
    assert tiny.default_cfg(None) == tiny.default_cfg(SHIPPED) == 2.0
    assert tiny.default_cfg(tmp_path) == 5.0  # any other model: SDXL's usual guidance
