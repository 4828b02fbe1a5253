"""sample.py end to end on a tiny saved pipeline: PNGs + grid with metadata that round-trips, same seed -> same
image, a LoRA changes the image and is recorded, and user errors print one line and exit with status 2."""

from pathlib import Path

import pytest
import torch

import sample
from minidiff.images import from_pil, read_png_metadata
from test_pretrained import saved_diffusers_pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--width", "64", "--height", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return saved_diffusers_pipeline(tmp_path_factory.mktemp("sample"))[1]


def pngs(folder):
    return sorted(p for p in Path(folder).glob("*.png") if p.name != "grid.png")


def pixels(path):
    from PIL import Image

    return from_pil(Image.open(path))


def test_writes_pngs_with_metadata_and_same_seed_same_image(model, tmp_path):
    (tmp_path / "comic.txt").write_text("# page 1\na cat\n\nrobot, a dog\n")
    args = [
        "--model",
        str(model),
        "--prompts",
        str(tmp_path / "comic.txt"),
        "--num",
        "2",
        "--seed",
        "11",
        "--negative",
        "robot",
        "--cfg",
        "4",
        *FAST,
    ]
    assert sample.main([*args, "--out", str(tmp_path / "a")]) == 0
    files = pngs(tmp_path / "a")
    assert [f.name for f in files] == ["0000-seed11.png", "0001-seed12.png", "0002-seed13.png", "0003-seed14.png"]
    meta = read_png_metadata(files[2])
    assert meta["prompt"] == "robot, a dog" and meta["seed"] == 13 and meta["negative"] == "robot"
    assert (meta["steps"], meta["cfg"], meta["sampler"], meta["width"], meta["height"]) == (2, 4.0, "euler", 64, 64)
    assert meta["model"] == str(model) and meta["loras"] == [] and meta["spacing"] == "leading"
    grid = read_png_metadata(tmp_path / "a" / "grid.png")
    assert grid["prompts"] == ["a cat", "a cat", "robot, a dog", "robot, a dog"] and grid["seeds"] == [11, 12, 13, 14]
    # the same run again: byte-identical files; the same seed alone in a batch of 1: the same image (up to one
    # 8-bit level where float sums of another batch size round the other way)
    assert sample.main([*args, "--out", str(tmp_path / "again")]) == 0
    assert [f.read_bytes() for f in pngs(tmp_path / "again")] == [f.read_bytes() for f in files]
    assert (
        sample.main(
            [
                "--model",
                str(model),
                "--prompt",
                "robot, a dog",
                "--seed",
                "13",
                "--negative",
                "robot",
                "--cfg",
                "4",
                "--batch-size",
                "1",
                *FAST,
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    torch.testing.assert_close(pixels(pngs(tmp_path / "b")[0]), pixels(files[2]), rtol=0, atol=1 / 127.5 + 1e-6)
    assert (pixels(files[0]) - pixels(files[1])).abs().mean() > 0.01  # seeds 11 and 12 differ


def test_lora_changes_the_image_and_is_recorded(model, tmp_path):
    from minidiff.weights.pretrained import load_unet
    from minidiff.lora import inject_lora, save_lora

    unet = load_unet(model)
    inject_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained-looking: B != 0
    save_lora(unet, tmp_path / "style.safetensors")
    base = ["--model", str(model), "--prompt", "a cat", *FAST]
    assert sample.main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert sample.main([*base, "--lora", f"{tmp_path / 'style.safetensors'}:0.8", "--out", str(tmp_path / "lora")]) == 0
    meta = read_png_metadata(pngs(tmp_path / "lora")[0])
    assert meta["loras"][0]["file"] == "style.safetensors" and meta["loras"][0]["scale"] == 0.8
    assert len(meta["loras"][0]["sha256"]) == 64
    assert not torch.equal(pixels(pngs(tmp_path / "plain")[0]), pixels(pngs(tmp_path / "lora")[0]))


def test_parse_lora():
    assert sample.parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert sample.parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert sample.parse_lora(r"C:\loras\b.safetensors") == (r"C:\loras\b.safetensors", 1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "x", "--width", "100"], "--width must be a positive multiple of 8"),
        (["--prompt", "x", "--steps", "0"], "--steps must be a positive integer"),
        (["--prompt", "x", "--lora", "missing.safetensors:0.5"], "--lora missing.safetensors:0.5: no such file"),
        (["--prompt", "x", "--sampler", "ddim", "--karras"], "--karras works with euler"),
        (["--prompts", "missing.txt"], "cannot read --prompts missing.txt"),
        ([], "no prompt: pass --prompt"),
        (["--prompt", "x", "--model", "nowhere/"], "no such model folder or file: nowhere"),
        (["--prompt", "x", "--sampler", "heun"], "argument --sampler: invalid choice"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(model, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--model" not in argv:
        argv = [*argv, "--model", str(model)]
    try:
        code = sample.main([*argv, "--device", "cpu"])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_cli_without_model_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "DEFAULT_MODEL", tmp_path / "no-such-miniature")  # as if the bundle were missing
    code = sample.main(["--prompt", "a cat"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: no model given: pass --model (a diffusers SDXL folder or an original .safetensors file); the bundled "
        "miniature minidiff/assets/tiny-sdxl is not there"
    ]


def test_prompt_2_reaches_the_second_encoder_and_is_recorded(model, tmp_path):
    base = ["--model", str(model), "--prompt", "a cat", *FAST]
    assert sample.main([*base, "--out", str(tmp_path / "one")]) == 0
    assert sample.main([*base, "--prompt-2", "robot", "--out", str(tmp_path / "two")]) == 0
    assert read_png_metadata(pngs(tmp_path / "two")[0])["prompt_2"] == "robot"
    assert read_png_metadata(pngs(tmp_path / "one")[0])["prompt_2"] is None
    assert not torch.equal(pixels(pngs(tmp_path / "one")[0]), pixels(pngs(tmp_path / "two")[0]))
