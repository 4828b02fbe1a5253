"""images.py: pixel conversions, grid placement by hand, PNG metadata, atomic writes, the loss plot."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import images


def test_to_pil_from_pil_round_trip():
    v = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    x = v.float() / 127.5 - 1
    img = images.to_pil(x)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.array_equal(np.asarray(img), v.permute(1, 2, 0).numpy())
    assert torch.equal(images.from_pil(img), x)
    assert images.to_pil(torch.full((1, 2, 2), 5.0)).getpixel((0, 0)) == 255  # clamped, 1 channel -> L
    assert images.to_pil(torch.full((1, 3, 2, 2), -1.0)).getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ValueError):
        images.to_pil(torch.zeros(4, 2, 2))


@pytest.mark.parametrize("n,nrow,pad", [(6, 3, 2), (7, 3, 2), (5, 8, 0), (4, 2, 5), (1, 3, 2)])
def test_make_grid_places_cells_by_hand(n, nrow, pad):
    x = torch.rand(n, 3, 9, 11) * 2 - 1
    ours = np.asarray(images.make_grid(x, nrow=nrow, pad=pad))
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    assert ours.shape == (rows * (9 + pad) + pad, ncol * (11 + pad) + pad, 3)
    want = np.full_like(ours, 255)  # by hand: cell i at row i // ncol, column i % ncol, white gaps and border
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x0 = pad + r * (9 + pad), pad + c * (11 + pad)
        want[y : y + 9, x0 : x0 + 11] = np.asarray(images.to_pil(x[i]))
    assert np.array_equal(ours, want)


def test_png_metadata_round_trip(tmp_path):
    meta = {
        "prompt": "a drawing of sks girl, ünïcode ✓",
        "seed": 42,
        "cfg": 5.5,
        "steps": [10, 20],
        "lora": None,
        "settings": {"sampler": "euler", "karras": True},
    }
    path = images.save_png(torch.zeros(3, 8, 8), tmp_path / "sub" / "x.png", meta)
    assert images.read_png_metadata(path) == meta
    with Image.open(path) as im:  # stored as plain text chunks any viewer can show
        assert im.text["seed"] == "42" and im.size == (8, 8)
    assert not list((tmp_path / "sub").glob("*.tmp"))
    # PNGs written by other tools: non-JSON text stays a string
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat, Steps: 20")
    Image.new("RGB", (2, 2)).save(tmp_path / "other.png", pnginfo=info)
    assert images.read_png_metadata(tmp_path / "other.png") == {"parameters": "a cat, Steps: 20"}


def test_failed_png_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    images.save_png(Image.new("RGB", (4, 4), (1, 2, 3)), path, {"v": 1})

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half a png")  # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        images.save_png(Image.new("RGB", (4, 4), (9, 9, 9)), path, {"v": 2})
    monkeypatch.undo()
    assert images.read_png_metadata(path) == {"v": 1}
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    assert not (tmp_path / "x.png.tmp").exists()


def test_plot_curves_draws_every_series(tmp_path):
    steps = range(0, 300)
    series = {
        "loss": [(s, 1.0 / (s + 1) + 0.01) for s in steps],
        "val": [(s, 0.5 / (s + 1) + 0.02) for s in steps[::10]] + [(301, float("nan"))],
    }
    path = images.plot_curves(series, tmp_path / "loss.png", title="loss")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (520, 900, 3)
    for color in images.COLORS[:2]:  # both series (and their legend entries) are drawn in their colours
        assert (np.abs(img - np.array(color)).sum(-1) < 10).sum() > 100
    assert (img < 100).all(-1).sum() > 500  # black axes, ticks and numbers
    images.plot_curves({"loss": [(0, 1.0)]}, tmp_path / "one.png", log_y=False)
    images.plot_curves({"loss": []}, tmp_path / "empty.png")  # "no data yet", no crash
    images.plot_curves({"g": [(0, -1.0), (5, 2.0)]}, tmp_path / "neg.png", log_y=True)  # falls back to linear
    assert all((tmp_path / n).is_file() for n in ("one.png", "empty.png", "neg.png"))


def test_nice_ticks_are_round_and_cover_range():
    ticks, step = images._nice_ticks(0.013, 0.87)
    assert step == 0.2 and ticks[0] <= 0.013 and ticks[-1] >= 0.87
    ticks, step = images._nice_ticks(0, 1234)
    assert step == 250 and ticks == [0, 250, 500, 750, 1000, 1250]
