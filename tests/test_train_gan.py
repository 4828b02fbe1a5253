"""train_gan.py end to end on tiny settings: the files it writes, bitwise resume, one-line user errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_gan
from minidiff.images import read_png_metadata

TINY = ["--size", "16", "--width", "8", "--batch-size", "4", "--device", "cpu", "--seed", "3"]


def _run(out, *extra):
    return train_gan.main(TINY + ["--out", str(out), *extra])


def test_tiny_run_writes_every_file(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--steps", "4", "--save-every", "2", "--sample-every", "2", "--r1", "auto") == 0
    for name in (
        "grid.png",
        "grid-000002.png",
        "grid-000004.png",
        "loss.png",
        "d_outputs.png",
        "loss.csv",
        "metrics.json",
        "checkpoints/step-000002.safetensors",
        "checkpoints/step-000004.safetensors",
    ):
        assert (out / name).is_file(), name
    meta = read_png_metadata(out / "grid.png")
    assert meta["seed"] == 3 and meta["recipe"] == "data-efficient" and meta["step"] == 4
    assert meta["settings"]["config"]["augment"] == "color,translation,cutout"
    m = json.loads((out / "metrics.json").read_text())
    assert {"nn_distance", "memorized_fraction", "palette_distance", "diversity", "identity"} <= set(m)
    assert m["n_samples"] == 64 and m["n_train"] == 6 and m["generator"] == "EMA"
    header, *rows = (out / "loss.csv").read_text().splitlines()
    assert {"d_x", "d_g_z", "score_real", "score_fake", "loss_d", "loss_g"} <= set(header.split(","))
    assert [r.split(",")[0] for r in rows] == ["1", "2", "3", "4"]
    ckpt = load_file(out / "checkpoints/step-000004.safetensors")
    assert any(k.startswith("module.G_ema.") for k in ckpt) and any(k.startswith("optim.D.") for k in ckpt)


def test_dcgan_recipe_runs(tmp_path):
    out = tmp_path / "dcgan"
    assert _run(out, "--recipe", "dcgan", "--steps", "2", "--sample-every", "0") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == "dcgan" and m["generator"] == "G"
    assert read_png_metadata(out / "grid.png")["settings"]["batch_size"] == 4


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--save-every", "3", "--sample-every", "0", "--r1", "0.5"]
    assert _run(full, "--steps", "6", *common) == 0
    assert _run(split, "--steps", "3", *common) == 0
    assert _run(split, "--steps", "6", "--resume", "latest", *common) == 0
    a = load_file(full / "checkpoints/step-000006.safetensors")
    b = load_file(split / "checkpoints/step-000006.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert (full / "loss.csv").read_text() == (split / "loss.csv").read_text()
    pixels = [np.asarray(Image.open(d / "grid.png")) for d in (full, split)]
    assert np.array_equal(*pixels)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--size", "48"], "--size must be a power of two"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--r1", "lots"], "--r1 must be a number"),
        (["--recipe", "stylegan"], "invalid choice"),
        (["--data", "/nonexistent/folder"], "image folder not found"),
        (["--device", "gpu0"], "--device must be"),
        (["--resume", "latest", "--steps", "2"], "checkpoint not found"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as e:  # argparse errors exit from inside parse_args
        raise SystemExit(train_gan.main(TINY + ["--out", str(tmp_path / "x"), *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
