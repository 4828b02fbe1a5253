"""Aspect-ratio bucketing (kohya, NovelAI): train on images at their own shape instead of squaring them.

Each image goes to the bucket (h, w) of about size^2 pixels whose aspect ratio is nearest its own, is scaled to cover
it and cropped in the middle (data.bucket_sizes / nearest_bucket / fit_bucket). A batch holds rows of one bucket
only, so its latents stack; the bucket is drawn with probability proportional to its rows (repeats counted), so
over many steps every image is seen as often as without buckets. SDXL's micro-conditioning comes from each image:

    time_ids = (h, w of the file as stored, crop top, left in the scaled image, bucket h, w)

(Podell et al. 2023 sec. 2.2-2.3: the model learns what a crop and a size look like, and at sampling time one asks
for (0, 0) and the full size). Class images (prior preservation) are square; a batch with instance rows from a
non-square bucket runs the UNet once per shape (dreambooth.compute_loss).
"""

from __future__ import annotations

import copy

import torch

from .dreambooth.cache import Examples, encode_examples


class BucketedExamples:
    """Examples of one bucket each; `draw` takes all n rows from one bucket (module docstring)."""

    def __init__(self, groups: dict):
        self.groups = groups  # {(h, w): Examples}
        every = list(groups.values())
        self.paths = [p for ex in every for p in ex.paths]
        self.captions = [c for ex in every for c in ex.captions]
        self.index = [i for ex in every for i in ex.index]

    def __len__(self):
        return len(self.paths)

    @property
    def mean(self):  # where the latents live (the training loop reads mean.device)
        return next(iter(self.groups.values())).mean

    def draw(self, n, caption_dropout=0.0, noise_offset=0.0, T=1000):
        """n rows of one bucket, chosen with probability proportional to its rows (torch's global RNG)."""
        every = list(self.groups.values())
        k = torch.multinomial(torch.tensor([float(len(ex.index)) for ex in every]), 1).item()
        return every[k].draw(n, caption_dropout, noise_offset, T)


@torch.no_grad()
def encode_buckets(dataset, vae=None, device="cpu", default_caption="", progress=True) -> BucketedExamples:
    """encode_examples for each bucket of an ImageFolder made with `buckets=`, with each image's own time ids."""
    groups = {}
    for bucket in sorted({tuple(img.shape[1:]) for img in dataset.images}):
        rows = [i for i, img in enumerate(dataset.images) if tuple(img.shape[1:]) == bucket]
        part = copy.copy(dataset)
        part.images, part.paths = [dataset.images[i] for i in rows], [dataset.paths[i] for i in rows]
        part.captions = [dataset.captions[i] for i in rows]
        part.index = [rows.index(j) for j in dataset.index if j in rows]
        ex: Examples = encode_examples(part, vae, device, default_caption, batch_size=4, progress=progress)
        ids = [[*_stored_size(dataset.paths[i]), *dataset.crops[i], *bucket] for i in rows]
        ex.time_ids = torch.tensor(ids, dtype=torch.float32, device=ex.time_ids.device)
        groups[bucket] = ex
    return BucketedExamples(groups)


def _stored_size(path):
    """(h, w) of the file as stored (EXIF applied)."""
    from .data import load_image

    w, h = load_image(path).size
    return float(h), float(w)
