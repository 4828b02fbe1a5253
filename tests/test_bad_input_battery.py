"""A fresh battery of bad inputs (issue 18's second acceptance bar), invented after the 27 of test_bad_input.py:
each must end in one line with exit status 2 (130 after CTRL-C) and lose nothing. docs/bad-input.md lists them
(B1 .. B30) with their outcome. Helpers: badinput.py."""

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import finetune
import sample
import train_ddpm
import train_gan
from badinput import DDPM, FT, assert_one_line, fails, interrupt_when, loss_rows, run_cases, unprivileged
from minidiff import audit
from minidiff.data import instance_images
from test_bad_input import LONG, SAMPLE, tampered

GAN = ["--steps", "1", "--batch-size", "2", "--width", "8", "--size", "16", "--threads", "1", "--device", "cpu"]


def first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


def test_b1_b3_b7_b10_sample_numbers_and_places(trained, tmp_path, capsys):
    o = ["--out", tmp_path / "o"]
    fails(
        capsys,
        sample.main,
        ["--prompt", "x", *SAMPLE, *o, "--width", "65536", "--height", "65536"],  # B1
        r"need at least .* GiB but cpu has .* free: 65536x65536 is too large",
    )
    fails(
        capsys,
        sample.main,
        ["--prompt", "x", *SAMPLE, *o, "--guidance-rescale", "inf"],  # B3
        "--guidance-rescale: expected a finite number",
    )
    fails(
        capsys,
        sample.main,
        ["--prompt", "x", *SAMPLE, *o, "--lora", f"{trained[0] / 'lora.safetensors'}:-inf"],
        "the scale must be a finite number, got -inf",
    )  # B7 (-inf is read as the value, not as a flag)
    (tmp_path / "file").write_text("")
    fails(
        capsys,
        sample.main,
        ["--prompt", "x", *SAMPLE, "--out", tmp_path / "file" / "sub"],  # B10
        "file is a file, not a folder",
    )
    assert not list((tmp_path / "o").glob("*.png"))


def test_b2_b5_b6_b22_b27_baseline_flags(tmp_path, capsys):
    o = ["--out", tmp_path / "o"]
    fails(capsys, train_gan.main, [*GAN, *o, "--size", "65536"], "--size must be a power of two from 16 to 1024")  # B2
    fails(
        capsys,
        train_ddpm.main,
        [*DDPM, *o, "--ema-decay", "-1e-3"],  # B5
        r"--ema-decay must be in \[0, 1\), got -0.001",
    )
    fails(capsys, train_gan.main, [*GAN, *o, "--lr", "-2e-4"], "--lr must be positive, got -0.0002")  # B6
    (tmp_path / "file").write_text("")
    fails(capsys, train_gan.main, [*GAN, "--out", tmp_path / "file"], "is a file, not a folder")  # B22
    fails(capsys, train_ddpm.main, [*DDPM, *o, "--dropout", "nan"], "--dropout: expected a finite number")  # B27


def test_b4_b28_finetune_floats(tmp_path, capsys):
    o = ["--out", tmp_path / "o"]
    fails(capsys, finetune.main, [*FT, *o, "--noise-offset", "-0.5"], "--noise-offset must be >= 0, got -0.5")  # B4
    fails(capsys, finetune.main, [*FT, *o, "--alpha", "nan"], "--alpha: expected a finite number")  # B28


def test_b8_b9_b21_loras_that_are_not_usable(trained, tmp_path, capsys):
    lora = trained[0] / "lora.safetensors"

    def nan_alpha(t, m):
        t[first(t, ".alpha")] = torch.tensor(float("nan"))

    bad = tampered(lora, tmp_path / "alpha.safetensors", nan_alpha)
    fails(
        capsys,
        sample.main,
        ["--prompt", "x", *SAMPLE, "--out", tmp_path / "o", "--lora", bad],  # B8
        r"\.alpha is nan, not a finite alpha",
    )

    def inf_up(t, m):
        t[first(t, ".lora_up.weight")] = t[first(t, ".lora_up.weight")] + float("inf")

    fails(capsys, audit.main, [tampered(lora, tmp_path / "inf.safetensors", inf_up)], "holds NaN or inf")  # B9
    ckpt = trained[0] / "checkpoints" / "step-000001.safetensors"
    fails(
        capsys,
        sample.main,
        ["--prompt", "x", *SAMPLE, "--out", tmp_path / "o", "--lora", ckpt],  # B21
        "keys are not LoRA tensors|holds no LoRA tensors",
    )


def test_b11_b12_b13_b16_b20_b24_resume_that_does_not_fit(trained, tmp_path, capsys):
    good = trained[0] / "checkpoints" / "step-000001.safetensors"
    run = [*FT, "--steps", "3"]

    def wrong_shape(t, m):
        t[first(t, ".lora_A.default")] = torch.zeros(7, 3)

    fails(
        capsys,
        finetune.main,
        [
            *run,
            "--out",
            tmp_path / "a",
            "--resume",  # B11
            tampered(good, tmp_path / "shape.safetensors", wrong_shape),
        ],
        "does not fit module 'unet'.* has shape \\[7, 3\\]",
    )
    fails(
        capsys,
        finetune.main,
        [
            *run,
            "--out",
            tmp_path / "b",
            "--resume",  # B12
            tampered(good, tmp_path / "step.safetensors", lambda t, m: m.update(step="abc")),
        ],
        "is damaged: its metadata does not parse",
    )
    fails(
        capsys,
        finetune.main,
        [*run, "--out", tmp_path / "c", "--resume", good, "--rank", "8"],  # B13
        "other settings: --rank 4 -> 8",
    )
    fails(
        capsys,
        finetune.main,
        [*run, "--out", tmp_path / "c", "--resume", good, "--batch-size", "2"],  # B30
        "other settings: --global-batch-size 1 -> 2",
    )
    fails(
        capsys,
        finetune.main,
        [*run, "--out", tmp_path / "d", "--resume", trained[0] / "lora.safetensors"],  # B16
        "not a minidiff training checkpoint",
    )
    fails(
        capsys,
        finetune.main,
        [
            *run,
            "--out",
            tmp_path / "e",
            "--resume",  # B20
            tampered(good, tmp_path / "extra.safetensors", lambda t, m: m.update(extra="[]")),
        ],
        "'extra' is not a JSON object",
    )
    fails(
        capsys,
        finetune.main,
        [*run, "--out", tmp_path / "f", "--resume", good, "--train", "full"],  # B24
        "other settings: --train 'lora' -> 'full'",
    )


def test_b14_b15_baseline_resume(tmp_path, capsys):
    assert train_ddpm.main([*DDPM, "--steps", "1", "--out", tmp_path / "d"]) == 0
    fails(
        capsys,
        train_ddpm.main,
        [
            *DDPM,
            "--steps",
            "2",
            "--out",
            tmp_path / "d",
            "--resume",
            "latest",  # B14
            "--lr",
            "1e-4",
        ],
        r"other settings: --lr 0.001 -> 0.0001",
    )
    assert train_gan.main([*GAN, "--out", tmp_path / "g"]) == 0
    ckpt = tmp_path / "g" / "checkpoints" / "step-000001.safetensors"

    def moment(t, m):
        key = first(t, ".exp_avg_sq")
        t[key] = t[key].flatten()[:3].clone()

    bad = tampered(ckpt, tmp_path / "gan.safetensors", moment)
    fails(
        capsys,
        train_gan.main,
        [*GAN, "--steps", "2", "--out", tmp_path / "g2", "--resume", bad],  # B15
        r"optimizer '(G|D)' state exp_avg_sq of parameter \d+ has shape \[3\]",
    )
    load_file(ckpt)  # the good one is untouched


def test_b17_audit_png_that_is_a_folder(trained, tmp_path, capsys):
    fails(capsys, audit.main, [trained[0] / "lora.safetensors", "--png", tmp_path], "is a folder: give a file name")


def test_b18_b19_permissions_without_root(tmp_path):
    prefix = unprivileged()
    ro = tmp_path / "read-only"
    ro.mkdir(mode=0o555)
    (tmp_path / "classes").mkdir(mode=0o000)
    results = run_cases(
        [
            ("train_ddpm", [*DDPM, "--steps", "1", "--out", ro]),  # B18
            (
                "finetune",
                [
                    "--steps",
                    "1",
                    "--validation-images",
                    "0",
                    "--device",
                    "cpu",
                    "--out",
                    tmp_path / "o",  # B19
                    "--num-class-images",
                    "1",
                    "--class-dir",
                    tmp_path / "classes",
                ],
            ),
        ],
        prefix=prefix,
    )
    assert_one_line(*results[0][::2], "read-only: cannot write into this folder")
    assert_one_line(*results[1][::2], r"cannot read the class image folder .*classes \(Permission denied\)")


def test_b23_long_captions_and_validation_prompts(tmp_path, capsys):
    """Training reads 77 tokens: a longer sidecar caption or --validation-prompt is refused, never cut."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        (data / f"{name}.png").write_bytes(instance_images()[0].read_bytes())
    (data / "b.txt").write_text(LONG)
    fails(capsys, finetune.main, [*FT, "--instance-dir", data, "--out", tmp_path / "o"], "prompt too long")
    fails(
        capsys,
        finetune.main,
        [*FT, "--validation-prompt", LONG, "--validation-images", "1", "--out", tmp_path / "v"],
        "prompt too long",
    )


def test_b25_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".minidiff.lock").write_text("999999\n")  # a SIGKILLed run's lock file: flock died with its process
    assert train_ddpm.main([*DDPM, "--steps", "1", "--out", out]) == 0


def test_b26_ctrl_c_resumes_bit_for_bit(tmp_path):
    """train_ddpm stopped by CTRL-C after step k, resumed to k + 2, equals an uninterrupted k + 2 step run."""
    out = tmp_path / "stopped"
    rc, _, err = interrupt_when(
        ["train_ddpm.py", *DDPM, "--steps", "100000", "--out", out], ready=lambda: loss_rows(out) >= 3
    )
    line = assert_one_line(rc, err, r"interrupted: stopped after step \d+", 130)
    k = int(line.split("after step ")[1].split(";")[0])
    assert train_ddpm.main([*DDPM, "--steps", k + 2, "--out", out, "--resume", "latest"]) == 0
    assert train_ddpm.main([*DDPM, "--steps", k + 2, "--out", tmp_path / "straight"]) == 0
    a = load_file(out / "checkpoints" / f"step-{k + 2:06d}.safetensors")
    b = load_file(tmp_path / "straight" / "checkpoints" / f"step-{k + 2:06d}.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (out / "loss.csv").read_text() == (tmp_path / "straight" / "loss.csv").read_text()
    with safe_open(str(out / "checkpoints" / f"step-{k:06d}.safetensors"), "pt") as f:
        assert f.metadata()["step"] == str(k)


def test_b29_ctrl_c_while_sampling(tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt from inside the sampler (what CTRL-C raises there): one line, 130, no half-written PNG."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate", interrupted)  # pipeline.generate, as sample.py imported it
    fails(capsys, sample.main, ["--prompt", "x", *SAMPLE, "--out", tmp_path / "o"], "interrupted", 130)
    assert not list((tmp_path / "o").glob("*.png*"))
