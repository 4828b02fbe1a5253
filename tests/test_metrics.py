"""metrics.py against closed forms and hand-computed cases (no weights needed except in the evaluate() test)."""

import math

import pytest
import torch

from minidiff.eval import metrics
from minidiff.errors import DataError


def flat(values, size=8):
    """Images [N,3,size,size] in [-1,1] whose every pixel is the given [0,1] RGB triple."""
    v = torch.tensor(values, dtype=torch.float32).view(-1, 3, 1, 1)
    return (v * 2 - 1).expand(-1, 3, size, size).clone()


def test_lab_reference_values():
    # CIE L*a*b* (D65) of sRGB primaries and white, as published (e.g. Bruce Lindbloom's calculator, colormine.org)
    rgb = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0.5, 0.5, 0.5]]).view(6, 3, 1, 1)
    lab = metrics.srgb_to_lab(rgb).view(6, 3)
    expected = torch.tensor(
        [
            [100.0, 0, 0],
            [53.2408, 80.0925, 67.2032],
            [87.7347, -86.1827, 83.1793],
            [32.2970, 79.1875, -107.8602],
            [0, 0, 0],
            [53.3889, 0, 0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(lab, expected, atol=2e-3, rtol=0)


def test_lab_roundtrip():
    rgb = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(metrics.lab_to_srgb(metrics.srgb_to_lab(rgb)), rgb, atol=1e-9, rtol=0)


def test_identical_sets_are_at_distance_zero():
    x = torch.rand(5, 3, 40, 40) * 2 - 1
    p = metrics.prepare(x)
    d1, d2, idx = metrics.nearest_neighbours(p, p)
    assert d1.abs().max() < 1e-6 and torch.equal(idx, torch.arange(5))
    assert metrics.palette_distance(p, p) == 0.0


def test_nn_distance_hand_case():
    # samples: gray 0.5 and black; train: white, gray 0.25, gray 0.6 (flat images, so RMSE = channel difference)
    s = metrics.prepare(flat([[0.5] * 3, [0.0] * 3]))
    t = metrics.prepare(flat([[1.0] * 3, [0.25] * 3, [0.6] * 3]))
    d1, d2, idx = metrics.nearest_neighbours(s, t)
    torch.testing.assert_close(d1, torch.tensor([0.1, 0.25], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(d2, torch.tensor([0.25, 0.6], dtype=torch.float64), atol=1e-5, rtol=0)
    assert idx.tolist() == [2, 1]
    # per-channel difference: one channel off by 0.3, the others equal -> sqrt(0.3^2 / 3)
    d = metrics.pairwise_rmse(metrics.prepare(flat([[0.2, 0.5, 0.5]])), metrics.prepare(flat([[0.5, 0.5, 0.5]])))
    assert d.item() == pytest.approx(0.3 / math.sqrt(3), abs=1e-5)


def test_memorization_constructed():
    train = torch.rand(4, 3, 32, 32) * 2 - 1
    t = metrics.prepare(train)
    d1, d2, _ = metrics.nearest_neighbours(metrics.prepare(train.clone()), t)
    assert metrics.memorized_fraction(d1, d2) == 1.0  # exact copies
    far = metrics.prepare(flat([[0.0] * 3, [1.0] * 3], size=32))  # black / white: equally far from all noise images
    d1, d2, _ = metrics.nearest_neighbours(far, t)
    assert metrics.memorized_fraction(d1, d2) == 0.0
    # hand case: 2 samples, nearest at 0.1 vs second at 0.25 (memorised: 0.1 < 0.0833? no) and 0.01 vs 0.5 (yes)
    assert metrics.memorized_fraction(torch.tensor([0.1, 0.01]), torch.tensor([0.25, 0.5])) == 0.5
    d1, d2, _ = metrics.nearest_neighbours(t[:2], t[:1])
    assert math.isnan(metrics.memorized_fraction(d1, d2))  # one training image: the ratio test is undefined


def test_diversity():
    x = metrics.prepare(flat([[0.3, 0.4, 0.5]] * 4))
    assert metrics.diversity(x) == pytest.approx(0.0, abs=1e-6)
    # three flat grays 0, 0.3, 0.9 -> pair distances 0.3, 0.9, 0.6 -> mean 0.6
    x = metrics.prepare(flat([[0.0] * 3, [0.3] * 3, [0.9] * 3]))
    assert metrics.diversity(x) == pytest.approx(0.6, abs=1e-5)
    assert math.isnan(metrics.diversity(x[:1]))


def test_palette_distance_of_a_colour_shift_is_the_shift():
    # random mid-tone pixels, and the same pixels shifted in Lab by (dL, da, db): W1 per channel = |shift|, so the
    # palette distance is (|dL| + |da| + |db|) / 3 (both sets stay in gamut and far from the white background)
    g = torch.Generator().manual_seed(1)
    rgb = 0.3 + 0.4 * torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)
    shift = torch.tensor([5.0, -4.0, 6.0], dtype=torch.float64).view(1, 3, 1, 1)
    shifted = metrics.lab_to_srgb(metrics.srgb_to_lab(rgb) + shift)
    assert shifted.min() > 0 and shifted.max() < metrics.WHITE
    a, b = metrics.prepare(rgb * 2 - 1, size=16), metrics.prepare(shifted * 2 - 1, size=16)
    assert metrics.palette_distance(a, b) == pytest.approx((5 + 4 + 6) / 3, abs=1e-3)
    assert metrics.palette_distance(b, a) == pytest.approx((5 + 4 + 6) / 3, abs=1e-3)


def test_wasserstein_hand_case():
    # {0, 1} vs {0.5}: |F_u - F_v| = 0.5 on [0, 1] -> 0.5; {0, 0, 3} vs {1}: 2/3 * 1 + 1/3 * 2 = 4/3
    assert metrics.wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([0.5])) == pytest.approx(0.5)
    assert metrics.wasserstein_1d(torch.tensor([0.0, 0.0, 3.0]), torch.tensor([1.0])) == pytest.approx(4 / 3)


def test_palette_ignores_white_background():
    x = flat([[0.8, 0.2, 0.2]], size=16)
    y = x.clone()
    y[..., :8] = 1.0  # half of the canvas turned white: same character colours
    assert metrics.palette_distance(metrics.prepare(x, size=16), metrics.prepare(y, size=16)) < 1e-9
    assert math.isnan(metrics.palette_distance(metrics.prepare(torch.ones(1, 3, 8, 8)), metrics.prepare(x)))


def test_prepare_pads_non_square_with_white():
    x = -torch.ones(1, 3, 32, 16)  # black, tall
    p = metrics.prepare(x, size=32)
    assert p.shape == (1, 3, 32, 32)
    assert p[..., :, :8].min() == 1.0 and p[..., :, 8:24].max() == 0.0


def test_bad_input_raises_data_error():
    with pytest.raises(DataError):
        metrics.prepare(torch.zeros(3, 8, 8))
    with pytest.raises(DataError):
        metrics.prepare(torch.full((1, 3, 8, 8), 255.0))
    with pytest.raises(DataError):
        metrics.evaluate(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), target_character="batman")


def test_background_distance_hand_cases():
    """Training images white except a black middle (which differs between them); a sample tinted (0.9, 0.8, 1.0)
    on the common background lies sqrt((0.01 + 0.04 + 0) / 3) away, whatever is in its middle; one white there
    lies 0 away."""
    train = metrics.prepare(flat([[1, 1, 1]] * 2, 16), 16)
    train[0, :, 4:12, 4:12], train[1, :, 6:14, 2:10] = 0.0, 0.5
    mask = metrics.background_mask(train)
    assert mask.sum() == 16 * 16 - 8 * 8 - 8 * 8 + 6 * 6  # white in both
    tinted = metrics.prepare(flat([[0.9, 0.8, 1.0]], 16), 16)
    tinted[..., ~mask] = 0.0  # where a character may be is not background
    clean = metrics.prepare(flat([[1, 1, 1]], 16), 16)
    clean[..., ~mask] = 0.3
    assert metrics.background_distance(tinted, train) == pytest.approx(math.sqrt(0.05 / 3), rel=1e-6)
    assert metrics.background_distance(clean, train) == pytest.approx(0.0, abs=1e-9)


def test_evaluate_returns_all_keys():
    from minidiff import data

    paths = [data.kenney_path(data.TARGET_CHARACTER, p) for p in data.INSTANCE_POSES]
    train = data.load_tensor_set(paths, 64)
    samples = data.load_tensor_set(paths[:3], 32)  # copies of three training images at generator resolution
    r = metrics.evaluate(samples, train)
    assert set(r) >= {
        "nn_distance",
        "memorized_fraction",
        "palette_distance",
        "diversity",
        "identity",
        "pose_counts",
        "character_counts",
        "background",
    }
    assert r["background"] < 0.01  # the drawings' own border is the white they are drawn on
    assert r["size"] == 32  # compared at the samples' resolution, not blurred up to 64
    assert r["nn_distance"] < 0.03 and r["memorized_fraction"] == 1.0 and r["identity"] == 1.0
    assert r["palette_distance"] < 3.0 and r["diversity"] > 0.05
    assert sum(r["pose_counts"].values()) == 3 and r["character_counts"][data.TARGET_CHARACTER] == 3
