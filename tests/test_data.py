"""data.py: every kind of bad or odd input gets a clear result, checked pixel by pixel on hand-made images."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import data
from minidiff.errors import DataError


def _rgb_of(item):
    """Item pixels [-1, 1] -> uint8 [H, W, 3], the inverse of v / 127.5 - 1."""
    return ((item["pixels"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_kenney_assets_and_constants():
    assert len(data.CHARACTERS) == 6 and len(data.POSES) == 13
    assert set(data.INSTANCE_POSES) | set(data.HELD_OUT_POSES) == set(data.POSES)
    assert not set(data.INSTANCE_POSES) & set(data.HELD_OUT_POSES) and len(data.HELD_OUT_POSES) == 7
    assert data.kenney_path("female_adventurer", "idle").name == "femaleAdventurer_idle.png"
    for c in data.CHARACTERS:
        for p in data.POSES:
            assert data.kenney_path(c, p).is_file(), (c, p)
    paths = data.instance_images()
    assert [p.stem.split("_")[1] for p in paths] == list(data.INSTANCE_POSES)
    with pytest.raises(DataError, match="unknown character"):
        data.kenney_path("batman", "idle")


def test_kenney_palette_transparency_becomes_white():
    # The bundled files are palette PNGs with a transparency chunk: the corners are transparent.
    img = data.load_image(data.kenney_path("female_adventurer", "idle"))
    assert img.mode == "RGB" and img.size == (96, 128)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    x = data.load_tensor_set(data.instance_images(), 64)
    assert x.shape == (6, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert (x[:, :, 0, 0] == 1).all()  # white corners, not black


def test_rgba_transparent_pixels_become_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200  # red-ish, fully transparent
    a[2:4, 2:4] = (10, 20, 30, 255)  # opaque square
    a[5, 5] = (0, 0, 0, 128)  # half-transparent black -> mid gray: 255 * (1 - 128/255) ~ 127
    Image.fromarray(a).save(tmp_path / "x.png")
    out = np.asarray(data.load_image(tmp_path / "x.png"))
    assert (out[0, 0] == 255).all() and tuple(out[2, 2]) == (10, 20, 30)
    assert abs(int(out[5, 5, 0]) - 127) <= 1


def test_grayscale_and_16bit(tmp_path):
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(tmp_path / "g.png")
    assert np.asarray(data.load_image(tmp_path / "g.png"))[0, 0].tolist() == [77, 77, 77]
    Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)).save(tmp_path / "g16.png")  # 16-bit: mid gray
    assert np.asarray(data.load_image(tmp_path / "g16.png"))[0, 0].tolist() == [127, 127, 127]


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)  # 0 black, 1 red, 2 blue
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 2)
    p.save(tmp_path / "pal.png", transparency=0)  # index 0 (black) is transparent
    out = np.asarray(data.load_image(tmp_path / "pal.png"))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert out[0, 1].tolist() == [0, 0, 255] and out[1, 1].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    a = np.full((20, 40, 3), 255, np.uint8)  # stored 40 wide x 20 high, dark block at the stored left
    a[:, :10] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the viewer must rotate 90 degrees clockwise
    Image.fromarray(a).save(tmp_path / "o.jpg", quality=95, exif=exif.tobytes())
    out = np.asarray(data.load_image(tmp_path / "o.jpg")).astype(int)
    assert out.shape == (40, 20, 3)  # now 20 wide x 40 high
    # rotating clockwise moves the stored left edge to the top
    assert out[:8].mean() < 30 and out[-20:].mean() > 225


def _tall_image_with_marks(path):
    a = np.full((100, 50, 3), 255, np.uint8)
    a[:4, 20:30] = (200, 0, 0)  # "head" at the very top
    a[-4:, 20:30] = (0, 0, 200)  # "feet" at the very bottom
    Image.fromarray(a).save(path)


def test_pad_keeps_whole_image_crop_cuts(tmp_path):
    _tall_image_with_marks(tmp_path / "t.png")
    img = data.load_image(tmp_path / "t.png")
    pad = np.asarray(data.fit_square(img, 100, "pad")).astype(int)
    crop = np.asarray(data.fit_square(img, 100, "crop")).astype(int)
    assert pad.shape == crop.shape == (100, 100, 3)
    # pad: same scale (longer side 100 -> 100), both marks present, nothing non-white lost
    assert (pad[:4, 45:55] == (200, 0, 0)).all() and (pad[-4:, 45:55] == (0, 0, 200)).all()
    assert (pad != 255).any(-1).sum() == (np.asarray(img) != 255).any(-1).sum()
    assert (pad[:, :25] == 255).all() and (pad[:, 75:] == 255).all()  # white side bars
    # crop: scaled 2x and cut to the middle: head and feet are gone
    assert (crop == 255).all()
    with pytest.raises(DataError, match="pad' or 'crop"):
        data.fit_square(img, 64, "stretch")


def test_corrupt_file_is_skipped_with_its_name(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    Image.new("RGB", (64, 64), (4, 5, 6)).save(tmp_path / "c.jpg")
    with pytest.warns(data.DataWarning, match="b.png"):
        ds = data.ImageFolder(tmp_path, 32)
    assert len(ds) == 2 and [p.split("/")[-1] for p in ds.paths] == ["a.png", "c.jpg"]


def test_empty_and_all_corrupt_folders_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        data.ImageFolder(tmp_path / "empty", 32)
    (tmp_path / "gif").mkdir()
    (tmp_path / "gif" / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match="found only: x.gif"):
        data.ImageFolder(tmp_path / "gif", 32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    (tmp_path / "bad" / "y.webp").write_bytes(b"")
    with pytest.warns(data.DataWarning), pytest.raises(DataError, match="no usable images.*all 2"):
        data.ImageFolder(tmp_path / "bad", 32)
    with pytest.raises(DataError, match="not found"):
        data.ImageFolder(tmp_path / "missing", 32)
    with pytest.raises(DataError, match="not found"):
        data.load_image(tmp_path / "missing.png")


def test_tiny_image_warning_names_the_file(tmp_path):
    Image.new("RGB", (20, 30)).save(tmp_path / "tiny.png")
    Image.new("RGB", (200, 300)).save(tmp_path / "big.png")
    with pytest.warns(data.DataWarning, match=r"tiny.png \(20x30\)") as rec:
        data.ImageFolder(tmp_path, 256)
    assert "big.png" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.ImageFolder(tmp_path, 64)  # 20x30 -> 64 is within 4x: no warning


def test_captions_and_kohya_repeats(tmp_path):
    sub = tmp_path / "10_sks girl"
    sub.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (32, 32)).save(sub / f"{name}.png")
    (sub / "b.caption").write_text("sks girl  jumping\n")
    Image.new("RGB", (32, 32)).save(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("a plain caption")
    Image.new("RGB", (32, 32)).save(tmp_path / "d.png")
    ds = data.ImageFolder(tmp_path, 16)
    assert len(ds) == 2 + 10 + 10  # c, d once; a, b ten times each
    caps = {p.split("/")[-1]: c for p, c in zip(ds.paths, ds.captions)}
    assert caps == {"c.webp": "a plain caption", "d.png": "", "a.png": "sks girl", "b.png": "sks girl jumping"}
    assert sorted(ds[i]["caption"] for i in range(len(ds))).count("sks girl") == 10
    ds2 = data.ImageFolder(tmp_path, 16, caption="photo of sks")  # the argument replaces folder names, not sidecars
    caps2 = dict(zip((p.split("/")[-1] for p in ds2.paths), ds2.captions))
    assert caps2["a.png"] == caps2["d.png"] == "photo of sks" and caps2["b.png"] == "sks girl jumping"
    assert data.parse_kohya_name("3_ohwx man") == (3, "ohwx man") and data.parse_kohya_name("girls") is None
    with pytest.raises(DataError, match="at least 1"):
        data.parse_kohya_name("0_x")


def test_order_is_sorted_and_flip_is_seeded(tmp_path):
    for name in ("b", "a", "c"):
        a = np.full((8, 8, 3), 255, np.uint8)
        a[:, 0] = 0  # dark left column
        Image.fromarray(a).save(tmp_path / f"{name}.png")
    ds = data.ImageFolder(sorted(tmp_path.glob("*.png"), reverse=True), 8, flip=True)
    assert [p[-5:] for p in ds.paths] == ["a.png", "b.png", "c.png"]

    def flips(seed):
        torch.manual_seed(seed)
        return [bool(ds[i % 3]["pixels"][0, 0, -1] < 0) for i in range(32)]  # dark column moved right?

    f = flips(1)
    assert f == flips(1) and 0 < sum(f) < 32
    assert not any(bool(data.ImageFolder(tmp_path, 8)[0]["pixels"][0, 0, -1] < 0) for _ in range(8))
