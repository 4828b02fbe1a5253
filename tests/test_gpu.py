"""What only a CUDA GPU can show (skipped, and reported, elsewhere; bench/gpu_session.sh runs them on a lent GPU):
fp16 LoRA training with the GradScaler resumes to the run it continues, finetune.py records a peak per phase, our
UNet matches diffusers' in half precision on the GPU, every attention call runs with only the memory-efficient
SDPA kernel (all a P100 or T4 has at 1024 px), and the arch check passes on a GPU this PyTorch supports."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune
from minidiff import training
from minidiff.checkpoint import save_pipeline
from test_dreambooth import tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytestmark = pytest.mark.gpu

FAST = ["--steps", "4", "--num-class-images", "2", "--class-steps", "2", "--class-batch-size", "2",
        "--validation-steps", "2", "--validation-images", "1", "--device", "cuda", "--mixed-precision", "fp16",
        "--save-every", "2", "--validate-every", "2", "--format", "diffusers"]


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fp16_lora_run_resumes_to_the_run_it_continues(tmp_path):
    model = save_pipeline(tiny_pipeline(tmp_path / "parts"), tmp_path / "tiny")
    runs = {}
    for name in ("straight", "again"):
        assert finetune.main(["--model", model, "--out", tmp_path / name, *FAST]) == 0
        runs[name] = load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors"))
    assert finetune.main(["--model", model, "--out", tmp_path / "resumed", "--class-dir",
                          tmp_path / "straight" / "class-images", "--resume",
                          tmp_path / "straight" / "checkpoints" / "step-000002.safetensors", *FAST]) == 0
    resumed = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    rerun, resume = _max_diff(runs["straight"], runs["again"]), _max_diff(runs["straight"], resumed)
    print(f"max |diff| of the LoRA after 4 steps: rerun {rerun:.3g}, resumed at step 2 {resume:.3g}")
    # bit-exact on CPU (tests/test_finetune.py); on a GPU only as exact as the kernels are deterministic
    assert resume <= max(4 * rerun, 1e-6)
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert manifest["settings"]["grad_scaler"] is True
    peaks = manifest["peak_gpu_memory_gib"]
    assert {"load", "class_images", "cache", "train", "save", "validation"} <= peaks.keys(), peaks


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


def test_arch_check_and_precision_on_this_gpu():
    training.check_gpu("cuda")  # this torch has kernels for this GPU: no error
    dtype, scaler = training.resolve_precision("auto", "cuda")
    major, _ = torch.cuda.get_device_capability()
    assert (dtype, scaler) == ((torch.bfloat16, False) if major >= 8 else (torch.float16, True))
