"""The miniature's ControlNet: its training loop runs and writes weights load_controlnet reads, the training target
is eps or v as the model's scheduler says, and the shipped ControlNet fits the shipped miniature and steers it."""

import random

import pytest
import torch

from minidiff.bundled import tiny
from minidiff.bundled.pose_control import (
    PROMPT,
    conflicting_action,
    control_images,
    figure,
    held_out_controls,
    shares,
    target_controls,
)
from minidiff.bundled.tiny_controlnet import CONTROLNET_DIR, TRAIN_COMMAND, WorldSampler, target, train
from minidiff.controlnet import check_fits
from minidiff.controlnet import load_controlnet
from minidiff.weights.pretrained import load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(tiny.TINY_DIR)


def test_target_is_eps_or_v():
    x0, eps, ab = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor(0.36)
    assert torch.equal(target({"prediction_type": "epsilon"}, x0, eps, ab), eps)
    v = target({"prediction_type": "v_prediction"}, x0, eps, ab)
    assert torch.allclose(v, 0.6 * eps - 0.8 * x0)  # sqrt(0.36) eps - sqrt(0.64) x_0


def test_controls_of_the_world_are_line_drawings():
    x, captions = WorldSampler().draw(4, random.Random(0))
    c = control_images(x, ["canny", "scribble", "canny", "scribble"])
    assert c.shape == (4, 3, tiny.SIZE, tiny.SIZE) and set(c.unique().tolist()) == {0.0, 1.0}
    assert all(0.02 < ci.mean() < 0.5 for ci in c)  # lines, neither empty nor filled
    assert all(isinstance(s, str) and s.startswith("a picture of") for s in captions)
    assert len(held_out_controls()) == 2 * 7


def test_a_few_training_steps_write_a_loadable_controlnet(pipe, tmp_path):
    net = train(pipe, tmp_path, steps=2, batch_size=2, progress=False)
    back = load_controlnet(tmp_path)
    check_fits(back, pipe.unet, pipe.scale)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    assert (tmp_path / "train.json").is_file() and (tmp_path / "loss.csv").is_file()


@pytest.mark.skipif(not CONTROLNET_DIR.exists(), reason=f"no shipped tiny ControlNet ({TRAIN_COMMAND})")
def test_shipped_controlnet_fits_and_steers_the_miniature(pipe):
    """The target's fall and jump drawings as canny controls (the miniature's guidance, the eval's settings): the
    classifier sees that pose family in every sample; without control it sees none (the miniature draws a walker)."""
    from minidiff.eval.classifier import load_classifier, pose_family, predict
    from minidiff.pipeline import generate

    net = load_controlnet(CONTROLNET_DIR)
    check_fits(net, pipe.unet, pipe.scale)
    assert sum(f.stat().st_size for f in CONTROLNET_DIR.glob("*.safetensors")) <= 10 * 2**20
    model = load_classifier()
    kw = dict(steps=30, cfg=tiny.GUIDANCE, width=tiny.SIZE, height=tiny.SIZE, progress=False)
    free = [pose_family(p) for p in predict(generate(pipe, [PROMPT] * 2, **kw), model)[1]]
    hits = []
    for pose, _, _, control in target_controls(("fall", "jump"), ("canny",)):
        x = generate(pipe, [PROMPT] * 2, controls=[(net, control[None], 1.0)], **kw)
        hits += [pose_family(p) == pose for p in predict(x, model)[1]]
        assert pose not in free
    assert all(hits), hits


def test_shares_hand_computed():
    m = {"walk1": [True, True], "walk2": [False, True], "climb1": [False, False]}
    assert shares(m) == {"all": 0.5, "family-balanced": 0.375}  # 3 / 6; (3/4 + 0/2) / 2
    assert conflicting_action("walk5") == "jumping" and conflicting_action("climb1") == "walking"
    assert conflicting_action("jump") == "walking" and conflicting_action("idle") == "jumping"


@pytest.mark.parametrize("n", [1, 2, 7])
def test_figure_cells_stay_aligned_for_any_n(tmp_path, n):
    """Each sample cell a flat colour of its own: the figure must put it in its row and column whatever n is."""
    from PIL import Image

    from minidiff import data

    colour = {}

    def flat(key, i):
        colour[(key, i)] = ((len(colour) * 37) % 200 + 20, (len(colour) * 91) % 200 + 20, 120)
        return torch.tensor(colour[(key, i)], dtype=torch.float32)[:, None, None].expand(3, 32, 32) / 127.5 - 1

    keys = [(p, k, PROMPT) for p in data.POSES for k in ("canny", "scribble")] + [(None, None, PROMPT)]
    keys += [(p, "canny", f"{PROMPT} {conflicting_action(p)}") for p in data.HELD_OUT_POSES]
    keys += [(None, None, f"{PROMPT} {conflicting_action(p)}") for p in data.HELD_OUT_POSES]
    samples = {key: torch.stack([flat(key, i) for i in range(n)]) for key in keys}
    sheet = Image.open(figure(samples, tmp_path / "f.png", per_row=6)).convert("RGB")
    k = min(n, 6)
    ncol, nrows = 2 * k + 3, len(data.POSES) + 1 + len(data.HELD_OUT_POSES)
    grid_w = (ncol * 34 + 2) * 3
    assert sheet.height == 22 + (nrows * 34 + 2) * 3
    left = sheet.width - grid_w

    def at(row, col):
        return sheet.getpixel((left + (2 + col * 34 + 16) * 3, 22 + (2 + row * 34 + 16) * 3))

    for r, pose in enumerate(data.POSES):
        for i in range(k):
            assert at(r, 2 + i) == colour[((pose, "canny", PROMPT), i)]
            assert at(r, 3 + k + i) == colour[((pose, "scribble", PROMPT), i)]
    free = len(data.POSES)
    assert [at(free, 2 + i) for i in range(k)] == [colour[((None, None, PROMPT), i)] for i in range(k)]
    assert at(free, 0) == at(free, 1) == (255, 255, 255)
    for r, pose in enumerate(data.HELD_OUT_POSES, free + 1):
        words = f"{PROMPT} {conflicting_action(pose)}"
        assert at(r, 2 + k - 1) == colour[((pose, "canny", words), k - 1)]
        assert at(r, 3 + k) == colour[((None, None, words), 0)]
