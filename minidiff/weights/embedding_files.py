"""Textual-inversion embedding files: what A1111, ComfyUI and diffusers write, read into {encoder name: vectors}.

    A1111 / ComfyUI, SDXL     {"clip_l": [n, 768], "clip_g": [n, 1280]}     token = the file's stem (ours: metadata)
    A1111, SD 1.x / 2.x       {"emb_params": [n, D]}                        token = the file's stem
    diffusers                 {"<token>": [n, D] or [D]}                    token = the key

Only .safetensors is read (A1111's older .pt embeddings are pickles: never loaded). `write_embedding` writes the
A1111 layout (clip_l / clip_g for SDXL, emb_params otherwise), which all three read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MinidiffError
from ..textual_inversion import add_token, encoders


def read_embedding(path) -> tuple[dict, str]:
    """({'clip_l': [n, D1], 'clip_g': [n, D2]} or {'emb_params': [n, D]}, the file's own token)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise MinidiffError(
            f"{path}: embeddings are read from .safetensors only (a .pt/.bin embedding is a pickle, "
            "which minidiff never loads)"
        )
    if not path.is_file():
        raise MinidiffError(f"no such embedding file: {path}")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            stem = (f.metadata() or {}).get("minidiff.token", path.stem)  # ours: sks-step-000100 holds "sks"
    except Exception as e:
        raise MinidiffError(f"cannot read {path}: truncated or not a safetensors file ({e})") from None
    if {"clip_l", "clip_g"} <= set(state):
        vectors, token = {"clip_l": state["clip_l"], "clip_g": state["clip_g"]}, stem
    elif "emb_params" in state:
        vectors, token = {"emb_params": state["emb_params"]}, stem
    elif len(state) == 1:
        token, value = next(iter(state.items()))
        vectors = {"emb_params": value}
    else:
        raise MinidiffError(
            f"{path}: not a textual-inversion embedding (expected clip_l + clip_g, emb_params, or one "
            f"token key; found {sorted(state)[:4]})"
        )
    vectors = {k: v.reshape(-1, v.shape[-1]).float() for k, v in vectors.items()}
    if len({v.shape[0] for v in vectors.values()}) != 1:
        raise MinidiffError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    return vectors, token


def write_embedding(path, vectors: dict, token: str, dtype=torch.float32, metadata=None) -> Path:
    """Write {'clip_l', 'clip_g'} or {'emb_params'} vectors (A1111 layout), atomically, with the token in the
    metadata; the file's stem is what A1111 and ComfyUI users type."""
    from .. import io

    tensors = {k: v.detach().to(dtype).cpu() for k, v in vectors.items()}
    meta = {"minidiff.token": token, "minidiff.vectors": str(next(iter(tensors.values())).shape[0]), **(metadata or {})}
    return io.save_safetensors(tensors, path, {k: str(v) for k, v in meta.items()})


def load_embedding(text, path, token: str | None = None) -> str:
    """Load an embedding file (A1111 / ComfyUI / diffusers, above) into a TextConditioner under `token`
    (default: the file's own token, else its stem, as A1111 does); returns the token to write in prompts."""
    vectors, own = read_embedding(path)
    token = token or own
    parts = encoders(text)
    if set(vectors) != set(parts):
        kind = "SDXL (clip_l + clip_g)" if "clip_g" in vectors else "SD 1.x / 2.x (one encoder)"
        raise MinidiffError(
            f"{path}: an {kind} embedding, but the model has "
            + ("two text encoders (SDXL)" if "clip_g" in parts else "one text encoder")
        )
    for name, (tokenizer, encoder) in parts.items():
        add_token(tokenizer, encoder, token, vectors[name])
    return token
