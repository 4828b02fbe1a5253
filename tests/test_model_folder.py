"""A full fine-tune's output folder is a model (sample.py --model OUT, diffusers' from_pretrained), and
sample.py --unet DIR swaps a UNet into any model (minidiff/model_folder.py)."""

import json

import pytest
import torch
from conftest import tiny_pipeline

import finetune
import sample
from minidiff.weights.pretrained import load_pipeline, load_unet, save_pipeline


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    model = save_pipeline(tiny_pipeline(root / "parts", latent=True), root / "base")
    out = root / "out"
    flags = "--train full --no-prior --steps 2 --lr 1e-3 --validation-images 0 --device cpu".split()
    assert finetune.main(["--model", model, "--out", out, *flags]) == 0
    return model, out


def test_full_finetune_saves_a_diffusers_unet(full_run):
    base, out = full_run
    trained, frozen = load_unet(out / "unet"), load_unet(base)
    changed = [k for k, v in frozen.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed and not (out / "lora.safetensors").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trainable"][-1]["params"] == sum(p.numel() for p in frozen.parameters())


def test_full_finetune_folder_is_a_model(full_run, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base, out = full_run
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
        assert (out / name).is_symlink() and (out / name).resolve() == (base / name).resolve()
    trained = load_pipeline(out)
    assert not torch.equal(trained.unet.conv_in.weight, load_unet(base).conv_in.weight)  # the trained UNet
    torch.testing.assert_close(trained.unet.conv_in.weight, load_unet(out / "unet").conv_in.weight, rtol=0, atol=0)
    again = StableDiffusionXLPipeline.from_pretrained(out)  # diffusers reads it as a pipeline too
    torch.testing.assert_close(again.unet.conv_in.weight, trained.unet.conv_in.weight, rtol=0, atol=0)


def test_sample_unet_flag_swaps_the_unet(full_run, tmp_path):
    base, out = full_run
    common = ["--prompt", "a cat", "--steps", "2", "--width", "16", "--height", "16", "--device", "cpu"]
    assert sample.main(["--model", str(out), *common, "--out", str(tmp_path / "a")]) == 0
    assert sample.main(["--model", str(base), "--unet", str(out / "unet"), *common, "--out", str(tmp_path / "b")]) == 0
    assert sample.main(["--model", str(base), *common, "--out", str(tmp_path / "c")]) == 0
    import numpy as np
    from PIL import Image

    a, b, c = (np.asarray(Image.open(tmp_path / x / "grid.png")) for x in "abc")
    assert (a == b).all() and not (a == c).all()
    assert sample.main(["--model", str(base), "--unet", str(tmp_path / "nothing"), *common]) == 2
