#!/usr/bin/env python
"""The central comparison of the DreamBooth paper (Ruiz et al. 2022, arXiv 2208.12242, Table 1-3), in miniature.

    python bench/dreambooth_table.py                                 # female_adventurer as "sks girl", 3 seeds
    python bench/dreambooth_table.py --character male_adventurer     # the second character, as "sks man"

Four models, all from the bundled miniature (minidiff/assets/tiny-sdxl, whose world has many girls and men but never
these two characters) and the six INSTANCE_POSES drawings of the character, taught with finetune.py's defaults
(only --seed changes) as "a picture of sks <class>":

    (a) base            the pretrained miniature, untouched
    (b) lora            LoRA, no prior preservation (--no-prior)
    (c) lora + prior    LoRA with prior preservation: `python finetune.py` exactly (class images from the base model)
    (d) full + prior    the whole UNet fine-tuned, with prior preservation (--train full)
    (e) ti + prior      textual inversion: only a new "sks" token's vectors learned (--train ti; 4 vectors, lr 5e-2)
    (f) pivotal + prior the new token and a LoRA learned together (--train lora --train-ti; the same token settings)

Each row is run with three seeds (fine-tune seed s, sampling seeds 1000 s + i) and reported as mean +- standard
deviation over the seeds. Each sample is judged independently by the character classifier (minidiff/eval/classifier.py):

    identity      share of "a picture of sks <class> <action>" samples recognised as the character, for the
                  actions of the held-out poses (climbing: climb1; walking: walk1, walk2, walk4..walk7)
    pose          share of those samples whose predicted pose family is the prompted one
    drift         share of "a picture of a <class>" samples recognised as the character (the class word taken over)
    class kept    share of "a picture of a <class>" samples recognised as the class's own body (female_person for
                  "girl", male_person for "man"): the class word still draws the class (language drift, when low)
    background    metrics.background_distance of all samples (0 = the training drawings' white border)
    diversity     mean pairwise RMS distance of the "a picture of a <class>" samples (metrics.diversity)

Writes OUT/results.json, OUT/table.md and OUT/dreambooth-table.png (rows (a)-(d), seed 0; columns: sks climbing,
sks walking, a <class>). Fine-tunes are skipped when their manifest.json exists (delete to redo).
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
from minidiff.bundled import tiny, world  # noqa: E402
from minidiff.eval import classifier, metrics  # noqa: E402
from minidiff.weights.pretrained import load_pipeline, load_unet  # noqa: E402
from minidiff.images import make_grid, save_png  # noqa: E402
from minidiff.weights.embedding_files import load_embedding  # noqa: E402
from minidiff.lora import load_lora  # noqa: E402

# The token of rows (e) and (f): 4 vectors per encoder at 10x A1111's 5e-3 (the miniature takes 10x SDXL's rates, as
# finetune.default_lr says for LoRA). finetune.py's own token defaults (1 vector, 5e-3) barely move the samples: after
# 1000 steps mean p(target) 0.05 / 0.16 on 8 "sks girl climbing" / "walking" samples, none recognised, against 0.46 /
# 0.83 (walking 6/8 recognised) with these (docs/dreambooth-table.md).
TI = ["--ti-vectors", "4", "--ti-lr", "5e-2"]
RUNS = {  # name -> extra finetune.py flags
    "lora": ["--no-prior"],
    "lora-prior": [],
    "full-prior": ["--train", "full"],
    "ti-prior": ["--train", "ti", *TI],
    "pivotal-prior": ["--train-ti", *TI],
}
LABELS = {
    "base": "(a) base model",
    "lora": "(b) LoRA",
    "lora-prior": "(c) LoRA + prior preservation",
    "full-prior": "(d) full fine-tune + prior preservation",
    "ti-prior": "(e) textual inversion + prior",
    "pivotal-prior": "(f) pivotal tuning (LoRA + new token) + prior",
}
HELD_OUT_ACTIONS = ("climbing", "walking")  # families of data.HELD_OUT_POSES (climb1, walk1, walk2, walk4..7)
METRICS = ("identity", "pose_accuracy", "drift", "class_kept", "background", "class_diversity")
CLASS_BODY = {"girl": "female_person", "man": "male_person"}  # the world body each class word names


def instance_dir(character, out: Path) -> Path:
    """A folder with the six INSTANCE_POSES drawings of `character` and their captions as sidecar .txt files ("a
    picture of sks girl climbing": tiny.instance_captions, what `python finetune.py` gives the bundled drawings)."""
    import shutil

    folder = out / f"instance-{character}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = data.instance_images(character)
    prompt = f"a picture of {tiny.IDENTIFIER} {world.CLASS_WORD[character]}"
    for p, caption in zip(paths, tiny.instance_captions(prompt, paths)):
        shutil.copyfile(p, folder / p.name)
        (folder / p.name).with_suffix(".txt").write_text(caption + "\n")
    return folder


def finetune(name, seed, args, out: Path):
    """Start finetune.py for one (row, seed) (None when its manifest exists already): a Popen to wait for."""
    run_dir = out / f"{name}-seed{seed}"
    if (run_dir / "manifest.json").is_file():
        return None
    word = world.CLASS_WORD[args.character]
    cmd = [
        sys.executable,
        str(ROOT / "finetune.py"),
        "--model",
        str(args.model),
        "--out",
        str(run_dir),
        "--instance-dir",
        str(instance_dir(args.character, out)),
        "--instance-prompt",
        f"a picture of {tiny.IDENTIFIER} {word}",
        "--class-prompt",
        f"a picture of a {word}",
        "--class-dir",
        str(out / "class-images"),
        "--validation-images",
        "0",
        "--seed",
        str(seed),
        "--device",
        "cpu",
        *RUNS[name],
        *args.finetune_args,
    ]
    print("$ " + " ".join(cmd), flush=True)
    log = open(out / f"{name}-seed{seed}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # one thread each: see minidiff/tiny.py --threads
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def finetune_all(args, out: Path) -> dict:
    """All (row, seed) fine-tunes, two at a time; (c) of the first seed first, which makes the class images."""
    jobs = [(n, s) for n in args.rows for s in args.seeds]
    jobs.sort(key=lambda j: (j != ("lora-prior", args.seeds[0]), j))
    first, rest = jobs[:1], jobs[1:]
    for group in [first] + [rest[i : i + 2] for i in range(0, len(rest), 2)]:
        for (name, seed), proc in [(j, finetune(*j, args, out)) for j in group]:
            if proc is not None and proc.wait() != 0:
                raise SystemExit(f"finetune.py failed for {name} seed {seed}: see {out / f'{name}-seed{seed}.log'}")
    return {j: json.loads((out / f"{j[0]}-seed{j[1]}" / "manifest.json").read_text()) for j in jobs}


def load_row(name, seed, args, out: Path):
    """The pipeline of one row: the base model, plus the row's LoRA or fine-tuned UNet."""
    pipe = load_pipeline(args.model)
    run = out / f"{name}-seed{seed}"
    if name.startswith(("lora", "pivotal")):
        load_lora(pipe.modules(), run / "lora.safetensors")
    elif name.startswith("full"):
        pipe.unet = load_unet(run / "unet")
    if name.startswith(("ti", "pivotal")):  # the learned "sks" token (textual inversion)
        load_embedding(pipe.text, run / f"{tiny.IDENTIFIER}.safetensors")
    return pipe


def sample_row(pipe, seed, args) -> dict:
    """{prompt: images [n, 3, 32, 32]} for the held-out-action prompts and the class prompt (same seeds per row),
    with the model's own sampler settings (pipeline.generate's defaults)."""
    from minidiff.pipeline import generate

    word = world.CLASS_WORD[args.character]
    prompts = [f"a picture of {tiny.IDENTIFIER} {word} {a}" for a in HELD_OUT_ACTIONS]
    prompts.append(f"a picture of a {word}")
    return {
        p: generate(
            pipe,
            [p] * args.samples,
            steps=args.sample_steps,
            cfg=args.cfg,
            seed=1000 * seed,
            width=tiny.SIZE,
            height=tiny.SIZE,
            batch_size=args.samples,
            progress=False,
        )
        for p in prompts
    }


def score(images: dict, judge, character, train) -> dict:
    """identity, pose accuracy, drift, background, class diversity (module docstring) of one row's samples."""
    identity, pose, n = 0, 0, 0
    for prompt, x in images.items():
        chars, poses, _ = classifier.predict(x, judge)
        if prompt.startswith(f"a picture of {tiny.IDENTIFIER}"):
            action = prompt.split()[-1]
            identity += sum(c == character for c in chars)
            pose += sum(tiny.ACTION[tiny.family(p)] == action for p in poses)
            n += len(chars)
        else:
            drift = sum(c == character for c in chars) / len(chars)
            class_chars = {c: chars.count(c) for c in (*data.CHARACTERS, classifier.UNKNOWN)}
            class_kept = class_chars[CLASS_BODY[world.CLASS_WORD[character]]] / len(chars)
            diversity = metrics.diversity(metrics.prepare(x))
    size = tiny.SIZE
    background = metrics.background_distance(
        metrics.prepare(torch.cat(list(images.values())), size), metrics.prepare(train, size)
    )
    return {
        "identity": identity / n,
        "pose_accuracy": pose / n,
        "drift": drift,
        "class_kept": class_kept,
        "background": background,
        "class_diversity": diversity,
        "class_sample_characters": class_chars,
    }


def summary(per_seed: list) -> dict:
    """mean and standard deviation (over seeds) of each metric."""
    out = {}
    for k in METRICS:
        v = torch.tensor([r[k] for r in per_seed], dtype=torch.float64)
        out[k] = v.mean().item()
        out[k + "_std"] = v.std(unbiased=False).item()
    return out


def figure(rows: dict, path: Path, per_prompt=8):
    """Rows (a)-(d) side by side: per_prompt samples of each prompt, a label above each row."""
    from PIL import Image, ImageDraw

    grids = {
        name: make_grid(torch.cat([x[:per_prompt] for x in imgs.values()]), nrow=per_prompt * len(imgs))
        for name, imgs in rows.items()
    }
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
    word = world.CLASS_WORD[results["settings"]["character"]]
    lines = [
        f"| model | identity (held-out poses) | pose accuracy | drift ('a {word}' -> target) | 'a {word}' "
        f"still a {word} | background | class diversity | fine-tune wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        cells = [
            f"{r[k]:.{3 if k in ('background', 'class_diversity') else 2}f} ± "
            f"{r[k + '_std']:.{3 if k in ('background', 'class_diversity') else 2}f}"
            for k in METRICS
        ]
        wall = f"{r['finetune_seconds']:.0f}" if "finetune_seconds" in r else "-"
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="DreamBooth table in miniature: base / LoRA / LoRA+prior / full+prior.")
    p.add_argument("--model", default=str(tiny.TINY_DIR))
    p.add_argument("--character", default=data.TARGET_CHARACTER, choices=data.CHARACTERS)
    p.add_argument("--out", default=None, help="default: runs/dreambooth-table[-CHARACTER]")
    p.add_argument("--rows", nargs="+", default=list(RUNS), choices=list(RUNS), help="fine-tuned rows to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=24, help="samples per prompt, row and seed")
    p.add_argument("--sample-steps", type=int, default=30, help="sampler steps of the scored samples")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's (tiny.default_cfg)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument(
        "--finetune-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra finetune.py flags for every run (last on the command line)",
    )
    args = p.parse_args(argv)
    args.cfg = tiny.default_cfg(args.model) if args.cfg is None else args.cfg
    torch.set_num_threads(args.threads)
    default_out = "runs/dreambooth-table" + ("" if args.character == data.TARGET_CHARACTER else f"-{args.character}")
    out, t0 = Path(args.out or default_out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    manifests = finetune_all(args, out)
    judge = classifier.load_classifier()
    train = data.load_tensor_set(data.instance_images(args.character), tiny.SIZE)
    results = {
        "settings": vars(args),
        "command": "python bench/dreambooth_table.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": {},
        "per_seed": {},
    }
    figure_rows = {}
    for name in ("base", *args.rows):
        per_seed = []
        for seed in args.seeds:
            images = sample_row(load_row(name, seed, args, out), seed, args)
            per_seed.append(score(images, judge, args.character, train))
            if seed == args.seeds[0]:
                figure_rows[name] = images
        results["per_seed"][name] = per_seed
        results["rows"][name] = summary(per_seed)
        walls = [manifests[(name, s)]["timings"]["total_s"] for s in args.seeds if (name, s) in manifests]
        if walls:
            results["rows"][name]["finetune_seconds"] = sum(walls) / len(walls)
        print(name, json.dumps(results["rows"][name]), flush=True)
    if {"lora", "lora-prior"} <= set(args.rows):
        b, c = results["rows"]["lora"], results["rows"]["lora-prior"]
        results["acceptance"] = {
            "c_identity_ge_0.8": c["identity"] >= 0.8,
            "c_pose_ge_0.7": c["pose_accuracy"] >= 0.7,
            "prior_halves_drift": c["drift"] <= b["drift"] / 2,
            "prior_identity_drop_le_0.1": b["identity"] - c["identity"] <= 0.1,
        }
    results["minutes"] = round((time.time() - t0) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown(results))
    figure(figure_rows, out / "dreambooth-table.png")
    print(markdown(results) + json.dumps(results.get("acceptance")) + f"\nwrote {out} in {results['minutes']} min")


if __name__ == "__main__":
    main()
