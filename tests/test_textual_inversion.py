"""Textual inversion against diffusers' load_textual_inversion on identical weights: A1111 (emb_params), diffusers
(one token key) and A1111/ComfyUI SDXL (clip_l + clip_g) files, single- and multi-vector; the embedding lookup
e(id) = E[id] | V[id - first] by hand; wrong files in one line."""

import pytest
import torch
from safetensors.torch import save_file
from test_sd import diffusers_sd, tiny_sd_parts
from test_text import diffusers_sdxl, tiny_text_parts
from transformers import CLIPTextModel, CLIPTokenizerFast

from minidiff.errors import MinidiffError
from minidiff.text import TextConditioner
from minidiff.text_sd import SDTextConditioner
from minidiff.textual_inversion import NewTokenEmbedding, add_token, expand_prompt
from minidiff.weights.embedding_files import load_embedding, read_embedding, write_embedding

PROMPTS = ["a mytok cat", "robot mytok, a dog"]


def vectors(n, width, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout,n", [("a1111", 1), ("a1111", 3), ("diffusers", 2)])
@torch.no_grad()
def test_sd_embedding_matches_diffusers(tmp_path, layout, n):
    tok, te, unet, vae = tiny_sd_parts(tmp_path / "ours")
    ref = diffusers_sd(*tiny_sd_parts(tmp_path / "ref"))  # same seed: identical weights, separate objects
    v = vectors(n, 64)
    path = tmp_path / "mytok.safetensors"
    save_file({"emb_params": v} if layout == "a1111" else {"mytok": v}, path)
    ref.load_textual_inversion(str(path), token="mytok")
    text = SDTextConditioner(tok, te)
    assert load_embedding(text, path) == "mytok"  # the stem (A1111) or the key (diffusers)
    if n > 1:
        assert (
            expand_prompt("a mytok cat", tok)
            == "a " + " ".join(["mytok"] + [f"mytok_{i}" for i in range(1, n)]) + " cat"
        )
    want = ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    torch.testing.assert_close(text.encode(PROMPTS)[0], want, rtol=0, atol=1e-6)
    assert not torch.allclose(want, ref.encode_prompt(["a xx cat", "robot xx, a dog"], "cpu", 1, False)[0])


@torch.no_grad()
def test_sdxl_clip_l_clip_g_pair_matches_diffusers(tmp_path):
    ours, theirs = tiny_text_parts(tmp_path / "ours"), tiny_text_parts(tmp_path / "ref")
    ref = diffusers_sdxl(theirs)
    pair = {"clip_l": vectors(2, 64, 1), "clip_g": vectors(2, 128, 2)}
    write_embedding(tmp_path / "mytok.safetensors", pair, "mytok")  # our writer, read by diffusers below
    ref.load_textual_inversion(pair["clip_l"], token="mytok", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(
        pair["clip_g"], token="mytok", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2
    )
    text = TextConditioner(*ours)
    load_embedding(text, tmp_path / "mytok.safetensors")
    ctx, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu")
    got_ctx, got_pooled = text.encode(PROMPTS)
    torch.testing.assert_close(got_ctx, ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    read, token = read_embedding(tmp_path / "mytok.safetensors")
    assert token == "mytok" and set(read) == {"clip_l", "clip_g"} and read["clip_g"].shape == (2, 128)


def test_lookup_by_hand():
    base = torch.nn.Embedding(10, 4)
    table = NewTokenEmbedding(base, first=12)  # a tokenizer longer than the table: ids 10, 11 are never used
    table.append(torch.ones(2, 4))
    ids = torch.tensor([[1, 12, 13, 0]])
    out = table(ids)
    torch.testing.assert_close(out[0, 0], base.weight[1]), torch.testing.assert_close(out[0, 3], base.weight[0])
    torch.testing.assert_close(out[0, 1:3], torch.ones(2, 4))


def test_wrong_files_are_one_line(tmp_path):
    tok, te, _, _ = tiny_sd_parts(tmp_path / "p")
    text = SDTextConditioner(tok, te)
    save_file({"clip_l": vectors(1, 64), "clip_g": vectors(1, 128)}, tmp_path / "xl.safetensors")
    with pytest.raises(MinidiffError, match="an SDXL .clip_l \\+ clip_g. embedding, but the model has one text"):
        load_embedding(text, tmp_path / "xl.safetensors")
    save_file({"emb_params": vectors(1, 32)}, tmp_path / "narrow.safetensors")
    with pytest.raises(MinidiffError, match="width 32, but this text encoder's tokens are 64 wide"):
        load_embedding(text, tmp_path / "narrow.safetensors")
    (tmp_path / "old.pt").write_bytes(b"x")
    with pytest.raises(MinidiffError, match="pickle"):
        load_embedding(text, tmp_path / "old.pt")
    add_token(tok, te, "mine", vectors(1, 64))
    with pytest.raises(MinidiffError, match="'mine' is already in the tokenizer"):
        add_token(tok, te, "mine", vectors(1, 64))


def test_finetune_ti_learns_only_the_token_and_sample_uses_it(tmp_path):
    """--train ti on the tiny pixel-space SDXL: only V trains (audit), the file is A1111's SDXL layout, and
    sample.py --embedding puts it back; --train lora --train-ti (pivotal tuning) writes both files."""
    import json

    import numpy as np
    from PIL import Image
    from safetensors import safe_open
    from conftest import tiny_pipeline

    import finetune
    import sample
    from minidiff.weights.pretrained import save_pipeline

    model = save_pipeline(tiny_pipeline(tmp_path / "parts"), tmp_path / "tiny")
    fast = [
        "--model",
        model,
        "--no-prior",
        "--steps",
        "3",
        "--validation-images",
        "0",
        "--device",
        "cpu",
        "--instance-prompt",
        "a sks cat",
        "--class-prompt",
        "a cat",
        "--save-precision",
        "fp16",
    ]
    assert finetune.main([*fast, "--train", "ti", "--out", tmp_path / "ti", "--ti-vectors", "2"]) == 0
    manifest = json.loads((tmp_path / "ti/manifest.json").read_text())
    assert [r["group"] for r in manifest["trainable"]] == ["text_encoder", "text_encoder_2", "total"]
    assert manifest["trainable"][-1]["params"] == 2 * (64 + 128)
    with safe_open(tmp_path / "ti/sks.safetensors", "pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"} and f.metadata()["minidiff.token"] == "sks"
        start = f.get_tensor("clip_l")
        assert start.dtype == torch.float16 and start.shape == (2, 64)
    tok = CLIPTokenizerFast.from_pretrained(model / "tokenizer")
    cat = (
        CLIPTextModel.from_pretrained(model / "text_encoder")
        .get_input_embeddings()
        .weight[tok("cat", add_special_tokens=False).input_ids]
        .mean(0)
    )
    assert not torch.allclose(start.float(), cat.expand(2, -1), atol=1e-3)  # moved away from its start, 'cat'
    common = [
        "--model",
        str(model),
        "--prompt",
        "a sks cat",
        "--steps",
        "2",
        "--width",
        "16",
        "--height",
        "16",
        "--device",
        "cpu",
    ]
    assert sample.main([*common, "--out", str(tmp_path / "plain")]) == 0
    embedding = str(tmp_path / "ti/sks.safetensors")
    assert sample.main([*common, "--embedding", embedding, "--out", str(tmp_path / "e")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / x / "grid.png")) for x in ("plain", "e"))
    assert not (a == b).all()
    assert finetune.main([*fast, "--train", "lora", "--train-ti", "--out", tmp_path / "pti"]) == 0
    assert (tmp_path / "pti/lora.safetensors").is_file() and (tmp_path / "pti/sks.safetensors").is_file()
