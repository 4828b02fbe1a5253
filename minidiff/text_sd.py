"""Stable Diffusion 1.x / 2.x text conditioning: ONE CLIP text encoder -> cross-attention context, nothing else.

SD 1.x (Rombach et al. 2022, arXiv 2112.10752) conditions its UNet on CLIP ViT-L/14's last hidden states, after the
final LayerNorm; SD 2.x on OpenCLIP ViT-H/14's *penultimate* states, also through the final LayerNorm:

    context [B, 77, C] = LN_final(h^(layer))        layer = -1 (SD 1.x), -2 (SD 2.x as originally released)
    pooled  [B, 0]                                   no pooled vector, no size/crop ids: the UNet adds nothing to t

diffusers' SD 2.x folders store the text encoder with its last layer already removed (num_hidden_layers 23 of 24),
so there the last layer *is* the penultimate one and `layer` stays -1: "as the config says". The original single file
keeps all 24 layers and its yaml says `layer: penultimate`, so loading it sets layer = -2.

Unlike SDXL, an empty negative prompt is encoded like any prompt (the empty string's states), as diffusers'
StableDiffusionPipeline does: SD was trained with dropped captions as "", not as zeros.
"""

from __future__ import annotations

import torch

from .text import TextConditioner


class SDTextConditioner(TextConditioner):
    """One CLIP text encoder (transformers `CLIPTextModel`) and its tokenizer. `text_encoder_2` is None, so code
    that walks a pipeline's modules sees one encoder; encode / time_ids behave as TextConditioner's."""

    force_zeros_for_empty_prompt = False

    def __init__(self, tokenizer, text_encoder, layer: int = -1):
        super().__init__(tokenizer, text_encoder, None, None)
        if layer not in (-1, -2):
            raise ValueError(f"SDTextConditioner: layer must be -1 (last) or -2 (penultimate), got {layer}")
        self.layer = layer

    @property
    def context_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return 0

    def hidden_states(self, encoder, ids):
        """LN_final(h^(layer)) for token ids [N, L] (the A1111-syntax path, encode_weighted), and the output."""
        out = encoder(ids, output_hidden_states=self.layer != -1)
        if self.layer == -1:
            return out.last_hidden_state, out
        return getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[self.layer]), out

    def encode_prompts(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, L, C] = LN_final(h^(layer)), pooled [B, 0]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenize(self.tokenizer, self.text_encoder, prompts)
        out = self.text_encoder(ids, output_hidden_states=self.layer != -1)
        if self.layer == -1:
            context = out.last_hidden_state  # already through final_layer_norm
        else:
            model = getattr(self.text_encoder, "text_model", self.text_encoder)
            context = model.final_layer_norm(out.hidden_states[self.layer])
        return context, context.new_zeros(context.shape[0], 0)
