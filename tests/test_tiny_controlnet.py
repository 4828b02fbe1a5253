"""The miniature's ControlNet: its training loop runs and writes weights load_controlnet reads, the training target
is eps or v as the model's scheduler says, and the shipped ControlNet fits the shipped miniature and steers it."""
import random

import pytest
import torch

from minidiff.bundled import tiny
from minidiff.bundled.tiny_controlnet import (
    CONTROLNET_DIR,
    TRAIN_COMMAND,
    WorldSampler,
    control_images,
    held_out_controls,
    target,
    train,
)
from minidiff.controlnet import check_fits
from minidiff.weights.controlnet_files import load_controlnet
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
    from minidiff.pipeline import generate

    net = load_controlnet(CONTROLNET_DIR)
    check_fits(net, pipe.unet, pipe.scale)
    assert sum(f.stat().st_size for f in CONTROLNET_DIR.glob("*.safetensors")) <= 10 * 2**20
    _, _, _, control = held_out_controls()[0]
    kw = dict(steps=4, cfg=5.0, sampler="dpmpp_2m", width=tiny.SIZE, height=tiny.SIZE, progress=False)
    a = generate(pipe, ["a picture of a girl"], **kw)
    b = generate(pipe, ["a picture of a girl"], controls=[(net, control[None], 1.0)], **kw)
    assert (a - b).abs().mean() > 5e-3  # its zero convs have opened (the shipped run is short: README)
