"""The bundled miniature SDXL (minidiff/bundled/tiny.py, minidiff/assets/tiny-sdxl): captions, tokenizer, shipped weights,
and the default finetune.py / sample.py path that runs on them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidiff import data
from minidiff.bundled import tiny
from minidiff.weights.pretrained import load_pipeline, load_tokenizer
from minidiff.pipeline import generate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = tiny.TINY_DIR


# ------------------------------------------------------------------------------------------------------ captions
def test_caption_written_out_by_hand():
    robot = "a picture of a robot with one eye in blue metal jumping seen from the front"
    assert tiny.caption("robot", "jump") == robot
    assert tiny.caption("female_person", "climb1", looks=False) == "a picture of a girl climbing seen from the back"
    assert tiny.caption("zombie", "walk5", looks=False, action=False, view=False) == "a picture of a zombie"


def test_pretraining_excludes_the_target_and_never_says_sks():
    assert data.TARGET_CHARACTER not in tiny.PRETRAIN_CHARACTERS and len(tiny.PRETRAIN_CHARACTERS) == 5
    assert tiny.KIND["female_person"] == tiny.CLASS_WORD == "girl"
    _, rows = tiny.pretraining_set()
    assert len(rows) == 65 and {c for c, _ in rows} == set(tiny.PRETRAIN_CHARACTERS)
    pretraining = tiny.pretraining_captions()
    assert all(tiny.IDENTIFIER not in c.split() for c in pretraining)
    assert "a picture of a girl" in pretraining  # the class prompt is in distribution


# ------------------------------------------------------------------------------------------------------ tokenizer
def _check_tokenizer(tok, captions):
    for c in captions:
        ids = tok(c).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(c.split()) + 2, (c, tok.convert_ids_to_tokens(ids))  # every word one token
        assert tok.unk_token_id not in ids[1:-1]
        assert tok.decode(ids, skip_special_tokens=True) == c


def test_built_tokenizer_makes_every_word_one_token(tmp_path):
    tok = tiny.build_tokenizer(tmp_path / "t")
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
        theirs = ref(x, t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ default path
def test_default_finetune_and_sample_run_on_the_miniature(tmp_path):
    out = tmp_path / "ft"
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--steps", "3", "--num-class-images", "2", "--class-steps", "2",
           "--validation-images", "1", "--validation-steps", "2", "--out", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("lora.safetensors", "loss.png", "manifest.json", "samples/final.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["model"]["path"]).resolve() == SHIPPED.resolve()
    cmd = [sys.executable, str(ROOT / "sample.py"), "--lora", str(out / "lora.safetensors"), "--prompt",
           "a picture of sks girl climbing", "--steps", "2", "--out", str(tmp_path / "s"), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((tmp_path / "s").glob("*.png"))

