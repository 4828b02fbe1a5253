"""page_file.py / comic.py / panels.py / lettering.py: the page file's one-line errors, the layout arithmetic, lettering that fits
its box, and sample.py --page end to end on the bundled miniature (few steps): page, strip and panel PNGs with their
settings, panels that edit earlier panels, and --panel N leaving every other panel file byte-identical."""

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import sample
from minidiff.comic import layout
from minidiff.page_file import read_page
from minidiff.errors import MinidiffError
from minidiff.images import read_png_metadata
from minidiff.lettering import fit

ROOT = Path(__file__).resolve().parents[1]


def write_page(tmp_path, page):
    path = tmp_path / "page.json"
    path.write_text(json.dumps(page))
    return path


def small_page(tmp_path, **extra):
    """Four panels at 16 x 16, 3 steps: text to image, img2img of panel 1, inpainting of panel 1, text to image."""
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))
    mask.save(tmp_path / "mask.png")
    return write_page(
        tmp_path,
        {
            "size": [256, 256],
            "margin": 8,
            "gutter": 6,
            "border": 2,
            "title": "Test page",
            "defaults": {"steps": 3, "size": [16, 16], "seed": 10, "cfg": 3.0},
            "rows": [
                {
                    "panels": [
                        {
                            "prompt": "a picture of a girl",
                            "texts": [{"kind": "speech", "text": "Hi there!", "at": [0.5, 0.2], "tail": [0.5, 0.6]}],
                        },
                        {"prompt": "a picture of a girl jumping", "init": {"panel": 1}, "strength": 0.5},
                    ]
                },
                {
                    "height": 0.5,
                    "panels": [
                        {
                            "prompt": "a picture of a robot",
                            "init": {"panel": 1},
                            "mask": "mask.png",
                            "mask_blur": 1,
                            "texts": [{"kind": "caption", "text": "Later"}, {"kind": "narration", "text": "The end"}],
                        },
                        {
                            "width": 2,
                            "prompt": "a picture of a (zombie:1.2)",
                            "seed": 3,
                            "texts": [{"kind": "thought", "text": "hmm", "tail": [0.2, 0.9]}],
                        },
                    ],
                },
            ],
            **extra,
        },
    )


def test_layout_hand_computed(tmp_path):
    page, _ = read_page(small_page(tmp_path))
    # content 240 wide; title 15 px + gutter 6: rows start at y = 8 + 15 + 6 = 29; 256 - 29 - 8 - 6 = 213 px of rows
    # shared 1 : 0.5 -> 142, 71. Row 1: (240 - 6) / 2 = 117 each; row 2: widths 1 : 2 of 234 -> 78, 156.
    assert layout(page) == [(8, 29, 125, 171), (131, 29, 248, 171), (8, 177, 86, 248), (92, 177, 248, 248)]


def test_fitted_text_fits_and_uses_the_largest_size():
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    f = fit(draw, "Need a hand over here, friend?", 120, 60)
    assert f.size[0] <= 120 and f.size[1] <= 60 and len(f.lines) > 1
    bigger = fit(draw, "Need a hand over here, friend?", 120, 60, min_size=f.font.size + 1)
    assert bigger.size[0] > 120 or bigger.size[1] > 60  # one size up does not fit


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["rows"][0]["panels"][1].update(strength=1.5), "panel 2: 'strength' must be in (0, 1], got 1.5"),
        (
            lambda p: p["rows"][0]["panels"][1].update(init={"panel": 2}),
            "panel 2: 'init' {\"panel\": k} must name an earlier panel (1..1), got 2",
        ),
        (lambda p: p["rows"][1]["panels"][0].update(mask="missing.png"), "panel 3: 'mask' image missing.png not found"),
        (lambda p: p["rows"][1]["panels"][1].update(promt="x"), "panel 4: unknown field 'promt'"),
        (lambda p: p["rows"][1]["panels"][1].update(steps=0), "panel 4: 'steps' must be in [1, inf), got 0"),
        (
            lambda p: p["rows"][1]["panels"][1].update(size=[20, 16]),
            "panel 4: 'size' must be [width, height], positive multiples of 8",
        ),
        (lambda p: p["rows"][0]["panels"][0].update(prompt=""), "panel 1: 'prompt' must be a non-empty string"),
        (lambda p: p["rows"][0]["panels"][0]["texts"][0].update(kind="shout"), "panel 1 text 1: 'kind' must be one of"),
        (lambda p: p["rows"][0]["panels"][0]["texts"][0].update(tail=[2, 0]), "panel 1 text 1: 'tail' must be [x, y]"),
        (
            lambda p: p["rows"][0]["panels"][0].update(loras=["nowhere.safetensors"]),
            "panel 1: LoRA file nowhere.safetensors not found",
        ),
        (lambda p: p["rows"][0]["panels"][0].update(strength=0.5), "panel 1: 'strength' needs an 'init' image"),
        (lambda p: p.update(font="no-font.ttf"), "page page.json: font file no-font.ttf not found"),
        (
            lambda p: p["rows"][1]["panels"][0]["texts"][1].update(at="left"),
            "panel 3 text 2: 'at' of a narration must be one of top, bottom, got 'left'",
        ),
    ],
)
def test_bad_page_files_name_panel_and_field(tmp_path, capsys, change, message):
    page = json.loads(small_page(tmp_path).read_text())
    change(page)
    path = write_page(tmp_path, page)
    with pytest.raises(MinidiffError) as e:
        read_page(path)
    assert message in str(e.value)
    assert sample.main(["--page", str(path), "--out", str(tmp_path / "out")]) == 2  # the script: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_page_renders_and_one_panel_rerenders_alone(tmp_path, capsys):
    page = small_page(tmp_path)
    out = tmp_path / "out"
    assert sample.main(["--page", str(page), "--out", str(out), "--device", "cpu"]) == 0
    files = {p.name: p.read_bytes() for p in out.glob("panel-*.png")}
    assert sorted(files) == ["panel-01.png", "panel-02.png", "panel-03.png", "panel-04.png"]
    meta = read_png_metadata(out / "panel-03.png")
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["init"], meta["mask"].endswith("mask.png")) == (
        "a picture of a robot",
        12,
        3,
        "panel 1",
        True,
    )
    assert read_png_metadata(out / "panel-04.png")["seed"] == 3
    assert Image.open(out / "page.png").size == (256, 256)
    assert Image.open(out / "strip.png").size[0] == 256
    p1, p3 = (Image.open(out / f"panel-0{k}.png").convert("L") for k in (1, 3))
    left = [abs(a - b) for a, b in zip(p1.crop((0, 0, 4, 16)).getdata(), p3.crop((0, 0, 4, 16)).getdata())]
    assert max(left) == 0  # inpainting kept the unmasked left part of panel 1 exactly
    page_before = (out / "page.png").read_bytes()
    capsys.readouterr()
    assert sample.main(["--page", str(page), "--out", str(out), "--panel", "4", "--device", "cpu"]) == 0
    again = {p.name: p.read_bytes() for p in out.glob("panel-*.png")}
    assert {k: v for k, v in again.items() if k != "panel-04.png"} == {
        k: v for k, v in files.items() if k != "panel-04.png"
    }
    assert again["panel-04.png"] == files["panel-04.png"]  # same seed and settings: the same bytes
    assert (out / "page.png").read_bytes() == page_before
    capsys.readouterr()
    assert sample.main(["--page", str(page), "--out", str(out), "--panel", "5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --panel 5: the page has panels 1..4"
    (out / "panel-02.png").unlink()  # a missing panel is rendered too
    assert sample.main(["--page", str(page), "--out", str(out), "--panel", "4", "--device", "cpu"]) == 0
    assert (out / "panel-02.png").read_bytes() == files["panel-02.png"]


def test_example_page_is_valid():
    page, notes = read_page(ROOT / "examples" / "page.json")
    assert len(page.panels) == 7 and isinstance(page.panels[3].init, int) and page.panels[5].mask is not None
    assert page.panels[6].outpaint == (0, 0, 16, 0)
    lora = ROOT / "runs" / "finetune" / "lora.safetensors"
    assert bool(notes) != lora.is_file()  # the optional LoRA: used when there, a note when not


def test_loras_are_switched_per_panel(tmp_path):
    """Panel 1 with a LoRA, panel 2 without: panel 2 is the image of a run that never loaded the LoRA."""
    import torch

    from minidiff.lora import inject_lora, save_lora
    from minidiff.weights.pretrained import load_unet

    unet = load_unet(ROOT / "minidiff" / "assets" / "tiny-sdxl")
    inject_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(unet, tmp_path / "style.safetensors")
    panels = [
        {"prompt": "a picture of a girl", "seed": 1, "loras": ["style.safetensors:0.7"]},
        {"prompt": "a picture of a girl", "seed": 1},
    ]
    base = {"size": [128, 128], "defaults": {"steps": 2, "size": [16, 16]}}
    with_lora = write_page(tmp_path, {**base, "rows": [{"panels": panels}]})
    assert sample.main(["--page", str(with_lora), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    (tmp_path / "b").mkdir()
    plain = tmp_path / "b" / "page.json"
    plain.write_text(json.dumps({**base, "rows": [{"panels": panels[1:]}]}))
    assert sample.main(["--page", str(plain), "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    meta = read_png_metadata(tmp_path / "a" / "panel-01.png")
    assert meta["loras"][0]["file"] == "style.safetensors" and meta["loras"][0]["scale"] == 0.7
    assert read_png_metadata(tmp_path / "a" / "panel-02.png")["loras"] == []
    a1, a2, b1 = (
        Image.open(tmp_path / d / f).tobytes()
        for d, f in (("a", "panel-01.png"), ("a", "panel-02.png"), ("b", "panel-01.png"))
    )
    assert a2 == b1 and a1 != a2


def test_panel_control_steers_like_sample_py_control(tmp_path):
    """A panel's "control" is sample.py --control on that panel: the image of generate(..., controls=[(ControlNet,
    the control image made by hand here, scale)]); scale 0 is the uncontrolled panel, byte for byte."""
    import numpy as np
    import torch

    from minidiff import data
    from minidiff.bundled import tiny
    from minidiff.bundled.tiny_controlnet import CONTROLNET_DIR
    from minidiff.control_images import canny
    from minidiff.images import to_pil
    from minidiff.pipeline import generate
    from minidiff.controlnet import load_controlnet
    from minidiff.weights.pretrained import load_pipeline

    drawing = data.load_image(data.kenney_path(data.TARGET_CHARACTER, "jump")).resize((32, 32))
    drawing.save(tmp_path / "pose.png")
    panel = {"prompt": "a picture of a girl", "seed": 5}
    page = write_page(
        tmp_path,
        {
            "size": [128, 128],
            "defaults": {"steps": 3, "size": [32, 32]},
            "rows": [
                {"panels": [{**panel, "control": "pose.png:canny"}, panel, {**panel, "control": ["pose.png:canny:0"]}]}
            ],
        },
    )
    out = tmp_path / "out"
    assert sample.main(["--page", str(page), "--out", str(out), "--device", "cpu"]) == 0
    meta = read_png_metadata(out / "panel-01.png")
    assert meta["controls"] == [{"image": "pose.png", "type": "canny", "scale": 1.0, "controlnet": str(CONTROLNET_DIR)}]
    assert "controls" not in read_png_metadata(out / "panel-02.png")
    images = [Image.open(out / f"panel-0{k}.png").convert("RGB") for k in (1, 2, 3)]
    assert images[0].tobytes() != images[1].tobytes() and images[2].tobytes() == images[1].tobytes()

    pipe = load_pipeline(tiny.TINY_DIR)
    pixels = torch.from_numpy(np.asarray(drawing, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    control = canny(pixels).float()[None].expand(3, -1, -1)[None]  # white edges on black, [1, 3, 32, 32]
    x = generate(
        pipe,
        ["a picture of a girl"],
        steps=3,
        cfg=5.0,
        seed=5,
        width=32,
        height=32,
        progress=False,
        controls=[(load_controlnet(CONTROLNET_DIR), control, 1.0)],
    )[0]
    assert to_pil(x).tobytes() == images[0].tobytes()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.update(control="missing.png:canny"), "panel 1: 'control' image missing.png not found"),
        (lambda p: p.update(control=[3]), "panel 1: 'control' must be \"IMAGE[:TYPE[:SCALE]]\""),
        (
            lambda p: p.update(control="pose.png:canny", init="pose.png", mask="pose.png"),
            "panel 1: 'control' steers text-to-image and img2img panels, not 'mask' or 'outpaint' ones",
        ),
        (lambda p: p.update(control="pose.png:canny", controlnet="nowhere"), "panel 1: 'controlnet' nowhere not found"),
        (
            lambda p: p.update(control="pose.png:canny:inf"),
            "panel 1: control pose.png:canny:inf: the scale must be a finite number",
        ),
    ],
)
def test_bad_panel_controls_are_one_line(tmp_path, capsys, change, message):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "pose.png")
    panel = {"prompt": "a picture of a girl"}
    change(panel)
    path = write_page(tmp_path, {"rows": [{"panels": [panel]}]})
    assert sample.main(["--page", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
