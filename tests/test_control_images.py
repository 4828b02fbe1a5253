"""Control-image preprocessors on synthetic shapes whose right answer is known by hand: a square's outline, a disc's
circle, a step's single column, noise below the threshold, a thick stroke's one-pixel skeleton."""

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.control_images import canny, control_tensor, gaussian_blur, make_control, scribble, sobel, thin
from minidiff.errors import DataError


def square(size=48, lo=12, hi=36):
    x = torch.zeros(size, size)
    x[lo:hi, lo:hi] = 1.0
    return x


def test_gaussian_blur_keeps_mass_and_constants():
    x = torch.zeros(21, 21)
    x[10, 10] = 1.0
    b = gaussian_blur(x, 1.5)
    assert abs(b.sum().item() - 1.0) < 1e-5 and b[10, 10] == b.max()
    assert torch.allclose(b, b.T, atol=1e-7)  # isotropic
    assert torch.allclose(gaussian_blur(torch.full((9, 9), 0.3), 2.0), torch.full((9, 9), 0.3))


def test_sobel_of_a_ramp():
    """x(i, j) = 2 j: g_x = (1 + 2 + 1) * (2 * 2) = 16 inside, g_y = 0."""
    x = 2.0 * torch.arange(10.0)[None].expand(10, 10)
    gx, gy = sobel(x)
    assert torch.allclose(gx[:, 1:-1], torch.full((10, 8), 16.0)) and gy.abs().max() == 0


def test_canny_finds_a_square_outline_one_pixel_wide():
    e = canny(square(), sigma=1.0)
    # every edge pixel lies on the border between the square (rows/cols 12..35) and the background
    ys, xs = torch.nonzero(e, as_tuple=True)
    near = lambda v, edge: (v - edge).abs() <= 1  # noqa: E731
    on_border = near(ys, 11.5) | near(ys, 35.5) | near(xs, 11.5) | near(xs, 35.5)
    assert on_border.all()
    # each side's middle is crossed by exactly one edge pixel (non-maximum suppression thins to 1 px)
    for line in (e[24, :24], e[24, 24:], e[:24, 24], e[24:, 24]):
        assert line.sum() == 1
    assert not e[16:32, 16:32].any() and not e[:8].any()  # flat inside and outside


def test_canny_circle_edges_lie_on_the_radius():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2).sqrt()
    disc = (r < 20).float()
    e = canny(torch.stack([disc] * 3), sigma=1.0)
    assert e.sum() > 2 * 3.14 * 20 * 0.8  # the whole circumference
    assert ((r[e] - 20).abs() <= 1.5).all()


def test_canny_hysteresis_keeps_weak_edges_connected_to_strong_ones():
    """A step whose height falls along it: its strong half alone passes `high`, the weak half survives through the
    connection, and an isolated weak step is dropped."""
    x = torch.zeros(40, 40)
    x[:20, 20:] = 1.0  # strong step, rows 0..19
    x[20:30, 20:] = 0.3  # weak step (0.3 * 1020 ~ 306 > low, < high when high = 400), connected below
    x[35:, :8] = 0.3  # an isolated weak corner
    e = canny(x, low=150, high=400, sigma=0.0)
    assert e[5:15, 19:21].any(dim=1).all() and e[22:28, 19:21].any(dim=1).all()
    assert not e[34:, :10].any()
    assert not canny(x, low=350, high=400, sigma=0.0)[22:28].any()  # weak part under `low`: gone


def test_canny_ignores_faint_noise():
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.01 * torch.randn(32, 32, generator=g)
    assert not canny(x).any()
    with pytest.raises(DataError, match="low <= high"):
        canny(x, low=3, high=2)


def test_thinning_gives_a_one_pixel_skeleton():
    m = np.zeros((20, 30), bool)
    m[8:13, 3:27] = True  # a 5-px thick horizontal bar
    t = thin(m)
    assert t[10, 6:24].all()  # the middle row, ends shortened at most by the bar's half width
    assert t.sum(axis=0).max() == 1  # one pixel per column
    assert not t[:8].any() and not t[13:].any()


def test_scribble_from_dark_strokes_on_paper_and_light_on_dark():
    paper = torch.ones(3, 32, 32)
    paper[:, 14:18, 4:28] = 0.0  # a black 4-px stroke
    lines = scribble(paper)
    assert lines.sum(dim=0).max() == 1 and lines[:, 8:24].any(dim=0).all()
    assert torch.equal(scribble(1 - paper), lines)
    wide = scribble(paper, width=3)
    assert wide.sum(dim=0).max() == 3


def test_make_control_and_control_tensor():
    img = torch.stack([square()] * 3)
    c = make_control(img, "canny")
    assert c.shape == (3, 48, 48) and set(c.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(make_control(img, "image"), img)
    with pytest.raises(DataError, match="pose and depth"):
        make_control(img, "openpose")
    pil = Image.fromarray((np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8))
    t = control_tensor(pil, 16, 24)
    assert t.shape == (1, 3, 16, 24) and 0 <= t.min() and t.max() <= 1
    with pytest.raises(DataError, match="control image"):
        control_tensor(torch.zeros(2, 5, 5), 5, 5)
