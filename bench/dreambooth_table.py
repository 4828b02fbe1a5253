#!/usr/bin/env python
"""The central comparison of the DreamBooth paper (Ruiz et al. 2022, arXiv 2208.12242, Table 1-3), in miniature.

    python bench/dreambooth_table.py                  # bundled tiny SDXL, six drawings of female_adventurer

Four models, all from the bundled miniature (minidiff/assets/tiny-sdxl) and the six INSTANCE_POSES drawings of the
target character, taught with finetune.py as "a picture of sks girl" (class "girl"):

    (a) base            the pretrained miniature, untouched (it never saw the target character)
    (b) lora            LoRA, no prior preservation
    (c) lora + prior    LoRA with prior preservation (class images "a picture of a girl" from the base model)
    (d) full + prior    the whole UNet fine-tuned, with prior preservation
    (e) ti + prior      textual inversion: only a new "sks" token's vectors learned (--train ti)
    (f) pivotal + prior the new token and a LoRA learned together (--train lora --train-ti)

Each is scored by the character classifier (minidiff/eval/classifier.py), which judges every sample independently:

    identity      share of "a picture of sks girl <action>" samples recognised as the target, for the actions of
                  the held-out poses (climbing: climb1; walking: walk1, walk2, walk4..walk7)
    pose          share of those samples whose predicted pose family is the prompted one
    drift         share of "a picture of a girl" samples recognised as the target (language drift: the class
                  word itself turned into the subject)
    diversity     mean pairwise RMS distance of the "a picture of a girl" samples (metrics.diversity), before
                  (base) vs after; prior preservation should keep it near the base model's

Writes OUT/results.json, OUT/table.md and OUT/dreambooth-table.png (rows (a)-(d); columns: sks girl climbing,
sks girl walking, a girl). Fine-tunes are skipped when OUT/<run>/manifest.json exists (delete to redo).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minidiff import data  # noqa: E402
from minidiff.bundled import tiny  # noqa: E402
from minidiff.eval import classifier, metrics  # noqa: E402
from minidiff.weights.pretrained import load_pipeline, load_unet  # noqa: E402
from minidiff.images import make_grid, save_png  # noqa: E402
from minidiff.weights.embedding_files import load_embedding  # noqa: E402
from minidiff.lora import load_lora  # noqa: E402

RUNS = {  # name -> extra finetune.py flags
    "lora": ["--no-prior"],
    "lora-prior": [],
    "full-prior": ["--train", "full"],
    "ti-prior": ["--train", "ti"],
    "pivotal-prior": ["--train-ti"],
}
LABELS = {"base": "(a) base model", "lora": "(b) LoRA", "lora-prior": "(c) LoRA + prior preservation",
          "full-prior": "(d) full fine-tune + prior preservation", "ti-prior": "(e) textual inversion + prior",
          "pivotal-prior": "(f) pivotal tuning (LoRA + new token) + prior"}
HELD_OUT_ACTIONS = ("climbing", "walking")  # families of data.HELD_OUT_POSES (climb1, walk1, walk2, walk4..7)


def finetune(name, args, out: Path):
    """Start finetune.py for one row (None when its manifest exists already): a Popen to wait for."""
    run_dir = out / name
    if not (run_dir / "manifest.json").is_file():
        cmd = [sys.executable, str(ROOT / "finetune.py"), "--model", str(args.model), "--out", str(run_dir),
               "--steps", str(args.steps), "--num-class-images", str(args.class_images),
               "--class-steps", str(args.sample_steps), "--class-dir", str(out / "class-images"),
               "--validation-images", "0", "--seed", str(args.seed), "--device", "cpu", *RUNS[name]]
        if name.startswith("full"):
            cmd += ["--lr", str(args.full_lr)]
        else:
            cmd += ["--lr", str(args.lora_lr), "--rank", str(args.rank)]
        print("$ " + " ".join(cmd), flush=True)
        log = open(out / f"{name}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # one thread each: see minidiff/bundled/tiny.py --threads
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return None


def finetune_all(args, out: Path) -> dict:
    """(b) and (c) in parallel, then (d), which reuses (c)'s class images; returns the manifests."""
    for group in (("lora", "lora-prior"), ("full-prior",), ("ti-prior", "pivotal-prior")):
        for name, proc in [(n, finetune(n, args, out)) for n in group]:
            if proc is not None and proc.wait() != 0:
                raise SystemExit(f"finetune.py failed for {name}: see {out / (name + '.log')}")
    return {name: json.loads((out / name / "manifest.json").read_text()) for name in RUNS}


def load_row(name, args, out: Path):
    """The pipeline of one row: the base model, plus the row's LoRA or fine-tuned UNet."""
    pipe = load_pipeline(args.model)
    if name.startswith(("lora", "pivotal")):
        load_lora(pipe.modules(), out / name / "lora.safetensors")
    elif name.startswith("full"):
        pipe.unet = load_unet(out / name / "unet")
    if name.startswith(("ti", "pivotal")):  # the learned "sks" token (textual inversion)
        load_embedding(pipe.text, out / name / f"{tiny.IDENTIFIER}.safetensors")
    return pipe


def sample_row(pipe, args) -> dict:
    """{prompt: images [n, 3, 32, 32]} for the held-out-action prompts and the class prompt (same seeds per row)."""
    from minidiff.pipeline import generate

    prompts = [f"a picture of {tiny.IDENTIFIER} {tiny.CLASS_WORD} {a}" for a in HELD_OUT_ACTIONS]
    prompts.append(f"a picture of a {tiny.CLASS_WORD}")
    return {p: generate(pipe, [p] * args.samples, steps=args.sample_steps, cfg=args.cfg, sampler=args.sampler,
                        seed=args.seed + 1000, width=tiny.SIZE, height=tiny.SIZE, batch_size=args.samples,
                        progress=False)
            for p in prompts}


def score(images: dict, judge) -> dict:
    """identity, pose accuracy, drift, class diversity (module docstring) of one row's samples."""
    identity, pose, n = 0, 0, 0
    for prompt, x in images.items():
        chars, poses, _ = classifier.predict(x, judge)
        if prompt.startswith(f"a picture of {tiny.IDENTIFIER}"):
            action = prompt.split()[-1]
            identity += sum(c == data.TARGET_CHARACTER for c in chars)
            pose += sum(tiny.ACTION[tiny.family(p)] == action for p in poses)
            n += len(chars)
        else:
            drift = sum(c == data.TARGET_CHARACTER for c in chars) / len(chars)
            class_chars = {c: chars.count(c) for c in data.CHARACTERS}
            diversity = metrics.diversity(metrics.prepare(x))
    return {"identity": identity / n, "pose_accuracy": pose / n, "drift": drift, "class_diversity": diversity,
            "class_sample_characters": class_chars}


def figure(rows: dict, path: Path, per_prompt=8):
    """Rows (a)-(d) side by side: per_prompt samples of each prompt, a label above each row."""
    from PIL import Image, ImageDraw

    grids = {name: make_grid(torch.cat([x[:per_prompt] for x in imgs.values()]), nrow=per_prompt * len(imgs))
             for name, imgs in rows.items()}
    w, h = next(iter(grids.values())).size
    scale, label_h = 3, 18
    sheet = Image.new("RGB", (w * scale, len(grids) * (h * scale + label_h) + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    prompts = list(next(iter(rows.values())))
    for i, p in enumerate(prompts):
        draw.text((4 + i * w * scale // len(prompts), 3), p, fill=(0, 0, 0))
    for r, (name, grid) in enumerate(grids.items()):
        y = label_h + r * (h * scale + label_h)
        draw.text((4, y + 3), LABELS[name], fill=(0, 0, 0))
        sheet.paste(grid.resize((w * scale, h * scale), Image.NEAREST), (0, y + label_h))
    save_png(sheet, path, {"rows": [LABELS[n] for n in grids], "prompts": prompts})


def markdown(results: dict) -> str:
    lines = ["| model | identity (held-out poses) | pose accuracy | drift ('a girl' -> target) | class diversity |",
             "|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        lines.append(f"| {LABELS[name]} | {r['identity']:.2f} | {r['pose_accuracy']:.2f} | {r['drift']:.2f} "
                     f"| {r['class_diversity']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="DreamBooth table in miniature: base / LoRA / LoRA+prior / full+prior.")
    p.add_argument("--model", default=str(tiny.TINY_DIR))
    p.add_argument("--out", default="runs/dreambooth-table")
    p.add_argument("--steps", type=int, default=400, help="fine-tuning steps of each run")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--class-images", type=int, default=50)
    p.add_argument("--samples", type=int, default=24, help="samples per prompt and row")
    p.add_argument("--sample-steps", type=int, default=30, help="sampler steps (also of the class images)")
    p.add_argument("--sampler", default="euler_a", help="of the scored samples (class images: finetune.py's euler)")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, t0 = Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    manifests = finetune_all(args, out)
    judge = classifier.load_classifier()
    rows, results = {}, {"settings": vars(args), "command": "python bench/dreambooth_table.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "rows": {}}
    for name in ("base", *RUNS):
        torch.manual_seed(args.seed)
        rows[name] = sample_row(load_row(name, args, out), args)
        results["rows"][name] = score(rows[name], judge)
        if name in manifests:
            results["rows"][name]["finetune_seconds"] = manifests[name]["timings"]["total_s"]
        print(name, json.dumps(results["rows"][name]), flush=True)
    base, b, c = (results["rows"][k] for k in ("base", "lora", "lora-prior"))
    results["acceptance"] = {
        "c_identity_ge_0.8": c["identity"] >= 0.8,
        "prior_halves_drift": c["drift"] <= b["drift"] / 2,
        "prior_identity_drop_le_0.1": b["identity"] - c["identity"] <= 0.1,
        "base_class_diversity": base["class_diversity"],
    }
    results["minutes"] = round((time.time() - t0) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown(results))
    figure(rows, out / "dreambooth-table.png")
    print(markdown(results) + json.dumps(results["acceptance"]) + f"\nwrote {out} in {results['minutes']} min")


if __name__ == "__main__":
    main()
