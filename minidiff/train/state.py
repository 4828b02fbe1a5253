"""What every training loop shares: seeds, EMA, atomic checkpoints and resume, the NaN check, the loss log.
(Devices, precision and GPU checks: minidiff/train/hardware.py.)

A checkpoint is ONE safetensors file, `<out>/checkpoints/step-000500.safetensors`, holding everything needed to
continue bit for bit as if the run had never stopped:

    module.<name>.<key>               the weights of each module (its state_dict)
    optim.<name>.state.<idx>.<key>    optimizer state tensors (Adam's exp_avg, exp_avg_sq, step)
    sched.<name>...., rng.torch, rng.cuda.<i>, rng.numpy.1   any other tensor, named by where it sits

Everything that is not a tensor (param_groups, scheduler counters, python's random state, the step, the user's
`extra` dict) is JSON in the file's metadata, with {"__tensor__": key} where a tensor was. Nothing is pickled, so
loading a checkpoint can never run code. Writes go to `path.tmp` first and are moved over with `os.replace`, so a
crash mid-save leaves the previous checkpoint intact; `checkpoints/latest.txt` names the newest one.
"""

import copy
import csv
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .. import io
from ..errors import TrainingError
from ..images import plot_curves
from . import resume as checks

FORMAT = "minidiff-checkpoint"
NAN_HINT = "fp16 overflow? try --mixed-precision bf16/no or a lower lr"


def seed_all(seed):
    """Seed python's random, numpy and torch (CPU and every GPU): same seed -> same run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's weights (Polyak averaging; DDPM, Ho et al. 2020, uses 0.9999).

    After every optimizer step, for each parameter p of the model and its shadow copy p_ema:

        p_ema <- decay * p_ema + (1 - decay) * p

    so p_ema averages about the last 1 / (1 - decay) steps. Buffers (e.g. BatchNorm statistics) are copied, not
    averaged. `.module` is the shadow model (eval mode, no grad); pass it to `save_checkpoint` like any module.
    """

    def __init__(self, model, decay=0.9999):
        if not 0.0 <= decay <= 1.0:
            raise TrainingError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        shadow = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            shadow[name].mul_(self.decay).add_(p.detach().to(shadow[name].dtype), alpha=1 - self.decay)
        buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            buffers[name].copy_(b)

    @torch.no_grad()
    def copy_to(self, model):
        """Load the averaged weights into `model` (e.g. before sampling or saving the final weights)."""
        model.load_state_dict(self.module.state_dict())

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        return self.module.load_state_dict(state_dict)


class Trainable:
    """Checkpoint only the parameters that train (e.g. the LoRA weights inside a frozen 2.6 B-param UNet):
    pass `Trainable(unet)` instead of `unet` in `modules` of save_checkpoint / load_checkpoint."""

    def __init__(self, module):
        self.module = module

    def state_dict(self):
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        params = dict(self.module.named_parameters())
        for name, value in state_dict.items():
            params[name].copy_(value)


def check_finite(loss, step, hint=NAN_HINT):
    """TrainingError when the loss is NaN or inf, naming the step (the run would only produce noise from here)."""
    value = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    if not torch.isfinite(value).all():
        what = "NaN" if torch.isnan(value).any() else "inf"
        raise TrainingError(f"loss became {what} at step {step}" + (f" ({hint})" if hint else ""))


# ----------------------------------------------------------------------------------------------- state <-> JSON
def _encode(obj, key, tensors):
    """A state tree -> JSON; each tensor goes to tensors[key] and is replaced by {"__tensor__": key}."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):  # numpy's MT19937 key is uint32, which safetensors cannot hold: keep as int64
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}  # int keys
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):  # e.g. an lr lambda: code is not state, the caller rebuilds it
        return None
    raise TrainingError(f"cannot store a {type(obj).__name__} ({key}) in a checkpoint")


def _decode(obj, tensors):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------- checkpoints
def _step_of(path):
    m = re.fullmatch(r"step-(\d+)\.safetensors", path.name)
    return int(m.group(1)) if m else -1


def save_checkpoint(out_dir, step, modules, optimizers, schedulers=None, extra=None, keep_last=None):
    """Write <out_dir>/checkpoints/step-XXXXXX.safetensors (atomic) and point checkpoints/latest.txt at it.

    modules / optimizers / schedulers: {name: object with state_dict()}. extra: a JSON-able dict returned by
    load_checkpoint (e.g. the epoch, the args). keep_last: delete all but the newest N checkpoints. Returns the path.
    """
    tensors = {}
    for name, module in modules.items():
        if "." in name:
            raise TrainingError(f"module name {name!r} must not contain '.'")
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value
    state = {
        "optim": {n: _encode(o.state_dict(), f"optim.{n}", tensors) for n, o in optimizers.items()},
        "sched": {n: _encode(s.state_dict(), f"sched.{n}", tensors) for n, s in (schedulers or {}).items()},
        "rng": _encode(rng_state(), "rng", tensors),
    }
    try:
        extra_json = json.dumps(extra or {})
    except (TypeError, ValueError) as e:
        raise TrainingError(f"checkpoint 'extra' must be JSON-serializable: {e}") from None
    metadata = {
        "format": FORMAT,
        "step": str(int(step)),
        "modules": json.dumps(sorted(modules)),
        "state": json.dumps(state),
        "extra": extra_json,
    }
    ckpt_dir = Path(out_dir) / "checkpoints"
    path = io.save_safetensors(tensors, ckpt_dir / f"step-{int(step):06d}.safetensors", metadata)
    io.write_text(path.name + "\n", ckpt_dir / "latest.txt")
    if keep_last:
        for old in sorted(ckpt_dir.glob("step-*.safetensors"), key=_step_of)[: -int(keep_last)]:
            if old != path:
                old.unlink()
    return path


def find_checkpoint(path, out_dir=None):
    """A checkpoint file, an out dir (its newest checkpoint), its checkpoints/ dir, or "latest" (in out_dir)."""
    if str(path) == "latest" and out_dir is not None:
        path = out_dir
    p = Path(path)
    if p.is_file():
        return p
    if p.name == "latest" and not p.exists():
        p = p.parent
    if not p.is_dir():
        raise TrainingError(f"checkpoint not found: {path} (expected a step-*.safetensors file or an output folder)")
    for d in (p / "checkpoints", p):
        latest = d / "latest.txt"
        if latest.is_file() and (d / latest.read_text().strip()).is_file():
            return d / latest.read_text().strip()
        files = sorted(d.glob("step-*.safetensors"), key=_step_of)
        if files:
            return files[-1]
    raise TrainingError(f"nothing to resume from in {p}: no checkpoints/step-*.safetensors there")


def load_checkpoint(path, modules, optimizers=None, schedulers=None, out_dir=None, restore_rng=True):
    """Restore modules, optimizers, schedulers and RNG states in place from a save_checkpoint file.

    path: a file, an out dir, or "latest" (relative to out_dir, default the current folder). Returns (step, extra).
    """
    file = find_checkpoint(path, out_dir)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise TrainingError(f"{file} is not a minidiff training checkpoint (no format={FORMAT} metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except TrainingError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise TrainingError(f"cannot read checkpoint {file}: {e}") from None
    step, state, extra = checks.parse_metadata(meta, file)

    # every check first (resume.py), so a checkpoint that does not fit changes nothing
    module_sds = {}
    for name, module in modules.items():
        prefix = f"module.{name}."
        module_sds[name] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not module_sds[name]:
            raise TrainingError(f"checkpoint {file} has no module {name!r} (it has: {meta.get('modules')})")
        checks.check_module(module_sds[name], module, file, name)
    states = []
    for kind, objects in (("optim", optimizers or {}), ("sched", schedulers or {})):
        for name, obj in objects.items():
            if name not in state[kind]:
                raise TrainingError(f"checkpoint {file} has no {kind} state {name!r} (it has {sorted(state[kind])})")
            try:
                sd = _decode(state[kind][name], tensors)
            except (KeyError, TypeError, ValueError) as e:
                raise TrainingError(f"checkpoint {file}: {kind} state {name!r} is damaged ({e!r})") from None
            if kind == "optim":
                checks.check_optimizer(sd, obj, file, name)
            states.append((kind, name, obj, sd))
    if restore_rng:
        try:
            rng = _decode(state["rng"], tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TrainingError(f"checkpoint {file}: its random-number state is damaged ({e!r})") from None
        checks.check_rng(rng, file)

    for name, module in modules.items():
        try:
            module.load_state_dict(module_sds[name])
        except RuntimeError as e:
            raise TrainingError(f"checkpoint {file} does not fit module {name!r}: {str(e).splitlines()[-1]}") from None
    for kind, name, obj, sd in states:
        try:
            obj.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainingError(f"checkpoint {file}: {kind} state {name!r} does not fit: {e}") from None
    if restore_rng:
        set_rng_state(rng)
    return step, extra


def checkpoint_extra(path, out_dir=None):
    """(file, step, extra) of a checkpoint from its metadata alone (no tensors read): what a script compares with
    its settings before it loads a model (resume.check_settings)."""
    file = find_checkpoint(path, out_dir)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise TrainingError(f"cannot read checkpoint {file}: {e}") from None
    if meta.get("format") != FORMAT:
        raise TrainingError(f"{file} is not a minidiff training checkpoint (no format={FORMAT} metadata)")
    step, _, extra = checks.parse_metadata(meta, file)
    return file, step, extra


# ----------------------------------------------------------------------------------------------- loss log
class LossLog:
    """<out_dir>/loss.csv (header `step,<names>`, one row per log call) and its plot <out_dir>/loss.png.

    A fresh run starts a new file; resume_step=N keeps the rows with step <= N and drops the rest (those steps
    will be trained again), so a resumed run's log reads as if it had never stopped.
    """

    def __init__(self, out_dir, resume_step=None):
        self.path = Path(out_dir) / "loss.csv"
        self.png = Path(out_dir) / "loss.png"
        self.names, self.rows = [], []  # rows: [(step, {name: value})]
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, ["step"])
                self.names = header[1:]
                for row in reader:
                    if row and int(float(row[0])) <= resume_step:
                        self.rows.append((int(float(row[0])), {n: float(v) for n, v in zip(self.names, row[1:]) if v}))
        self._rewrite()

    def _line(self, step, values):
        return ",".join([str(step)] + [format(values[n], ".7g") if n in values else "" for n in self.names]) + "\n"

    def _rewrite(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = ",".join(["step"] + self.names) + "\n" + "".join(self._line(s, v) for s, v in self.rows)
        io.write_text(text, self.path)

    def log(self, step, **values):
        """Append one row, e.g. log(100, loss=0.12, lr=1e-4); values may be 0-dim tensors."""
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self.rows.append((int(step), values))
        new = [k for k in values if k not in self.names]
        if new:
            self.names += new
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(self._line(int(step), values))

    def series(self):
        """{name: [(step, value), ...]} of every column (NaN / inf left out)."""
        return {n: [(s, v[n]) for s, v in self.rows if n in v and math.isfinite(v[n])] for n in self.names}

    def plot(self, title="training loss", path=None, names=None):
        """Draw loss.png: the columns in `names`, default all but learning rates (lr*), which have another scale."""
        series = {n: v for n, v in self.series().items() if (n in names if names else not n.startswith("lr"))}
        return plot_curves(series, path or self.png, title=title)
