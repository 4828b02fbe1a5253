"""Where a run happens: the device, the mixed precision it can use, whether this PyTorch has kernels for the GPU, and
the peak memory of each phase of a run. Every script goes through these, so a P100, a T4, an H100 and the CPU
are told apart in one place.
"""

import re
from pathlib import Path

import torch

from ..errors import MinidiffError, TrainingError


def _native_bf16(device):
    if torch.cuda.get_device_capability(device)[0] < 8:  # bf16 tensor cores arrived with Ampere (sm_80)
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def resolve_precision(mode, device):
    """--mixed-precision auto|bf16|fp16|no -> (autocast dtype or None, use a GradScaler).

    auto: bf16 on GPUs with native bf16 (sm_80+), else fp16 + GradScaler (P100 sm_60, T4 sm_75); none on CPU.
    fp16 needs the GradScaler: gradients below ~6e-8 flush to zero in fp16, so the loss is scaled up first.
    """
    mode = {"fp32": "no", "none": "no", "float16": "fp16", "bfloat16": "bf16"}.get(str(mode).lower(), str(mode).lower())
    if mode not in ("auto", "bf16", "fp16", "no"):
        raise TrainingError(f"mixed precision must be auto, bf16, fp16 or no, got {mode!r}")
    device = torch.device(device)
    if mode == "no":
        return None, False
    if device.type != "cuda":
        if mode == "fp16":
            raise TrainingError(f"fp16 mixed precision needs a CUDA GPU; on {device.type} use bf16 or no")
        return (torch.bfloat16, False) if mode == "bf16" else (None, False)
    bf16 = _native_bf16(device)
    if mode == "bf16" and not bf16:
        major, minor = torch.cuda.get_device_capability(device)
        raise TrainingError(f"this GPU (sm_{major}{minor}) has no native bf16; use --mixed-precision fp16 or no")
    if mode == "bf16" or (mode == "auto" and bf16):
        return torch.bfloat16, False
    return torch.float16, True


def _arch_runs(arch, major, minor):
    """Can code built for `arch` (from torch.cuda.get_arch_list()) run on a GPU of capability major.minor?"""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
    if m is None:
        return False
    kind, a_major, a_minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if suffix:  # sm_90a etc.: arch-specific features, that exact GPU only
        return (a_major, a_minor) == (major, minor)
    if kind == "sm":  # a cubin runs on the same major version with an equal or higher minor
        return a_major == major and a_minor <= minor
    return (a_major, a_minor) <= (major, minor)  # PTX is compiled on the fly for any newer GPU


def resolve_device(name=None) -> torch.device:
    """--device: None -> cuda when this PyTorch sees a GPU, else cpu; a name it cannot use -> one-line MinidiffError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MinidiffError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinidiffError(f"--device {name}: this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda") and not (device.type == "mps" and torch.backends.mps.is_available()):
        raise MinidiffError(f"--device must be cpu, cuda or cuda:N (or mps on a Mac), got {name!r}")
    return device


def check_gpu(device=None):
    """Fail clearly, before training starts, when this PyTorch has no CUDA kernels for the GPU.

    Kaggle's default image ships a torch built for cu128 whose arch list starts at sm_70, while Kaggle still hands
    out Tesla P100s (sm_60): torch.cuda.is_available() is True and then every CUDA op dies with "no kernel image is
    available" (Kaggle/docker-python#1546, Kaggle/kaggle-cli#1151). Two fixes: a torch build that still ships sm_60
    kernels (the cu126 wheels), or the T4 accelerator.
    """
    if not torch.cuda.is_available():
        return
    index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    archs = torch.cuda.get_arch_list()
    if not archs or any(_arch_runs(a, major, minor) for a in archs):
        return
    raise TrainingError(
        f"this PyTorch {torch.__version__} has no CUDA kernels for {torch.cuda.get_device_name(index)} "
        f"(sm_{major}{minor}; it was built for {' '.join(archs)}). Fix: install a PyTorch build that still has "
        f"sm_{major}{minor} kernels (pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126)"
        f", or on Kaggle switch the accelerator to the T4 (Settings > Accelerator > GPU T4 x2)"
    )


class PeakMemory:
    """Peak memory per phase of a run, in GiB: on a GPU torch.cuda.max_memory_allocated, on the CPU the process's
    peak resident set (VmHWM, Linux), each since the previous phase ended (the high-water mark is reset at each end:
    torch.cuda.reset_peak_memory_stats, or writing 5 to /proc/self/clear_refs). Where neither exists: nothing.

        peaks = PeakMemory(device); load(); peaks.end("load"); train(); peaks.end("train")
        on_save = peaks.around("save", save)   # save's own peak, apart from the training around it
    """

    def __init__(self, device):
        self.device, self.gib = torch.device(device), {}
        what = "GPU memory allocated" if self.device.type == "cuda" else "resident set (RSS)"
        self.what = what if self._reset() else None  # None: this machine cannot reset its high-water mark

    def _reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: reset VmHWM to the current resident set
            return True
        except OSError:
            return False

    def _peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB

    def end(self, phase):
        if self.what is not None:
            self.gib[phase] = round(max(self.gib.get(phase, 0.0), self._peak()), 3)
            self._reset()

    def around(self, phase, fn, before="train"):
        """fn, wrapped: what ran before it counts for `before`, fn itself for `phase`."""

        def wrapped(*args, **kwargs):
            self.end(before)
            result = fn(*args, **kwargs)
            self.end(phase)
            return result

        return wrapped


def free_memory(device):
    """Bytes free on `device`: the GPU's free memory, or on the CPU what the kernel reports as available
    (MemAvailable), capped by the container's cgroup limit; None where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # cgroup v2: the container's limit less what it uses
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def check_fits(need, device, what, hint=""):
    """MinidiffError (one line, before anything is allocated) when `need` bytes, a lower bound of what comes next,
    exceed the memory free on `device`: better than an out-of-memory kill minutes later with no message."""
    free = free_memory(device)
    if free is not None and need > free:
        raise MinidiffError(
            f"{what} need at least {need / 2**30:,.1f} GiB but {torch.device(device)} has "
            f"{free / 2**30:,.1f} GiB free" + (f": {hint}" if hint else "")
        )
