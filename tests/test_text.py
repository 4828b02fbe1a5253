"""text.py against diffusers' StableDiffusionXLPipeline.encode_prompt on the same tiny random CLIPs.

Also home of the tiny-CLIP builders the other test files of the loading stack import (test_pretrained,
test_pipeline, test_sample): a byte-level BPE tokenizer written as hub-style files (vocab.json, merges.txt,
special_tokens_map.json, tokenizer_config.json) and two tiny CLIP text configs.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast

from minidiff.errors import MinidiffError
from minidiff.text import TextConditioner, time_ids

MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r o", "ro b", "rob o", "robo t</w>"]


def _byte_chars():
    """GPT-2/CLIP byte -> printable unicode table (the first 256 entries of every CLIP vocab)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(extra))]


def make_tokenizer_dir(path, pad_token):
    """A tiny CLIP BPE tokenizer laid out like the hub's tokenizer/ folder. Vocab = 256 bytes, 256 bytes + '</w>',
    the merges, then <|startoftext|>, <|endoftext|> as the two largest ids (as in CLIP's 49406, 49407)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (path / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad_token}))
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


VOCAB = 2 * 256 + len(MERGES) + 2
BOS, EOS = VOCAB - 2, VOCAB - 1


def clip_configs(c1=64, c2=128, proj=96):
    """Tiny CLIP-L-like (quick_gelu) and bigG-like (gelu, projection) configs. Head width 64 as in SDXL."""
    common = dict(
        vocab_size=VOCAB,
        max_position_embeddings=77,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )
    cfg_l = CLIPTextConfig(
        hidden_size=c1,
        intermediate_size=2 * c1,
        num_hidden_layers=3,
        num_attention_heads=c1 // 64,
        hidden_act="quick_gelu",
        projection_dim=c1,
        **common,
    )
    cfg_g = CLIPTextConfig(
        hidden_size=c2,
        intermediate_size=2 * c2,
        num_hidden_layers=3,
        num_attention_heads=c2 // 64,
        hidden_act="gelu",
        projection_dim=proj,
        **common,
    )
    return cfg_l, cfg_g


def tiny_text_parts(tmp_path, seed=0):
    """(tokenizer, text_encoder, tokenizer_2, text_encoder_2): random tiny CLIPs + the two tokenizers."""
    torch.manual_seed(seed)
    cfg_l, cfg_g = clip_configs()
    tok = CLIPTokenizerFast.from_pretrained(make_tokenizer_dir(Path(tmp_path) / "tokenizer", "<|endoftext|>"))
    tok_2 = CLIPTokenizerFast.from_pretrained(make_tokenizer_dir(Path(tmp_path) / "tokenizer_2", "!"))
    return tok, CLIPTextModel(cfg_l).eval(), tok_2, CLIPTextModelWithProjection(cfg_g).eval()


def diffusers_sdxl(text_parts, unet=None, vae=None, scheduler=None):
    """A diffusers StableDiffusionXLPipeline around given parts (oracle only)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, te, tok_2, te_2 = text_parts
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


PROMPTS = ["a cat", "robot, a dog and a cat!"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_text_parts(tmp_path_factory.mktemp("text"))


def test_tokens_pad_with_the_tokenizer_files_own_pad_token(parts):
    tok, te, tok_2, te_2 = parts
    text = TextConditioner(*parts)
    ids_l, ids_g = text.tokenize(tok, te, ["a cat"]), text.tokenize(tok_2, te_2, ["a cat"])
    assert ids_l.shape == ids_g.shape == (1, 77)
    cat_w = tok.convert_tokens_to_ids("cat</w>")
    assert ids_l[0, :4].tolist() == ids_g[0, :4].tolist() == [BOS, 256 + _byte_chars().index("a"), cat_w, EOS]
    assert (ids_l[0, 4:] == EOS).all()  # CLIP-L pads with <|endoftext|>
    assert (ids_g[0, 4:] == 0).all()  # bigG pads with "!" = id 0
    full = text.tokenize(tok, te, ["a " * 75])  # 75 tokens + BOS + EOS: all of it is read
    assert full.shape == (1, 77) and full[0, -1] == EOS
    with pytest.raises(MinidiffError, match="prompt too long"):  # never silently cut (issue 18)
        text.tokenize(tok, te, ["a " * 76])


@torch.no_grad()
def test_encode_matches_diffusers_encode_prompt(parts):
    text = TextConditioner(*parts)
    ref = diffusers_sdxl(parts)
    for negative in (None, ["robot", ""]):
        d_ctx, d_neg_ctx, d_pooled, d_neg_pooled = ref.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative
        )
        ctx, pooled = text.encode(PROMPTS, negative=negative if negative is not None else "")
        assert ctx.shape == (4, 77, 64 + 128) and pooled.shape == (4, 96)
        torch.testing.assert_close(ctx[2:], d_ctx, rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled[2:], d_pooled, rtol=0, atol=1e-6)
        if negative is None:  # no negative prompt -> zeros (force_zeros_for_empty_prompt)
            assert d_neg_ctx.abs().sum() == 0 and d_neg_pooled.abs().sum() == 0
            torch.testing.assert_close(ctx[:2], d_neg_ctx, rtol=0, atol=0)
            torch.testing.assert_close(pooled[:2], d_neg_pooled, rtol=0, atol=0)
        else:  # a given negative prompt is encoded like a prompt; diffusers encodes "" where we zero it
            torch.testing.assert_close(ctx[0], d_neg_ctx[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(pooled[0], d_neg_pooled[0], rtol=0, atol=1e-6)
            assert ctx[1].abs().sum() == 0 and pooled[1].abs().sum() == 0
    plain_ctx, plain_pooled = text.encode(PROMPTS)  # negative=None: just the prompts
    torch.testing.assert_close(plain_ctx, ctx[2:]), torch.testing.assert_close(plain_pooled, pooled[2:])


@torch.no_grad()
def test_context_is_penultimate_states_in_clip_l_then_bigg_order(parts):
    """Hand-built from the encoders: [h_L^(-2) || h_G^(-2)], pooled = W_proj LN_final(h_G^(-1))[eos]."""
    tok, te, tok_2, te_2 = parts
    ctx, pooled = TextConditioner(*parts).encode(["a dog"])
    ids = tok(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = tok_2(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    h_l = te(ids, output_hidden_states=True).hidden_states
    h_g = te_2(ids_2, output_hidden_states=True).hidden_states
    assert len(h_l) == 4  # embeddings + 3 layers: index -2 is the output of layer 2 of 3
    torch.testing.assert_close(ctx, torch.cat([h_l[-2], h_g[-2]], -1))
    assert not torch.allclose(ctx[..., :64], te.final_layer_norm(h_l[-2]))  # no final LayerNorm
    eos = ids_2[0].tolist().index(EOS)
    last = te_2.text_model.final_layer_norm(h_g[-1])
    torch.testing.assert_close(pooled, last[:, eos] @ te_2.text_projection.weight.T)


def test_time_ids_match_diffusers(parts):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=192,
        attention_head_dim=2,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=96 + 6 * 8,
        use_linear_projection=True,
    )
    ref = diffusers_sdxl(parts, unet=unet)
    want = ref._get_add_time_ids((768, 1024), (16, 32), (512, 640), torch.float32, text_encoder_projection_dim=96)
    got = time_ids((768, 1024), (16, 32), (512, 640), batch=3)
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, want.repeat(3, 1))
    torch.testing.assert_close(TextConditioner.time_ids((64, 48), batch=1), torch.tensor([[64.0, 48, 0, 0, 64, 48]]))


# ---- prompts as artists write them: emphasis, 75-token chunks, prompt_2 -------------------------------------------
from minidiff.text import parse_emphasis  # noqa: E402


@pytest.mark.parametrize(
    "prompt, want",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("[less] more", [("less", 1 / 1.1), (" more", 1.0)]),
        ("(sks girl:1.3), smiling", [("sks girl", 1.3), (", smiling", 1.0)]),
        ("((x:1.3))", [("x", 1.3 * 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # A1111's own docstring example
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
        ("", [("", 1.0)]),
        ("time: 3:30", [("time: 3:30", 1.0)]),
    ],
)
def test_parse_emphasis_follows_a1111(prompt, want):
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


def chunk_ids(tok, body_ids, pad):
    """[BOS, ids, EOS, pad...] of length 77, built by hand."""
    return torch.tensor([[BOS, *body_ids, EOS] + [pad] * (75 - len(body_ids))])


@torch.no_grad()
def test_emphasis_scales_token_states_and_restores_the_mean(parts):
    """Hand-computed A1111 rule on each encoder: z' = z * w * mean(z) / mean(z * w), w = 1.5 on 'cat' only."""
    tok, te, tok_2, te_2 = parts
    text = TextConditioner(*parts)
    a, cat = 256 + _byte_chars().index("a"), tok.convert_tokens_to_ids("cat</w>")
    w = torch.ones(77)
    w[2] = 1.5  # [BOS, a, cat, EOS, ...]
    want = []
    for enc, pad in ((te, EOS), (te_2, 0)):
        z = enc(chunk_ids(tok, [a, cat], pad), output_hidden_states=True).hidden_states[-2][0]
        want.append(z * w[:, None] * (z.mean() / (z * w[:, None]).mean()))
    ctx, pooled = text.encode(["a (cat:1.5)"], emphasis=True)
    torch.testing.assert_close(ctx[0], torch.cat(want, -1), rtol=0, atol=1e-6)
    plain_ctx, plain_pooled = text.encode(["a cat"])
    torch.testing.assert_close(pooled, plain_pooled, rtol=0, atol=1e-6)  # pooled: the unweighted states' EOS
    assert not torch.allclose(ctx, plain_ctx)
    for p in PROMPTS:  # no brackets: emphasis=True is diffusers' encoding, bit for bit
        torch.testing.assert_close(text.encode([p], emphasis=True), text.encode([p]), rtol=0, atol=0)
    lit, _ = text.encode([r"\(cat\)"], emphasis=True)  # escaped: the literal brackets are tokens
    ids = tok(["(cat)"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(lit[0, :, :64], te(ids, output_hidden_states=True).hidden_states[-2][0])


@torch.no_grad()
def test_long_prompts_are_chunked_never_cut(parts, capsys):
    """100 tokens -> 2 chunks: [BOS t0..t74 EOS] and [BOS t75..t99 EOS pad...], each encoded alone and
    concatenated along the sequence; pooled from the first chunk; one notice line."""
    tok, te, tok_2, te_2 = parts
    text = TextConditioner(*parts)
    cat = tok.convert_tokens_to_ids("cat</w>")
    dog = tok.convert_tokens_to_ids("dog</w>")
    body = [cat] * 60 + [dog] * 40
    prompt = " ".join(["cat"] * 60 + ["dog"] * 40)
    ctx, pooled = text.encode([prompt, "a cat"], emphasis=True)
    assert ctx.shape == (2, 154, 64 + 128) and pooled.shape == (2, 96)
    for enc, pad, cols in ((te, EOS, slice(0, 64)), (te_2, 0, slice(64, None))):
        first = enc(chunk_ids(tok, body[:75], pad), output_hidden_states=True)
        second = enc(chunk_ids(tok, body[75:], pad), output_hidden_states=True)
        torch.testing.assert_close(ctx[0, :77, cols], first.hidden_states[-2][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(ctx[0, 77:, cols], second.hidden_states[-2][0], rtol=0, atol=1e-6)
        empty = enc(chunk_ids(tok, [], pad), output_hidden_states=True).hidden_states[-2][0]
        torch.testing.assert_close(ctx[1, 77:, cols], empty, rtol=0, atol=1e-6)  # the short prompt: + an empty chunk
    torch.testing.assert_close(pooled[0], te_2(chunk_ids(tok, body[:75], 0)).text_embeds[0], rtol=0, atol=1e-6)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "100 tokens > 75: encoded as 2 chunks" in err[0]
    ctx, _ = text.encode([prompt], negative="robot", emphasis=True)  # the negative is padded to the same length
    assert ctx.shape == (2, 154, 192) and capsys.readouterr().err == ""  # noticed once per prompt


@torch.no_grad()
def test_prompt_2_goes_to_the_second_encoder_as_in_diffusers(parts):
    text = TextConditioner(*parts)
    ref = diffusers_sdxl(parts)
    d_ctx, d_neg, d_pooled, d_neg_pooled = ref.encode_prompt(
        PROMPTS,
        prompt_2=["robot", "a dog"],
        device="cpu",
        do_classifier_free_guidance=True,
        negative_prompt=["dog", "cat"],
        negative_prompt_2=["cat", "robot"],
    )
    ctx, pooled = text.encode(
        PROMPTS, negative=["dog", "cat"], prompts_2=["robot", "a dog"], negative_2=["cat", "robot"], emphasis=True
    )
    torch.testing.assert_close(ctx, torch.cat([d_neg, d_ctx]), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, torch.cat([d_neg_pooled, d_pooled]), rtol=0, atol=1e-6)
