"""The optimizers fine-tuning offers: the ones torch itself ships, by the names kohya's users know.

    adamw      torch.optim.AdamW(betas 0.9, 0.999; decoupled weight decay)      the default, as diffusers and kohya
    adafactor  torch.optim.Adafactor (factored second moments: ~no optimizer state for matrices; Shazeer & Stern 2018)
    sgd        torch.optim.SGD(momentum 0.9, weight decay)

8-bit AdamW / Lion / Prodigy need bitsandbytes or other packages minidiff does not depend on.
Parameter groups ({"params": [...], "lr": ...}) carry their own learning rates (e.g. --text-encoder-lr).
"""

from __future__ import annotations

import torch

from .errors import TrainingError

OPTIMIZERS = ("adamw", "adafactor", "sgd")


def make_optimizer(name: str, groups, lr: float, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """An optimizer over `groups` (parameters or parameter groups) with base learning rate `lr`."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise TrainingError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
