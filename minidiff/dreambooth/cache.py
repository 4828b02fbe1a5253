"""The training data of DreamBooth, encoded once: instance and class images as latents, captions as embeddings.

Everything the frozen parts compute is computed once (`Examples`, `PromptCache`): the VAE encodes each image once
(its posterior mean and std are kept and a fresh z_0 = mean + std * n is drawn per step; for a pixel-space model
z_0 is the image), and the text encoders encode each distinct caption once; after that they can leave the GPU.
A dropped caption (`caption_dropout`) is the all-zero embedding, the unconditional input SDXL was trained with
(sgm's ucg_rate zeroes it) and the one our sampler's classifier-free guidance uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..data import ImageFolder, load_image
from ..errors import MinidiffError
from ..text import time_ids as text_time_ids


def size_ids(path, size, fit="pad"):
    """SDXL micro-conditioning of one training image (Podell et al. 2023 sec. 2.2) as 6 floats:
    (h, w) of the file as stored (EXIF applied), the crop's (top, left) in the resized image ((0, 0) when the
    image is padded to a square, data.fit_square), and the target (size, size)."""
    w, h = load_image(path).size
    top = left = 0
    if fit == "crop":
        side = min(w, h)
        top, left = round((h - side) // 2 * size / side), round((w - side) // 2 * size / side)
    return [float(h), float(w), float(top), float(left), float(size), float(size)]


@dataclass
class Examples:
    """One half of the training data, encoded once (module docstring). Rows are distinct images; `index` lists
    the rows to draw from (an image in a kohya `10_sks girl` folder is listed 10 times)."""

    mean: torch.Tensor  # [N, C, h, w] scaled latent mean (pixel space: the pixels)
    std: torch.Tensor | None  # [N, C, h, w] scaled latent std, None in pixel space
    time_ids: torch.Tensor  # [N, 6]
    captions: list
    index: list
    paths: list

    def __len__(self):
        return self.mean.shape[0]

    def draw(self, n, caption_dropout=0.0, noise_offset=0.0, T=1000):
        """n random rows with fresh noise: {z0, eps, t, time_ids, captions}. All randomness comes from torch's
        global RNG, so a training checkpoint (which stores it) resumes the same sequence."""
        picked = [self.index[i] for i in torch.randint(len(self.index), (n,)).tolist()]
        rows = torch.tensor(picked, device=self.mean.device)
        z0 = self.mean[rows]
        if self.std is not None:
            z0 = z0 + self.std[rows] * torch.randn_like(z0)
        captions = [self.captions[r] for r in picked]
        if caption_dropout > 0:
            drop = (torch.rand(n) < caption_dropout).tolist()
            captions = ["" if d else c for d, c in zip(drop, captions)]
        eps = torch.randn_like(z0)
        if noise_offset:
            eps = eps + noise_offset * torch.randn(n, z0.shape[1], 1, 1, device=z0.device, dtype=z0.dtype)
        t = torch.randint(0, T, (n,), device=z0.device)
        return {"z0": z0, "eps": eps, "t": t, "time_ids": self.time_ids[rows], "captions": captions}


@torch.no_grad()
def encode_examples(
    dataset: ImageFolder, vae=None, device="cpu", default_caption="", batch_size=4, progress=True
) -> Examples:
    """Encode an ImageFolder once: latents (VAE posterior mean and std, times the scaling factor) or pixels,
    per-image time ids, captions (an image without one gets `default_caption`)."""
    chunks = [dataset.images[i : i + batch_size] for i in range(0, len(dataset.images), batch_size)]
    means, stds = [], []
    for chunk in tqdm(chunks, desc="encoding images", disable=not progress or vae is None, leave=False):
        x = torch.stack(chunk).float() / 127.5 - 1  # uint8 -> [-1, 1], a few images at a time
        if vae is None:
            means.append(x.to(device))
            continue
        p = next(vae.parameters())
        post = vae.encode(x.to(p.device, p.dtype))
        means.append((post.mean.float() * vae.scaling_factor).to(device))
        stds.append((post.std.float() * vae.scaling_factor).to(device))
    mean, std = torch.cat(means), (torch.cat(stds) if stds else None)
    ids = torch.tensor([size_ids(p, dataset.size, dataset.fit) for p in dataset.paths], device=device)
    captions = [c or default_caption for c in dataset.captions]
    return Examples(mean, std, ids, captions, list(dataset.index), list(dataset.paths))


def encode_captions(text, captions):
    """(context [B, L, D], pooled [B, P]) of captions through the text encoders; "" rows are all zeros."""
    context, pooled = text.encode(list(captions))
    keep = torch.tensor([c != "" for c in captions], device=context.device, dtype=context.dtype)
    return context * keep[:, None, None], pooled * keep[:, None].to(pooled.dtype)


class PromptCache:
    """context and pooled embedding of each distinct caption, encoded once while the text encoders are frozen."""

    def __init__(self, text, captions, device="cpu", batch_size=8):
        captions = sorted({c for c in captions if c != ""})
        self.table = {}
        with torch.no_grad():
            for i in range(0, len(captions), batch_size):
                chunk = captions[i : i + batch_size]
                context, pooled = text.encode(chunk)
                for j, c in enumerate(chunk):
                    self.table[c] = (context[j].float().to(device), pooled[j].float().to(device))
        some = next(iter(self.table.values()), None)
        if some is None:  # only empty captions: derive the shapes from one encode of a dummy prompt
            with torch.no_grad():
                context, pooled = text.encode(["x"])
            some = (context[0].float().to(device), pooled[0].float().to(device))
        self.zeros = (torch.zeros_like(some[0]), torch.zeros_like(some[1]))

    def __call__(self, captions):
        pairs = [self.table[c] if c != "" else self.zeros for c in captions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def encode(self, prompts, negative=None, prompts_2=None, negative_2=None, emphasis=False):
        """TextConditioner.encode from the cache, so `pipeline.generate` can sample without the text encoders.
        The cache holds the plain encodings (what training sees), also when `emphasis` asks for A1111's syntax;
        a second encoder's own prompt is not cached."""
        if prompts_2 is not None or negative_2 is not None:
            raise MinidiffError("the text-embedding cache holds no prompt_2 / negative_2 encodings")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = sorted(
            {
                p
                for p in prompts + ([negative] if isinstance(negative, str) else list(negative or []))
                if p != "" and p not in self.table
            }
        )
        if missing:
            raise MinidiffError(f"prompt not in the text-embedding cache: {missing[0]!r}")
        context, pooled = self(prompts)
        if negative is None:
            return context, pooled
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        neg_context, neg_pooled = self(negative)
        return torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])

    time_ids = staticmethod(text_time_ids)
