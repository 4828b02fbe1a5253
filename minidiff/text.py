"""SDXL's text conditioning: two CLIP text encoders -> cross-attention context, pooled vector, size/crop ids.

SDXL (Podell et al. 2023, arXiv 2307.01952, sec. 2.1-2.2) conditions its UNet on three things, all made here:

    context  [B, 77, C1 + C2] = [ h_L^(-2) || h_G^(-2) ]       penultimate hidden states of both encoders,
                                                              no final LayerNorm, CLIP-L first, then OpenCLIP bigG
    pooled   [B, P]           = W_proj . LN_final(h_G^(-1))[eos]  bigG's projected end-of-text token (`text_embeds`)
    time_ids [B, 6]           = (h, w, top, left, target_h, target_w)   "micro-conditioning" on sizes and crop

The UNet embeds `time_ids` with the timestep sinusoid and adds MLP([pooled || emb(time_ids)]) to the timestep
embedding (reference notes: shared/reference/sdxl.md sec. 1.3 and 3).

Tokenization pads every prompt to 77 tokens and the UNet attends to all 77 positions (no attention mask), so the
pad token matters numerically: CLIP-L pads with `<|endoftext|>`, bigG with `!` (id 0, open_clip's zero padding).
Both come from the checkpoint's own tokenizer files (`tokenizer/`, `tokenizer_2/`); nothing here names a token.

An empty negative prompt gives an all-zero unconditional context *and* pooled vector, as the reference does
(diffusers `force_zeros_for_empty_prompt`, sgm `force_uc_zero_embeddings=["txt"]`); the size ids are not zeroed.
"""

from __future__ import annotations

import torch
from torch import nn


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
        raise ValueError(f"time_ids wants (h, w), (top, left), (h, w); got {original_size}, {crop_top_left}, "
                         f"{target_size}")
    return torch.tensor([float(v) for v in ids]).repeat(batch, 1)


class TextConditioner(nn.Module):
    """Both SDXL text encoders and their tokenizers (sdxl.md sec. 3).

    `text_encoder` is a transformers `CLIPTextModel` (CLIP ViT-L/14, width C1 = 768), `text_encoder_2` a
    `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG/14, width C2 = 1280, projection P = 1280). Any sizes work:
    the bundled miniature uses tiny CLIPs with the same structure. Attribute names match diffusers' pipeline
    components, so LoRA names such as `text_encoder.text_model.encoder.layers.0...` resolve on this module.
    """

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
        """Token ids [B, L]: BOS, BPE tokens, EOS, then the tokenizer's own pad token up to L (77 for SDXL)."""
        length = tokenizer.model_max_length
        if not length or length > encoder.config.max_position_embeddings:  # unset (1e30) in some tokenizer files
            length = encoder.config.max_position_embeddings
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(encoder.device)

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

    def encode(self, prompts, negative=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts for the UNet.

        negative=None: (context [B, L, C1+C2], pooled [B, P]) of `prompts`.
        negative=str or list of B str: the classifier-free-guidance batch [uncond ; cond] of size 2B, uncond first
        (the order `samplers.cfg` chunks back). A row whose negative prompt is "" is all zeros (context and pooled).
        """
        context, pooled = self.encode_prompts(prompts)
        if negative is None:
            return context, pooled
        negative = _as_list(negative, context.shape[0])
        neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        rows = [i for i, p in enumerate(negative) if p != ""]
        if rows:
            c, p = self.encode_prompts([negative[i] for i in rows])
            neg_context[rows], neg_pooled[rows] = c.to(context.dtype), p.to(pooled.dtype)
        return torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])

    time_ids = staticmethod(time_ids)
