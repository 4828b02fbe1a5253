#!/usr/bin/env python
"""The bundled miniature before any fine-tuning, judged by the classifier: is each class word a recognisable class,
on a clean background, at the guidance the miniature samples with?

    python bench/base_model.py                 # 24 samples per class prompt at tiny.GUIDANCE (2), seeds 0..23
    python bench/base_model.py --cfg 5         # the same at another guidance

For each class prompt "a picture of a girl / man / zombie / robot" (the world's bodies, world.CLASS_WORD):
- recognised: share of samples the classifier calls that body (p >= classifier.MIN_CONFIDENCE);
- background: metrics.background_distance against the body's own Kenney drawings (RMS distance of the pixels
  white in all of them, [0, 1] units; the drawings themselves score ~0.001);
- diversity: mean pairwise RMS distance of the samples (metrics.diversity).
Writes OUT/base-model.json and OUT/base-model.png (rows: the prompts; 8 samples each, 4x nearest neighbour).
The bar of issue 12: >= 90 % recognised per class prompt.
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
from minidiff.eval import classifier, metrics  # noqa: E402
from minidiff.images import labelled_grid, save_png  # noqa: E402
from minidiff.pipeline import generate  # noqa: E402
from minidiff.weights.pretrained import load_pipeline  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="The miniature's class prompts, judged by the classifier.")
    p.add_argument("--cfg", type=float, default=tiny.GUIDANCE)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="runs/base-model")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, t0 = Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    pipe, judge = load_pipeline(str(tiny.TINY_DIR)), classifier.load_classifier()
    rows, shown = {}, []
    for body in world.WORLD_BODIES:
        prompt = f"a picture of a {world.CLASS_WORD[body]}"
        x = generate(
            pipe,
            [prompt] * args.samples,
            steps=args.steps,
            cfg=args.cfg,
            seed=0,
            width=tiny.SIZE,
            height=tiny.SIZE,
            batch_size=args.samples,
            progress=False,
        )
        chars, _, _ = classifier.predict(x, judge)
        own = metrics.prepare(data.load_tensor_set([data.kenney_path(body, q) for q in data.POSES], tiny.SIZE))
        samples = metrics.prepare(x)
        rows[prompt] = {
            "recognised": sum(c == body for c in chars) / len(chars),
            "background": metrics.background_distance(samples, own),
            "diversity": metrics.diversity(samples),
            "verdicts": {c: chars.count(c) for c in sorted(set(chars))},
        }
        shown.append(x[:8])
        print(prompt, json.dumps({k: v for k, v in rows[prompt].items() if k != "verdicts"}), flush=True)
    result = {
        "command": "python bench/base_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cfg": args.cfg,
        "steps": args.steps,
        "samples": args.samples,
        "sampler": "the model's (euler_a)",
        "rows": rows,
        "bar_0.9": all(r["recognised"] >= 0.9 for r in rows.values()),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "base-model.json").write_text(json.dumps(result, indent=2) + "\n")
    grid = labelled_grid(torch.cat(shown), list(rows), [f"seed {i}" for i in range(8)])
    save_png(
        grid, out / "base-model.png", {"prompts": list(rows), "cfg": args.cfg, "steps": args.steps, "seeds": "0-7"}
    )
    print(f"wrote {out} in {result['seconds']} s; >= 90 % recognised per class prompt: {result['bar_0.9']}")


if __name__ == "__main__":
    main()
