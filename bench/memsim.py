"""Simulated peak CUDA memory, minidiff against diffusers + peft, side by side, without a GPU.

    python bench/memsim.py                                   # the table at 1024 px (fake CUDA tensors, minutes)
    python bench/memsim.py --rows lora-b2,lora-b2-fp8        # some rows only
    python bench/memsim.py --validate --config tiny_sdxl     # the same tracker on real CPU tensors vs the fake run
    flock /tmp/fullsize.lock python bench/memsim.py --validate --config sdxl --latent 32   # full size (11 GB RAM)

Both implementations run their real code on fake CUDA tensors (minidiff/train/memsim.py: a FakeTensorMode with the
autocast, autograd-engine and attention adjustments, and a dispatch-mode tracker counting every storage in
512-byte blocks until its last reference dies): what `torch.cuda.max_memory_allocated` would report. Ours is
minidiff/train/memory_plan.py's job (the code finetune.py and sample.py run). diffusers + peft as their DreamBooth-LoRA
SDXL script sets it up: UNet2DConditionModel in the weight dtype, `unet.add_adapter(LoraConfig(r, target_modules=
[to_q, to_k, to_v, to_out.0]))`, LoRA weights cast to fp32 (cast_training_params), gradient checkpointing (diffusers'
non-reentrant torch.utils.checkpoint), fp16 autocast, AdamW (foreach), a GradScaler's multiply; text-encoder
LoRA on q/k/v/out_proj. Sampling: StableDiffusionXLPipeline.__call__'s memory-relevant steps: one UNet call on
[uncond; cond] of the batch, then `vae.decode` of the whole batch in fp32 (force_upcast; VAE tiling is off by
default). Each row runs in its own subprocess (fake tensors hold no data, but patches and caches stay per row).
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minidiff.train import memsim  # noqa: E402
from minidiff.train.memory_plan import Calls, Job, World, simulate, track  # noqa: E402
from minidiff.unet_config import UNetConfig  # noqa: E402

# row name: (what it is, minidiff's job); the diffusers side runs the same settings.
ROWS = {
    "lora-b1": ("LoRA step, batch 1 (no prior)", Job("lora", batch=1)),
    "lora-b2": ("LoRA step, batch 1 + 1 class row", Job("lora", batch=2)),
    "lora-b2-fp8": ("LoRA step, batch 1 + 1 class row, fp8 base", Job("lora", batch=2, base_precision="fp8")),
    "lora-b1-fp8": ("LoRA step, batch 1, fp8 base", Job("lora", batch=1, base_precision="fp8")),
    "lora-b2-te": ("LoRA step, batch 2, --train-text-encoder", Job("lora", batch=2, train_text_encoder=True)),
    "full-b1": ("full fine-tune, batch 1 (fp32 weights, AdamW)", Job("full", batch=1)),
    "sample": ("sampling: 1 image, CFG batch 2, VAE decode", Job("sample", batch=1)),
    "sample-fp8": ("sampling, fp8 base", Job("sample", batch=1, base_precision="fp8")),
    "sample-untiled": ("sampling, whole-image VAE decode", Job("sample", batch=1, vae_tile=None)),
    "classgen": ("class images: batch of 4, CFG batch 8, decode", Job("sample", batch=4)),
}
DEFAULT_ROWS = "lora-b2,lora-b2-fp8,sample,lora-b1,lora-b2-te,full-b1,sample-fp8,classgen,sample-untiled"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def configs(name):
    """(our UNetConfig, diffusers' UNet config, our VAEConfig, diffusers' VAE config, the two CLIP configs): SDXL's,
    or tiny_sdxl's with a context of the miniature's tiny CLIPs (64 + 128 wide, pooled 128)."""
    from weights import SDXL_CLIP_G, SDXL_CLIP_L, SDXL_VAE, unet_config

    from minidiff.bundled import tiny
    from minidiff.vae import VAEConfig

    if name == "sdxl":
        from transformers import CLIPTextConfig

        theirs, ours = unet_config(name)
        return ours, theirs, VAEConfig.sdxl(), SDXL_VAE, (CLIPTextConfig(**SDXL_CLIP_L), CLIPTextConfig(**SDXL_CLIP_G))
    ours, vae = UNetConfig.tiny_sdxl(cross_attention_dim=192, pooled_dim=128), VAEConfig.tiny()
    return ours, _diffusers_keys(ours), vae, _diffusers_keys(vae), tiny.text_configs(1000)


def _diffusers_keys(config) -> dict:
    return {k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------ diffusers + peft
def simulate_diffusers(job: Job, unet_cfg: dict, vae_cfg: dict, text_configs) -> dict:
    """The same job through diffusers' UNet2DConditionModel / AutoencoderKL and peft (module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[job.precision]
    full = job.kind == "full"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg).to(torch.float32 if full else dtype)
        unet.requires_grad_(full)
        texts = (
            [CLIPTextModel(text_configs[0]).to(dtype), CLIPTextModelWithProjection(text_configs[1]).to(dtype)]
            if job.train_text_encoder
            else []
        )
        if job.kind == "lora":
            unet.add_adapter(
                LoraConfig(r=job.rank, lora_alpha=job.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
            )
            for te in texts:
                te.requires_grad_(False)
                te.add_adapter(
                    LoraConfig(
                        r=job.rank,
                        lora_alpha=job.rank,
                        init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                    )
                )
        vae = AutoencoderKL.from_config(vae_cfg).float().requires_grad_(False) if job.kind == "sample" else None
        if job.checkpointing and job.kind != "sample":
            unet.enable_gradient_checkpointing()
        params = [p for m in [unet, *texts] for p in m.parameters() if p.requires_grad]
        for p in params:  # cast_training_params: trainable LoRA weights in fp32
            p.data = p.data.float()
    cfg = UNetConfig.from_diffusers(dict(unet.config))

    def call(x, t, ctx, pooled, ids):
        return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample

    def text(tokens):
        out_l, out_g = texts[0](tokens, output_hidden_states=True), texts[1](tokens, output_hidden_states=True)
        return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g[0]

    def decode(latents):  # the pipeline's: the whole batch at once, fp32 (force_upcast)
        return vae.decode(latents.float() / vae.config.scaling_factor).sample

    calls = Calls(cfg, call, text if texts else None, decode if vae is not None else None, latent_dtype=dtype)
    with memsim.meta_cuda():
        return track(job, World(None, False, dtype), [unet, *texts, *([vae] if vae is not None else [])], params, calls)


# ------------------------------------------------------------------------------------------------ rows and table
def run_row(name, impl, config, latent):
    ours, theirs, vae, vae_d, texts = configs(config)
    job = ROWS[name][1]
    job = Job(**{**job.__dict__, "latent": latent})
    if impl == "diffusers" and job.base_precision == "fp8":
        return {"row": name, "impl": impl, "error": "no fp8 base storage in diffusers + peft"}
    t0 = time.perf_counter()
    peaks = simulate(job, ours, vae, texts) if impl == "ours" else simulate_diffusers(job, theirs, vae_d, texts)
    return {"row": name, "impl": impl, "seconds": round(time.perf_counter() - t0, 1), **peaks}


def validate(config, latent, rows=("lora-b1",)) -> list:
    """Each row (fp32, no autocast) on real CPU tensors and on fake CUDA tensors, same tracker: the agreement."""
    ours, _, vae, _, texts = configs(config)
    out = []
    for name in rows:
        job = Job(**{**ROWS[name][1].__dict__, "latent": latent, "precision": "fp32", "base_precision": "fp32"})
        fake = simulate(job, ours, vae, texts)
        real = simulate(job, ours, vae, texts, cpu=True)
        out.append(
            {
                "row": name,
                "fake_cuda_gib": fake["peak"],
                "real_cpu_gib": real["peak"],
                "diff_mib": round((fake["peak"] - real["peak"]) * 1024, 3),
            }
        )
    return out


def table(results) -> str:
    by = {(r["row"], r["impl"]): r for r in results}
    lines = [
        "| row | minidiff peak (GiB) | diffusers + peft peak (GiB) | ours / theirs | minidiff phases (GiB) |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["row"] for r in results):
        o, d = by.get((name, "ours"), {}), by.get((name, "diffusers"), {})
        ratio = f"{o['peak'] / d['peak']:.2f}x" if "peak" in o and "peak" in d else ""
        phases = ", ".join(
            f"{k} {v:.2f}" for k, v in o.items() if k not in ("row", "impl", "seconds", "peak", "start", "error")
        )
        lines.append(f"| {ROWS[name][0]} | {_fmt(o)} | {_fmt(d)} | {ratio} | {phases} |")
    return "\n".join(lines)


def _fmt(r):
    return "" if not r else r.get("error", "")[:60] if "peak" not in r else f"{r['peak']:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="sdxl", help="sdxl (full size) or tiny_sdxl")
    p.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024 px)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of {list(ROWS)}")
    p.add_argument("--impls", default="ours,diffusers")
    p.add_argument("--validate", action="store_true", help="real CPU tensors vs fake CUDA, same tracker (fp32)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.row:  # a worker: one row, JSON on stdout
        print(json.dumps(run_row(a.row, a.impl, a.config, a.latent)))
        return None
    if a.validate:
        res = validate(a.config, a.latent, a.rows.split(",") if a.rows != DEFAULT_ROWS else ("lora-b1",))
        print(json.dumps(res, indent=1))
        _write(a.json, {"validate": res, "config": a.config, "latent": a.latent})
        return res
    results = []
    for name in a.rows.split(","):
        for impl in a.impls.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--row",
                name,
                "--impl",
                impl,
                "--config",
                a.config,
                "--latent",
                str(a.latent),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            try:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                r = {"row": name, "impl": impl, "error": tail[0]}
            print(f"[memsim] {json.dumps(r)}", file=sys.stderr, flush=True)
            results.append(r)
            _write(a.json, {"config": a.config, "latent": a.latent, "torch": torch.__version__, "results": results})
    print(table(results))
    _write(a.json, {"config": a.config, "latent": a.latent, "torch": torch.__version__, "results": results})
    return results


def _write(path, obj):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1))


if __name__ == "__main__":
    main()
