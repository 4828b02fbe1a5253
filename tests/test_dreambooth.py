"""dreambooth.py: the prior-preservation loss, per-row conditioning, min-SNR, class images, frozen weights.

Everything runs on a tiny random pixel-space SDXL-family pipeline (tiny UNet, the tiny CLIPs of test_text.py).
References are independent of our code: hand computations in numpy, a UNet call on one half of the batch alone,
the text encoders called directly, the images' own file sizes.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from minidiff import dreambooth as db
from minidiff.data import ImageFolder, instance_images
from minidiff.errors import DataError
from minidiff.lora import inject_lora, lora_parameters
from minidiff.pipeline import generate
from minidiff.schedule import Schedule

SIZE = 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def _examples(n, caption, ids, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1
    return db.Examples(
        mean,
        None,
        torch.tensor([ids] * n, dtype=torch.float32),
        [caption] * n,
        list(range(n)),
        [f"{caption}-{i}" for i in range(n)],
    )


def _lora_unet(pipe):
    unet = copy.deepcopy(pipe.unet)
    inject_lora(unet, "attn", rank=4)
    with torch.no_grad():  # B starts at zero, which would leave A without gradient: give both some values
        for p in lora_parameters(unet):
            p.normal_(0, 0.1)
    return unet


# ----------------------------------------------------------------------------------------------- the loss
def test_prior_weight_zero_is_instance_only_training(pipe):
    unet = _lora_unet(pipe)
    params = lora_parameters(unet)
    instance = _examples(3, "a picture of sks girl", [128, 96, 0, 0, SIZE, SIZE], 1)
    klass = _examples(4, "a picture of a girl", [SIZE, SIZE, 0, 0, SIZE, SIZE], 2)
    cache = db.PromptCache(pipe.text, instance.captions + klass.captions)

    def step(klass_or_none, weight):
        torch.manual_seed(7)
        batch = db.make_batch(instance, klass_or_none, 2)
        terms = db.compute_loss(unet, batch, pipe.schedule, cache, prior_weight=weight)
        return batch, terms, torch.autograd.grad(terms[0], params)

    b0, (loss0, inst0, prior0), g0 = step(klass, 0.0)
    b1, (loss1, inst1, _), g1 = step(None, 1.0)
    assert b0["z0"].shape[0] == 4 and b1["z0"].shape[0] == 2
    torch.testing.assert_close(b0["z0"][:2], b1["z0"]), torch.testing.assert_close(b0["t"][:2], b1["t"])
    torch.testing.assert_close(loss0, loss1, rtol=1e-5, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in g0)
    # the prior term is the plain MSE of a UNet call on the class rows alone, and lambda = 1 adds it
    _, (loss2, inst2, prior2), g2 = step(klass, 1.0)
    rows = slice(2, 4)
    z_t = pipe.schedule.q_sample(b0["z0"][rows], b0["t"][rows], b0["eps"][rows])
    context, pooled = cache(b0["captions"][2:])
    with torch.no_grad():
        alone = unet(z_t, b0["t"][rows], context=context, text_embeds=pooled, time_ids=b0["time_ids"][rows])
    torch.testing.assert_close(prior2.detach(), ((alone - b0["eps"][rows]) ** 2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss2.detach(), (inst1 + prior2).detach(), rtol=1e-5, atol=0)
    assert not torch.allclose(g2[0], g1[0])


def _alpha_bar_by_hand(T=1000, b0=0.00085, b1=0.012):
    betas = np.linspace(b0**0.5, b1**0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_applied_per_row_to_its_own_timestep(prediction):
    """B = 2 instance + 2 class rows with four different timesteps; numpy reference of L (module docstring).
    (diffusers' basic script weights B losses with 2B timesteps: a shape error for B > 1.)"""
    schedule, gamma, lam = Schedule.scaled_linear(), 5.0, 0.7
    g = torch.Generator().manual_seed(0)
    z0, eps, pred = (torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([3, 100, 20, 700])  # SNR 291, 8.5 | 52, 0.09: four different weights
    batch = {"z0": z0, "eps": eps, "t": t, "time_ids": torch.zeros(4, 6), "captions": [""] * 4, "n_instance": 2}
    loss, inst, prior = db.compute_loss(
        lambda x, t, **kw: pred,
        batch,
        schedule,
        lambda c: (None, None),
        prediction,
        prior_weight=lam,
        min_snr_gamma=gamma,
    )
    ab = _alpha_bar_by_hand()[t.numpy()]
    snr = ab / (1 - ab)
    z0n, epsn, predn = z0.numpy(), eps.numpy(), pred.numpy()
    if prediction == "epsilon":
        y, w = epsn, np.minimum(snr, gamma) / snr
    else:
        y = np.sqrt(ab)[:, None, None, None] * epsn - np.sqrt(1 - ab)[:, None, None, None] * z0n
        w = np.minimum(snr, gamma) / (snr + 1)
    m = ((predn - y) ** 2).mean(axis=(1, 2, 3))
    assert len(set(w.round(6))) == 4  # the rows really have different weights
    expected = (w[:2] * m[:2]).mean() + lam * (w[2:] * m[2:]).mean()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-6)
    np.testing.assert_allclose(inst.item(), (w[:2] * m[:2]).mean(), rtol=1e-6)
    np.testing.assert_allclose(prior.item(), (w[2:] * m[2:]).mean(), rtol=1e-6)


def test_noise_offset_shifts_each_row_and_channel_by_a_constant():
    ex = _examples(2, "x", [SIZE, SIZE, 0, 0, SIZE, SIZE], 0)
    torch.manual_seed(3)
    plain = ex.draw(64, noise_offset=0.0)["eps"]
    torch.manual_seed(3)
    shifted = ex.draw(64, noise_offset=0.5)["eps"]
    diff = shifted - plain
    assert diff.abs().max() > 0
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))  # constant over h, w
    assert 0.3 < diff[:, :, 0, 0].std() < 0.7  # ~ 0.5 * N(0, 1)


# ----------------------------------------------------------------------------------------------- conditioning
def _png(path, w, h, color):
    Image.new("RGB", (w, h), color).save(path)
    return path


def test_every_row_gets_its_own_time_ids_caption_and_image(pipe, tmp_path):
    inst_dir, class_dir = tmp_path / "inst", tmp_path / "class"
    inst_dir.mkdir(), class_dir.mkdir()
    _png(inst_dir / "a.png", 40, 30, (255, 0, 0))
    (inst_dir / "a.txt").write_text("sks girl, running")  # a captioned image trains on its own caption
    _png(inst_dir / "b.png", 24, 48, (0, 255, 0))
    _png(class_dir / "c.png", 16, 16, (0, 0, 255))
    _png(class_dir / "d.png", 64, 20, (90, 90, 90))
    instance_set = ImageFolder(inst_dir, SIZE, fit="pad")
    klass_set = ImageFolder(class_dir, SIZE, fit="pad", caption="a picture of a girl")
    instance = db.encode_examples(instance_set, None, default_caption="a picture of sks girl", progress=False)
    klass = db.encode_examples(klass_set, None, progress=False)
    # (h, w) of each file as stored, crop (0, 0) when padded, target (16, 16)
    own = {
        (30.0, 40.0): ("a", "sks girl, running"),
        (48.0, 24.0): ("b", "a picture of sks girl"),
        (16.0, 16.0): ("c", "a picture of a girl"),
        (20.0, 64.0): ("d", "a picture of a girl"),
    }
    pixels = {p.split("/")[-1][0]: x for ds in (instance_set, klass_set) for p, x in zip(ds.paths, ds.tensors())}
    cache = db.PromptCache(pipe.text, instance.captions + klass.captions)

    seen = set()
    calls = []

    def recording_unet(x, t, context=None, text_embeds=None, time_ids=None):
        calls.append((context, text_embeds, time_ids))
        return pipe.unet(x, t, context=context, text_embeds=text_embeds, time_ids=time_ids)

    torch.manual_seed(0)
    for _ in range(3):
        batch = db.make_batch(instance, klass, 4)
        with torch.no_grad():
            db.compute_loss(recording_unet, batch, pipe.schedule, cache)
        context, pooled, ids = calls[-1]
        for row in range(8):
            assert ids[row, 2:].tolist() == [0, 0, SIZE, SIZE]
            name, caption = own[tuple(ids[row, :2].tolist())]
            assert (name in "ab") == (row < 4), f"row {row} holds {name}: instance rows first, then class rows"
            torch.testing.assert_close(batch["z0"][row], pixels[name])  # pixel space: z_0 is the image
            with torch.no_grad():
                ref_context, ref_pooled = pipe.text.encode([caption])  # the encoders themselves
            torch.testing.assert_close(context[row], ref_context[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pooled[row], ref_pooled[0], rtol=1e-5, atol=1e-6)
            seen.add(name)
    assert seen == set("abcd")


@torch.no_grad()
def test_latents_are_encoded_once_as_the_vae_posterior_times_the_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    vae = tiny_pipeline(tmp_path, latent=True).vae
    dataset = ImageFolder(instance_images(), SIZE)
    ex = db.encode_examples(dataset, vae, batch_size=4, progress=False)
    ref = DiffusersVAE.from_config(vae.config.to_diffusers())
    ref.load_state_dict(vae.state_dict())
    post = ref.encode(dataset.tensors()).latent_dist
    assert ex.mean.shape == (6, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(ex.mean, post.mean * 0.13025, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ex.std, post.std * 0.13025, rtol=1e-4, atol=1e-5)
    one = db.Examples(ex.mean[:1], ex.std[:1], ex.time_ids[:1], ["x"], [0], ["p"])
    torch.manual_seed(0)
    n = (one.draw(200)["z0"] - one.mean) / one.std  # a fresh z_0 ~ N(mean, std^2) every step
    assert abs(n.mean()) < 0.02 and abs(n.std() - 1) < 0.02


def test_crop_conditioning_and_caption_dropout(pipe, tmp_path):
    path = _png(tmp_path / "wide.png", 40, 30, (1, 2, 3))
    # fit="crop": short side 30 -> 16; 5 px were cut on the left in the original = 5 * 16 / 30 = 2.67 -> 3
    assert db.size_ids(path, SIZE, "crop") == [30.0, 40.0, 0.0, 3.0, 16.0, 16.0]
    assert db.size_ids(path, SIZE, "pad") == [30.0, 40.0, 0.0, 0.0, 16.0, 16.0]
    ex = _examples(3, "a picture of sks girl", [SIZE, SIZE, 0, 0, SIZE, SIZE], 0)
    torch.manual_seed(0)
    captions = ex.draw(400, caption_dropout=0.25)["captions"]
    assert 60 < captions.count("") < 140 and set(captions) == {"", "a picture of sks girl"}
    cache = db.PromptCache(pipe.text, ["a picture of sks girl"])
    context, pooled = cache(["", "a picture of sks girl"])
    assert context[0].abs().sum() == 0 and pooled[0].abs().sum() == 0  # dropped = the zero (unconditional) input
    assert context[1].abs().sum() > 0
    live_context, live_pooled = db.encode_captions(pipe.text, ["", "a picture of sks girl"])
    torch.testing.assert_close(live_context, context, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(live_pooled, pooled, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- class images
def test_class_images_are_made_once_and_repaired_identically(pipe, tmp_path):
    class_dir = tmp_path / "class"
    calls = []

    def make(prompts, seeds):
        calls.append(list(seeds))
        return generate(
            pipe, prompts, steps=2, seed=seeds[0], width=SIZE, height=SIZE, batch_size=len(prompts), progress=False
        )

    paths, written = db.generate_class_images(
        make, class_dir, 5, "a picture of a girl", batch_size=2, seed=10, progress=False
    )
    assert written == 5 and calls == [[10, 11], [12, 13], [14]]
    assert sorted(p.name for p in class_dir.iterdir()) == [f"class-0000{i}.png" for i in range(5)]
    assert [p.name for p in paths] == [f"class-0000{i}.png" for i in range(5)]
    from minidiff.images import read_png_metadata

    meta = read_png_metadata(class_dir / "class-00003.png")
    assert meta["prompt"] == "a picture of a girl" and meta["seed"] == 13
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in class_dir.iterdir()}
    assert len({b for b, _ in before.values()}) == 5  # different seeds, different images

    (class_dir / "class-00001.png").unlink()
    (class_dir / "class-00004.png").unlink()
    calls.clear()
    paths, written = db.generate_class_images(
        make, class_dir, 5, "a picture of a girl", batch_size=2, seed=10, progress=False
    )
    assert written == 2 and calls == [[10, 11], [14]]  # only the batches holding a missing image
    for p in class_dir.iterdir():
        data, mtime = before[p.name]
        assert p.read_bytes() == data  # same seed, same batch -> the same file, byte for byte
        if p.name not in ("class-00001.png", "class-00004.png"):
            assert p.stat().st_mtime_ns == mtime  # untouched
    calls.clear()
    assert db.generate_class_images(make, class_dir, 5, "x", batch_size=2, progress=False)[1] == 0 and not calls
    # more images asked for later: the existing five are kept and reused
    paths, written = db.generate_class_images(
        make, class_dir, 6, "a picture of a girl", batch_size=2, seed=10, progress=False
    )
    assert written == 1 and calls == [[14, 15]] and len(paths) == 6


def test_user_class_images_count_and_missing_ones_are_reported(tmp_path):
    class_dir = tmp_path / "reg"
    class_dir.mkdir()
    for i in range(3):
        _png(class_dir / f"photo{i}.jpg", 8, 8, (i, i, i))
    paths, missing = db.class_image_plan(class_dir, 5)
    assert [p.name for p in paths] == ["photo0.jpg", "photo1.jpg", "photo2.jpg", "class-00000.png", "class-00001.png"]
    assert missing == [0, 1]
    assert db.check_class_images(class_dir, 3, can_generate=False)[1] == []
    with pytest.raises(DataError, match="has 3.*--no-generate"):
        db.check_class_images(class_dir, 5, can_generate=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="is a file, not a folder"):  # cannot be created, even by root
        db.check_class_images(blocker / "class", 5, can_generate=True)


# ----------------------------------------------------------------------------------------------- the loop
def test_training_changes_only_the_adapters(pipe, tmp_path):
    unet = copy.deepcopy(pipe.unet)
    text = pipe.text
    frozen = {k: v.clone() for k, v in unet.state_dict().items()}
    frozen_text = {k: v.clone() for k, v in text.state_dict().items()}
    inject_lora(unet, "attn-ff", rank=2)
    start = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" in k}
    instance = _examples(3, "a picture of sks girl", [96, 128, 0, 0, SIZE, SIZE], 1)
    klass = _examples(3, "a picture of a girl", [SIZE, SIZE, 0, 0, SIZE, SIZE], 2)
    cache = db.PromptCache(text, ["a picture of sks girl", "a picture of a girl"])
    from minidiff.train.state import Trainable

    cfg = db.TrainConfig(steps=3, lr=1e-2, batch_size=1, min_snr_gamma=5.0, noise_offset=0.1, warmup=2)
    result = db.train(
        unet=unet,
        params=lora_parameters(unet),
        schedule=pipe.schedule,
        instance=instance,
        klass=klass,
        embed=cache,
        cfg=cfg,
        out_dir=tmp_path,
        modules={"unet": Trainable(unet)},
        progress=False,
    )
    assert result["steps"] == 3 and np.isfinite(result["loss"])
    after = unet.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k  # bit-identical frozen base
    for k, v in frozen_text.items():
        assert torch.equal(text.state_dict()[k], v), k
    assert all(not torch.equal(after[k], v) for k, v in start.items() if ".lora_B." in k)  # the adapters moved
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "loss", "instance"] and len(rows) == 4
    lrs = [float(r.split(",")[rows[0].split(",").index("lr")]) for r in rows[1:]]
    assert lrs == [5e-3, 1e-2, 1e-2]  # linear warm-up over 2 steps, then the base lr
    assert (tmp_path / "loss.png").is_file()


def test_lr_schedules():
    assert db.lr_factor(0, 100, warmup=4) == 0.25 and db.lr_factor(3, 100, warmup=4) == 1.0
    assert db.lr_factor(50, 100, 0, "constant") == 1.0
    assert db.lr_factor(50, 100, 0, "linear") == 0.5 and db.lr_factor(100, 100, 0, "linear") == 0.0
    assert abs(db.lr_factor(55, 100, 10, "cosine") - 0.5) < 1e-12  # half way through the decay: cos(pi/2)
