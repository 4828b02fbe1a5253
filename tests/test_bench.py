"""bench/bench.py and bench/budget.py on a tiny config: the two implementations really get identical weights and
compute the same numbers (else the timings would compare different work), and the analytic budget reproduces the
published SDXL counts. diffusers / peft are oracles here (bench code only)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench  # noqa: E402
import weights  # noqa: E402
import budget  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def args(**kw):
    a = bench.parse_args(["--config", "tiny_sdxl", "--latent", "8", "--steps", "2", "--threads", "1"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_init_is_a_function_of_the_key_only():
    a = weights.init_value("down_blocks.1.attentions.0.proj_in.weight", (8, 4), torch.float32, "cpu")
    b = weights.init_value("down_blocks.1.attentions.0.proj_in.weight", (8, 4), torch.float32, "cpu")
    c = weights.init_value("down_blocks.1.attentions.0.proj_out.weight", (8, 4), torch.float32, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(weights.init_value("norm.weight", (5,), torch.float32, "cpu"), torch.ones(5))


def test_same_state_dict_in_both_implementations():
    ours, _, _ = weights.build_unet("ours", "tiny_sdxl", torch.float32, "cpu", 0)
    theirs, _, _ = weights.build_unet("diffusers", "tiny_sdxl", torch.float32, "cpu", 0)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["forward", "train"])
def test_ours_and_diffusers_compute_the_same(task, tmp_path):
    out = {}
    for impl in ("ours", "diffusers"):
        a = args(impl=impl, task=task)
        fn = bench.task_forward if task == "forward" else bench.task_train
        out[impl] = fn(a, torch.float32, tmp_path / f"{task}-{impl}.safetensors")
    assert bench.max_diff(tmp_path, task) < 1e-5
    if task == "train":  # the LoRA updates agree step by step (peft on diffusers as the oracle)
        assert out["ours"]["lora_params"] == out["diffusers"]["lora_params"]
        assert out["ours"]["losses"] == pytest.approx(out["diffusers"]["losses"], rel=1e-5)
        assert out["ours"]["losses"][-1] < out["ours"]["losses"][0]


def test_parent_runs_workers_and_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    bench.main(
        [
            "--config",
            "tiny_sdxl",
            "--latent",
            "8",
            "--tasks",
            "forward",
            "--impls",
            "ours",
            "--threads",
            "1",
            "--reps",
            "2",
            "--json",
            str(path),
        ]
    )
    r = json.loads(path.read_text())
    (run,) = r["runs"]
    assert "error" not in run, run
    assert run["peak_rss_gb"] > 0 and len(run["times"]) == 2
    assert "| forward" in capsys.readouterr().out


def test_budget_reproduces_sdxl_counts():
    """2,567,463,684 UNet parameters and 5,806,080 rank-4 attention LoRA parameters (the
    diffusers+peft count), ~6.8 TFLOP per forward at a 128x128 latent (issue 6)."""
    unet = budget.meta_unet("sdxl", torch.float16, lora_rank=4)
    n_lora = sum(p.numel() for p in budget.lora_parameters(unet))
    assert n_lora == 5_806_080
    assert sum(p.numel() for p in unet.parameters()) - n_lora == 2_567_463_684
    flops = budget.forward_flops("sdxl", latent=128)["total"]
    assert 6.7e12 < flops < 6.85e12


def test_flop_counter_counts_two_flops_per_multiply_add():
    """The convention budget.py relies on, by hand: a 3x3 conv, 4 -> 32 channels at 8x8 is 9 * 4 * 32 * 64 MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(4, 32, 3, padding=1, device="meta")
    with FlopCounterMode(display=False) as c:
        conv(torch.empty(1, 4, 8, 8, device="meta"))
    assert c.get_total_flops() == 2 * 9 * 4 * 32 * 64


def test_sdxl_text_encoder_configs_have_the_published_sizes():
    """CLIP ViT-L/14 123,060,480 and OpenCLIP bigG/14 694,659,840 parameters (the hub configs of stabilityai/stable-diffusion-xl-base-1.0)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(**weights.SDXL_CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**weights.SDXL_CLIP_G))
    assert sum(p.numel() for p in te1.parameters()) == 123_060_480
    assert sum(p.numel() for p in te2.parameters()) == 694_659_840


def test_random_folder_reads_the_same_in_minidiff_and_diffusers(tmp_path):
    """write_random_sdxl's folder (what the GPU session trains on) is a valid diffusers SDXL folder: diffusers'
    StableDiffusionXLPipeline.from_pretrained reads the same tensors and encodes a prompt the same way as ours."""
    from diffusers import StableDiffusionXLPipeline

    from minidiff.weights.pretrained import load_pipeline

    folder = weights.write_random_sdxl(tmp_path / "model", "tiny_sdxl", torch.float32)
    ours = load_pipeline(folder)
    theirs = StableDiffusionXLPipeline.from_pretrained(str(folder))
    for a, b in ((ours.unet, theirs.unet), (ours.vae, theirs.vae), (ours.text.text_encoder_2, theirs.text_encoder_2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ctx, pooled = ours.text.encode(["a picture of sks girl"])
    ctx_d, _, pooled_d, _ = theirs.encode_prompt(
        "a picture of sks girl", device="cpu", do_classifier_free_guidance=False
    )
    assert torch.allclose(ctx, ctx_d, atol=1e-5) and torch.allclose(pooled, pooled_d, atol=1e-5)


def launches(impl, task):
    """Ops (~GPU kernel launches) of one forward, or one LoRA training step with checkpointing, as bench.py runs
    them: frozen weights in bf16, LoRA in fp32, bf16 autocast; the tiny SDXL config on the CPU has the op structure
    of SDXL in fp16 on a GPU."""
    model, call, cfg = weights.build_unet(impl, "tiny_sdxl", torch.bfloat16, "cpu", 0)
    x, t, ctx, pooled, ids = weights.unet_inputs(cfg, 1, 8, torch.bfloat16, "cpu")
    if task == "train":
        bench._add_lora(impl, model, "cpu", 0)
        model.enable_gradient_checkpointing()
        model.train()
    with budget.OpCounter() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(task == "train"):
            pred = call(x, t, ctx, pooled, ids)
        if task == "train":
            pred.float().square().mean().backward()
    return ops.total


@pytest.mark.parametrize("task", ["forward", "train"])
def test_ours_launches_fewer_kernels_than_diffusers(task):
    """On an H100 an SDXL forward is tens of milliseconds and a few thousand kernels at ~5 us each: fewer launches
    is where a from-scratch UNet can be faster than diffusers + peft on a GPU (docs/performance.md)."""
    ours, theirs = launches("ours", task), launches("diffusers", task)
    print(f"{task}: {ours} ops ours, {theirs} diffusers (+ peft): {ours / theirs:.2f}x")
    assert ours < 0.95 * theirs
