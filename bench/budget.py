"""The analytic side of docs/memory-budget.md: FLOPs of one UNet forward and the bytes a LoRA training step holds,
counted on the meta device (no weights, no RAM, seconds), for any latent size, batch and precision.

    python bench/budget.py --latent 128 --batch 1 --dtype fp16        # SDXL at 1024 px

FLOPs: torch.utils.flop_counter.FlopCounterMode counts every matmul, convolution and attention kernel the forward
dispatches (2 FLOPs per multiply-add). Memory:
    weights      every UNet tensor at the frozen dtype
    LoRA         A, B (fp32) + their gradients (fp32) + AdamW's exp_avg and exp_avg_sq (fp32): 16 bytes / parameter
    activations  what autograd saves for backward, found with torch.autograd.graph.saved_tensors_hooks:
                 without checkpointing: every saved tensor of the forward (unique tensors);
                 with checkpointing: what is saved outside the checkpointed blocks + each checkpointed block's inputs
                 (kept for the recomputation) + the largest single block's saved tensors (alive while that block is
                 recomputed during backward)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minidiff.lora import inject_lora, lora_parameters  # noqa: E402
from minidiff.unet import BasicTransformerBlock, ResnetBlock2D, UNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GB = 2**30


def meta_unet(config: str, dtype, lora_rank=4):
    with torch.device("meta"):
        unet = UNet(getattr(UNetConfig, config)()).to(dtype)
        if lora_rank:
            inject_lora(unet, targets="attn", rank=lora_rank)
            for p in lora_parameters(unet):  # under autocast the LoRA matmuls run in the half dtype too
                p.data = p.data.to(dtype)
    return unet


def meta_inputs(cfg, batch, latent, dtype):
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    with torch.device("meta"):
        return (
            torch.randn(batch, cfg.in_channels, latent, latent, dtype=dtype),
            torch.full((batch,), 500),
            torch.randn(batch, 77, cfg.cross_attention_dim, dtype=dtype),
            torch.randn(batch, pooled, dtype=dtype),
            torch.randn(batch, 6, dtype=dtype),
        )


def forward_flops(config="sdxl", latent=128, batch=1) -> dict:
    """FLOPs of one forward (no LoRA), total and by aten op."""
    unet = meta_unet(config, torch.float32, lora_rank=0)
    x, t, ctx, pooled, ids = meta_inputs(unet.config, batch, latent, torch.float32)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, t, context=ctx, text_embeds=pooled, time_ids=ids)
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": counter.get_total_flops(), "by_op": by_op}


# Ops that only reinterpret a tensor's shape or strides: no kernel runs for them on a GPU.
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "reshape",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "alias",
    "detach",
    "as_strided",
    "split",
    "chunk",
    "unbind",
    "split_with_sizes",
    "lift_fresh",
    "_reshape_alias",
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run while active, views excluded: about the number of GPU kernel launches, whose
    fixed cost (~5 us each) is what a fast GPU sees of Python-level overhead once the matmuls take milliseconds."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.counts.values())


def _nbytes(t):
    return t.numel() * t.element_size()


class SavedBytes:
    """Sum of the bytes of the distinct tensors autograd saves while active, weights (and views of them) excluded:
    those are counted once, as weights."""

    def __init__(self, model):
        self.seen, self.total = set(), 0
        self.params = {id(p) for p in model.parameters()}

    def pack(self, t):
        is_weight = id(t) in self.params or (t._base is not None and id(t._base) in self.params)
        if not is_weight and id(t) not in self.seen:
            self.seen.add(id(t))
            self.total += _nbytes(t)
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


class _SavesLikeAFusedKernel(torch.autograd.Function):
    """Attention whose backward keeps q, k, v, out and a [B, heads, N] fp32 logsumexp, as the memory-efficient and
    flash SDPA kernels do on a GPU (the math path that runs on meta keeps the [B, heads, N, N] probabilities)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = _SDPA(q, k, v)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fused_sdpa(q, k, v, *args, **kwargs):
    return _SavesLikeAFusedKernel.apply(q, k, v)


def activation_bytes(
    config="sdxl", latent=128, batch=1, dtype=torch.float16, checkpointing=True, lora_rank=4, fused_attention=True
):
    """Bytes autograd keeps for backward (module docstring). fused_attention: count attention as the GPU's
    memory-efficient kernel stores it (what runs on a P100 / T4), else as the math path does."""
    if fused_attention:
        torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
        try:
            return activation_bytes(config, latent, batch, dtype, checkpointing, lora_rank, fused_attention=False)
        finally:
            torch.nn.functional.scaled_dot_product_attention = _SDPA
    unet = meta_unet(config, dtype, lora_rank)
    unet.enable_gradient_checkpointing(checkpointing)
    x, t, ctx, pooled, ids = meta_inputs(unet.config, batch, latent, dtype)
    block_inputs, seen = 0, set()

    def pre_hook(module, args):
        nonlocal block_inputs
        for a in args:
            if isinstance(a, torch.Tensor) and id(a) not in seen:
                seen.add(id(a))
                block_inputs += _nbytes(a)

    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    handles = [m.register_forward_pre_hook(pre_hook) for m in blocks] if checkpointing else []
    with SavedBytes(unet) as saved:
        unet(x, t, context=ctx, text_embeds=pooled, time_ids=ids)
    for h in handles:
        h.remove()
    out = {"saved_outside_blocks": saved.total, "block_inputs": block_inputs if checkpointing else 0}
    if checkpointing:  # the largest block's own saved tensors, alive while it is recomputed in backward
        unet.enable_gradient_checkpointing(False)
        sizes = {}

        def wrap(module):
            orig = module.forward

            def fwd(*args, **kw):
                with SavedBytes(unet) as s:
                    y = orig(*args, **kw)
                sizes[id(module)] = max(sizes.get(id(module), 0), s.total)
                return y

            module.forward = fwd

        for m in blocks:
            wrap(m)
        unet(x, t, context=ctx, text_embeds=pooled, time_ids=ids)
        largest = max(sizes.values())
        out["largest_block_recompute"] = largest
        out["total"] = out["saved_outside_blocks"] + block_inputs + largest
    else:
        out["total"] = saved.total
    return out


def budget(config="sdxl", latent=128, batch=1, dtype="fp16", lora_rank=4) -> dict:
    d = DTYPES[dtype]
    unet = meta_unet(config, d, lora_rank)
    n_lora = sum(p.numel() for p in lora_parameters(unet)) if lora_rank else 0
    n_all = sum(p.numel() for p in unet.parameters())
    n_frozen = n_all - n_lora
    return {
        "config": config,
        "latent": latent,
        "batch": batch,
        "dtype": dtype,
        "params_frozen": n_frozen,
        "params_lora": n_lora,
        "weights_gb": n_frozen * d.itemsize / GB,
        "lora_train_state_gb": n_lora * 16 / GB,  # fp32 param + grad + AdamW m, v
        "activations_ckpt_gb": {
            k: v / GB for k, v in activation_bytes(config, latent, batch, d, True, lora_rank).items()
        },
        "activations_no_ckpt_gb": activation_bytes(config, latent, batch, d, False, lora_rank)["total"] / GB,
        "activations_ckpt_math_attention_gb": activation_bytes(
            config, latent, batch, d, True, lora_rank, fused_attention=False
        )["total"]
        / GB,
        "activations_no_ckpt_math_attention_gb": activation_bytes(
            config, latent, batch, d, False, lora_rank, fused_attention=False
        )["total"]
        / GB,
        "forward_tflop": forward_flops(config, latent, batch)["total"] / 1e12,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="sdxl")
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--rank", type=int, default=4)
    a = p.parse_args(argv)
    r = budget(a.config, a.latent, a.batch, a.dtype, a.rank)
    print(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
