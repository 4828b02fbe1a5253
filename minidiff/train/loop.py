"""The one training-loop shape every trainer uses (DDPM, GAN, the classifier, the miniature's pretraining, DreamBooth).

A trainer is a step function and a few hooks. `loop.train` owns only what every loop repeats:

    for step in start+1 .. steps:                       a tqdm bar that starts at `start` (a resumed run)
        logs = step_fn(step)                            the trainer's math: batches, losses, backward, optimizer
        logs = reduce(logs)                             DDP hook 2: the global batch's values (default: as is)
        check_finite(logs[k] for k in finite)           TrainingError naming the step, with `hint`
        log.log(step, **logs)                           the CSV loss log (state.LossLog), when given
        bar.set_postfix(postfix(logs))                  every `postfix_every` steps and at the last
        for every, fn, at_end in hooks:                 saving, sampling, validation: fn(step) on every `every`-th
            if (every and step % every == 0) or (at_end and step == steps): fn(step)
                                                        step (and at the last when at_end); time spent in hooks
                                                        is not counted in s_per_step
    return {"steps", "resumed_from", "seconds", "s_per_step", "logs" (the last step's)}

The contract for `step_fn(step) -> dict`: it draws its own batch (from the global RNG or its own generator), runs
forward and backward and steps its optimizer(s), and returns the values to log (tensors or floats; `finite` names
the ones that must be finite). Everything the loop does not do is the step function's, so a GAN (two optimizers)
and a classifier (an lr schedule) share the same loop. Resume is not a hook: load the checkpoint before the loop
(state.load_checkpoint restores weights, optimizers and RNG) and pass its step as `start`; saving is a hook
(`(save_every, save, True)`). Hooks run only where `hooks_here` is true (DDP: process 0).

`optimizer_step` is the update most step functions end with, written once with no branches on precision:

    [after_backward(): DDP hook 1, average gradients] -> scaler.unscale_ -> clip ||g|| to max_grad_norm
    -> scaler.step(optimizer) (skipped on inf/NaN in fp16) -> scaler.update -> zero_grad -> lr_scheduler.step
    -> ema.update(model)

with `torch.amp.GradScaler(enabled=...)`: a disabled scaler's scale/unscale_/step/update are identities around a
plain optimizer.step(), and `autocast(dtype)` is `nullcontext()` when there is nothing to cast.

DreamBooth on this shape (minidiff/dreambooth/loop.py::train):
    scaler = grad_scaler(device, use_scaler)
    step_fn(step): grad_accum x [make_batch -> rows_of_rank -> compute_loss (under autocast) ->
                   scaler.scale(loss / grad_accum).backward()], then
                   lr = optimizer_step(optimizer=, params=, scaler=, max_grad_norm=, lr_scheduler=,
                                       after_backward=lambda: ddp.average_gradients(params, ctx))      DDP hook 1
    reduce:        all_reduce the logged sums over the processes and divide by W                      DDP hook 2
    agree:         ddp.any_process(CTRL-C requested): every process stops after the same step          DDP hook 3
    hooks:         [(save_every, checkpoint (extra={"scaler": ...}) + on_save, False),
                    (validate_every, on_validate under torch.random.fork_rng unless step == steps, False)]
    hooks_here=ctx.is_main; start from state.load_checkpoint (+ scaler.load_state_dict) before the loop.
"""

import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from . import interrupt, state


def autocast(device, dtype):
    """torch.autocast for `dtype` on `device`, or nullcontext() when dtype is None (full precision)."""
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device, enabled):
    """A GradScaler for fp16 training (enabled), or the disabled one whose methods pass straight through."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)


def optimizer_step(
    *, optimizer, params, scaler=None, max_grad_norm=None, lr_scheduler=None, ema=None, model=None, after_backward=None
):
    """The update after the backward pass(es); see the module docstring. Returns the learning rate used."""
    scaler = scaler or _DISABLED
    lr = optimizer.param_groups[0]["lr"]
    if after_backward is not None:
        after_backward()
    scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    if ema is not None:
        ema.update(model)
    return lr


_DISABLED = torch.amp.GradScaler("cpu", enabled=False)


def train(
    *,
    step_fn,
    steps,
    start=0,
    log=None,
    finite=("loss",),
    hint=state.NAN_HINT,
    hooks=(),
    reduce=None,
    hooks_here=True,
    postfix=None,
    postfix_every=1,
    on_stop=None,
    agree=None,
    desc="training",
    progress=True,
    **bar_kw,
):
    """Run steps start+1 .. steps of `step_fn` (the contract is in the module docstring). Returns a summary dict."""
    t0, aside, logs = time.perf_counter(), 0.0, {}
    bar = tqdm(
        range(start + 1, steps + 1),
        initial=start,
        total=steps,
        desc=desc,
        disable=not progress or not hooks_here,
        **bar_kw,
    )
    # on_stop(step): CTRL-C writes a checkpoint after the current step and stops (interrupt.steps, exit 130);
    # agree(requested) -> bool: DDP hook 3, every process stops after the same step
    for step in interrupt.steps(bar, on_stop=on_stop, agree=agree) if on_stop is not None else bar:
        logs = step_fn(step)
        if reduce is not None:
            logs = reduce(logs)
        for key in finite:
            state.check_finite(logs[key], step, hint=hint)
        if postfix is not None and (step % postfix_every == 0 or step == steps):
            bar.set_postfix(postfix(logs))
        if not hooks_here:
            continue
        t_aside = time.perf_counter()
        if log is not None:
            log.log(step, **logs)
        for every, fn, at_end in hooks:
            if (every and step % every == 0) or (at_end and step == steps):
                fn(step)
        aside += time.perf_counter() - t_aside
    bar.close()
    seconds = time.perf_counter() - t0
    return {
        "steps": steps,
        "resumed_from": start,
        "seconds": seconds,
        "logs": logs,
        "s_per_step": (seconds - aside) / max(steps - start, 1),
    }
