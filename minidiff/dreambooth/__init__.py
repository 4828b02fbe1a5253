"""DreamBooth with prior preservation: teach a model one subject from a few images without forgetting its class.

Read in this order (each file one concept; `from minidiff import dreambooth as db` gives every name below):

    loss.py           the math: Ruiz et al. 2022 eq. 2, a batch of instance rows then class rows -> L
    cache.py          the data, encoded once: images -> latents (Examples), captions -> embeddings (PromptCache)
    class_images.py   the class images: which are missing, and making them with the frozen base model
    loop.py           the training loop: train(...) on minidiff/train/loop.py, lr schedule, resume, DDP hooks
    job.py, run.py    one run of `python finetune.py`: load -> class images -> cache -> train -> files
"""

from .cache import Examples, PromptCache, encode_captions, encode_examples, size_ids
from .class_images import CLASS_NAME, check_class_images, class_image_plan, generate_class_images
from .loop import TrainConfig, lr_factor, train
from .loss import (
    combine_rows,
    compute_loss,
    diffusion_target,
    make_batch,
    prior_preservation_loss,
    row_weights,
    rows_of_rank,
)

__all__ = [
    "CLASS_NAME",
    "Examples",
    "PromptCache",
    "TrainConfig",
    "check_class_images",
    "class_image_plan",
    "combine_rows",
    "compute_loss",
    "diffusion_target",
    "encode_captions",
    "encode_examples",
    "generate_class_images",
    "lr_factor",
    "make_batch",
    "prior_preservation_loss",
    "row_weights",
    "rows_of_rank",
    "size_ids",
    "train",
]
