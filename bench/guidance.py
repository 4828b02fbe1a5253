#!/usr/bin/env python
"""How a DreamBooth LoRA on the miniature depends on classifier-free guidance and the sampler, judged by the classifier.

    python bench/guidance.py --lora runs/finetune/lora.safetensors                  # CFG 1.5 2 3 4 5, the model's sampler
    python bench/guidance.py --lora runs/finetune/lora.safetensors --sampler dpmpp_2m --cfg 2 3 5

For each guidance scale: 16 samples (seeds 1000..1015) of "a picture of sks <class> climbing", "... walking" and
"a picture of a <class>"; the share recognised as the character (the first two) and as the class's own world body
(the third), with confidence >= classifier.MIN_CONFIDENCE. Writes OUT/guidance.json and prints a markdown table.
This is the measurement behind tiny.GUIDANCE (docs/dreambooth-table.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from minidiff import data  # noqa: E402
from minidiff.bundled import tiny, world  # noqa: E402
from minidiff.eval import classifier  # noqa: E402
from minidiff.lora import load_lora  # noqa: E402
from minidiff.pipeline import generate, model_sampler  # noqa: E402
from minidiff.weights.pretrained import load_pipeline  # noqa: E402

CLASS_BODY = {"girl": "female_person", "man": "male_person"}


def main(argv=None):
    p = argparse.ArgumentParser(
        description="DreamBooth LoRA on the miniature vs guidance scale, judged by the classifier."
    )
    p.add_argument("--lora", required=True)
    p.add_argument("--character", default=data.TARGET_CHARACTER, choices=("female_adventurer", "male_adventurer"))
    p.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2, 3, 4, 5])
    p.add_argument("--sampler", default=None, help="default: the model's (euler_a)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="runs/guidance")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, t0 = Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    pipe, judge = load_pipeline(str(tiny.TINY_DIR)), classifier.load_classifier()
    load_lora(pipe.modules(), args.lora)
    word = world.CLASS_WORD[args.character]
    prompts = {
        "climbing": f"a picture of {tiny.IDENTIFIER} {word} climbing",
        "walking": f"a picture of {tiny.IDENTIFIER} {word} walking",
        "class": f"a picture of a {word}",
    }
    sampler = args.sampler or model_sampler(pipe)
    rows = []
    for cfg in args.cfg:
        row = {"cfg": cfg, "sampler": sampler}
        for key, prompt in prompts.items():
            x = generate(
                pipe,
                [prompt] * args.samples,
                steps=args.steps,
                cfg=cfg,
                sampler=sampler,
                seed=1000,
                width=tiny.SIZE,
                height=tiny.SIZE,
                batch_size=args.samples,
                progress=False,
            )
            chars, _, _ = classifier.predict(x, judge)
            who = CLASS_BODY[word] if key == "class" else args.character
            row[key] = sum(c == who for c in chars)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "python bench/guidance.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "samples": args.samples,
        "steps": args.steps,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "guidance.json").write_text(json.dumps(result, indent=2) + "\n")
    n = args.samples
    print(
        f"| CFG | sampler | 'sks {word} climbing' = {args.character} | 'sks {word} walking' = {args.character} | 'a {word}' = a {word} |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cfg']:g} | {r['sampler']} | {r['climbing']}/{n} | {r['walking']}/{n} | {r['class']}/{n} |")


if __name__ == "__main__":
    main()
