"""The DreamBooth training loop: one step of loss.py's L per optimizer step, run by minidiff/train/loop.py.

    resume (weights, optimizer, lr schedule, RNG, grad scaler) -> for each step (train/loop.train):
        grad_accum x [make_batch -> rows_of_rank -> compute_loss (autocast) -> scaler.scale(L / grad_accum).backward()]
        optimizer_step: average gradients over the processes (DDP hook 1) -> unscale -> clip at 1 -> step
        reduce: the global batch's loss (DDP hook 2);  hooks: checkpoint + on_save, on_validate (process 0 only)

Data-parallel (torchrun, minidiff/train/ddp.py) is those two hooks plus a third that makes every process stop after
the same step on CTRL-C; with one process they do nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import TrainingError
from ..optimizers import make_optimizer
from ..train import ddp, state
from ..train import loop
from .loss import compute_loss, make_batch, rows_of_rank


@dataclass
class TrainConfig:
    """The knobs of `train` (finetune.py's flags of the same names)."""

    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    lr_schedule: str = "constant"  # constant | cosine | linear, after `warmup` linear warm-up steps
    warmup: int = 0
    prior_weight: float = 1.0
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    prediction_type: str = "epsilon"
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-4  # AdamW, as diffusers' DreamBooth-LoRA script
    optimizer: str = "adamw"  # adamw | adafactor | sgd (optimizers.py)
    save_every: int = 0
    validate_every: int = 0


def lr_factor(step, steps, warmup=0, schedule="constant"):
    """Multiplier of the base lr after `step` optimizer steps: linear warm-up to 1 over `warmup` steps, then
    constant, linear decay to 0, or half a cosine to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise TrainingError(f"lr schedule must be constant, cosine or linear, got {schedule!r}")


def train(
    *,
    unet,
    params,
    schedule,
    instance,
    klass,
    embed,
    cfg: TrainConfig,
    out_dir,
    modules,
    autocast_dtype=None,
    use_scaler=False,
    resume=None,
    on_save=None,
    on_validate=None,
    progress=True,
    ctx=None,
    settings=None,
):
    """The DreamBooth loop: AdamW (or cfg.optimizer) on `params` (tensors, or groups {"params", "lr"}), lr
    warm-up/decay, gradient accumulation, clipping at 1, an fp16 GradScaler when `use_scaler`, a loss log,
    checkpoints every `save_every` steps (`modules`: {name: module or state.Trainable} to store, with optimizer,
    lr schedule, step and RNG) and `resume` (a checkpoint file, out dir or "latest"). on_save(step) /
    on_validate(step) are called after those steps; validation runs under torch.random.fork_rng, so it cannot change
    what training draws next. `ctx` (minidiff.train.ddp.Context): data-parallel over W processes (loss.py); every
    process resumes from the same checkpoint, and only process 0 logs, saves, and calls on_save / on_validate.
    `settings` (JSON-able) is stored in every checkpoint's extra, for the caller to compare when resuming.
    CTRL-C stops at the end of the current step, after a checkpoint (interrupt.Stopped, exit status 130).
    Returns {"steps", "resumed_from", "seconds", "s_per_step" (optimizer steps only), "loss" (the last)}."""
    device = instance.mean.device
    ctx = ctx or ddp.Context(device=device)
    groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.lr_schedule)
    )
    scaler = loop.grad_scaler(device, use_scaler)
    start = 0
    if resume is not None:
        start, extra = state.load_checkpoint(
            resume, modules, {"optimizer": optimizer}, {"lr": lr_sched}, out_dir=out_dir
        )
        if use_scaler and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if start >= cfg.steps:
            raise TrainingError(f"the checkpoint is at step {start}, nothing left to do for --steps {cfg.steps}")
        share_device_rng(ctx, device)

    def step_fn(step):
        terms = torch.zeros(3, device=device)  # L, instance term, prior term, averaged over the micro-batches
        for _ in range(cfg.grad_accum):
            batch = make_batch(
                instance, klass, cfg.batch_size * ctx.world_size, cfg.caption_dropout, cfg.noise_offset, schedule.T
            )
            loss, inst, prior = compute_loss(
                unet,
                rows_of_rank(batch, ctx),
                schedule,
                embed,
                cfg.prediction_type,
                cfg.prior_weight,
                cfg.min_snr_gamma,
                autocast_dtype,
            )
            state.check_finite(loss, step)  # before backward: nothing NaN reaches the weights
            scaler.scale(loss / cfg.grad_accum).backward()
            terms += torch.stack([loss.detach(), inst.detach(), prior.detach()]) / cfg.grad_accum
        lr = loop.optimizer_step(
            optimizer=optimizer,
            params=params,
            scaler=scaler,
            max_grad_norm=cfg.max_grad_norm,
            lr_scheduler=lr_sched,
            after_backward=lambda: ddp.average_gradients(params, ctx),
        )
        return {"terms": terms, "lr": lr}

    def reduce(logs):  # DDP hook 2: the global batch's loss is the mean of the processes' losses
        if ctx.world_size > 1:
            torch.distributed.all_reduce(logs["terms"])
            logs["terms"] /= ctx.world_size
        loss, inst, prior = logs["terms"].tolist()
        return {"loss": loss, "instance": inst, "lr": logs["lr"]} | ({"prior": prior} if klass is not None else {})

    def checkpoint(step):
        extra = {"settings": settings or {}} | ({"scaler": scaler.state_dict()} if use_scaler else {})
        return state.save_checkpoint(out_dir, step, modules, {"optimizer": optimizer}, {"lr": lr_sched}, extra)

    def save(step):
        checkpoint(step)
        if on_save is not None:
            on_save(step)

    def validate(step):
        if step < cfg.steps:  # the caller validates after the last step itself
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                on_validate(step)
            unet.train()

    hooks = [(cfg.save_every, save, False)] + ([(cfg.validate_every, validate, False)] if on_validate else [])
    log = state.LossLog(out_dir, resume_step=start if resume is not None else None) if ctx.is_main else None
    unet.train()
    result = loop.train(
        step_fn=step_fn,
        steps=cfg.steps,
        start=start,
        log=log,
        finite=(),
        hooks=hooks,
        reduce=reduce,
        hooks_here=ctx.is_main,
        postfix=lambda logs: {"loss": f"{logs['loss']:.4f}"},
        on_stop=checkpoint if ctx.is_main else lambda step: None,
        agree=lambda requested: ddp.any_process(requested, ctx),
        progress=progress,
    )
    if ctx.is_main:
        log.plot(title=f"DreamBooth loss ({cfg.steps} steps)")
    return {k: result[k] for k in ("steps", "resumed_from", "seconds", "s_per_step")} | {
        "loss": result["logs"].get("loss", float("nan"))
    }


def share_device_rng(ctx, device):
    """After a resume, give every GPU process rank 0's generator state of its own GPU: the checkpoint holds
    per-device states indexed by GPU, and process r draws on cuda:r, whose saved state rank 0 never advanced."""
    if ctx.world_size > 1 and device.type == "cuda":
        rng = torch.cuda.get_rng_state(device).to(device)
        torch.distributed.broadcast(rng, src=0)
        torch.cuda.set_rng_state(rng.cpu(), device)
