"""minidiff/train/hardware.py, and what only a CUDA GPU can show.

On any machine (the CUDA calls faked where needed): the arch check names both fixes for a P100 on a torch without
sm_60, the precision each GPU gets, --device errors, and the peak memory of each phase. On a CUDA GPU only (marked
`gpu`: reported as skipped elsewhere; bench/gpu_session.sh runs them on a lent GPU): fp16 LoRA training with the
GradScaler resumes to the run it continues, finetune.py records a peak per phase, our UNet matches diffusers' in
half precision, every attention call runs with only the memory-efficient SDPA kernel (all a P100 or T4 has at 1024
px), and the arch check passes on a GPU this PyTorch supports."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import finetune
from minidiff.train import hardware
from minidiff.weights.pretrained import save_pipeline
from minidiff.errors import MinidiffError, TrainingError
from conftest import tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


# ------------------------------------------------------------------------------------- on any machine
def _fake_gpu(monkeypatch, capability, archs, bf16_emulated=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    # like recent torch: True on pre-Ampere GPUs unless emulation is excluded
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: capability[0] >= 8 or (including_emulation and bf16_emulated),
    )


KAGGLE_CU128 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # Kaggle/docker-python#1546


def test_check_gpu_names_both_fixes(monkeypatch):
    _fake_gpu(monkeypatch, (6, 0), KAGGLE_CU128)
    with pytest.raises(TrainingError) as e:
        hardware.check_gpu()
    msg = str(e.value)
    assert "sm_60" in msg and "P100" in msg and "cu126" in msg and "T4" in msg and "\n" not in msg
    for cap, archs in [
        ((6, 0), ["sm_50", "sm_60", "sm_70"]),
        ((6, 1), ["sm_60"]),
        ((6, 0), ["sm_50", "compute_50"]),
        ((7, 5), KAGGLE_CU128),
        ((9, 0), ["sm_80", "sm_90a"]),
    ]:
        _fake_gpu(monkeypatch, cap, archs)
        hardware.check_gpu()  # a cubin of the same major and lower minor, older PTX, or the exact sm_90a
    for cap, archs in [((10, 0), ["sm_90a"]), ((6, 0), ["sm_61", "compute_70"]), ((8, 6), ["sm_90"])]:
        _fake_gpu(monkeypatch, cap, archs)
        with pytest.raises(TrainingError, match=f"sm_{cap[0]}{cap[1]}"):
            hardware.check_gpu()


def test_resolve_precision(monkeypatch):
    assert hardware.resolve_precision("auto", "cpu") == (None, False)
    assert hardware.resolve_precision("no", "cpu") == (None, False)
    assert hardware.resolve_precision("bf16", "cpu") == (torch.bfloat16, False)
    with pytest.raises(TrainingError, match="needs a CUDA GPU"):
        hardware.resolve_precision("fp16", "cpu")
    with pytest.raises(TrainingError, match="auto, bf16, fp16 or no"):
        hardware.resolve_precision("fp8", "cpu")
    _fake_gpu(monkeypatch, (7, 5), KAGGLE_CU128)  # T4: bf16 only emulated -> fp16 + GradScaler
    assert hardware.resolve_precision("auto", "cuda") == (torch.float16, True)
    with pytest.raises(TrainingError, match="no native bf16"):
        hardware.resolve_precision("bf16", "cuda")
    _fake_gpu(monkeypatch, (8, 0), KAGGLE_CU128)  # A100
    assert hardware.resolve_precision("auto", "cuda") == (torch.bfloat16, False)
    assert hardware.resolve_precision("fp16", "cuda:0") == (torch.float16, True)


def test_peak_memory_gives_each_phase_its_own_peak(monkeypatch):
    """A fake CUDA allocator counter (grows to the high-water mark, reset to what is allocated now): a peak reached
    during a save inside training must count for the save, and the training around it for gpu."""
    GiB = 2**30
    mem = {"now": 0, "peak": 0}

    def use(nbytes):  # allocate nbytes on top of what is held, then free them
        mem["peak"] = max(mem["peak"], mem["now"] + nbytes)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["now"]))
    peaks = hardware.PeakMemory("cuda")
    mem["now"] = mem["peak"] = GiB  # the weights, held from here on
    peaks.end("load")
    save = peaks.around("save", lambda: use(GiB // 2))
    use(3 * GiB)
    save()
    use(GiB)
    peaks.end("train")
    assert peaks.gib == {"load": 1.0, "train": 4.0, "save": 1.5}


def test_peak_memory_on_the_cpu_is_the_resident_set_of_each_phase():
    """A 512 MiB array allocated and touched during phase "big" only: its peak shows there and not in the phases
    before and after it (VmHWM, reset through /proc/self/clear_refs)."""
    peaks = hardware.PeakMemory("cpu")
    if peaks.what is None:
        pytest.skip("this kernel lets no process reset its peak RSS (/proc/self/clear_refs)")
    peaks.end("before")
    big = np.ones(2**26)  # 512 MiB, every page written
    del big
    peaks.end("big")
    peaks.end("after")
    assert peaks.gib["big"] - peaks.gib["before"] > 0.45
    assert peaks.gib["big"] - peaks.gib["after"] > 0.45


def test_resolve_device_names_what_it_expects():
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    assert hardware.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MinidiffError, match=r"--device must be cpu, cuda or cuda:N, got 'gpu'"):
        hardware.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(MinidiffError, match="sees no CUDA GPU; use --device cpu"):
            hardware.resolve_device("cuda:1")


# ------------------------------------------------------------------------------------- on a CUDA GPU
FAST = [
    "--steps",
    "4",
    "--num-class-images",
    "2",
    "--class-steps",
    "2",
    "--class-batch-size",
    "2",
    "--validation-steps",
    "2",
    "--validation-images",
    "1",
    "--device",
    "cuda",
    "--mixed-precision",
    "fp16",
    "--save-every",
    "2",
    "--validate-every",
    "2",
    "--format",
    "diffusers",
]


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.gpu
def test_fp16_lora_run_resumes_to_the_run_it_continues(tmp_path):
    model = save_pipeline(tiny_pipeline(tmp_path / "parts"), tmp_path / "tiny")
    runs = {}
    for name in ("straight", "again"):
        assert finetune.main(["--model", model, "--out", tmp_path / name, *FAST]) == 0
        runs[name] = load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors"))
    assert (
        finetune.main(
            [
                "--model",
                model,
                "--out",
                tmp_path / "resumed",
                "--class-dir",
                tmp_path / "straight" / "class-images",
                "--resume",
                tmp_path / "straight" / "checkpoints" / "step-000002.safetensors",
                *FAST,
            ]
        )
        == 0
    )
    resumed = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    rerun, resume = _max_diff(runs["straight"], runs["again"]), _max_diff(runs["straight"], resumed)
    print(f"max |diff| of the LoRA after 4 steps: rerun {rerun:.3g}, resumed at step 2 {resume:.3g}")
    # bit-exact on CPU (tests/test_finetune.py); on a GPU only as exact as the kernels are deterministic
    assert resume <= max(4 * rerun, 1e-6)
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert manifest["settings"]["grad_scaler"] is True
    peaks = manifest["peak_memory_gib"]
    assert (
        peaks["of"] == "GPU memory allocated"
        and {"load", "class_images", "cache", "train", "save", "validation"} <= peaks.keys()
    ), peaks


@pytest.mark.gpu
def test_unet_in_fp16_matches_diffusers_on_the_gpu():
    import weights

    pytest.importorskip("diffusers")
    out = {}
    for impl in ("ours", "diffusers"):
        model, call, cfg = weights.build_unet(impl, "tiny_sdxl", torch.float16, "cuda", 0)
        with torch.inference_mode():
            out[impl] = call(*weights.unet_inputs(cfg, 2, 16, torch.float16, "cuda")).float()
    scale = out["diffusers"].abs().max()
    assert (out["ours"] - out["diffusers"]).abs().max() <= 1e-2 * scale


@pytest.mark.gpu
def test_every_attention_runs_on_the_memory_efficient_kernel():
    """A P100 (sm_60) and a T4 (sm_75) have no FlashAttention: at 1024 px SDXL fits only if every attention call
    is accepted by the memory-efficient kernel. With only that backend allowed, an unsupported call raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minidiff.unet import UNet, UNetConfig

    cfg = UNetConfig.tiny_sdxl(head_dim=64, block_out_channels=(64, 128, 128))  # SDXL's head width
    unet = UNet(cfg).to("cuda", torch.float16).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g).to("cuda", torch.float16)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to("cuda", torch.float16)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = torch.randn(1, pooled_dim, generator=g).to("cuda", torch.float16)
    ids = torch.tensor([[256.0, 256, 0, 0, 256, 256]], device="cuda", dtype=torch.float16)
    with torch.inference_mode(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        eps = unet(x, torch.tensor([500], device="cuda"), context=ctx, text_embeds=pooled, time_ids=ids)
    assert torch.isfinite(eps).all()


@pytest.mark.gpu
def test_arch_check_and_precision_on_this_gpu():
    hardware.check_gpu("cuda")  # this torch has kernels for this GPU: no error
    dtype, scaler = hardware.resolve_precision("auto", "cuda")
    major, _ = torch.cuda.get_device_capability()
    assert (dtype, scaler) == ((torch.bfloat16, False) if major >= 8 else (torch.float16, True))
