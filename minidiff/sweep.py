"""Sweeps as the source projects ran them: render checkpoints x prompts x seeds, rate the images, compare.

    python -m minidiff.sweep --from runs/finetune --prompts prompts.txt --seeds 0 1 2 --out runs/sweep
    python -m minidiff.sweep --score runs/sweep/sheet.csv          # after filling the score column by hand

One thesis chose its training steps this way: a grid of 13 prompts x 3 images for each checkpoint (100 .. 2000
steps), each image rated good or bad, and the "quality ratio" of a checkpoint

    quality ratio(c) = #{rated images of c with score >= good} / #{rated images of c}

(its best: 0.35 at 1800 steps). This module renders the grid (one labelled row per checkpoint and variant, one
column per prompt and seed, `grid.png`), writes every image and a rating sheet `sheet.csv` (one row per image, a
blank `score` column), and `--score` turns a filled sheet into `quality.csv` and `quality.png` (ratio per checkpoint,
in sheet order). On the bundled miniature `--auto-score` lets the character classifier fill the sheet: an image
scores 1 when it shows the target character and, if the prompt names an action, a pose of that action.

Checkpoints (`--checkpoint`, repeatable; `--from DIR` takes `base` + a finetune.py run's step files in order):
    base                    the model alone
    X.safetensors           a LoRA file (kohya / diffusers / peft), or a textual-inversion embedding (its token is
                            renamed per checkpoint, so several can be compared in one run)
    DIR                     a UNet folder (a full fine-tune's OUT/unet) or a model folder
Variants (optional, one axis): `--lora-scales 0.5 1.0` or `--steps-list 10 30 100` (sampling steps).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import torch
from tqdm import tqdm

from . import cli
from .errors import MinidiffError

COLUMNS = ["checkpoint", "variant", "prompt", "seed", "file", "score"]


@dataclass
class Checkpoint:
    label: str  # what the grid row and the sheet call it
    path: str | None  # None: the base model
    kind: str  # base | lora | embedding | unet | model


def checkpoint_of(spec: str) -> Checkpoint:
    """Classify a --checkpoint argument (module docstring)."""
    if spec == "base":
        return Checkpoint("base", None, "base")
    path = Path(spec)
    if path.is_dir():
        kind = "model" if (path / "unet").is_dir() else "unet"
        return Checkpoint(path.parent.name + "/" + path.name, str(path), kind)
    if path.suffix != ".safetensors" or not path.is_file():
        raise MinidiffError(f"--checkpoint {spec}: expected 'base', a .safetensors LoRA or embedding file, or a folder")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    is_embedding = {"clip_l", "clip_g"} <= keys or keys == {"emb_params"} or len(keys) == 1
    return Checkpoint(path.stem, str(path), "embedding" if is_embedding else "lora")


def from_run(folder) -> list[str]:
    """'base' + a finetune.py output folder's saved steps in step order, then its final files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MinidiffError(f"--from {folder}: no such folder (expected a finetune.py --out folder)")
    steps = sorted(folder.glob("*-step-*.safetensors"), key=lambda p: (int(re.findall(r"\d+", p.stem)[-1]), p.name))
    final = [
        p
        for p in sorted(folder.glob("*.safetensors"))
        if "-step-" not in p.name  # lora / sks.safetensors
        and p.name != "pytorch_lora_weights.safetensors"
    ] + [p for p in [folder / "unet"] if p.is_dir()]
    try:  # the final files repeat the last step file when --save-every divides --steps
        last = int(json.loads((folder / "manifest.json").read_text())["settings"]["steps"])
        final = [p for p in final if p.is_dir() or not any(f"-step-{last:06d}" in q.name for q in steps)]
    except (OSError, ValueError, KeyError):
        pass
    if not steps and not final:
        raise MinidiffError(f"--from {folder}: no *-step-*.safetensors, lora.safetensors or unet/ in it")
    return ["base", *map(str, steps), *map(str, final)]


class Swapper:
    """Puts one checkpoint at a time onto a base pipeline (LoRA adapters disabled after use, embeddings under a
    token of their own, UNets reloaded) and rewrites prompts for it."""

    def __init__(self, model, device, dtype, tokenizers=None):
        from .weights.pretrained import load_pipeline

        self.load = lambda unet=None: load_pipeline(model, dtype=dtype, device=device, tokenizers=tokenizers, unet=unet)
        self.base = self.pipe = self.load()
        self.adapter, self.token, self.count = None, None, 0

    def use(self, ck: Checkpoint):
        from .lora import disable_lora, load_lora

        if self.adapter:
            disable_lora(self.base.modules(), self.adapter)
        self.adapter, self.token, self.pipe = None, None, self.base
        self.count += 1
        if ck.kind == "lora":
            self.adapter = load_lora(self.base.modules(), ck.path, name=f"sweep{self.count}")
        elif ck.kind == "embedding":
            from .embedding_files import load_embedding, read_embedding

            own = read_embedding(ck.path)[1]
            self.token = (own, load_embedding(self.base.text, ck.path, token=f"{own}{self.count}sweep"))
        elif ck.kind in ("unet", "model"):
            self.pipe = self.load(unet=Path(ck.path) / "unet" if ck.kind == "model" else ck.path)

    def scale(self, s):
        from .lora import set_lora_scale

        if self.adapter:
            set_lora_scale(self.base.modules(), s, self.adapter)

    def prompt(self, p):
        """The embedding's own token in a prompt -> this checkpoint's token."""
        if self.token:
            return re.sub(rf"(?<!\w){re.escape(self.token[0])}(?!\w)", self.token[1], p)
        return p


def render(args) -> Path:
    """Every (checkpoint, variant, prompt, seed) image, grid.png and sheet.csv under args.out."""
    from .images import grouped_grid, save_png

    out = Path(args.out)
    specs = (from_run(args.from_dir) if args.from_dir else []) + (args.checkpoint or [])
    if not specs:
        raise MinidiffError("nothing to sweep: pass --from RUN_DIR and/or --checkpoint (repeatable)")
    checkpoints = [checkpoint_of(s) for s in specs]
    prompts = read_prompts(args)
    variants = [("", None)]
    if args.lora_scales:
        variants = [(f"scale {s:g}", ("scale", s)) for s in args.lora_scales]
    elif args.steps_list:
        variants = [(f"{n} steps", ("steps", n)) for n in args.steps_list]
    swap = Swapper(
        args.model,
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        torch.float16 if torch.cuda.is_available() else torch.float32,
        args.tokenizers,
    )
    native = swap.base.unet.config.sample_size * swap.base.scale
    size = args.size or native
    rows, sheet = [], []
    bar = tqdm(total=len(checkpoints) * len(variants), desc="sweep")
    for ck in checkpoints:
        swap.use(ck)
        for name, variant in variants:
            steps = variant[1] if variant and variant[0] == "steps" else args.steps
            swap.scale(variant[1] if variant and variant[0] == "scale" else 1.0)
            images = []
            for prompt in prompts:
                x = generate_seeds(swap.pipe, swap.prompt(prompt), args.seeds, steps, args.cfg, size)
                for seed, img in zip(args.seeds, x):
                    label = f"{ck.label}" + (f" ({name})" if name else "")
                    file = out / "images" / f"{len(sheet):05d}.png"
                    save_png(
                        img,
                        file,
                        {
                            "checkpoint": ck.label,
                            "checkpoint_path": ck.path,
                            "variant": name,
                            "prompt": prompt,
                            "seed": seed,
                            "steps": steps,
                            "cfg": args.cfg,
                            "model": str(args.model),
                        },
                    )
                    sheet.append(
                        {
                            "checkpoint": ck.label,
                            "variant": name,
                            "prompt": prompt,
                            "seed": seed,
                            "file": str(file.relative_to(out)),
                            "score": "",
                        }
                    )
                    images.append(img)
            rows.append((label, torch.stack(images)))
            bar.update()
    bar.close()
    if args.auto_score:
        auto_score(sheet, out)
    write_sheet(sheet, out / "sheet.csv")
    grouped_grid(
        rows,
        [(p, [f"seed {s}" for s in args.seeds]) for p in prompts],
        out / "grid.png",
        {
            "prompts": prompts,
            "seeds": args.seeds,
            "steps": args.steps,
            "cfg": args.cfg,
            "model": str(args.model),
            "checkpoints": [c.path or "base" for c in checkpoints],
        },
    )
    print(
        f"{len(sheet)} images; wrote {out / 'grid.png'} and {out / 'sheet.csv'} (fill its score column, then: "
        f"python -m minidiff.sweep --score {out / 'sheet.csv'})"
    )
    if args.auto_score:
        score(out / "sheet.csv")
    return out


def generate_seeds(pipe, prompt, seeds, steps, cfg, size) -> torch.Tensor:
    """One image per seed (image i of seed s is the same whatever else is drawn): [len(seeds), 3, size, size]."""
    from .pipeline import generate

    return torch.cat(
        [generate(pipe, [prompt], steps=steps, cfg=cfg, seed=s, width=size, height=size, progress=False) for s in seeds]
    )


def read_prompts(args) -> list[str]:
    prompts = cli.read_prompts(args)
    if not prompts:
        raise MinidiffError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


# ------------------------------------------------------------------------------------------------- sheet and score
def write_sheet(rows, path):
    """The rating sheet: one CSV row per image (COLUMNS), atomically."""
    from . import io

    text = StringIO()
    w = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return io.write_text(text.getvalue(), path)


def read_sheet(path) -> list[dict]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise MinidiffError(f"cannot read the rating sheet {path}: {e.strerror}") from None
    if not rows or not {"checkpoint", "score"} <= set(rows[0]):
        raise MinidiffError(f"{path}: expected a CSV with at least the columns checkpoint and score")
    return rows


def quality_ratios(rows, good=1.0) -> dict:
    """{checkpoint (and variant): (ratio, rated, images)}: the share of rated images with score >= good; blank
    scores are not rated. Sheet order is kept."""
    out = {}
    for r in rows:
        key = r["checkpoint"] + (f" ({r['variant']})" if r.get("variant") else "")
        good_n, rated, n = out.get(key, (0, 0, 0))
        s = (r.get("score") or "").strip()
        if s:
            try:
                value = float(s)
            except ValueError:
                raise MinidiffError(f"score {s!r} for {r.get('file', key)} is not a number (1 good, 0 bad)") from None
            good_n, rated = good_n + (value >= good), rated + 1
        out[key] = (good_n, rated, n + 1)
    return {k: (g / rated if rated else float("nan"), rated, n) for k, (g, rated, n) in out.items()}


def score(sheet_path, good=1.0) -> dict:
    """quality.csv and quality.png (ratio against the checkpoint's training step, read from its name: base = 0; when
    no name has a number, sheet order) next to a filled sheet; returns the ratios."""
    from . import io
    from .images import plot_curves

    sheet_path = Path(sheet_path)
    ratios = quality_ratios(read_sheet(sheet_path), good)
    lines = ["checkpoint,quality_ratio,rated,images"] + [f"{k},{r:.4f},{m},{n}" for k, (r, m, n) in ratios.items()]
    io.write_text("\n".join(lines) + "\n", sheet_path.parent / "quality.csv")
    rated = {k: v[0] for k, v in ratios.items() if v[1]}
    if not rated:
        raise MinidiffError(f"{sheet_path}: no score filled in yet (1 = good, 0 = bad, blank = not rated)")
    steps = {
        k: 0 if k.startswith("base") else int(n[-1]) if (n := re.findall(r"\d+", k.partition(" (")[0])) else None
        for k in rated
    }
    numbered = any(v for v in steps.values())  # step files: names without a step (lora.safetensors) stay off the plot
    series = {}
    for i, (k, r) in enumerate(rated.items()):
        if numbered and steps[k] is None:
            continue
        variant = k.partition(" (")[2].rstrip(")") or "quality ratio"
        series.setdefault(variant, []).append((steps[k] if numbered else i, r))
    plot_curves(
        series,
        sheet_path.parent / "quality.png",
        title="quality ratio per checkpoint",
        log_y=False,
        xlabel="training step of the checkpoint (base = 0)",
        ylabel="share of images rated good",
        smooth=0,
    )
    for k, (r, m, n) in ratios.items():
        print(f"{k:40s} quality ratio {r:.2f} ({m} of {n} rated)")
    print(f"wrote {sheet_path.parent / 'quality.csv'} and {sheet_path.parent / 'quality.png'}")
    return ratios


def auto_score(rows, out):
    """The miniature's classifier fills the score column (module docstring)."""
    from . import data
    from .bundled import tiny
    from .eval import classifier
    from .images import from_pil

    judge = classifier.load_classifier()
    for r in rows:
        x = from_pil(data.load_image(Path(out) / r["file"]))[None]
        chars, poses, _ = classifier.predict(x, judge)
        actions = [a for a in tiny.ACTION.values() if re.search(rf"\b{a}\b", r["prompt"])]
        ok = chars[0] == data.TARGET_CHARACTER and (not actions or tiny.ACTION[tiny.family(poses[0])] in actions)
        r["score"] = str(int(ok))


def build_parser():
    from .cli import ArgumentParser

    p = ArgumentParser(prog="python -m minidiff.sweep", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default=None, help="the base model (default: the bundled miniature)")
    a("--tokenizers", default=None, help="folder holding the tokenizers (with a single-file model)")
    a("--from", dest="from_dir", default=None, help="a finetune.py --out folder: base + its saved steps")
    a("--checkpoint", action="append", default=None, help="base, a LoRA / embedding file or a UNet folder (repeatable)")
    a("--prompt", action="append", default=None)
    a("--prompts", default=None, help="a text file, one prompt per line")
    a("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a("--steps", type=int, default=30)
    a("--cfg", type=float, default=None, help="default: 5, and 2 for the bundled miniature (tiny.default_cfg)")
    a("--size", type=int, default=None, help="image side (default: the model's native size)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lora-scales", type=float, nargs="+", default=None, help="one row per LoRA multiplier")
    g.add_argument("--steps-list", type=int, nargs="+", default=None, help="one row per number of sampling steps")
    a("--auto-score", action="store_true", help="fill the sheet with the miniature's character classifier")
    a("--score", default=None, metavar="SHEET.csv", help="turn a filled rating sheet into quality.csv + quality.png")
    a("--good", type=float, default=1.0, help="a score >= this counts as good (default 1: 0/1 ratings)")
    a("--device", default=None)
    a("--out", default="runs/sweep")
    return p


def run(args):
    """--score SHEET, or render (the bundled miniature and its DreamBooth prompts when no --model is given)."""
    if args.score:
        return score(args.score, args.good)
    from .bundled.tiny import TINY_DIR, default_cfg, dreambooth_prompts

    if args.model is None:
        args.model = str(TINY_DIR)
        if not args.prompt and not args.prompts:
            args.prompt = [q for q in dreambooth_prompts() if "sks" in q]
    args.cfg = default_cfg(args.model) if args.cfg is None else args.cfg
    if any(s <= 0 for s in [args.steps, *(args.steps_list or [])]):
        raise MinidiffError("--steps and --steps-list must be positive")
    return render(args)


def main(argv=None):
    from .cli import exit_code

    return exit_code(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
