import os

import pytest
import torch

# The tests use tiny tensors: one thread avoids thread start-up costs that dominate them (10x faster on a loaded
# 2-core machine). MINIDIFF_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("MINIDIFF_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """Full-size SDXL tests (~11 GB RAM, minutes) run only with MINIDIFF_FULLSIZE=1, GPU tests only where CUDA is;
    otherwise they are reported as skipped with the command that runs them (never dropped silently)."""
    skips = {"gpu": None if torch.cuda.is_available() else pytest.mark.skip(
                 reason="needs a CUDA GPU: bash bench/gpu_session.sh tests (docs/performance.md)"),
             "fullsize": None if os.environ.get("MINIDIFF_FULLSIZE") == "1" else pytest.mark.skip(
                 reason="full-size SDXL check: run with MINIDIFF_FULLSIZE=1 python -m pytest -m fullsize")}
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
            assert finetune.main(["--steps", "2", "--save-every", "1", "--no-prior", "--validation-images", "0",
                                  "--device", "cpu", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    return outs
