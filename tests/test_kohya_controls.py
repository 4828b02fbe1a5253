"""kohya-grade training controls: aspect-ratio buckets (two aspect ratios: each batch one bucket, time ids per image,
computed by hand), a batch of two shapes gives the same loss as its parts, epochs x repeats, rank and module dropout
by hand, optimizers, text-encoder learning rate."""

import pytest
import torch
from PIL import Image

import finetune
from minidiff import data
from minidiff.buckets import encode_buckets
from minidiff.dreambooth import compute_loss, encode_examples, make_batch
from minidiff.lora import LoRALinear
from minidiff.schedule import Schedule


def test_bucket_sizes_follow_kohyas_rule():
    sdxl = data.bucket_sizes(1024, 64)
    for b in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344)]:  # SDXL's usual buckets
        assert b in sdxl
    assert all(h * w <= 1024**2 and h % 64 == 0 == w % 64 and max(h / w, w / h) <= 2 for h, w in sdxl)
    assert data.bucket_sizes(32, 8) == [(24, 40), (32, 32), (40, 24)]
    assert data.nearest_bucket(96, 128, data.bucket_sizes(32, 8)) == (40, 24)  # a portrait 96 x 128 drawing


@pytest.fixture
def two_shapes(tmp_path):
    """A portrait (96 x 128) and a landscape (128 x 64) image in one kohya folder repeated 3 times."""
    folder = tmp_path / "3_sks girl"
    folder.mkdir()
    Image.new("RGB", (96, 128), (200, 10, 10)).save(folder / "portrait.png")
    Image.new("RGB", (128, 64), (10, 10, 200)).save(folder / "landscape.png")
    (folder / "landscape.txt").write_text("wide sks girl")
    return data.ImageFolder(tmp_path, 32, buckets=data.bucket_sizes(32, 8))


def test_each_batch_is_one_bucket_with_each_images_own_time_ids(two_shapes):
    ex = encode_buckets(two_shapes, progress=False)
    assert set(ex.groups) == {(40, 24), (24, 40)} and len(ex.index) == 6
    # portrait 96 x 128 -> scale max(24/96, 40/128) = 0.3125 -> 30 x 40, crop left (30 - 24) // 2 = 3
    # landscape 128 x 64 -> scale max(40/128, 24/64) = 0.375 -> 48 x 24, crop left (48 - 40) // 2 = 4
    want = {"sks girl": [128, 96, 0, 3, 40, 24], "wide sks girl": [64, 128, 0, 4, 24, 40]}
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        batch = make_batch(ex, None, batch_size=3)
        shape = tuple(batch["z0"].shape[2:])
        seen.add(shape)
        for caption, ids in zip(batch["captions"], batch["time_ids"].tolist()):
            assert ids == want[caption] and tuple(ids[4:]) == shape  # one bucket per batch, each row its own ids
    assert seen == {(40, 24), (24, 40)}


def test_a_batch_of_two_shapes_is_the_loss_of_its_parts(two_shapes):
    """Instance rows of a non-square bucket + square class rows: one UNet call per shape, the same L by hand."""
    ex = encode_buckets(two_shapes, progress=False)
    klass = encode_examples(data.ImageFolder([two_shapes.paths[0]], 32), progress=False)  # square 32 x 32 rows
    schedule = Schedule.scaled_linear(1000)

    def unet(z, t, context=None, text_embeds=None, time_ids=None):
        return 0.5 * z + time_ids[:, :1, None, None] / 100

    embed = lambda caps: (torch.zeros(len(caps), 1, 1), torch.zeros(len(caps), 1))  # noqa: E731
    torch.manual_seed(1)
    batch = make_batch(ex, klass, batch_size=2)
    assert "parts" in batch and len(batch["captions"]) == 4
    loss, inst, prior = compute_loss(unet, batch, schedule, embed, prior_weight=0.5)
    m = []
    for part in batch["parts"]:
        z_t = schedule.q_sample(part["z0"], part["t"], part["eps"])
        m.append(((unet(z_t, part["t"], time_ids=part["time_ids"]) - part["eps"]) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(inst, m[0].mean()), torch.testing.assert_close(prior, m[1].mean())
    torch.testing.assert_close(loss, m[0].mean() + 0.5 * m[1].mean())


def test_rank_and_module_dropout_by_hand():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base)
    layer.add_adapter("d", rank=4, alpha=4, rank_dropout=0.5)
    torch.nn.init.normal_(layer.lora_B["d"])
    x = torch.randn(3, 7, 6)
    torch.manual_seed(3)
    got = layer.train()(x)
    torch.manual_seed(3)
    keep = (torch.rand(3, 1, 4) >= 0.5).float()  # one draw per sample and rank, as kohya
    want = base(x) + ((x @ layer.lora_A["d"].T) * keep / 0.5) @ layer.lora_B["d"].T
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(layer.eval()(x), base(x) + x @ layer.lora_A["d"].T @ layer.lora_B["d"].T)
    layer.adapters["d"].rank_dropout, layer.adapters["d"].module_dropout = 0.0, 0.999
    torch.manual_seed(0)
    torch.testing.assert_close(layer.train()(x), base(x))  # skipped (with probability 0.999)


def test_text_encoder_lr_and_optimizers(tmp_path):
    from conftest import tiny_pipeline

    from minidiff.dreambooth.job import make_trainable
    from minidiff.optimizers import make_optimizer

    pipe = tiny_pipeline(tmp_path)
    args = finetune.build_parser().parse_args(["--train-text-encoder", "--text-encoder-lr", "5e-5", "--rank", "2"])
    models, groups, tables = make_trainable(args, pipe, 1e-4)
    assert set(models) == {"unet", "text_encoder", "text_encoder_2"} and not tables
    assert "lr" not in groups[0] and groups[1]["lr"] == 5e-5
    for name, cls in (("adamw", torch.optim.AdamW), ("adafactor", torch.optim.Adafactor), ("sgd", torch.optim.SGD)):
        opt = make_optimizer(name, groups, 1e-4)
        assert isinstance(opt, cls) and [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]
    assert "bitsandbytes" in finetune.build_parser().format_help()


def test_epochs_count_repeats(two_shapes, tmp_path, capsys):
    """--epochs 2 over 6 rows (2 images x 3 repeats) at batch 4 -> 2 * ceil(6 / 4) = 4 steps."""
    from conftest import tiny_pipeline

    from minidiff.weights.pretrained import save_pipeline

    model = save_pipeline(tiny_pipeline(tmp_path / "parts"), tmp_path / "tiny")
    assert (
        finetune.main(
            [
                "--model",
                model,
                "--instance-dir",
                tmp_path / "3_sks girl",
                "--no-prior",
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--buckets",
                "--validation-images",
                "0",
                "--out",
                tmp_path / "o",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "2 epoch(s) of 6 instance rows = 4 steps" in capsys.readouterr().out
