"""What trains, and what a LoRA file holds.

    python -m minidiff.audit FILE.safetensors [--png OUT.png] [--top N]

lists a LoRA file's modules with rank, alpha and the size of the change each makes, largest first, then the totals,
and draws the change per UNet block as a bar chart. The size of a module's change is the Frobenius norm of

    delta_W = (alpha / r) B A          (B: [out, r], A: [r, in]; a conv's A and B are flattened to 2-D first)

computed without forming the out x in matrix, from two r x r Gram matrices (both symmetric):

    ||B A||_F^2 = tr(A^T B^T B A) = tr((B^T B)(A A^T)) = sum_ij (B^T B)_ij (A A^T)_ij

A block's norm is that of all its modules' changes together: sqrt(sum of ||delta_W||_F^2).
`trainable_table(models)` is the start-of-training check: which groups of parameters will get gradients.
"""

import math
import re
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..cli import ArgumentParser, exit_code
from ..errors import MinidiffError
from ..images import save_png
from ..lora import read_lora
from ..run_folder import check_file_target

_BLOCK = re.compile(r"(down_blocks|up_blocks|input_blocks|output_blocks)[._](\d+)|(mid_block|middle_block)")


def block_of(name: str) -> str:
    """The UNet block a parameter / module name belongs to ("down_blocks.1", "middle_block", "conv_in", ...),
    whether the name is dotted or kohya-underscored."""
    m = _BLOCK.search(name)
    if m:
        return f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(3)
    return name.split(".")[0]


def _block_order(block: str):
    """Sort key: down / input blocks, then mid, then up / output blocks, then the rest (text encoders last)."""
    m = re.fullmatch(r"(\w+)\.(\d+)", block)
    rank = {"down_blocks": 0, "input_blocks": 0, "mid_block": 1, "middle_block": 1, "up_blocks": 2, "output_blocks": 2}
    if m and m.group(1) in rank:
        return (rank[m.group(1)], int(m.group(2)), block)
    return (rank.get(block, 3 if not block.startswith("text_encoder") else 4), 0, block)


# --------------------------------------------------------------------------------------------- what trains
def trainable_table(models, prefix="unet") -> list:
    """Rows {group, tensors, params, share, dtype} of the parameters with requires_grad, grouped by UNet block
    (a dict's text encoders are one group each), and a last row "total". share = params / all params given."""
    models = {c: m for c, m in models.items() if m is not None} if isinstance(models, dict) else {prefix: models}
    groups, total = {}, 0
    for component, model in models.items():
        for name, p in model.named_parameters():
            total += p.numel()
            if not p.requires_grad:
                continue
            group = block_of(name) if component == "unet" or len(models) == 1 else component
            g = groups.setdefault(group, {"group": group, "tensors": 0, "params": 0, "dtypes": set()})
            g["tensors"] += 1
            g["params"] += p.numel()
            g["dtypes"].add(str(p.dtype).removeprefix("torch."))
    rows = [groups[k] for k in sorted(groups, key=_block_order)]
    rows.append(
        {
            "group": "total",
            "tensors": sum(r["tensors"] for r in rows),
            "params": sum(r["params"] for r in rows),
            "dtypes": set().union(*[r["dtypes"] for r in rows]),
        }
    )
    for r in rows:
        r["share"] = r["params"] / max(total, 1)
        r["dtype"] = ",".join(sorted(r.pop("dtypes"))) or "-"
    rows[-1]["of"] = total
    return rows


def format_table(rows) -> str:
    """The rows of trainable_table as aligned text."""
    lines = [f"{'group':<24} {'tensors':>8} {'trainable params':>17} {'share':>8}  dtype"]
    for r in rows:
        lines.append(f"{r['group']:<24} {r['tensors']:>8,} {r['params']:>17,} {100 * r['share']:>7.3f}%  {r['dtype']}")
    lines.append(f"(of {rows[-1]['of']:,} parameters in all; everything else is frozen)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ what a file holds
def delta_norm(down: torch.Tensor, up: torch.Tensor, alpha: float) -> float:
    """||(alpha / r) B A||_F via the r x r Gram matrices (module docstring); float64 for accuracy."""
    A, B = down.flatten(1).double(), up.flatten(1).double()
    r = A.shape[0]
    sq = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0)
    return float(alpha / r * sq.sqrt())


def audit_lora(path) -> dict:
    """{"format", "modules": [{name, component, block, rank, alpha, norm, params}] largest norm first,
    "blocks": {block: norm}, "params", "bytes", "metadata"} of a LoRA file."""
    entries, fmt, metadata = read_lora(path)
    modules, blocks, nbytes = [], {}, 0
    for e in entries:
        norm = delta_norm(e.down, e.up, e.alpha)
        block = block_of(e.name) if e.component == "unet" else e.component
        modules.append(
            {
                "name": e.name,
                "component": e.component,
                "block": block,
                "rank": e.rank,
                "alpha": e.alpha,
                "norm": norm,
                "params": e.down.numel() + e.up.numel(),
            }
        )
        blocks[block] = blocks.get(block, 0.0) + norm**2
        nbytes += e.down.numel() * e.down.element_size() + e.up.numel() * e.up.element_size()
    modules.sort(key=lambda m: -m["norm"])
    blocks = {b: math.sqrt(blocks[b]) for b in sorted(blocks, key=_block_order)}
    return {
        "path": str(path),
        "format": fmt,
        "modules": modules,
        "blocks": blocks,
        "params": sum(m["params"] for m in modules),
        "bytes": nbytes,
        "metadata": metadata,
    }


def format_audit(report, top=None) -> str:
    mods = report["modules"]
    ranks = sorted({m["rank"] for m in mods})
    alphas = sorted({m["alpha"] for m in mods})
    lines = [
        f"{report['path']}: {report['format']} naming, {len(mods)} modules, "
        f"rank {','.join(map(str, ranks))}, alpha {','.join(f'{a:g}' for a in alphas)}",
        f"{'||dW||_F':>10} {'rank':>5} {'alpha':>6}  module",
    ]
    for m in mods[:top]:
        lines.append(f"{m['norm']:>10.4g} {m['rank']:>5} {m['alpha']:>6g}  {m['component']}: {m['name']}")
    if top is not None and len(mods) > top:
        lines.append(f"{'':>10} ... {len(mods) - top} more")
    lines.append("per block: " + ", ".join(f"{b} {n:.4g}" for b, n in report["blocks"].items()))
    total = math.sqrt(sum(n**2 for n in report["blocks"].values()))
    lines.append(
        f"total: {report['params']:,} params, {report['bytes'] / 1e6:.3g} MB, ||dW||_F over all modules {total:.4g}"
    )
    return "\n".join(lines)


def draw_block_norms(blocks: dict, path, title="", metadata=None):
    """Horizontal PIL bar chart of ||delta_W||_F per block, saved as a PNG with `metadata` in its text chunks."""
    row, left, width, top = 22, 150, 420, 34
    img = Image.new("RGB", (left + width + 90, top + row * len(blocks) + 16), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title or "||delta W||_F per block", fill="black")
    biggest = max(blocks.values(), default=0.0) or 1.0
    for i, (block, norm) in enumerate(blocks.items()):
        y = top + i * row
        d.text((10, y + 4), block, fill="black")
        d.rectangle([left, y + 2, left + max(1, round(width * norm / biggest)), y + row - 4], fill=(70, 110, 190))
        d.text((left + width + 8, y + 4), f"{norm:.4g}", fill="black")
    return save_png(img, path, dict(metadata or {}, title=title))


def main(argv=None):
    ap = ArgumentParser(prog="python -m minidiff.audit", description="What a LoRA file holds.")
    ap.add_argument("file", help="a LoRA .safetensors file (kohya, diffusers or peft naming)")
    ap.add_argument("--png", help="write ||delta W|| per UNet block as a bar chart to this PNG")
    ap.add_argument("--top", type=int, default=None, help="list only the N largest modules")
    args = ap.parse_args(argv)

    def report_file():
        if args.top is not None and args.top <= 0:
            raise MinidiffError(f"--top must be a positive integer, got {args.top}")
        if args.png:
            check_file_target(args.png, "--png")
        report = audit_lora(args.file)
        print(format_audit(report, args.top))
        if args.png:
            draw_block_norms(
                report["blocks"],
                args.png,
                title=f"||delta W||_F per block: {Path(args.file).name}",
                metadata={"file": str(args.file), "format": report["format"], "params": report["params"]},
            )
            print(f"wrote {args.png}")

    return exit_code(report_file)


if __name__ == "__main__":
    sys.exit(main())
