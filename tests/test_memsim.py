"""The memory simulator (minidiff/train/memsim.py, memory_plan.py).

The simulator is checked against the same tracker on real CPU tensors (the run it models, with data), and the
tracker against closed-form byte counts. fp8 storage's output error: tests/test_base_precision.py."""

import pytest
import torch

from minidiff.train import memsim
from minidiff.train.memory_plan import Job, simulate
from minidiff.unet_config import UNetConfig
from minidiff.vae import VAEConfig


def test_tracker_counts_blocks_of_512_bytes_and_frees_on_last_reference():
    with memsim.PeakTracker() as mem:
        a = torch.ones(1000)  # 4000 B -> 4096
        b = a.view(10, 100)  # a view: no new storage
        c = a * 2  # 4096 more
        del a, b
        d = torch.ones(1)  # 4 B -> 512
        assert mem.now == 4096 + 512
        del c, d
    assert mem.peak == 2 * 4096 + 0 and mem.now == 0


@pytest.mark.parametrize(
    "job",
    [
        Job("lora", latent=8, batch=2, precision="fp32", base_precision="fp32"),
        Job("sample", latent=16, precision="fp32", base_precision="fp32", vae_tile=None),
        Job("sample", latent=16, precision="fp32", base_precision="fp32", vae_tile=8),
    ],
    ids=["lora-step", "sample-whole-decode", "sample-tiled-decode"],
)
def test_simulated_peak_equals_the_real_cpu_run(job):
    """Meta tensors with CUDA's rules vs real CPU tensors, fp32 (no autocast), same tracker: the same bytes."""
    cfg, vae = UNetConfig.tiny_sdxl(), VAEConfig.tiny()
    fake, real = simulate(job, cfg, vae), simulate(job, cfg, vae, cpu=True)
    assert abs(fake["peak"] - real["peak"]) * 2**30 < 64 * 1024, (fake, real)
    assert fake["peak"] > fake["weights"]


def test_fp8_halves_the_base_and_tiles_lower_the_decode():
    cfg, vae = UNetConfig.tiny_sdxl(), VAEConfig.tiny()
    fp16 = simulate(Job("lora", latent=8, batch=2), cfg)
    fp8 = simulate(Job("lora", latent=8, batch=2, base_precision="fp8"), cfg)
    assert fp8["weights"] < 0.65 * fp16["weights"] and fp8["peak"] < fp16["peak"]
    whole = simulate(Job("sample", latent=32, vae_tile=None), cfg, vae)
    tiled = simulate(Job("sample", latent=32, vae_tile=8), cfg, vae)
    assert tiled["decode"] < whole["decode"]
