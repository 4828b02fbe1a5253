"""train_ddpm.py: a few-step run writes every output; resume == uninterrupted (bitwise, CPU); the loss is L_simple;
user errors exit with status 2 and one line."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_ddpm
from minidiff.eval import classifier, metrics
from minidiff.images import read_png_metadata
from minidiff.schedule import Schedule

TINY = ["--steps", "4", "--batch-size", "2", "--sample-steps", "2", "--threads", "1", "--save-every", "2"]
needs_classifier = pytest.mark.skipif(
    not classifier.CLASSIFIER_PATH.is_file(), reason=f"metrics need the shipped classifier: {classifier.TRAIN_COMMAND}"
)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@needs_classifier
def test_few_step_run_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    assert train_ddpm.main(TINY + ["--out", out, "--sample-every", "2"]) == 0
    for name in (
        "grid.png",
        "loss.png",
        "loss.csv",
        "metrics.json",
        "checkpoints/step-000004.safetensors",
        "checkpoints/step-000002.safetensors",
        "samples/step-000002.png",
    ):
        assert (out / name).is_file(), name
    meta = read_png_metadata(out / "grid.png")
    assert meta["seed"] == 0 and meta["step"] == 4
    assert meta["settings"]["sampler"] == "ddpm" and meta["settings"]["schedule"] == "cosine"
    result = json.loads((out / "metrics.json").read_text())
    for key in ("nn_distance", "memorized_fraction", "palette_distance", "diversity", "identity", "pose_counts"):
        assert key in result
    assert result["n_samples"] == 25
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 5 and all(math.isfinite(float(r.split(",")[1])) for r in rows[1:])


@pytest.mark.parametrize("recipe", ["ho"])  # (--recipe seed runs the same loop with another loss and net)
def test_resume_equals_uninterrupted_bitwise(tmp_path, monkeypatch, recipe):
    stub = dict.fromkeys(("palette_distance", "identity", "nn_distance", "diversity"), 0.0)
    monkeypatch.setattr(metrics, "evaluate", lambda samples, train: dict(stub))  # metrics are not tested here
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--batch-size", "2", "--threads", "1", "--save-every", "2", "--recipe", recipe]
    args += ["--sample-steps", "2"] if recipe == "ho" else []  # the seed recipe always samples in 5 steps
    assert train_ddpm.main(["--steps", "4", "--out", a] + args) == 0
    assert train_ddpm.main(["--steps", "2", "--out", b] + args) == 0  # "interrupted" after its step-2 checkpoint
    assert train_ddpm.main(["--steps", "4", "--out", b, "--resume", "latest"] + args) == 0
    wa, wb = load_file(a / "checkpoints/step-000004.safetensors"), load_file(b / "checkpoints/step-000004.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "loss.csv").read_text() == (b / "loss.csv").read_text()
    pixels = [Image.open(d / "grid.png").tobytes() for d in (a, b)]  # (the metadata differs: it names --out)
    assert pixels[0] == pixels[1]
    assert train_ddpm.main(["--steps", "5", "--out", b, "--resume", "latest", "--lr", "1e-4"] + args) == 2  # changed


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    assert train_ddpm.main(["--out", tmp_path / "none", "--resume", "latest", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and len(err.strip().splitlines()) == 1


def test_loss_is_l_simple():
    """An oracle that knows x_0 recovers eps exactly from x_t (loss ~ 0); predicting 0 costs E[eps^2] = 1."""
    s = Schedule.linear()
    x0 = torch.rand(64, 3, 8, 8) * 2 - 1
    ab = s.alpha_bar.float()

    def oracle(x_t, t):
        a = ab[t].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    torch.manual_seed(0)
    assert train_ddpm.ddpm_loss(oracle, s, x0).item() < 1e-8
    assert train_ddpm.ddpm_loss(lambda x_t, t: torch.zeros_like(x_t), s, x0).item() == pytest.approx(1.0, abs=0.05)


def test_seed_blend_is_the_notebooks_linear_blend():
    x0, noise = torch.full((5, 3, 4, 4), 0.5), torch.full((5, 3, 4, 4), -1.0)
    t = torch.arange(5)
    got = train_ddpm.seed_blend(x0, noise, t)
    a = 1 - torch.arange(5) / 5  # time_bar = 1 - linspace(0, 1, 6): 1.0, 0.8, 0.6, 0.4, 0.2 (then 0.0)
    want = (1 - a) * 0.5 + a * -1.0
    torch.testing.assert_close(got[:, 0, 0, 0], want)
    torch.testing.assert_close(train_ddpm.seed_blend(x0[:1], noise[:1], torch.tensor([5])), x0[:1])  # t = 5: image
    assert train_ddpm.SeedNet(32)(torch.randn(2, 3, 32, 32), torch.tensor([0, 4])).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", "/nonexistent/folder"], "no such folder"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--ema-decay", "1.5"], "--ema-decay"),
        (["--size", "48"], "invalid choice"),
        (["--recipe", "seed", "--sample-steps", "10"], "5 training steps"),
    ],
)
def test_cli_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    try:
        code = train_ddpm.main(argv + ["--out", tmp_path / "x"])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_ddpm.main(["--data", tmp_path / "empty", "--out", tmp_path / "x", "--threads", "1"]) == 2
    assert "no images" in capsys.readouterr().err
