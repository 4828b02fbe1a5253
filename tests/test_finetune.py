"""finetune.py end to end on a tiny random pixel-space SDXL-family pipeline saved with weights.pretrained.save_pipeline:
the files it writes, bit-exact resume, full fine-tuning, and one-line errors (exit status 2) for bad input; and
(fullsize) on random weights at SDXL's exact shapes, with sample.py after it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import finetune
from minidiff.weights.pretrained import load_pipeline, save_pipeline
from minidiff.lora import find_targets, load_lora
from conftest import tiny_pipeline

FAST = [
    "--steps",
    "4",
    "--num-class-images",
    "3",
    "--class-steps",
    "2",
    "--class-batch-size",
    "2",
    "--validation-steps",
    "2",
    "--validation-images",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    return save_pipeline(tiny_pipeline(root / "parts"), root / "tiny")


RUN_FLAGS = "--save-every 2 --validate-every 2 --format both --min-snr-gamma 5".split()


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    """One 4-step LoRA run with prior preservation, checkpoints every 2 steps and a validation grid at step 2."""
    out = tmp_path_factory.mktemp("run")
    assert finetune.main(["--model", model, "--out", out, *RUN_FLAGS, *FAST]) == 0
    return out


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_a_run_writes_lora_loss_plot_grids_and_manifest(run, model):
    for name in (
        "lora.safetensors",
        "pytorch_lora_weights.safetensors",
        "lora-step-000002.safetensors",
        "lora-step-000004.safetensors",
        "loss.csv",
        "loss.png",
        "manifest.json",
        "samples/step-000002.png",
        "samples/final.png",
        "checkpoints/step-000002.safetensors",
        "checkpoints/step-000004.safetensors",
    ):
        assert (run / name).is_file(), name
    assert len(list((run / "class-images").glob("class-*.png"))) == 3
    tensors, meta = _tensors(run / "lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in tensors)
    for key in (
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_base_model_version",
        "ss_v2",
        "ss_sd_model_hash",
        "ss_learning_rate",
        "ss_steps",
        "minidiff.dataset_hash",
    ):
        assert key in meta, key
    assert meta["ss_network_dim"] == "4" and meta["minidiff.instance_prompt"] == "a picture of sks girl"
    assert meta["ss_steps"] == "4" and meta["ss_num_reg_images"] == "3"

    # the file loads back into the base UNet and covers exactly the attention projections
    unet = load_pipeline(model).unet
    expected = find_targets(unet, "attn")
    load_lora(unet, run / "lora.safetensors", name="sks")
    assert len(tensors) == 3 * len(expected)  # down, up, alpha per module

    manifest = json.loads((run / "manifest.json").read_text())
    total = manifest["trainable"][-1]
    linear = [unet.get_submodule(n) for n in expected]
    assert total["params"] == sum(4 * (m.in_features + m.out_features) for m in linear)  # r (in + out) each
    assert total["dtype"] == "float32" and 0 < total["share"] < 0.05
    assert str(run / "lora.safetensors") in manifest["files"]
    assert manifest["settings"]["lr"] == 1e-4 and manifest["timings"]["s_per_step"] > 0
    rows = (run / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,instance") and "prior" in rows[0] and len(rows) == 5


def test_resumed_run_ends_with_the_same_lora_bit_for_bit(run, model, tmp_path):
    out = tmp_path / "resumed"
    resume = ["--resume", run / "checkpoints" / "step-000002.safetensors", "--class-dir", run / "class-images"]
    rc = finetune.main(["--model", model, "--out", out, *RUN_FLAGS, *resume, *FAST])
    assert rc == 0
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        a, _ = _tensors(run / name)
        b, _ = _tensors(out / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, _ = _tensors(run / "lora-step-000002.safetensors")
    b, _ = _tensors(out / "lora.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_up" in k)  # training did move between 2 and 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 2


def test_latent_model_run_with_class_images(tmp_path):
    model = save_pipeline(tiny_pipeline(tmp_path / "parts", latent=True), tmp_path / "latent")
    out = tmp_path / "out"
    flags = "--num-class-images 2 --class-steps 2 --steps 2 --validation-steps 2 --validation-images 1"
    assert (
        finetune.main(["--model", model, "--out", out, *flags.split(), "--noise-offset", "0.05", "--device", "cpu"])
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["resolution"] == 16  # 8 x 8 latents x the VAE's 2x
    w, h = Image.open(out / "samples" / "final.png").size  # rows: instance prompt, class prompt; one 16 px image
    assert h == 4 * (2 * (16 + 2) + 2) + 22 and w > 4 * (16 + 4)  # each, 2 px gaps, 4x nearest, column labels on top
    assert Image.open(out / "class-images" / "class-00000.png").size == (16, 16)


def test_captioned_folder_trains_each_image_on_its_caption(model, tmp_path):
    data = tmp_path / "style" / "3_pixel style"  # kohya folder: 3 repeats, caption "pixel style" for uncaptioned
    data.mkdir(parents=True)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (20, 20), color).save(data / f"{i}.png")
    (data / "0.txt").write_text("a red square, pixel style")
    (data / "1.caption").write_text("a green square, pixel style")
    out = tmp_path / "out"
    flags = "--no-prior --caption-dropout 0.3 --steps 2 --validation-images 0 --train-text-encoder"
    argv = ["--model", model, "--out", out, "--instance-dir", data.parent, *flags.split()]
    assert finetune.main([*argv, "--gradient-checkpointing", "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["captions"] == ["a red square, pixel style", "a green square, pixel style", "pixel style"]
    assert [r["group"] for r in manifest["trainable"]][-3:] == ["text_encoder", "text_encoder_2", "total"]
    tensors, meta = _tensors(out / "lora.safetensors")
    assert meta["ss_num_reg_images"] == "0" and meta["minidiff.class_prompt"] == ""
    assert {"_".join(k.split("_")[:2]) for k in tensors} == {"lora_unet", "lora_te1", "lora_te2"}


@pytest.mark.fullsize
def test_full_size_sdxl_folder_finetunes_and_samples_end_to_end(tmp_path):
    """Random weights at SDXL's exact shapes, written as a diffusers folder (bench/weights.py: what the GPU session
    trains on), through finetune.py (256 px, prior preservation, checkpointing, validation, save) and sample.py with
    the LoRA, each in its own process (~16 GB, ~2.5 min). The parameter counts are the published ones: UNet
    2,567,463,684 + CLIP-L 123,060,480 + bigG 694,659,840 + VAE 83,653,863, and 5,806,080 LoRA parameters on the
    560 attention projections."""
    root = Path(__file__).resolve().parents[1]
    model, out = tmp_path / "sdxl-random", tmp_path / "run"

    def python(*argv):
        r = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=root)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return r.stdout

    try:
        python("bench/weights.py", model, "--config", "sdxl")
        python(
            "finetune.py",
            "--model",
            model,
            "--out",
            out,
            "--resolution",
            "256",
            "--steps",
            "2",
            "--num-class-images",
            "1",
            "--class-steps",
            "2",
            "--class-batch-size",
            "1",
            "--validation-images",
            "1",
            "--validation-steps",
            "2",
            "--save-every",
            "2",
            "--gradient-checkpointing",
            "--device",
            "cpu",
            "--mixed-precision",
            "no",
        )
        total = json.loads((out / "manifest.json").read_text())["trainable"][-1]
        assert total["params"] == 5_806_080 and total["tensors"] == 2 * 560
        assert total["of"] == 2_567_463_684 + 123_060_480 + 694_659_840 + 83_653_863 + 5_806_080
        tensors, meta = _tensors(out / "lora.safetensors")
        assert len(tensors) == 3 * 560 and meta["ss_network_dim"] == "4"
        printed = python(
            "sample.py",
            "--model",
            model,
            "--lora",
            out / "lora.safetensors",
            "--prompt",
            "a picture of sks girl",
            "--width",
            "256",
            "--height",
            "256",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            out / "samples-after",
        )
        assert "1 image(s) in" in printed
        assert Image.open(out / "samples-after" / "0000-seed0.png").size == (256, 256)
    finally:
        shutil.rmtree(model, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- user errors
def _fails(capsys, argv, match):
    try:
        rc = finetune.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1], err  # the error: one line, last
    assert all(line.startswith("warning: ") for line in lines[:-1]), err  # at most one-line warnings before it
    return lines[-1]


def test_bad_input_is_one_line_and_exit_2(model, tmp_path, capsys, monkeypatch):
    out = ["--out", tmp_path / "out", "--device", "cpu", "--model", model]
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["--instance-dir", empty, *out], "no images")
    _fails(capsys, [*out, "--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    _fails(capsys, ["--instance-dir", broken, *out], "no usable images")
    _fails(capsys, ["--instance-dir", tmp_path / "nowhere", *out], "not found")
    reg = tmp_path / "reg"
    reg.mkdir()
    Image.new("RGB", (8, 8)).save(reg / "one.png")
    _fails(capsys, ["--class-dir", reg, "--num-class-images", "5", "--no-generate", *out], "has 1")
    (tmp_path / "file").write_text("")
    _fails(capsys, ["--class-dir", tmp_path / "file" / "class", *out], "is a file, not a folder")
    _fails(capsys, ["--rank", "0", *out], "--rank must be a positive integer")
    _fails(capsys, ["--rank", "-3", *out], "--rank must be a positive integer")
    _fails(capsys, ["--caption-dropout", "1.5", *out], "--caption-dropout")
    _fails(capsys, ["--targets", "everything", *out], "invalid choice")
    _fails(capsys, ["--model", tmp_path / "no-model", "--out", tmp_path / "out"], "model not found")
    monkeypatch.setattr(finetune, "DEFAULT_MODEL", tmp_path / "tiny-sdxl")  # the bundled miniature, not built yet
    _fails(capsys, ["--out", tmp_path / "out"], "bundled miniature")
    _fails(capsys, ["--resume", tmp_path / "nothing", "--no-prior", "--steps", "1", *out], "checkpoint not found")
