"""Issue 18: the 27 cases a fault battery found, each as a test that fails on a traceback, on exit status 0 where an
error is due, or on a lost file (the fresh battery: test_bad_input_battery.py; both listed with their outcome in
docs/bad-input.md). Helpers (the one-line check, dropped permissions, a small disk, SIGINT): badinput.py.
Everything runs on the bundled miniature (pixel space, 32 px) for 1-3 steps."""

import os
import re
import stat
import subprocess
import sys
import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import finetune
import sample
import train_ddpm
from badinput import (
    DDPM,
    FT,
    ROOT,
    assert_one_line,
    call,
    fails,
    interrupt_when,
    loss_rows,
    run_cases,
    small_disk,
    unprivileged,
)
from minidiff import audit, run_folder

LONG = "a picture of sks girl " + "with a red hat and blue shoes, " * 12  # 173 CLIP tokens
SAMPLE = ["--steps", "1", "--device", "cpu"]


def tampered(src, dst, edit):
    """A copy of checkpoint `src` at `dst` after edit(tensors, metadata)."""
    with safe_open(str(src), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    edit(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


# -------------------------------------------------------------------------------------- raw tracebacks
def test_unreadable_data_folders_and_read_only_outputs(tmp_path):
    """finetune --instance-dir and train_ddpm --data of mode 000, finetune / sample / audit --png into a read-only
    folder, without root's override (badinput.unprivileged); refused before any model loads."""
    prefix = unprivileged()
    (tmp_path / "unreadable").mkdir(mode=0o000)
    ro = tmp_path / "read-only"
    ro.mkdir(mode=0o555)
    results = run_cases(
        [
            ("finetune", [*FT, "--instance-dir", tmp_path / "unreadable", "--out", tmp_path / "o1"]),
            ("train_ddpm", [*DDPM, "--steps", "1", "--data", tmp_path / "unreadable", "--out", tmp_path / "o2"]),
            ("finetune", [*FT, "--out", ro]),
            ("sample", ["--prompt", "a girl", *SAMPLE, "--out", ro]),
            ("sample", ["--prompt", "a girl", *SAMPLE, "--out", ro / "new"]),
            ("minidiff.audit", [ROOT / "no.safetensors", "--png", ro / "x.png"]),
        ],
        prefix=prefix,
    )
    patterns = [
        r"cannot read image folder .*unreadable \(Permission denied\)",
        "cannot read image folder",
        r"--out .*read-only: cannot write into this folder \(Permission denied\)",
        "read-only: cannot write",
        "--out .*new: cannot create the folder",
        "--png .*read-only: cannot write into this folder",
    ]
    for (rc, out, err), pattern in zip(results, patterns):
        assert_one_line(rc, err, pattern)
        assert "loading" not in out  # before the model
    assert list(ro.iterdir()) == []


def test_outputs_that_are_files(tmp_path, capsys):
    mine = tmp_path / "file"
    mine.write_text("mine")
    fails(capsys, sample.main, ["--prompt", "x", *SAMPLE, "--out", mine], "--out .*file is a file, not a folder")
    fails(capsys, train_ddpm.main, [*DDPM, "--steps", "1", "--out", mine], "--out .*file is a file, not a folder")
    out = fails(
        capsys,
        finetune.main,
        [
            "--steps",
            "1",
            "--validation-images",
            "0",
            "--device",
            "cpu",
            "--out",
            tmp_path / "o",
            "--num-class-images",
            "1",
            "--class-dir",
            mine,
        ],
        "--class-dir .*file is a file, not a folder",
    )
    assert "loading" not in out
    fails(capsys, audit.main, [ROOT / "no.safetensors", "--png", mine / "x.png"], "--png .*file is a file")
    assert mine.read_text() == "mine"


def test_full_disk_finetune(tmp_path):
    with small_disk(tmp_path / "disk", 1 << 20) as (disk, limit):
        (disk / "keep.txt").write_text("written before")
        ((rc, out, err),) = run_cases(
            [("finetune", [*FT, "--steps", "3", "--save-every", "1", "--out", disk / "ft"])], preexec_fn=limit
        )
        assert_one_line(rc, err, r"(No space left on device|File too large).*intact")
        assert not list(disk.rglob("*.tmp")), list(disk.rglob("*.tmp"))
        for ckpt in (disk / "ft" / "checkpoints").glob("step-*.safetensors"):  # what was written still loads
            load_file(ckpt)
        assert (disk / "keep.txt").read_text() == "written before"


def test_full_disk_sample(tmp_path):
    with small_disk(tmp_path / "disk", 16 << 10) as (disk, limit):
        ((rc, out, err),) = run_cases(
            [("sample", ["--prompt", "a girl", "--num", "4", *SAMPLE, "--out", disk])], preexec_fn=limit
        )
        assert_one_line(rc, err, r"(No space left on device|File too large).*intact")
        assert not list(disk.rglob("*.tmp"))


def test_resume_from_a_checkpoint_whose_content_is_wrong(trained, tmp_path, capsys):
    """Corrupt `state` JSON, a wrong-size torch RNG state, a wrong-size Adam moment: refused before resuming."""
    good = trained[0] / "checkpoints" / "step-000001.safetensors"

    def bad_json(t, m):
        m["state"] = m["state"][:-40]

    def short_rng(t, m):
        t["rng.torch"] = t["rng.torch"][:100].clone()

    def moment(t, m):
        key = next(k for k in t if k.startswith("optim.optimizer.state.") and k.endswith(".exp_avg"))
        t[key] = t[key][:1].clone()

    for edit, pattern in (
        (bad_json, "is damaged: its metadata does not parse"),
        (short_rng, "random-number state cannot be restored"),
        (moment, r"optimizer 'optimizer' state exp_avg of parameter \d+ has shape"),
    ):
        ckpt = tampered(good, tmp_path / f"{edit.__name__}.safetensors", edit)
        fails(
            capsys, finetune.main, [*FT, "--steps", "3", "--out", tmp_path / edit.__name__, "--resume", ckpt], pattern
        )


def test_ctrl_c_during_training_writes_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "ft"
    rc, _, err = interrupt_when(
        ["finetune.py", *FT, "--steps", "100000", "--out", out], ready=lambda: loss_rows(out) >= 2
    )
    line = assert_one_line(rc, err, r"interrupted: stopped after step \d+; checkpoint .*step-\d+\.safetensors", 130)
    step = int(line.split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step:06d}.safetensors").is_file()
    assert loss_rows(out) == step
    assert finetune.main([*FT, "--steps", str(step + 1), "--out", out, "--resume", "latest"]) == 0


def test_ctrl_c_during_class_images_exits_130_and_keeps_them(tmp_path):
    out = tmp_path / "ft"
    rc, _, err = interrupt_when(
        [
            "finetune.py",
            "--steps",
            "1",
            "--num-class-images",
            "200",
            "--class-steps",
            "10",
            "--class-batch-size",
            "1",
            "--device",
            "cpu",
            "--out",
            out,
        ],
        ready=lambda: len(list((out / "class-images").glob("class-*.png"))) >= 2,
    )
    assert_one_line(rc, err, "interrupted", 130)
    made = list((out / "class-images").glob("class-*.png"))
    assert made and not list(out.rglob("*.tmp"))
    for png in made:  # every file there is a whole PNG
        assert png.read_bytes().endswith(b"IEND\xaeB`\x82")


def test_two_runs_into_one_out(tmp_path, capsys):
    """The second run is refused while the first holds OUT/.minidiff.lock; after the first is SIGKILLed, the lock
    is gone with it and the next run sweeps the .tmp it left."""
    out = tmp_path / "ddpm"
    first = subprocess.Popen(
        [sys.executable, "train_ddpm.py", *DDPM, "--steps", "100000", "--out", out],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if loss_rows(out) >= 1:
                break
            time.sleep(0.2)
        fails(
            capsys,
            train_ddpm.main,
            [*DDPM, "--steps", "1", "--out", out],
            rf"in use by another minidiff run \(pid {first.pid}\)",
        )
    finally:
        first.kill()
        first.wait()
    stale = out / "checkpoints" / "step-000007.safetensors.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half a file")
    assert train_ddpm.main([*DDPM, "--steps", "1", "--out", out]) == 0
    assert not stale.exists()


# -------------------------------------------------------------------------------------- silent wrong results
def test_nan_and_inf_loras_and_scales_are_refused(trained, tmp_path, capsys):
    lora = trained[0] / "lora.safetensors"
    for value in ("nan", "inf"):

        def poison(t, m, value=value):
            key = next(k for k in sorted(t) if k.endswith(".lora_down.weight"))
            t[key] = t[key] * float(value)

        bad = tampered(lora, tmp_path / f"{value}.safetensors", poison)
        fails(
            capsys,
            sample.main,
            ["--prompt", "x", *SAMPLE, "--out", tmp_path / "o", "--lora", bad],
            "holds NaN or inf values",
        )
        fails(
            capsys,
            sample.main,
            ["--prompt", "x", *SAMPLE, "--out", tmp_path / "o", "--lora", f"{lora}:{value}"],
            f"the scale must be a finite number, got {value}",
        )


def test_cfg_nan_is_refused_and_long_prompts_are_never_cut(tmp_path, capsys):
    """sample.py reads a long prompt in 75-token chunks, saying so in one note line (text.encode_weighted); training
    reads 77 tokens, so finetune refuses a longer instance prompt instead of cutting it."""
    fails(capsys, sample.main, ["--prompt", "x", "--cfg", "nan", *SAMPLE], "--cfg: expected a finite number")
    assert call(sample.main, ["--prompt", LONG, *SAMPLE, "--out", tmp_path / "s"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(r"note: prompt of \d+ tokens > 75: encoded as \d chunks", err)
    fails(capsys, finetune.main, [*FT, "--instance-prompt", LONG, "--out", tmp_path / "f"], "prompt too long")


def test_resume_with_another_lr_is_refused_with_the_difference(trained, capsys):
    fails(
        capsys,
        finetune.main,
        [*FT, "--steps", "3", "--out", trained[0], "--resume", "latest", "--lr", "0.01"],
        r"other settings: --lr 0.001 -> 0.01",
    )  # the fixture ran with the miniature's default lr, 1e-3


def test_audit_top_must_be_positive(trained, capsys):
    fails(capsys, audit.main, [trained[0] / "lora.safetensors", "--top", "-1"], "--top must be a positive integer")


# -------------------------------------------------------------------------------------- killed with no message
def test_huge_resolution_is_refused_before_allocating(tmp_path, capsys):
    out = fails(
        capsys,
        finetune.main,
        [*FT, "--resolution", "100000", "--out", tmp_path / "o"],
        r"need at least [\d,.]+ GiB but cpu has [\d,.]+ GiB free: --resolution 100000 is too large",
    )
    assert "loading" not in out


# -------------------------------------------------------------------------------------- misleading one-liners
def test_misleading_messages_now_name_the_problem(trained, tmp_path, capsys):
    o = ["--out", tmp_path / "o"]
    fails(capsys, finetune.main, [*FT, "--lr", "-1e-4", *o], "--lr must be positive, got -0.0001")
    fails(capsys, finetune.main, [*FT, "--lr", "inf", *o], "argument --lr: expected a finite number, got 'inf'")
    fails(capsys, finetune.main, [*FT, "--prior-weight", "nan", *o], "--prior-weight: expected a finite number")
    lora = trained[0] / "lora.safetensors"
    fails(
        capsys, sample.main, ["--prompt", "x", *SAMPLE, *o, "--lora", f"{lora}:abc"], "the scale 'abc' is not a number"
    )


@pytest.mark.parametrize(
    "key, variant",
    [
        ("lora_unet_mid_block_attentions_0_proj_in.lora_mid.weight", "LoCon with Tucker decomposition"),
        ("lora_unet_mid_block_attentions_0_proj_in.a1.weight", "GLoRA"),
        ("lora_unet_mid_block_attentions_0_proj_in.on_input", "IA3"),
        ("lora_unet_mid_block_attentions_0_proj_in.oft_blocks", "OFT"),
    ],
)
def test_lora_variants_are_refused_by_name(trained, tmp_path, capsys, key, variant):
    bad = tampered(
        trained[0] / "lora.safetensors",
        tmp_path / "variant.safetensors",
        lambda t, m: t.__setitem__(key, t[sorted(t)[0]].clone()),
    )
    fails(
        capsys,
        sample.main,
        ["--prompt", "x", *SAMPLE, "--out", tmp_path / "o", "--lora", bad],
        f"holds {variant}.* weights .*minidiff does not apply",
    )


# -------------------------------------------------------------------------------------- also seen
def test_written_files_follow_the_umask_and_identical_runs_give_identical_bytes(trained):
    a, b = trained
    for name in ("lora.safetensors", "checkpoints/step-000002.safetensors", "lora-step-000001.safetensors"):
        assert stat.S_IMODE(os.stat(a / name).st_mode) == 0o664, name  # made under umask 002
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_stale_tmp_files_are_swept_at_start(tmp_path, capsys):
    out = tmp_path / "o"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / "lora.safetensors.tmp", out / "checkpoints" / "step-000003.safetensors.tmp", out / "loss.csv.tmp"]
    for f in stale:
        f.write_bytes(b"half")
    (out / "notes.tmp").write_text("the user's")  # not a name our writers make: kept
    lock = run_folder.claim(out)
    lock.release()
    assert not any(f.exists() for f in stale) and (out / "notes.tmp").exists()
    assert "removed 3 unfinished file(s)" in capsys.readouterr().out
