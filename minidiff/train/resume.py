"""Resuming safely: a checkpoint's content checked against the run before anything is restored.

A checkpoint can read fine and still be wrong for this run: damaged metadata, an RNG state or an optimizer moment
of another size (an edited file, or one from another version), weights of another shape, or the settings of
another run. `state.load_checkpoint` runs every check here first and touches the modules, optimizers and RNGs
only when all of them pass; each failure is one TrainingError line that names the file and what differs.

Resuming with changed hyper-parameters is REFUSED, with the list of differences (`check_settings`): the continued
run would be neither the run that was started nor a fresh run with the new settings (the optimizer state and the
lr schedule carry the old ones, and finetune.py once silently kept the old lr while its manifest recorded the new
one). The number of steps and the flags that only decide what is written, validated or where it runs may change.
"""

import json
import random

import numpy as np
import torch

from ..errors import TrainingError


def parse_metadata(meta, file):
    """(step, state, extra) from a checkpoint's metadata strings; TrainingError when they do not parse."""
    try:
        step, state, extra = int(meta["step"]), json.loads(meta["state"]), json.loads(meta.get("extra") or "{}")
        if not all(isinstance(state.get(k), dict) for k in ("optim", "sched")) or "rng" not in state:
            raise ValueError("'state' lacks optim, sched or rng")
        if not isinstance(extra, dict):
            raise ValueError("'extra' is not a JSON object")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise TrainingError(
            f"checkpoint {file} is damaged: its metadata does not parse ({type(e).__name__}: {e}); "
            "resume from an earlier checkpoint"
        ) from None
    return step, state, extra


def check_module(sd, module, file, name):
    """Every key of `module` present in `sd` with the same shape (nothing else in `sd`)."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint {file} does not match module {name!r}: {len(missing)} keys missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    for key, value in expected.items():
        if tuple(sd[key].shape) != tuple(value.shape):
            raise TrainingError(
                f"checkpoint {file} does not fit module {name!r}: {key} has shape "
                f"{list(sd[key].shape)}, the model's {list(value.shape)} (another model or settings?)"
            )


def check_optimizer(sd, optimizer, file, name):
    """The saved state fits `optimizer`: as many parameters per group, and every per-parameter tensor (Adam's
    exp_avg, exp_avg_sq) of its parameter's shape. torch checks only the counts, and a wrong-size moment would
    crash at the first resumed step."""
    try:
        saved_groups, state = sd["param_groups"], sd["state"]
        ids = [[i for i in g["params"]] for g in saved_groups]
    except (KeyError, TypeError) as e:
        raise TrainingError(f"checkpoint {file}: optimizer state {name!r} is damaged ({e!r})") from None
    groups = [g["params"] for g in optimizer.param_groups]
    if [len(g) for g in ids] != [len(g) for g in groups]:
        raise TrainingError(
            f"checkpoint {file}: optimizer {name!r} holds {[len(g) for g in ids]} parameters per "
            f"group, this run trains {[len(g) for g in groups]} (other --rank/--targets/--train?)"
        )
    for saved, params in zip(ids, groups):
        for i, p in zip(saved, params):
            for key, value in (state.get(i) or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                    raise TrainingError(
                        f"checkpoint {file}: optimizer {name!r} state {key} of parameter {i} has "
                        f"shape {list(value.shape)}, the parameter {list(p.shape)} (damaged file)"
                    )


def check_rng(state, file):
    """The saved RNG states can be restored: torch's of the right size, numpy's and python's accepted by fresh
    generators (so the global ones are never left half set)."""
    try:
        torch_state = state["torch"]
        if torch_state.dtype != torch.uint8 or torch_state.numel() != torch.get_rng_state().numel():
            raise ValueError(
                f"torch state has {torch_state.numel()} {torch_state.dtype} values, expected "
                f"{torch.get_rng_state().numel()} uint8"
            )
        np.random.RandomState().set_state(state["numpy"])
        random.Random().setstate(state["python"])
        torch.Generator().set_state(torch_state)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise TrainingError(
            f"checkpoint {file}: its random-number state cannot be restored ({e}); resume from an earlier checkpoint"
        ) from None


def check_settings(saved, now, keys, file, allowed="--steps and the output, validation and device flags"):
    """TrainingError listing `--flag saved -> now` for each key in `keys` that changed (keys the checkpoint does
    not record, e.g. from an older version, are not compared)."""
    now = json.loads(json.dumps(now, default=str))  # tuples -> lists, paths -> str: as the checkpoint stores them
    changed = [
        f"--{k.replace('_', '-')} {saved[k]!r} -> {now.get(k)!r}" for k in keys if k in saved and saved[k] != now.get(k)
    ]
    if changed:
        raise TrainingError(
            f"checkpoint {file} was trained with other settings: {', '.join(changed)}. Resume with "
            f"the same ones (only {allowed} may change), or start a new run in another --out"
        )
