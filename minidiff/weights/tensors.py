"""Weights files read lazily (`Tensors`: one safetensors file or a sharded set) and modules filled from them with
every key and shape checked first (`fill`), built on the meta device so nothing is allocated twice (`on_meta`).
pretrained.py (UNet, VAE, text encoders, pipelines) and controlnet_files.py read their files through these."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .layouts import View


# --------------------------------------------------------------------------------------------------------- files
class Tensors:
    """The tensors of one safetensors file, or of a sharded set (`*.safetensors.index.json`), read lazily."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no such file: {path}")
        files = [path]
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: not a safetensors index (expected a 'weight_map'): {e}") from None
            files = [path.parent / f for f in dict.fromkeys(weight_map.values())]
        elif path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors files are read (no pickled .ckpt/.bin/.pt)")
        self.path, self.handles, self.where = path, {}, {}
        for f in files:
            try:
                self.handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except FileNotFoundError:
                raise CheckpointError(f"missing shard {f} (listed in {path})") from None
            except Exception as e:  # SafetensorError: truncated download, not a safetensors file, ...
                raise CheckpointError(f"cannot read {f}: truncated or not a safetensors file ({e})") from None
            self.where.update({k: f for k in self.handles[f].keys()})

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key) -> list[int]:
        return self.handles[self.where[key]].get_slice(key).get_shape()

    def get(self, key, rows=None) -> torch.Tensor:
        """The tensor `key`, or only its rows [a:b] (read from disk without the other rows)."""
        f = self.handles[self.where[key]]
        try:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0] : rows[1]]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key} from {self.where[key]}: {e}") from None


# --------------------------------------------------------------------------------------------- building modules
def on_meta(make):
    """Build a module without allocating or initialising its weights (`fill` assigns them)."""
    with torch.device("meta"):
        return make()


def fill(module, plan, view: View, dtype=None, device="cpu", what="model", unknown=()):
    """Fill `module` (built on the meta device) from plan {module key: (file key, reshape)}. Every key and shape
    is checked first; then each tensor is read, cast to `dtype` (None: as stored), moved to `device`, assigned."""
    want = module.state_dict()
    missing = [k for k in want if k not in plan]
    unexpected = list(unknown) + [src for k, (src, _) in plan.items() if k not in want]
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: the weights do not fit the model: {len(missing)} missing, "
            f"{len(unexpected)} unexpected; first missing {missing[:3]}, first unexpected "
            f"{unexpected[:3]}"
        )
    for k, (src, how) in plan.items():
        if view.shape(src, how) != list(want[k].shape):
            raise CheckpointError(
                f"{what}: {src} has shape {view.shape(src, how)} but the model's {k} is "
                f"{list(want[k].shape)} (weights of another size or architecture)"
            )
    state = {}
    for k, (src, how) in plan.items():
        t = view.get(src, how)
        state[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    module.load_state_dict(state, assign=True)
    for name, buf in list(module.named_buffers()):  # buffers no file stores (CLIP's position_ids)
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            if leaf != "position_ids":
                raise CheckpointError(f"{what}: buffer {name} is not in the file")
            module.get_submodule(owner)._buffers[leaf] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
    return module.eval()
