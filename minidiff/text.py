"""SDXL's text conditioning: two CLIP text encoders -> cross-attention context, pooled vector, size/crop ids.

SDXL (Podell et al. 2023, arXiv 2307.01952, sec. 2.1-2.2) conditions its UNet on three things, all made here:

    context  [B, 77, C1 + C2] = [ h_L^(-2) || h_G^(-2) ]       penultimate hidden states of both encoders,
                                                              no final LayerNorm, CLIP-L first, then OpenCLIP bigG
    pooled   [B, P]           = W_proj . LN_final(h_G^(-1))[eos]  bigG's projected end-of-text token (`text_embeds`)
    time_ids [B, 6]           = (h, w, top, left, target_h, target_w)   "micro-conditioning" on sizes and crop

The UNet embeds `time_ids` with the timestep sinusoid and adds MLP([pooled || emb(time_ids)]) to the timestep
embedding (sgm `ConcatTimestepEmbedderND`,
https://github.com/Stability-AI/generative-models/blob/0ad7de9a5cb5/sgm/modules/encoders/modules.py).

Tokenization pads every prompt to 77 tokens and the UNet attends to all 77 positions (no attention mask), so the
pad token matters numerically: CLIP-L pads with `<|endoftext|>`, bigG with `!` (id 0, open_clip's zero padding).
Both come from the checkpoint's own tokenizer files (`tokenizer/`, `tokenizer_2/`); nothing here names a token.

An empty negative prompt gives an all-zero unconditional context *and* pooled vector, as the reference does
(diffusers `force_zeros_for_empty_prompt`, sgm `force_uc_zero_embeddings=["txt"]`); the size ids are not zeroed.
"""

from __future__ import annotations

import math
import re
import sys

import torch
from torch import nn

from .errors import MinidiffError
from .textual_inversion import expand_prompt


def _as_list(prompts, n=None):
    if isinstance(prompts, str):
        return [prompts] * (n or 1)
    prompts = list(prompts)
    if n is not None and len(prompts) != n:
        if len(prompts) == 1:
            return prompts * n
        raise ValueError(f"expected 1 or {n} negative prompts, got {len(prompts)}")
    return prompts


def time_ids(original_size, crop_top_left=(0, 0), target_size=None, batch=1) -> torch.Tensor:
    """Micro-conditioning ids, shape [batch, 6]: (h, w, top, left, target_h, target_w).

    Order as in sgm's `ConcatTimestepEmbedderND` and diffusers' `_get_add_time_ids`: original size, crop top-left,
    target size; each as (height, width) or (top, left). At inference all three are usually (H, W), (0, 0), (H, W).
    """
    target_size = original_size if target_size is None else target_size
    ids = [*original_size, *crop_top_left, *target_size]
    if len(ids) != 6:
        raise ValueError(
            f"time_ids wants (h, w), (top, left), (h, w); got {original_size}, {crop_top_left}, {target_size}"
        )
    return torch.tensor([float(v) for v in ids]).repeat(batch, 1)


# ---- prompts as artists write them: A1111 emphasis syntax ----------------------------------------------------------
# One token of the syntax per match: escapes \( \) \[ \] \\ \, brackets, ":w)" closing a weight, plain text, ':'.
_SYNTAX = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
UP, DOWN = 1.1, 1 / 1.1  # (x) and [x]


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """A1111's prompt emphasis (`prompt_parser.parse_prompt_attention`) -> [(text, weight), ...], runs of equal
    weight merged:

        (x) -> x * 1.1     [x] -> x / 1.1     (x:w) -> x * w     \\( \\) \\[ \\] -> literal brackets
        nesting multiplies: ((x)) = 1.21, ((x:1.3)) = 1.43; an unclosed ( or [ runs to the end of the prompt.

    "a (((house:1.3)) [on] a (hill:0.5)" -> [("a ", 1), ("house", 1.573), (" ", 1.1), ("on", 1), (" a ", 1.1),
    ("hill", 0.55)]
    """
    res, rounds, squares = [], [], []

    def multiply(start, w):
        for item in res[start:]:
            item[1] *= w

    for m in _SYNTAX.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            rounds.append(len(res))
        elif text == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            try:
                multiply(rounds.pop(), float(weight))
            except ValueError:
                raise MinidiffError(f"prompt {prompt!r}: weight {weight!r} is not a number") from None
        elif text == ")" and rounds:
            multiply(rounds.pop(), UP)
        elif text == "]" and squares:
            multiply(squares.pop(), DOWN)
        else:
            res.append([text, 1.0])
    for start in rounds:
        multiply(start, UP)
    for start in squares:
        multiply(start, DOWN)
    merged = []
    for text, w in res:
        if merged and merged[-1][1] == w:
            merged[-1][0] += text
        else:
            merged.append([text, w])
    return [(t, w) for t, w in merged] or [("", 1.0)]


def weighted_tokens(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """The prompt's BPE ids without BOS/EOS, and each token's emphasis weight (each fragment tokenized alone)."""
    ids, weights = [], []
    for text, w in parse_emphasis(prompt):
        t = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        ids, weights = ids + t, weights + [w] * len(t)
    return ids, weights


def emphasize(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's rule: scale each token's hidden state by its weight, then rescale the whole chunk so its mean is
    what it was (z [L, C] of one 77-token chunk, w [L]):

        z' = z * w[:, None] * mean(z) / mean(z * w[:, None])

    Why this one and not ComfyUI's z' = z_empty + w (z - z_empty) (pulling away from the empty prompt's states):
    A1111's is what most published prompts with (word:1.3) were tuned on, it needs no second encoder pass, and it
    keeps every unweighted prompt bit-identical (all w = 1 -> z' = z). Unlike A1111 we take the mean per prompt,
    not over the batch, so an image does not depend on which prompts share its batch.
    """
    if bool((w == 1).all()):
        return z
    scaled = z * w[:, None].to(z.dtype)
    return scaled * (z.mean() / scaled.mean())


def _chunks(ids: list[int], weights: list[float], tokenizer, length: int, n: int):
    """n chunks of `length` ids (BOS, up to length - 2 prompt tokens, EOS, pad), weights 1 on the specials."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    body = length - 2
    out_ids, out_w = [], []
    for k in range(n):
        part, w = ids[k * body : (k + 1) * body], weights[k * body : (k + 1) * body]
        fill = body - len(part)
        out_ids.append([bos, *part, eos] + [pad] * fill)
        out_w.append([1.0, *w, 1.0] + [1.0] * fill)
    return out_ids, out_w


_NOTICED: set = set()


def _notice_long(prompt: str, n_tokens: int, body: int):
    """One line on stderr the first time a prompt needs more than one chunk: it is split, never cut."""
    if prompt not in _NOTICED:
        _NOTICED.add(prompt)
        print(
            f"note: prompt of {n_tokens} tokens > {body}: encoded as {math.ceil(n_tokens / body)} chunks of {body} "
            f"(each with BOS/EOS) concatenated along the sequence; pooled from the first: {prompt[:60]!r}...",
            file=sys.stderr,
        )


class TextConditioner(nn.Module):
    """Both SDXL text encoders and their tokenizers (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/tree/main/text_encoder_2).

    `text_encoder` is a transformers `CLIPTextModel` (CLIP ViT-L/14, width C1 = 768), `text_encoder_2` a
    `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG/14, width C2 = 1280, projection P = 1280). Any sizes work:
    the bundled miniature uses tiny CLIPs with the same structure. Attribute names match diffusers' pipeline
    components, so LoRA names such as `text_encoder.text_model.encoder.layers.0...` resolve on this module.
    """

    force_zeros_for_empty_prompt = True  # SDXL: an empty negative prompt is all zeros (module docstring)

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    @property
    def context_dim(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim

    def tokenize(self, tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, L]: BOS, BPE tokens, EOS, then the tokenizer's own pad token up to L (77 for SDXL).
        A prompt longer than L is refused (MinidiffError naming it), never silently cut (sampling reads longer
        prompts in chunks instead: encode_weighted)."""
        length = tokenizer.model_max_length
        if not length or length > encoder.config.max_position_embeddings:  # unset (1e30) in some tokenizer files
            length = encoder.config.max_position_embeddings
        prompts = [expand_prompt(p, tokenizer) for p in prompts]  # multi-vector embedding tokens: tok tok_1 ..
        counted = tokenizer(prompts, max_length=length + 1, truncation=True).input_ids  # L + 1: "too long"
        for prompt, ids in zip(prompts, counted):
            if len(ids) > length:
                raise MinidiffError(
                    f"prompt too long for training: the text encoder reads {length - 2} tokens and "
                    f"would silently drop the rest of {prompt[:60]!r}...; shorten it"
                )
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(encoder.device)

    def _length(self, tokenizer, encoder) -> int:
        length = tokenizer.model_max_length
        if not length or length > encoder.config.max_position_embeddings:
            length = encoder.config.max_position_embeddings
        return length

    def _tokens(self, prompts, prompts_2):
        """Per encoder: [(ids, weights)] for each prompt (prompts_2, when given, for the second encoder)."""
        pairs = ((self.tokenizer, self.text_encoder, prompts), (self.tokenizer_2, self.text_encoder_2, prompts_2))
        return [
            (tok, enc, [weighted_tokens(tok, expand_prompt(p, tok)) for p in ps])
            for tok, enc, ps in pairs
            if enc is not None
        ]  # (SD 1.x / 2.x: one encoder, text_sd.py)

    def hidden_states(self, encoder, ids):
        """(the states the context takes from `encoder` for token ids [N, L], its output): SDXL's penultimate
        layer, before any final LayerNorm."""
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out

    def count_chunks(self, prompts, prompts_2=None) -> int:
        """Chunks of 75 tokens the longest prompt needs (on either encoder)."""
        prompts = _as_list(prompts)
        prompts_2 = prompts if prompts_2 is None else _as_list(prompts_2, len(prompts))
        return max(
            max(1, math.ceil(len(ids) / (self._length(tok, enc) - 2)))
            for tok, enc, rows in self._tokens(prompts, prompts_2)
            for ids, _ in rows
        )

    def encode_weighted(self, prompts, prompts_2=None, chunks=1) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in A1111 syntax: context [B, K * 77, C1 + C2], pooled [B, P] with emphasis (`parse_emphasis`,
        `emphasize`) and K = max(chunks, chunks the longest prompt needs) chunks of 75 tokens, each encoded alone
        with its own BOS/EOS and concatenated along the sequence (as A1111 and ComfyUI do); shorter prompts get
        empty chunks. Pooled comes from the first chunk. `prompts_2` (default: the prompts) go to encoder 2."""
        prompts = _as_list(prompts)
        prompts_2 = prompts if prompts_2 is None else _as_list(prompts_2, len(prompts))
        K = max(chunks, self.count_chunks(prompts, prompts_2))
        states, pooled = [], None
        for (tok, enc, rows), texts in zip(self._tokens(prompts, prompts_2), (prompts, prompts_2)):
            length = self._length(tok, enc)
            ids, weights = [], []
            for (i, w), text in zip(rows, texts):
                if len(i) > length - 2:
                    _notice_long(text, len(i), length - 2)
                ci, cw = _chunks(i, w, tok, length, K)
                ids, weights = ids + ci, weights + cw
            states_k, out = self.hidden_states(enc, torch.tensor(ids, device=enc.device))
            w = torch.tensor(weights, device=enc.device)
            h = torch.stack([emphasize(z, wz) for z, wz in zip(states_k, w)])  # [B * K, 77, C]
            states.append(h.reshape(len(prompts), K * length, -1))
            if enc is self.text_encoder_2:
                pooled = out.text_embeds.reshape(len(prompts), K, -1)[:, 0]
        context = torch.cat([s.to(states[0].dtype) for s in states], dim=-1)
        return context, pooled if pooled is not None else context.new_zeros(len(prompts), 0)

    def encode_prompts(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, L, C1 + C2] = [h_L^(-2) || h_G^(-2)], pooled [B, P] = bigG `text_embeds`."""
        prompts = _as_list(prompts)
        out_l = self.text_encoder(self.tokenize(self.tokenizer, self.text_encoder, prompts), output_hidden_states=True)
        out_g = self.text_encoder_2(
            self.tokenize(self.tokenizer_2, self.text_encoder_2, prompts), output_hidden_states=True
        )
        h_l, h_g = out_l.hidden_states[-2], out_g.hidden_states[-2]  # penultimate layer, before any final LayerNorm
        context = torch.cat([h_l, h_g.to(h_l.dtype)], dim=-1)
        return context, out_g.text_embeds

    def encode(
        self, prompts, negative=None, prompts_2=None, negative_2=None, emphasis=False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts for the UNet.

        negative=None: (context [B, L, C1+C2], pooled [B, P]) of `prompts`.
        negative=str or list of B str: the classifier-free-guidance batch [uncond ; cond] of size 2B, uncond first
        (the order `samplers.cfg` chunks back). A row whose negative prompt is "" is all zeros (context and pooled).
        emphasis=False: diffusers' encode_prompt (77 tokens; what training uses: a longer prompt is refused).
        emphasis=True: A1111 syntax, (word:1.3) and 75-token chunks (`encode_weighted`); `prompts_2` /
        `negative_2` go to the second encoder (diffusers' prompt_2), default: the same text.
        """
        if not emphasis:
            context, pooled = self.encode_prompts(prompts)
        else:
            prompts = _as_list(prompts)
            prompts_2 = prompts if prompts_2 is None else _as_list(prompts_2, len(prompts))
            K = self.count_chunks(prompts, prompts_2)
            if negative is not None:
                neg, neg_2 = _as_list(negative, len(prompts)), _as_list(negative_2 or negative, len(prompts))
                rows = [i for i, p in enumerate(neg) if p != ""]
                if rows:
                    K = max(K, self.count_chunks([neg[i] for i in rows], [neg_2[i] for i in rows]))
            context, pooled = self.encode_weighted(prompts, prompts_2, K)
        if negative is None:
            return context, pooled
        negative = _as_list(negative, context.shape[0])
        neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        rows = [i for i, p in enumerate(negative) if p != "" or not self.force_zeros_for_empty_prompt]
        if rows:
            if emphasis:
                c, p = self.encode_weighted([negative[i] for i in rows], [neg_2[i] for i in rows], K)
            else:
                c, p = self.encode_prompts([negative[i] for i in rows])
            neg_context[rows], neg_pooled[rows] = c.to(context.dtype), p.to(pooled.dtype)
        return torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])

    time_ids = staticmethod(time_ids)
