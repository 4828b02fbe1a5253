"""Data-parallel training over several GPUs of one machine (Kaggle's two T4s) with torchrun, in four functions.

    torchrun --nproc_per_node 2 finetune.py ...       # one process per GPU; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK

Each of the W processes holds the whole (frozen, fp16) UNet and the same LoRA weights, draws its own rows, and after
backward the LoRA gradients are averaged over processes before the optimizer step:

    g = (1 / W) * sum_w g_w        (g_w: the gradient of process w's mean loss over its rows)

With equal row counts per process that is exactly the gradient of the mean loss over all W * B rows, so W
processes at batch B train like one process at batch W * B (tests/test_ddp.py checks this). Only the LoRA
gradients travel (5.8 M floats = 23 MB per step for rank 4), in one flat all-reduce. This is what
torch.nn.parallel.DistributedDataParallel does for the trainable parameters, written out: DDP's bucketing overlaps
communication with backward, which matters little for 23 MB, and its hooks interact badly with gradient
checkpointing. Class images are made in chunks split round robin (chunk c on process c mod W; dreambooth.make_class_images),
and only process 0 writes files (`is_main`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingError
from .hardware import resolve_device


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str | None = None) -> Context:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPUs, gloo on CPU);
    a single process (no torchrun) gets Context(0, 1) and nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)  # a --device it cannot use: one line, not torch's traceback
    cuda = device.type == "cuda"
    if world == 1:
        return Context(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local >= torch.cuda.device_count():
            raise TrainingError(
                f"torchrun started {world} processes but this machine has "
                f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Context(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


@torch.no_grad()
def broadcast_parameters(params, ctx: Context):
    """Every process starts from process 0's values (the LoRA A matrices are random)."""
    if ctx.world_size > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


@torch.no_grad()
def average_gradients(params, ctx: Context):
    """g <- (1/W) sum_w g_w for every parameter with a gradient, in one flat all-reduce (module docstring)."""
    if ctx.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_process(flag: bool, ctx: Context) -> bool:
    """True on every process when `flag` is True on any of them (e.g. CTRL-C reached one: all stop together)."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=ctx.device)
    dist.all_reduce(t)
    return bool(t.item())


def barrier(ctx: Context):
    if ctx.world_size > 1:
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
