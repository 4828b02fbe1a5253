"""The shipped character classifier: recognises the bundled drawings (clean and at 32 px), loads and fails clearly."""

import json

import pytest
import torch
import torch.nn.functional as F

from minidiff import data
from minidiff.eval import classifier
from minidiff.errors import CheckpointError, DataError


@pytest.fixture(scope="module")
def model():
    return classifier.load_classifier()


@pytest.fixture(scope="module")
def kenney():
    pairs = [(c, p) for c in data.CHARACTERS for p in data.POSES]
    return pairs, data.load_tensor_set([data.kenney_path(c, p) for c, p in pairs], 96)


def test_shipped_file_is_small_and_documented():
    assert classifier.CLASSIFIER_PATH.stat().st_size <= 2 * 1024 * 1024
    meta = classifier.load_classifier().metadata
    assert json.loads(meta["characters"]) == list(data.CHARACTERS) and json.loads(meta["poses"]) == list(data.POSES)
    # the shipped file records the command as it was run, before the module moved to minidiff/eval/
    assert meta["command"].startswith("python -m minidiff.classifier --train")
    assert "heldout_poses" in json.loads(meta["accuracy"])


def test_recognises_all_78_clean_drawings(model, kenney):
    pairs, x = kenney
    characters, poses, probs = classifier.predict(x, model)
    acc = sum(c == true_c for c, (true_c, _) in zip(characters, pairs)) / len(pairs)
    fam = sum(classifier.pose_family(p) == classifier.pose_family(q) for p, (_, q) in zip(poses, pairs)) / len(pairs)
    assert acc >= 0.95, acc
    assert fam >= 0.9, fam
    assert probs["character"].shape == (78, 6) and probs["pose"].shape == (78, 13) and probs["family"].shape == (78, 5)
    torch.testing.assert_close(probs["family"].sum(-1), torch.ones(78))


def test_recognises_32px_versions(model, kenney):
    pairs, _ = kenney
    x32 = data.load_tensor_set([data.kenney_path(c, p) for c, p in pairs], 32)  # what a 32 px baseline outputs
    characters, _, _ = classifier.predict(x32, model)
    acc = sum(c == true_c for c, (true_c, _) in zip(characters, pairs)) / len(pairs)
    assert acc >= 0.9, acc


def test_mirror_and_non_square_inputs(model, kenney):
    pairs, x = kenney
    flipped, _, _ = classifier.predict(x.flip(-1), model)  # flips keep the character (pixel baselines use x-flip)
    assert sum(c == t for c, (t, _) in zip(flipped, pairs)) / len(pairs) >= 0.9
    tall = data.load_tensor_set([data.kenney_path("robot", "idle")], 96)[:, :, :, 16:80]  # 96x64, padded inside
    assert classifier.predict(tall, model)[0] == ["robot"]


def test_does_not_call_everything_the_target(model):
    # noise and blank canvases are not a confident female_adventurer (the identity metric must be able to fail)
    junk = torch.cat([torch.ones(4, 3, 64, 64), torch.rand(4, 3, 64, 64) * 2 - 1])
    _, _, probs = classifier.predict(junk, model)
    assert probs["character"][:, data.CHARACTERS.index("female_adventurer")].mean() < 0.5


def test_pose_family():
    assert [classifier.pose_family(p) for p in ("climb1", "walk7", "idle", "fall", "jump")] == [
        "climb",
        "walk",
        "idle",
        "fall",
        "jump",
    ]
    assert {classifier.pose_family(p) for p in data.POSES} == set(classifier.FAMILIES)


def test_augment_keeps_shape_range_and_is_seeded():
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    alpha = torch.ones(4, 1, 64, 64)
    a = classifier.augment(x.clone(), alpha, torch.Generator().manual_seed(3))
    b = classifier.augment(x.clone(), alpha, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1 and torch.equal(a, b)
    assert not torch.equal(a, x)


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="--train"):
        classifier.load_classifier(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        classifier.load_classifier(bad)
    with pytest.raises(DataError):
        classifier.preprocess(torch.zeros(3, 64, 64))
    with pytest.raises(DataError):
        classifier.preprocess(torch.zeros(1, 4, 64, 64))


def test_preprocess_pads_with_white():
    x = -torch.ones(1, 3, 64, 32)
    p = classifier.preprocess(x, size=64)
    assert p.shape == (1, 3, 64, 64) and p[..., :16].min() == 1.0 and p[..., 16:48].max() == -1.0
    small = F.interpolate(x[..., :32, :], size=(16, 16))
    assert classifier.preprocess(small).shape == (1, 3, 64, 64)


def test_training_is_seeded():
    x, alpha, c, p = classifier.kenney_set(("idle", "jump"))
    a = classifier.train_model(x, alpha, c, p, steps=2, batch=8, seed=5, desc="a").state_dict()
    b = classifier.train_model(x, alpha, c, p, steps=2, batch=8, seed=5, desc="b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_noise_is_not_recognised_as_anyone():
    """A softmax always names someone: below MIN_CONFIDENCE the sample is 'unknown', so noise scores identity 0."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(32, 3, 64, 64, generator=g) * 2 - 1
    characters, _, probs = classifier.predict(noise)
    assert data.TARGET_CHARACTER not in characters
    assert characters.count(classifier.UNKNOWN) >= 0.9 * len(characters), characters
    assert all(
        (p >= classifier.MIN_CONFIDENCE) == (c != classifier.UNKNOWN)
        for p, c in zip(probs["character"].max(-1).values.tolist(), characters)
    )
