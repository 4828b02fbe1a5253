import os

import pytest
import torch

# The tests use tiny tensors: one thread avoids thread start-up costs that dominate them (10x faster on a loaded
# 2-core machine). MINIDIFF_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("MINIDIFF_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """Full-size SDXL tests (~11 GB RAM, minutes) run only with MINIDIFF_FULLSIZE=1, GPU tests only where CUDA is;
    otherwise they are reported as skipped with the command that runs them (never dropped silently)."""
    skips = {
        "gpu": None
        if torch.cuda.is_available()
        else pytest.mark.skip(reason="needs a CUDA GPU: bash bench/gpu_session.sh tests (docs/performance.md)"),
        "fullsize": None
        if os.environ.get("MINIDIFF_FULLSIZE") == "1"
        else pytest.mark.skip(reason="full-size SDXL check: run with MINIDIFF_FULLSIZE=1 python -m pytest -m fullsize"),
    }
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Two identical 2-step finetune.py LoRA runs on the bundled miniature (checkpoints at steps 1 and 2), made
    under umask 002: [out a, out b] (the bad-input tests tamper with copies of their files)."""
    import finetune

    old = os.umask(0o002)
    try:
        outs = [tmp_path_factory.mktemp(name) for name in ("trained-a", "trained-b")]
        for out in outs:
            assert (
                finetune.main(
                    [
                        "--steps",
                        "2",
                        "--save-every",
                        "1",
                        "--no-prior",
                        "--validation-images",
                        "0",
                        "--device",
                        "cpu",
                        "--out",
                        str(out),
                    ]
                )
                == 0
            )
    finally:
        os.umask(old)
    return outs


# ------------------------------------------------------------------ helpers the test files share
def perturb_weights(*modules, std=0.02):
    """Add N(0, std^2) noise to every weight: diffusers zero-inits some layers (conv_out, proj_out), and a parity
    test should make every weight matter."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn_like(p) * std)


def tiny_pipeline(tmp_path, seed=0, latent=False, size=16):
    """SDXL family at toy size: UNet of 2 levels with attention at the bottom, context 64 + 128, pooled 96; pixel
    space, or (latent=True) with a 2-level VAE (16 px images <-> 8 x 8 x 4 latents)."""
    from test_text import tiny_text_parts  # the tiny CLIPs (transformers) load only for the tests that use them

    from minidiff.pipeline import Pipeline
    from minidiff.schedule import Schedule
    from minidiff.text import TextConditioner
    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    text = TextConditioner(*tiny_text_parts(tmp_path, seed))
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(32, 32), sample_size=size)) if latent else None
    cfg = UNetConfig.tiny_sdxl(
        block_out_channels=(32, 64),
        transformer_depth=(0, 1),
        mid_transformer_depth=1,
        cross_attention_dim=192,
        pooled_dim=96,
        in_channels=4 if latent else 3,
        sample_size=size // 2 if latent else size,
        layers_per_block=1,
    )
    return Pipeline(UNet(cfg), vae, text, Schedule.scaled_linear(), name="tiny")
