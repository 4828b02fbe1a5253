"""Peak CUDA memory without a GPU: run the real code on fake CUDA tensors and count what the allocator would hold.

    with fake_cuda() as mode, PeakTracker() as mem:
        unet = fake_module(build(), mode)        # shapes, dtypes and devices, no data, no RAM
        mem.adopt(unet)                          # the weights are resident before the step starts
        step()                                   # forward, backward, optimizer: the code finetune.py runs
    mem.peak                                     # bytes: what torch.cuda.max_memory_allocated() would report

The tracker is a TorchDispatchMode: every aten op's output storage that is new is added, rounded up to the CUDA
caching allocator's 512-byte block size (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize), and subtracted when its
last reference dies (a weakref finalizer on the untyped storage). Views and in-place results share a storage that
is already counted. `max_memory_allocated` counts exactly these blocks; what a real GPU adds on top (allocator
segments and fragmentation, cuBLAS/cuDNN workspaces, the CUDA context) is not allocated through it and is stated in
docs/memory-budget.md.

Running CUDA code on fake tensors on a machine without a GPU needs five adjustments (`fake_cuda`):
  - the autograd engine records each tensor's device when the graph is built and, for CUDA, stashes the streams of
    a device that does not exist ("hasPrimaryContext expects a valid device index", pytorch#92627): the C++
    `device()` query (prim.device) answers CPU, so the backward runs single-threaded on the caller's thread, while
    Python code still sees CUDA (`.device`, the fake device);
  - autocast("cuda") switches itself off when no GPU is present (its availability check is bypassed), and its C++
    kernels ask the same `device()` whether a tensor is CUDA: so CUDA autocast's casting policy is applied one level
    up, by `CudaAutocast` (a TorchFunctionMode reading torch.is_autocast_enabled("cuda"), which checkpoint
    recomputation re-enters as on a GPU, the mode itself being re-entered there through checkpoint's recompute
    context): fp16 for matmuls and convolutions, fp32 for norms, softmax, reductions
    and losses (the op lists of the CUDA AMP documentation), casts of leaf tensors that need a gradient cached
    until autocast exits, as autocast caches them;
  - on fake CUDA tensors F.scaled_dot_product_attention takes the math path (fp32 scores, the full [N, N] matrix),
    which no GPU of ours runs: the memory-efficient kernel (what a P100 / T4 runs; flash on sm_80+ keeps the same
    out + logsumexp) is called directly;
  - the optimizers read their step count with `.item()`, which fake tensors cannot answer: it reads 1.
Two ways to run: `fake_cuda` (FakeTensors on device "cuda", the adjustments above) and `meta_cuda` (meta tensors,
CudaAutocast and the efficient attention only: the same bytes, 5.498 GiB for both on the SDXL LoRA step, at about
half the time; memory_plan.py uses it). memory_plan.simulate(cpu=True) runs the same tracker on real CPU tensors,
where nothing is faked: the two must agree (tests/test_memsim.py).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

BLOCK = 512  # bytes: the CUDA caching allocator rounds every block up to a multiple of this
GIB = 2**30


def rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class PeakTracker(TorchDispatchMode):
    """Bytes alive now and at the peak, counted per storage (module docstring). `phase(name)` starts a new phase;
    `peaks` holds the peak reached during each."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.peaks, self.current = {}, 0, 0, {}, "start"

    def add(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        n = rounded(storage.nbytes())
        self.live[key] = n
        weakref.finalize(storage, self._free, key)
        self.now += n
        if self.now > self.peak:
            self.peak = self.now
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), self.now)

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def adopt(self, *things):
        """Count tensors that exist already (a model's weights, inputs made before tracking started)."""
        for thing in things:
            tensors = [*thing.parameters(), *thing.buffers()] if isinstance(thing, torch.nn.Module) else [thing]
            for t in tensors:
                self.add(t)

    def phase(self, name: str):
        self.current = name
        self.peaks[name] = max(self.peaks.get(name, 0), self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    def gib(self) -> dict:
        return {"peak": self.peak / GIB, **{k: v / GIB for k, v in self.peaks.items()}}


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# ------------------------------------------------------------------------------------------ fake CUDA, no GPU
# CUDA autocast's op lists (docs: "Automatic Mixed Precision package", CUDA Op-Specific Behavior), by function name.
TO_HALF = {
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "linear",
    "matmul",
    "__matmul__",
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "addbmm",
    "addmv",
    "addr",
    "mv",
    "einsum",
    "prelu",
    "chain_matmul",
}
TO_FLOAT = {
    "layer_norm",
    "group_norm",
    "softmax",
    "log_softmax",
    "softmin",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "cross_entropy",
    "nll_loss",
    "kl_div",
    "exp",
    "expm1",
    "log",
    "log2",
    "log10",
    "log1p",
    "pow",
    "__pow__",
    "__rpow__",
    "rsqrt",
    "reciprocal",
    "sum",
    "prod",
    "cumsum",
    "cumprod",
    "norm",
    "normalize",
    "softplus",
    "cosine_similarity",
    "binary_cross_entropy_with_logits",
    "cdist",
    "dist",
    "erfinv",
    "acos",
    "asin",
    "cosh",
    "sinh",
    "tan",
    "__rdiv__",
    "__rtruediv__",
    "renorm",
}


class CudaAutocast(TorchFunctionMode):
    """torch.autocast("cuda")'s casting, done at the Python level (module docstring): while autocast is enabled
    for CUDA, the floating tensor arguments of a TO_HALF op are cast to the autocast dtype, of a TO_FLOAT op to
    fp32; a cast of a leaf that requires grad is kept until autocast is switched off (autocast's weight cache)."""

    def __init__(self):
        super().__init__()
        self.cache = {}

    def _cast(self, a, dtype):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()) or a.dtype in (dtype, torch.float64):
            return a
        if a.is_leaf and a.requires_grad:
            key = (id(a), dtype)
            if key not in self.cache:
                self.cache[key] = (a, a.to(dtype))
            return self.cache[key][1]
        return a.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cuda"):
            self.cache.clear()
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        dtype = torch.get_autocast_dtype("cuda") if name in TO_HALF else torch.float32 if name in TO_FLOAT else None
        if dtype is not None:
            args, kwargs = tree_map(lambda a: self._cast(a, dtype), (args, kwargs))
        return func(*args, **kwargs)


def efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as the memory-efficient CUDA kernel computes it: out [B, H, N, d] and, when a
    gradient is needed, a [B, H, N] fp32 logsumexp; never the [N, N] matrix. Autocast does not see this aten op, so
    the inputs are cast to the autocast dtype here, as autocast does for the public function."""
    if torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        attn_mask = attn_mask.to(dt) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel takes an additive bias
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -1e4)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale
    )[0]


class KeepOnCuda(TorchDispatchMode):
    """The other side of showing the engine CPU: where a backward formula takes its output's device from the
    recorded (CPU) metadata (the backward of a cast, zeros for a missing gradient), the output goes to CUDA, where
    the forward's tensor was."""

    FACTORIES = {"empty", "zeros", "ones", "full", "empty_strided", "scalar_tensor", "new_zeros", "new_empty"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":
            name = func.overloadpacket.__name__
            moved = (
                name == "_to_copy"
                and _is_fake(args[0])
                and args[0].fake_device.type == "cuda"
                or name in self.FACTORIES
                and torch._C._current_graph_task_id() != -1
            )
            if moved:
                kwargs = dict(kwargs, device=torch.device("cuda", 0))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """A FakeTensorMode in which CUDA code runs as on a GPU (module docstring); yields the mode."""
    import torch._subclasses.fake_tensor as ft
    import torch.cuda.amp.common as amp_common
    import torch.optim.adam as adam
    import torch.utils.checkpoint as ckpt
    from torch._subclasses.fake_tensor import FakeTensorMode

    device_op = torch.ops.prim.device.default
    saved = (
        amp_common.amp_definitely_not_available,
        ft._DISPATCH_META_HANDLERS[device_op],
        F.scaled_dot_product_attention,
        adam._get_value,
        torch.cuda.is_bf16_supported,
        ckpt._checkpoint_without_reentrant_generator_impl,
    )

    def checkpoint_impl(fn, args, kwargs, **options):  # the autograd engine does not carry Python modes into backward
        options["context_fn"] = lambda: (contextlib.nullcontext(), CudaAutocast())
        return saved[5](fn, args, kwargs, **options)

    ckpt._checkpoint_without_reentrant_generator_impl = checkpoint_impl
    amp_common.amp_definitely_not_available = lambda: False
    ft._DISPATCH_META_HANDLERS[device_op] = lambda args: torch.device("cpu")  # what the autograd engine sees
    F.scaled_dot_product_attention = efficient_attention
    adam._get_value = lambda x: 1.0 if _is_fake(x) else saved[3](x)
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode, KeepOnCuda(), CudaAutocast():
            yield mode
    finally:
        (
            amp_common.amp_definitely_not_available,
            ft._DISPATCH_META_HANDLERS[device_op],
            F.scaled_dot_product_attention,
            adam._get_value,
            torch.cuda.is_bf16_supported,
            ckpt._checkpoint_without_reentrant_generator_impl,
        ) = saved


def fake_module(module: torch.nn.Module, mode, device="cuda") -> torch.nn.Module:
    """Replace every parameter and buffer of a module built on the meta device by a fake tensor on `device`
    (same shape, dtype and requires_grad; shared tensors stay shared)."""
    from torch._subclasses.fake_tensor import FakeTensor

    done = {}
    for m in module.modules():
        for table, is_param in ((m._parameters, True), (m._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in done:
                    f = FakeTensor(mode, t.data if t.is_meta else t.data.to("meta"), torch.device(device))
                    done[id(t)] = torch.nn.Parameter(f, requires_grad=t.requires_grad) if is_param else f
                table[name] = done[id(t)]
    return module


def fake_like(mode, shape, dtype=torch.float32, device="cuda"):
    """A fake tensor of this shape and dtype (an input: latents, text states)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), torch.device(device))


@contextlib.contextmanager
def meta_cuda():
    """CUDA as the meta device sees it: tensors are meta (shapes and dtypes, C++ kernels, fast), autocast("cuda") is
    CudaAutocast's, and torch.is_autocast_enabled asked about "meta" answers for CUDA (so code that asks about its
    tensors' device type, like LoRALinear, behaves as on a GPU)."""
    import torch.utils.checkpoint as ckpt

    saved = (
        torch.is_autocast_enabled,
        F.scaled_dot_product_attention,
        ckpt._checkpoint_without_reentrant_generator_impl,
    )
    is_enabled = saved[0]

    def enabled(device_type=None):
        if device_type is None:
            return is_enabled()
        return is_enabled("cuda" if str(device_type) == "meta" else device_type)

    def checkpoint_impl(fn, args, kwargs, **options):  # recomputation under the forward's autocast state
        state = (is_enabled("cuda"), torch.get_autocast_dtype("cuda"))

        @contextlib.contextmanager
        def recompute():
            with torch.autocast("cuda", dtype=state[1], enabled=state[0]), CudaAutocast():
                yield

        options["context_fn"] = lambda: (contextlib.nullcontext(), recompute())
        return saved[2](fn, args, kwargs, **options)

    import torch.cuda.amp.common as amp_common

    not_available = amp_common.amp_definitely_not_available
    amp_common.amp_definitely_not_available = lambda: False
    torch.is_autocast_enabled = enabled
    F.scaled_dot_product_attention = efficient_attention
    ckpt._checkpoint_without_reentrant_generator_impl = checkpoint_impl
    try:
        with CudaAutocast():
            yield None
    finally:
        torch.is_autocast_enabled, F.scaled_dot_product_attention, ckpt._checkpoint_without_reentrant_generator_impl = (
            saved
        )
        amp_common.amp_definitely_not_available = not_available
