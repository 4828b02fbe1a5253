#!/usr/bin/env python
"""The README's two commands, judged: `python finetune.py` with its defaults, then `python sample.py --lora ...`.

    python bench/finetune_default.py                              # female_adventurer, "a picture of sks girl"
    python bench/finetune_default.py --character male_adventurer  # the second character, "a picture of sks man"

1. finetune.py with no flags but --out (for the second character also --instance-dir with its six INSTANCE_POSES
   drawings and the prompts "a picture of sks man" / "a picture of a man": the same recipe, another subject);
2. sample.py --lora OUT/lora.safetensors --prompt "a picture of sks <class> climbing" --num 16 (its defaults);
3. the character classifier judges the 16 PNGs (confidence floor kept). The bar: >= 80 % recognised.

Writes OUT/result.json with the commands, wall times and the verdicts; the 16 samples are in OUT/samples/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from dreambooth_table import instance_dir  # noqa: E402

from minidiff import data  # noqa: E402
from minidiff.bundled import world  # noqa: E402
from minidiff.eval import classifier  # noqa: E402
from minidiff.data import load_image  # noqa: E402
from minidiff.images import from_pil  # noqa: E402


def run(cmd, log):
    """Run one command (output to `log`), return its wall time in seconds; exit on failure."""
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"failed: see {log}")
    return time.time() - t


def main(argv=None):
    p = argparse.ArgumentParser(description="Default finetune.py + sample.py, judged by the classifier.")
    p.add_argument("--character", default=data.TARGET_CHARACTER, choices=data.CHARACTERS)
    p.add_argument("--out", default=None, help="default: runs/finetune-default-CHARACTER")
    p.add_argument("--num", type=int, default=16)
    p.add_argument(
        "--lora",
        default=None,
        help="judge this finetune.py output instead of running finetune.py "
        "(e.g. the dreambooth table's lora-prior-seed0, which is the same command)",
    )
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/finetune-default-{args.character}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    word = world.CLASS_WORD[args.character]
    ft = [sys.executable, "finetune.py", "--out", str(out / "finetune")]
    if args.character != data.TARGET_CHARACTER:
        ft += [
            "--instance-dir",
            str(instance_dir(args.character, out)),
            "--instance-prompt",
            f"a picture of sks {word}",
            "--class-prompt",
            f"a picture of a {word}",
        ]
    prompt = f"a picture of sks {word} climbing"
    lora = Path(args.lora).resolve() if args.lora else out / "finetune" / "lora.safetensors"
    sp = [
        sys.executable,
        "sample.py",
        "--lora",
        str(lora),
        "--prompt",
        prompt,
        "--num",
        str(args.num),
        "--out",
        str(out / "samples"),
    ]
    walls = {
        "finetune_s": None if args.lora else run(ft, out / "finetune.log"),
        "sample_s": run(sp, out / "sample.log"),
    }
    files = sorted((out / "samples").glob("0*-seed*.png"))[: args.num]
    x = torch.stack([from_pil(load_image(f)) for f in files])
    chars, poses, _ = classifier.predict(x)
    recognised = sum(c == args.character for c in chars) / len(chars)
    result = {
        "commands": ([] if args.lora else [" ".join(ft[1:])]) + [" ".join(sp[1:])],
        "prompt": prompt,
        "character": args.character,
        "recognised": recognised,
        "bar_0.8": recognised >= 0.8,
        "verdicts": chars,
        "poses": poses,
        **walls,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("verdicts", "poses")}, indent=1))


if __name__ == "__main__":
    main()
