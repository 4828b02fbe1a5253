"""inpaint.py: the mask feather (closed forms of a Gaussian), the paste-back (pixels outside the mask come back
exactly), the "only masked" box (hand-computed), the grown canvas, and inpaint / outpaint end to end on the bundled
pixel-space miniature (what is outside the feathered mask is the input, bit for bit)."""

from pathlib import Path

import pytest
import torch

from minidiff.errors import MinidiffError
from minidiff.inpaint import blur, grow_canvas, inpaint, mask_box, outpaint, paste

MINIATURE = Path(__file__).resolve().parents[1] / "minidiff" / "assets" / "tiny-sdxl"


@pytest.fixture(scope="module")
def pipe():
    from minidiff.weights.pretrained import load_pipeline

    return load_pipeline(MINIATURE)


def test_blur_is_a_normalised_gaussian():
    step = torch.zeros(1, 9, 20)
    step[..., 10:] = 1
    soft = blur(step, 4.0)
    torch.testing.assert_close(blur(torch.ones(1, 9, 20), 4.0), torch.ones(1, 9, 20))  # weights sum to 1
    assert torch.equal(blur(step, 0), step)
    # symmetric kernel: at the edge pixels 9 and 10 the blurred step is 0.5 -/+ the same amount
    torch.testing.assert_close(soft[0, 4, 9] + soft[0, 4, 10], torch.tensor(1.0))
    assert soft[0, 4, 0] == 0 and soft[0, 4, -1] == 1 and 0.5 < soft[0, 4, 10] < 1
    k = torch.exp(-0.5 * (torch.arange(-4, 5.0) / 2) ** 2)  # sigma = radius / 2, kernel 2 * 4 + 1
    torch.testing.assert_close(soft[0, 4, 10], (k[4:].sum() / k.sum()).float())  # pixel 10 sees 5 ones of 9


def test_paste_keeps_the_original_where_the_mask_is_zero():
    x, g = torch.rand(3, 8, 8) * 2 - 1, torch.rand(3, 8, 8) * 2 - 1
    m = torch.zeros(1, 8, 8)
    m[:, 2:5, 3:6] = 1
    out = paste(x, g, m)
    assert torch.equal(out[:, m[0] == 0], x[:, m[0] == 0]) and torch.equal(out[:, m[0] == 1], g[:, m[0] == 1])


def test_mask_box_hand_computed():
    m = torch.zeros(1, 100, 200)
    m[:, 40:50, 60:70] = 1  # a 10 x 10 hole
    # padding 5 -> rows 35..55, cols 55..75 (20 x 20); aspect 2 -> 40 wide, centred: cols 45..85; multiple 8 ->
    # 24 high x 40 wide, centred on rows 35..55: 33..57
    assert mask_box(m, padding=5, aspect=2.0) == (33, 45, 57, 85)
    m2 = torch.zeros(1, 64, 64)
    m2[:, 0:4, 60:64] = 1  # in a corner: the box is shifted inside the image
    assert mask_box(m2, padding=8, aspect=1.0) == (0, 48, 16, 64)
    with pytest.raises(MinidiffError, match="mask is empty"):
        mask_box(torch.zeros(1, 8, 8), 4, 1.0)


def test_grow_canvas():
    x = torch.rand(3, 16, 24) * 2 - 1
    canvas, mask = grow_canvas(x, left=8, right=0, top=0, bottom=16, overlap=4)
    assert canvas.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert torch.equal(canvas[:, :16, 8:], x)
    assert torch.equal(canvas[:, :16, 0], x[:, :, 0]) and torch.equal(canvas[:, 31, 8:], x[:, -1])  # edges stretched
    assert mask[0, :12, 12:].eq(0).all() and mask[0, :, :12].eq(1).all() and mask[0, 12:].eq(1).all()
    with pytest.raises(MinidiffError, match="grow by non-negative"):
        grow_canvas(x)


@pytest.mark.parametrize("only_masked", [False, True])
def test_inpaint_changes_only_the_feathered_mask(pipe, only_masked):
    from minidiff.pipeline import generate

    image = generate(pipe, ["a picture of a robot"], steps=4, width=64, height=48, seed=1, progress=False)[0]
    mask = torch.zeros(1, 48, 64)
    mask[:, 16:32, 40:56] = 1
    out = inpaint(
        pipe, "a picture of a zombie", image, mask, blur_radius=2, only_masked=only_masked, padding=4, steps=4, seed=2
    )
    soft = blur(mask, 2)
    assert out.shape == image.shape
    assert torch.equal(out[:, soft[0] == 0], image[:, soft[0] == 0])  # untouched, bit for bit
    assert (out - image)[:, mask[0] == 1].abs().mean() > 0.05  # the hole was repainted


def test_outpaint_grows_the_canvas_and_keeps_the_middle(pipe):
    from minidiff.pipeline import generate

    image = generate(pipe, ["a picture of a girl"], steps=4, width=32, height=32, seed=3, progress=False)[0]
    out = outpaint(pipe, "a picture of a girl", image, left=16, right=16, overlap=4, blur_radius=2, steps=4, seed=4)
    assert out.shape == (3, 32, 64)
    torch.testing.assert_close(out[:, :, 16 + 6 : 48 - 6], image[:, :, 6:-6], rtol=0, atol=0)
    assert (out[:, :, :8] - image[:, :, :1]).abs().mean() > 0.02  # the border is painted, not the stretched edge
