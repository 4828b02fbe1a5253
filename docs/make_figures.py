#!/usr/bin/env python
"""Make every figure and every computed table of the walkthrough (docs/*.md), from the code itself.

    python docs/make_figures.py            # CPU, about a minute; rewrites docs/figures/* and the generated blocks

Nothing here is drawn or typed by hand, so the docs cannot drift from the code:

    figures/schedules-alpha-bar.png   alpha_bar_t of Schedule.linear / .cosine / .scaled_linear
    figures/schedules-log-snr.png     log10 SNR(t) = log10(alpha_bar_t / (1 - alpha_bar_t)) of the same three
    figures/forward-process.png       q_sample of a bundled drawing at several t, one row per schedule, one eps
    figures/diffaugment.png           a bundled drawing and eight draws of gan.diff_augment
    figures/unet-sdxl-1024.txt        the SDXL UNet at 1024 px: forward hooks record every block's tensor shapes
                                      while our UNet runs on the meta device (shapes only, no memory, no weights)
    tables in the .md files           LoRA sizes per target preset and rank on the meta-device SDXL UNet; what each
                                      finetune.py mode trains (parameters, tensors, file bytes)

A generated block in a .md file sits between `<!-- make_figures:NAME -->` and `<!-- /make_figures:NAME -->`; this
script replaces what is between the two markers and leaves the rest of the page alone. File sizes are exact: the
tensors and metadata `lora.save_lora` (or `dreambooth.job.save_unet`) would write are captured at the write and measured
with the safetensors layout (`safetensors_size`), which tests/test_docs_identities.py checks against real files.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FIGURES = DOCS / "figures"
sys.path.insert(0, str(ROOT))

from minidiff import data, io, lora  # noqa: E402
from minidiff.baselines import gan  # noqa: E402
from minidiff.images import make_grid, plot_curves, save_png, to_pil  # noqa: E402
from minidiff.schedule import Schedule  # noqa: E402
from minidiff.vae import AutoencoderKL, VAEConfig  # noqa: E402
from minidiff.unet import Downsample2D, ResnetBlock2D, Transformer2DModel, UNet, UNetConfig, Upsample2D  # noqa: E402

MADE_BY = {"made_by": "docs/make_figures.py"}
SCHEDULES = {
    "linear (DDPM)": Schedule.linear,
    "cosine (iDDPM)": Schedule.cosine,
    "scaled_linear (SD, SDXL)": Schedule.scaled_linear,
}


# ------------------------------------------------------------------------------------------------ markdown blocks
def replace_block(page: str, name: str, text: str):
    """Put `text` between the markers of generated block `name` in docs/`page`."""
    path = DOCS / page
    src = path.read_text()
    begin, end = f"<!-- make_figures:{name} -->", f"<!-- /make_figures:{name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(src):
        raise SystemExit(f"{path}: markers {begin} ... {end} not found")
    path.write_text(pattern.sub(lambda _: f"{begin}\n{text.rstrip()}\n{end}", src))


def md_table(header, rows) -> str:
    """A GitHub table; columns whose first cell starts with a digit are right-aligned."""
    align = ["---:" if re.match(r"[\d.,]+", str(c)) else "---" for c in rows[0]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ------------------------------------------------------------------------------------------------ file sizes
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def safetensors_size(tensors: dict, metadata: dict | None = None) -> int:
    """Bytes of the .safetensors file safetensors.torch.save_file(tensors, metadata=metadata) writes: an 8-byte
    header length, the JSON header (names, dtypes, shapes, offsets; padded with spaces to a multiple of 8), then the
    raw tensor bytes, laid out wider dtypes first and by name. Works on meta tensors (needs only shapes)."""
    order = sorted(tensors, key=lambda k: (-DTYPE_ORDER.index(DTYPE_NAMES[tensors[k].dtype]), k))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for k in order:
        n = tensors[k].numel() * tensors[k].element_size()
        header[k] = {
            "dtype": DTYPE_NAMES[tensors[k].dtype],
            "shape": list(tensors[k].shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + head + (-head) % 8 + offset


@contextmanager
def captured_writes():
    """Replace `io.save_safetensors` (every weights file goes through it) by a recorder: [(tensors, metadata)]."""
    writes, real = [], io.save_safetensors
    io.save_safetensors = lambda tensors, path, metadata=None: writes.append((tensors, metadata)) or Path(path)
    try:
        yield writes
    finally:
        io.save_safetensors = real


def lora_file_bytes(model, dtype=torch.float32, format="kohya") -> int:
    """Size of the file lora.save_lora(model, ..., dtype=dtype) writes (model on any device, meta included)."""
    with captured_writes() as writes:
        lora.save_lora(model, "unwritten.safetensors", format=format, dtype=dtype)
    return safetensors_size(*writes[0])


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# ------------------------------------------------------------------------------------------------ meta-device models
def sdxl_unet_on_meta():
    with torch.device("meta"):
        return UNet(UNetConfig.sdxl())


def sdxl_text_encoders_on_meta():
    """CLIP ViT-L/14 (CLIPTextModel, width 768, 12 layers) and OpenCLIP ViT-bigG/14 (CLIPTextModelWithProjection,
    width 1280, 32 layers, projection 1280): SDXL's two text encoders, shapes only."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(vocab_size=49408, max_position_embeddings=77)
    c1 = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
        **common,
    )
    c2 = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
        hidden_act="gelu",
        **common,
    )
    with torch.device("meta"):
        return CLIPTextModel(c1), CLIPTextModelWithProjection(c2)


# ------------------------------------------------------------------------------------------------ 1. schedules
def schedule_figures():
    alpha_bar, log_snr = {}, {}
    for name, make in SCHEDULES.items():
        s = make()
        ts = list(range(0, s.T, 5)) + [s.T - 1]
        alpha_bar[name] = [(t, s.alpha_bar[t].item()) for t in ts]
        log_snr[name] = [(t, math.log10(s.snr(torch.tensor([t])).item())) for t in ts]
    for stem, series, title, ylabel in [
        ("schedules-alpha-bar", alpha_bar, "alpha_bar_t (signal kept in x_t)", "alpha_bar"),
        ("schedules-log-snr", log_snr, "log10 SNR(t) = log10(alpha_bar / (1 - alpha_bar))", "log10 SNR"),
    ]:
        path = FIGURES / f"{stem}.png"
        plot_curves(series, path, title=title, log_y=False, xlabel="t", ylabel=ylabel, smooth=0)
        save_png(Image.open(path).copy(), path, dict(MADE_BY, figure=stem, schedules=list(SCHEDULES)))


# ------------------------------------------------------------------------------------------------ 2. forward process
def labelled_grid(rows: dict, col_labels, cell=96, left=190, top=24):
    """{row label: [N, 3, S, S]} -> one PIL image with row and column labels."""
    n = len(col_labels)
    img = Image.new("RGB", (left + n * (cell + 4), top + len(rows) * (cell + 4)), "white")
    d = ImageDraw.Draw(img)
    for j, label in enumerate(col_labels):
        d.text((left + j * (cell + 4) + 4, 6), label, fill="black")
    for i, (label, x) in enumerate(rows.items()):
        d.text((6, top + i * (cell + 4) + cell // 2 - 6), label, fill="black")
        for j in range(n):
            img.paste(to_pil(x[j]).resize((cell, cell), Image.NEAREST), (left + j * (cell + 4), top + i * (cell + 4)))
    return img


def forward_process_figure():
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with one eps for every cell (Schedule.q_sample)."""
    path = data.kenney_path(data.TARGET_CHARACTER, "idle")
    x0 = data.load_tensor_set([path], 64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ts = [0, 100, 250, 500, 750, 900, 999]
    rows = {}
    for name, make in SCHEDULES.items():
        s = make()
        rows[name] = torch.cat([s.q_sample(x0, torch.tensor([t]), eps) for t in ts])
    img = labelled_grid(rows, [f"t = {t}" for t in ts])
    save_png(
        img,
        FIGURES / "forward-process.png",
        dict(MADE_BY, image=str(path.relative_to(ROOT)), size=64, t=ts, eps_seed=0, schedules=list(SCHEDULES)),
    )


# ------------------------------------------------------------------------------------------------ 3. DiffAugment
def diffaugment_figure():
    x = data.load_tensor_set([data.kenney_path(data.TARGET_CHARACTER, "jump")], 64)
    g = torch.Generator().manual_seed(0)
    draws = gan.diff_augment(x.repeat(8, 1, 1, 1), "color,translation,cutout", generator=g)
    img = make_grid(torch.cat([x, draws]), nrow=9)
    save_png(
        img,
        FIGURES / "diffaugment.png",
        dict(MADE_BY, policy="color,translation,cutout", seed=0, note="first cell: the drawing; then 8 draws of T(x)"),
    )


# ------------------------------------------------------------------------------------------------ 4. UNet shapes
def unet_shape_diagram(latent=128) -> str:
    """Run UNet(UNetConfig.sdxl()) on the meta device on a [1, 4, latent, latent] input and record, with forward
    hooks, the input and output shape of every ResBlock, Transformer2D, Down/Upsample and of the embeddings."""
    unet = sdxl_unet_on_meta()
    c = unet.config
    seen = []

    def hook(name):
        def record(module, args, out):
            seen.append((name, module, tuple(args[0].shape), tuple(out.shape)))

        return record

    kinds = (ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D)
    for name, m in unet.named_modules():
        if isinstance(m, kinds) or name in ("time_embedding", "add_embedding", "conv_in", "conv_out"):
            m.register_forward_hook(hook(name))
    meta = dict(device="meta")
    x = torch.empty(1, c.in_channels, latent, latent, **meta)
    context = torch.empty(1, 77, c.cross_attention_dim, **meta)
    pooled = torch.empty(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, **meta)
    with torch.no_grad():
        eps = unet(
            x, torch.tensor([999.0], **meta), context=context, text_embeds=pooled, time_ids=torch.empty(1, 6, **meta)
        )

    shape = lambda s: "[" + ", ".join(map(str, s)) + "]"  # noqa: E731
    n_params = sum(p.numel() for p in unet.parameters())
    lines = [
        f"UNet(UNetConfig.sdxl()) at {8 * latent}x{8 * latent} px: latent x_t {shape(x.shape)}, "
        f"{n_params:,} parameters",
        f"inputs: t [1], context {shape(context.shape)} (CLIP-L 768 || bigG 1280), text_embeds "
        f"{shape(pooled.shape)} (pooled bigG), time_ids [1, 6]",
        "",
    ]
    skips, block = [], None
    for name, m, s_in, s_out in seen:
        top = ".".join(name.split(".")[:2]) if name.startswith(("down_blocks", "up_blocks")) else name.split(".")[0]
        if top != block and top.startswith(("down_blocks.", "up_blocks.", "mid_block")):  # a block's header line
            sub = unet.get_submodule(top)
            kind = type(sub).__name__
            if top != "mid_block":
                kind = ("CrossAttn" if sub.attentions is not None else "") + kind
            lines.append(f"{top} ({kind}, {sum(p.numel() for p in sub.parameters()) / 1e6:.1f} M params)")
        block = top
        short = name[len(top) + 1 :] if name != top else name
        note = ""
        if isinstance(m, Transformer2DModel):
            depth, tokens = len(m.transformer_blocks), s_in[2] * s_in[3]
            note = f"{depth} x (self-attn, cross-attn to 77 tokens, FF) over {tokens} tokens of {s_in[1]}"
        if name == "time_embedding":
            note = "MLP(sinusoid(t))"
        if name == "add_embedding":
            note = "MLP([text_embeds || sinusoid(time_ids)]); temb = sum of the two"
        if (
            name.startswith("down_blocks")
            and (
                isinstance(m, (Transformer2DModel, Downsample2D))
                or (isinstance(m, ResnetBlock2D) and unet.get_submodule(top).attentions is None)
            )
            or name == "conv_in"
        ):
            skips.append(s_out)
            note = (note + "; " if note else "") + f"push skip {len(skips) - 1}"
        if name.startswith("up_blocks") and isinstance(m, ResnetBlock2D):
            s = skips.pop()
            note = f"concat(h, skip {len(skips)} {shape(s)})"
        indent = "  " if name.startswith(("down_blocks", "up_blocks", "mid_block")) else ""
        lines.append(f"{indent}{short:<17} {shape(s_in):>20} -> {shape(s_out):<20} {note}".rstrip())
    lines.append(f"eps = conv_out(SiLU(conv_norm_out(h))) {shape(eps.shape)}; skips left over: {len(skips)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ 5. LoRA sizes
def lora_size_table(presets=("attn", "attn-ff", "all-linear"), ranks=(4, 16, 32)) -> str:
    rows = []
    for preset in presets:
        for r in ranks:
            unet = sdxl_unet_on_meta()
            names = lora.inject_lora(unet, preset, rank=r)
            params = sum(p.numel() for p in lora.lora_parameters(unet))
            fmt = "kohya" if preset != "all-linear" else "peft"  # kohya names exist for the original UNet's modules
            rows.append(
                [
                    f"`{preset}`",
                    r,
                    len(names),
                    f"{params:,}",
                    fmt_bytes(lora_file_bytes(unet, torch.float16, fmt)),
                    fmt_bytes(lora_file_bytes(unet, torch.float32, fmt)),
                    fmt,
                ]
            )
    return md_table(["targets", "rank r", "modules", "LoRA parameters", "file, fp16", "file, fp32", "naming"], rows)


# ------------------------------------------------------------------------------------------------ 6. what trains
def sdxl_components():
    """{unet, text_encoder, text_encoder_2, vae} of full-size SDXL on the meta device."""
    te1, te2 = sdxl_text_encoders_on_meta()
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sdxl())
    return {"unet": sdxl_unet_on_meta(), "text_encoder": te1, "text_encoder_2": te2, "vae": vae}


def miniature_components():
    """The bundled miniature's components, loaded from what is shipped in minidiff/assets/tiny-sdxl (pixel space,
    so no VAE). tests/test_docs.py recomputes the miniature's tables from them."""
    from minidiff.bundled import assets_dir
    from minidiff.weights.pretrained import load_pipeline

    pipe = load_pipeline(assets_dir() / "tiny-sdxl", device="cpu")
    return {"unet": pipe.unet, "text_encoder": pipe.text.text_encoder, "text_encoder_2": pipe.text.text_encoder_2}


def what_trains_table(components, rank=4) -> tuple[str, str]:
    """For each finetune.py mode: trainable tensors and parameters and the size of the output file. The modules
    are frozen and then made trainable exactly as finetune.py does it (minidiff/dreambooth/job.py's make_trainable)."""
    import argparse

    from minidiff.dreambooth.job import make_trainable, save_unet
    from minidiff.eval import audit

    rows, attn_table = [], ""
    for mode, flags in [
        ("`--train lora` (default)", dict(train="lora", train_text_encoder=False)),
        ("`--train lora --train-text-encoder`", dict(train="lora", train_text_encoder=True)),
        ("`--train full`", dict(train="full", train_text_encoder=False)),
    ]:
        parts = components()
        for module in parts.values():  # dreambooth.run freezes every component before make_trainable
            module.requires_grad_(False)
        pipe = argparse.Namespace(
            unet=parts["unet"],
            text=argparse.Namespace(text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"]),
            modules=lambda: {k: m for k, m in parts.items() if k != "vae"},
        )
        args = argparse.Namespace(
            targets="attn",
            rank=rank,
            alpha=None,
            gradient_checkpointing=False,
            lora_dropout=0.0,
            rank_dropout=0.0,
            module_dropout=0.0,
            text_encoder_lr=None,
            train_ti=False,
            **flags,
        )
        models, params, _ = make_trainable(args, pipe, 1e-4)
        table = audit.trainable_table(parts)  # what finetune.py prints before training: every component
        total = table[-1]
        if flags["train"] == "full":
            with captured_writes() as writes:
                with tempfile.TemporaryDirectory() as tmp:
                    save_unet(pipe.unet, tmp)
            size = safetensors_size(*writes[0])
            what = "every UNet tensor (weights and biases of all convs, norms, linears)"
            out = "`unet/diffusion_pytorch_model.safetensors` (fp32) + `config.json`"
        else:
            size = lora_file_bytes(models if len(models) > 1 else pipe.unet, torch.float32)
            n_unet = len(lora.lora_layers(pipe.unet))
            what = f"A, B of the UNet's {n_unet} `to_q/to_k/to_v/to_out.0`" + (
                " + CLIP `q_proj/k_proj/v_proj/out_proj` of both encoders" if flags["train_text_encoder"] else ""
            )
            out = "`lora.safetensors` (kohya names, fp32)"
            if not flags["train_text_encoder"]:
                attn_table = audit.format_table(table)
        rows.append(
            [
                mode,
                what,
                f"{total['tensors']:,}",
                f"{total['params']:,}",
                f"{100 * total['share']:.3f} %",
                out,
                fmt_bytes(size),
            ]
        )
    header = ["mode", "what trains", "tensors", "parameters", "share of all parameters", "file", "bytes"]
    return md_table(header, rows), attn_table


def main():
    t0 = time.perf_counter()
    FIGURES.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    schedule_figures()
    forward_process_figure()
    diffaugment_figure()
    print(f"figures: {time.perf_counter() - t0:.1f}s")
    diagram = unet_shape_diagram()
    (FIGURES / "unet-sdxl-1024.txt").write_text(diagram + "\n")
    replace_block("03-sdxl.md", "unet-shapes", "```text\n" + diagram + "\n```")
    print(f"unet diagram: {time.perf_counter() - t0:.1f}s")
    replace_block("05-lora-dreambooth.md", "lora-sizes", lora_size_table())
    print(f"lora table: {time.perf_counter() - t0:.1f}s")
    modes, attn = what_trains_table(sdxl_components)
    replace_block("06-what-trains.md", "what-trains", modes)
    replace_block("06-what-trains.md", "trainable-attn", "```text\n" + attn + "\n```")
    modes, attn = what_trains_table(miniature_components)
    replace_block("06-what-trains.md", "what-trains-miniature", modes)
    replace_block("06-what-trains.md", "trainable-attn-miniature", "```text\n" + attn + "\n```")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
