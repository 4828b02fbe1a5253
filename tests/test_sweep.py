"""python -m minidiff.sweep: the grid's images are the ones sample.py draws for the same checkpoint, prompt and seed
(a LoRA is on for its own row only), the rating sheet, and the quality ratio computed by hand."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import tiny_pipeline

from minidiff import sweep
from minidiff.lora import inject_lora, load_lora, save_lora
from minidiff.pipeline import generate
from minidiff.weights.pretrained import load_pipeline, save_pipeline


def test_quality_ratio_by_hand(tmp_path):
    rows = [{"checkpoint": "base", "variant": "", "score": s} for s in ("1", "0", "0", "")] + [
        {"checkpoint": "lora-step-000100", "variant": "", "score": s} for s in ("1", "1", "0", "1")
    ]
    ratios = sweep.quality_ratios(rows)
    assert ratios["base"] == (1 / 3, 3, 4) and ratios["lora-step-000100"] == (3 / 4, 4, 4)
    assert sweep.quality_ratios([{"checkpoint": "a", "variant": "", "score": "4"}], good=3)["a"][0] == 1.0
    with pytest.raises(sweep.MinidiffError, match="not a number"):
        sweep.quality_ratios([{"checkpoint": "a", "variant": "", "score": "good", "file": "x.png"}])
    sweep.write_sheet([{**r, "prompt": "p", "seed": 0, "file": "f.png"} for r in rows], tmp_path / "sheet.csv")
    assert sweep.main(["--score", str(tmp_path / "sheet.csv")]) == 0
    lines = (tmp_path / "quality.csv").read_text().splitlines()
    assert lines[1:] == ["base,0.3333,3,4", "lora-step-000100,0.7500,4,4"]
    assert Image.open(tmp_path / "quality.png").size == (900, 520)
    sweep.write_sheet([{**r, "prompt": "p", "seed": 0, "file": "f.png", "score": ""} for r in rows], tmp_path / "e.csv")
    assert sweep.main(["--score", str(tmp_path / "e.csv")]) == 2  # nothing rated yet: one line, exit 2


def test_grid_images_are_the_checkpoints_own(tmp_path):
    model = save_pipeline(tiny_pipeline(tmp_path / "parts"), tmp_path / "tiny")
    pipe = load_pipeline(model)
    inject_lora(pipe.unet, "attn", 2)
    with torch.no_grad():
        for layer in pipe.unet.modules():
            if hasattr(layer, "lora_B"):
                for b in layer.lora_B.values():
                    b.normal_(std=0.5)
    save_lora(pipe.unet, tmp_path / "lora-step-000050.safetensors")
    out = tmp_path / "sweep"
    assert (
        sweep.main(
            [
                "--model",
                str(model),
                "--checkpoint",
                "base",
                "--checkpoint",
                str(tmp_path / "lora-step-000050.safetensors"),
                "--checkpoint",
                "base",
                "--prompt",
                "a cat",
                "--seeds",
                "3",
                "4",
                "--steps",
                "2",
                "--size",
                "16",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with open(out / "sheet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == ["base"] * 2 + ["lora-step-000050"] * 2 + ["base"] * 2
    assert [r["seed"] for r in rows] == ["3", "4"] * 3 and all(r["score"] == "" for r in rows)
    png = [np.asarray(Image.open(out / r["file"])) for r in rows]
    fresh = load_pipeline(model)
    draw = lambda: [
        generate(fresh, ["a cat"], steps=2, seed=s, width=16, height=16, progress=False)[0]  # noqa: E731
        for s in (3, 4)
    ]
    want_base = draw()
    load_lora(fresh.modules(), tmp_path / "lora-step-000050.safetensors")
    want_lora = draw()
    to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # noqa: E731
    for i in range(2):
        assert (png[i] == to_u8(want_base[i])).all() and (png[4 + i] == png[i]).all()  # LoRA off again after
        assert (png[2 + i] == to_u8(want_lora[i])).all() and not (png[2 + i] == png[i]).all()
    assert Image.open(out / "grid.png").size[0] > 2 * 128
