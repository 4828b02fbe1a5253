"""Textual inversion (Gal et al. 2022, arXiv 2208.01618): a new word whose embedding vectors are the only thing learned.

A CLIP text encoder looks each token id up in its embedding table E [N, D]. A new token gets n new rows V [n, D]
(one per vector: a 3-vector token "tok" is written "tok tok_1 tok_2" before tokenization, as diffusers and A1111 do):

    e(id) = E[id]              id < first          the frozen vocabulary
          = V[id - first]      id >= first         the new token's vectors (the tokenizer's added tokens)

and training minimises the usual diffusion loss over V alone: the UNet and both encoders stay frozen, so the result
is a few kilobytes (weights/embedding_files.py writes it as A1111 / ComfyUI read it). SDXL has two encoders: the
token gets vectors in each (`clip_l` [n, 768] and `clip_g` [n, 1280]). Pivotal tuning (finetune.py --train lora
--train-ti) learns V and a LoRA together.

`NewTokenEmbedding` replaces the encoder's `token_embedding` and holds E (frozen, shared) and V (a parameter):
what trains is exactly V, and the audit table shows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MinidiffError


class NewTokenEmbedding(nn.Module):
    """e(id) = E[id] for id < first, V[id - first] for the new tokens (module docstring)."""

    def __init__(self, base: nn.Embedding, first: int):
        super().__init__()
        self.base, self.first = base, first
        self.new = nn.Parameter(
            torch.zeros(0, base.embedding_dim, device=base.weight.device),  # fp32
            requires_grad=False,
        )

    @property
    def weight(self):  # what transformers reads for dtype and device
        return self.base.weight

    def append(self, vectors: torch.Tensor):
        """More new tokens' vectors [k, D] after the ones already there (their ids are first + len(V) ..)."""
        new = torch.cat([self.new.detach(), vectors.to(self.new.dtype).to(self.new.device)])
        self.new = nn.Parameter(new, requires_grad=self.new.requires_grad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> embeddings [B, L, D]."""
        is_new = ids >= self.first  # [B, L]
        old = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        if not is_new.any():
            return old
        new = F.embedding((ids - self.first).clamp(0, self.new.shape[0] - 1), self.new.to(old.dtype))
        return torch.where(is_new[..., None], new, old)


def token_names(token: str, n: int) -> list[str]:
    """The tokenizer entries of an n-vector token: tok, tok_1, .., tok_{n-1} (diffusers' and A1111's naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_prompt(prompt: str, tokenizer) -> str:
    """'a tok girl' -> 'a tok tok_1 tok_2 girl' for every multi-vector token of `tokenizer` in the prompt
    (diffusers' TextualInversionLoaderMixin._maybe_convert_prompt, the same replacement)."""
    added = tokenizer.added_tokens_encoder
    if not any(f"{token}_1" in added for token in added):  # no multi-vector token: nothing to expand
        return prompt
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            n = 1
            while f"{token}_{n}" in added:
                n += 1
            prompt = prompt.replace(token, " ".join(token_names(token, n)))
    return prompt


def _embeddings(encoder):
    return getattr(encoder, "text_model", encoder).embeddings


def add_token(tokenizer, encoder, token: str, vectors: torch.Tensor) -> list[int]:
    """Teach one encoder + tokenizer a new token with vectors [n, D] (or [D]); returns its token ids."""
    vectors = vectors.reshape(-1, vectors.shape[-1])
    emb = _embeddings(encoder)
    width = emb.token_embedding.weight.shape[1]
    if vectors.shape[1] != width:
        raise MinidiffError(
            f"embedding for {token!r} has vectors of width {vectors.shape[1]}, but this text encoder's "
            f"tokens are {width} wide (an embedding made for another model)"
        )
    names = token_names(token, vectors.shape[0])
    taken = [t for t in names if t in tokenizer.get_vocab()]
    if taken:
        raise MinidiffError(f"token {taken[0]!r} is already in the tokenizer: choose another name for this embedding")
    if not isinstance(emb.token_embedding, NewTokenEmbedding):
        emb.token_embedding = NewTokenEmbedding(emb.token_embedding, first=len(tokenizer))
    table = emb.token_embedding
    if len(tokenizer) != table.first + table.new.shape[0]:
        raise MinidiffError(
            "the tokenizer and text encoder disagree on the added tokens (load embeddings through "
            "minidiff.textual_inversion only)"
        )
    tokenizer.add_tokens(names)
    table.append(vectors)
    return tokenizer.convert_tokens_to_ids(names)


def word_vectors(tokenizer, encoder, word: str, n: int) -> torch.Tensor:
    """n starting vectors [n, D] for a new token: the mean embedding of `word`'s tokens, repeated (a neutral start,
    e.g. the class word 'girl'; textual inversion's usual initialisation)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise MinidiffError(f"--ti-init {word!r} has no tokens")
    table = _embeddings(encoder).token_embedding
    base = table.base if isinstance(table, NewTokenEmbedding) else table
    return base.weight[torch.tensor(ids, device=base.weight.device)].detach().float().mean(0).repeat(n, 1)


def new_vectors(encoder) -> nn.Parameter | None:
    """V of an encoder (None when it has no new tokens)."""
    table = _embeddings(encoder).token_embedding
    return table.new if isinstance(table, NewTokenEmbedding) else None


def encoders(text) -> dict:
    """{'clip_l' or 'emb_params': (tokenizer, encoder), 'clip_g': ...}: the encoders of a TextConditioner by the
    names embedding files use (weights/embedding_files.py)."""
    if text.text_encoder_2 is None:
        return {"emb_params": (text.tokenizer, text.text_encoder)}
    return {"clip_l": (text.tokenizer, text.text_encoder), "clip_g": (text.tokenizer_2, text.text_encoder_2)}


def learn_token(text, token: str, n: int, init_word: str) -> dict:
    """Add `token` (n vectors, each started at `init_word`'s embedding) to every encoder of a TextConditioner and
    make its vectors V the trainable part: {file name ('clip_l', 'clip_g' or 'emb_params'): the embedding table}."""
    tables = {}
    for name, (tokenizer, encoder) in encoders(text).items():
        add_token(tokenizer, encoder, token, word_vectors(tokenizer, encoder, init_word, n))
        tables[name] = _embeddings(encoder).token_embedding
        tables[name].new.requires_grad_(True)
    return tables
