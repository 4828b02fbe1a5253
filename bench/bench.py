"""Ours vs diffusers(+peft) on identical random full-size SDXL weights: UNet forward, LoRA training step,
sampling and class-image generation, each measured in a fresh subprocess (so peak RSS is per implementation).

    python bench/bench.py --device cpu                       # 32x32 latent, fp32, minutes (needs ~12 GB RAM)
    python bench/bench.py --device cuda --resolution 1024 --precision fp16   # a 16 GB P100 / T4
    python bench/bench.py --config tiny_sdxl --tasks forward,train          # seconds (what tests/test_bench.py runs)

Identical weights without a download (bench/weights.py): both models are built on the meta device and every tensor is
then filled from a generator seeded by (seed, crc32 of its state-dict key), so "ours" never holds a copy of the
diffusers model (each subprocess builds only its own). The LoRA down matrices A are filled the same way (key "<module>.lora_A"); B starts
at zero in both. Ours: minidiff.lora.inject_lora(targets="attn", rank=4); diffusers: peft LoraConfig(r=4,
target_modules=["to_q", "to_k", "to_v", "to_out.0"]) through unet.add_adapter, as train_dreambooth_lora_sdxl.py does.
One training step = forward + MSE + backward + AdamW step, gradient checkpointing on both; the reported time is the
mean of steps 2..n (step 1 warms up). Memory: torch.cuda.max_memory_allocated on a GPU, peak RSS (ru_maxrss) on CPU.
Each worker also writes its first output, so the parent reports max |ours - diffusers| (the same weights must give
the same numbers, or the timings compare two different computations).

diffusers and peft are imported only here and only in the "diffusers" workers: they are oracles, never minidiff deps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from weights import DTYPES, SDXL_SCHEDULER, build_unet, build_vae, init_value, unet_inputs  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TASKS = ("forward", "train", "sample", "classgen")


# ------------------------------------------------------------------------------------------------ measurements
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    out = {"peak_rss_gb": round(rss, 3)}
    if torch.device(device).type == "cuda":
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def task_forward(args, dtype, out_file):
    model, call, cfg = build_unet(args.impl, args.config, dtype, args.device, args.seed)
    model.eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        call = torch.compile(call)
    inputs = unet_inputs(cfg, args.batch, args.latent, dtype, args.device, args.seed)
    times, cpu = [], []
    with torch.inference_mode():
        for i in range(args.reps):
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            eps = call(*inputs)
            sync(args.device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if i == 0:
                save_output(eps, out_file)
    return {"times": times, "time_s": _headline(times), "cpu_times": cpu, "cpu_s": _headline(cpu)}


def _add_lora(impl, model, device, seed):
    """Rank-4 LoRA on to_q/to_k/to_v/to_out.0 with A from the shared init, B = 0; returns the fp32 trainables."""
    if impl == "ours":
        from minidiff.lora import inject_lora, lora_layers, lora_parameters

        inject_lora(model, targets="attn", rank=4)
        for name, layer in lora_layers(model).items():
            A = layer.lora_A["default"]
            A.data = init_value(f"{name}.lora_A", A.shape, torch.float32, device, seed)
        return lora_parameters(model)
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and "default" in module.lora_A:
            A = module.lora_A["default"].weight
            A.data = init_value(f"{name}.lora_A", A.shape, torch.float32, device, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: LoRA weights in fp32 on a half-precision model
        p.data = p.data.float()
    return params


def task_train(args, dtype, out_file):
    """LoRA step: frozen weights in `dtype`, LoRA + AdamW state fp32, autocast + GradScaler for fp16."""
    model, call, cfg = build_unet(args.impl, args.config, dtype, args.device, args.seed)
    params = _add_lora(args.impl, model, args.device, args.seed)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        call = torch.compile(call)
    opt = torch.optim.AdamW(params, lr=1e-4)
    half = dtype != torch.float32
    scaler = torch.amp.GradScaler(torch.device(args.device).type) if dtype == torch.float16 else None
    x, t, ctx, pooled, ids = unet_inputs(cfg, args.batch, args.latent, dtype, args.device, args.seed)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed + 7)).to(args.device)
    times, cpu, losses = [], [], []
    for step in range(args.train_steps):
        sync(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=half):
            pred = call(x, t, ctx, pooled, ids)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss.item())
        if step == 0:
            save_output(pred.detach(), out_file)
    n = sum(p.numel() for p in params)
    return {
        "times": times,
        "time_s": _headline(times),
        "cpu_times": cpu,
        "cpu_s": _headline(cpu),
        "losses": losses,
        "lora_params": n,
    }


class StubText:
    """Stands in for the two CLIP encoders (identical in both implementations: both use transformers): fixed random
    prompt states for cond rows, zeros for the empty negative prompt (SDXL's force_zeros_for_empty_prompt)."""

    def __init__(self, ctx, pooled):
        self.ctx, self.pooled = ctx, pooled

    def encode(self, prompts, negative=None):
        i = [int(p) for p in prompts]
        ctx, pooled = self.ctx[i], self.pooled[i]
        if negative is None:
            return ctx, pooled
        return torch.cat([torch.zeros_like(ctx), ctx]), torch.cat([torch.zeros_like(pooled), pooled])

    @staticmethod
    def time_ids(original_size, crop_top_left, target_size, batch=1):
        return torch.tensor(
            [[*map(float, original_size), *map(float, crop_top_left), *map(float, target_size)]]
        ).repeat(batch, 1)


def task_sample(args, dtype, out_file, n_images, batch):
    """n_images images in batches of `batch`: Euler, args.steps steps, CFG 5 batched, VAE decode (fp32 upcast)."""
    unet, _, cfg = build_unet(args.impl, args.config, dtype, args.device, args.seed)
    vae = build_vae(args.impl, args.config, dtype, args.device, args.seed)
    unet.eval(), vae.eval()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(args.seed + 99)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    ctx = torch.randn(n_images, 77, cfg.cross_attention_dim, generator=g).to(args.device, dtype)
    pooled = torch.randn(n_images, pooled_dim, generator=g).to(args.device, dtype)
    noise = torch.randn(n_images, cfg.in_channels, args.latent, args.latent, generator=g)
    size = args.latent * 8
    if args.impl == "ours":
        from minidiff.pipeline import Pipeline, generate
        from minidiff.schedule import Schedule

        pipe = Pipeline(unet, vae, StubText(ctx, pooled), Schedule.scaled_linear(), vae_tile=None)  # as diffusers

        def run():
            return (
                generate(
                    pipe,
                    [str(i) for i in range(n_images)],
                    negative="",
                    steps=args.steps,
                    cfg=5.0,
                    sampler="euler",
                    width=size,
                    height=size,
                    batch_size=batch,
                    progress=False,
                    noise=noise.to(args.device),
                )
                * 0.5
                + 0.5
            )
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        def run():
            out = []
            for s in range(0, n_images, batch):
                sl = slice(s, s + batch)
                out.append(
                    pipe(
                        prompt_embeds=ctx[sl],
                        negative_prompt_embeds=torch.zeros_like(ctx[sl]),
                        pooled_prompt_embeds=pooled[sl],
                        negative_pooled_prompt_embeds=torch.zeros_like(pooled[sl]),
                        num_inference_steps=args.steps,
                        guidance_scale=5.0,
                        height=size,
                        width=size,
                        latents=noise[sl].to(args.device, dtype),
                        output_type="pt",
                    ).images
                )
            return torch.cat(out)

    sync(args.device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        images = run()
    sync(args.device)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_output(images[:1].float(), out_file)
    return {
        "time_s": total / n_images,
        "cpu_s": cpu / n_images,
        "total_s": total,
        "images": n_images,
        "batch": batch,
        "steps": args.steps,
    }


def _headline(times):
    rest = times[1:] or times  # the first call warms up (allocator, kernels, autotuning)
    return sum(rest) / len(rest)


def save_output(t, path):
    from safetensors.torch import save_file

    save_file({"out": t.detach().float().cpu().contiguous()}, str(path))


def worker(args):
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.precision]
    out_file = Path(args.worker_out).with_suffix(".safetensors")
    t0 = time.perf_counter()
    if args.task == "forward":
        r = task_forward(args, dtype, out_file)
    elif args.task == "train":
        r = task_train(args, dtype, out_file)
    elif args.task == "sample":
        r = task_sample(args, dtype, out_file, n_images=args.images, batch=1)
    else:
        r = task_sample(args, dtype, out_file, n_images=args.class_images, batch=args.class_batch)
    r.update(peak_memory(args.device), task=args.task, impl=args.impl, wall_s=round(time.perf_counter() - t0, 1))
    Path(args.worker_out).write_text(json.dumps(r))


# ------------------------------------------------------------------------------------------------ the parent
def run_worker(args, task, impl, tmp) -> dict:
    out = Path(tmp) / f"{task}-{impl}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-out", str(out), "--task", task, "--impl", impl]
    for k in (
        "device",
        "config",
        "latent",
        "batch",
        "precision",
        "reps",
        "train_steps",
        "steps",
        "images",
        "class_images",
        "class_batch",
        "seed",
        "threads",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += [
        f
        for f, on in (
            ("--checkpointing", args.checkpointing),
            ("--no-checkpointing", not args.checkpointing),
            ("--channels-last", args.channels_last),
            ("--compile", args.compile),
        )
        if on
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "task": task,
            "impl": impl,
            "error": " | ".join(tail) or f"exit {proc.returncode}",
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    return json.loads(out.read_text())


def max_diff(tmp, task):
    from safetensors.torch import load_file

    a, b = (Path(tmp) / f"{task}-{i}.safetensors" for i in ("ours", "diffusers"))
    if not (a.exists() and b.exists()):
        return None
    x, y = load_file(str(a))["out"], load_file(str(b))["out"]
    return float((x - y).abs().max()) if x.shape == y.shape else float("nan")


def _median(values):
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def _combine(runs):
    """One row from the rounds of a (task, impl): median times, the largest peak memory, the rounds' times."""
    ok = [r for r in runs if "error" not in r]
    if len(ok) < 2:
        return ok[0] if ok else (runs[0] if runs else {})
    r = dict(
        ok[0],
        time_s=_median([x["time_s"] for x in ok]),
        cpu_s=_median([x["cpu_s"] for x in ok]),
        rounds=[x["time_s"] for x in ok],
    )
    for key in ("peak_rss_gb", "peak_cuda_gb"):
        if key in r:
            r[key] = max(x[key] for x in ok)
    return r


def _ratio(o_runs, d_runs, key):
    """ours / diffusers: the median over rounds of the ratio within a round (both ran back to back)."""
    pairs = [(o[key], d[key]) for o, d in zip(o_runs, d_runs) if key in o and key in d]
    return _median([a / b for a, b in pairs])


def table(results) -> str:
    rows = [
        (
            "task",
            "impl",
            "time",
            "cpu time",
            "peak mem",
            "ours/diffusers time (cpu time)",
            "ours/diffusers mem",
            "max |diff|",
            "notes",
        )
    ]
    runs = {}
    for r in results["runs"]:
        runs.setdefault((r["task"], r["impl"]), []).append(r)
    mem_key = "peak_cuda_gb" if results["setup"]["device"] == "cuda" else "peak_rss_gb"
    for task in results["setup"]["tasks"]:
        o_runs, d_runs = runs.get((task, "ours"), []), runs.get((task, "diffusers"), [])
        o, d = _combine(o_runs), _combine(d_runs)
        for impl, r in (("ours", o), ("diffusers", d)):
            if not r:
                continue
            if "error" in r:
                rows.append((task, impl, "error", "", "", "", "", "", r["error"][:120]))
                continue
            unit = "s/image" if task in ("sample", "classgen") else "s"
            notes = []
            if "lora_params" in r:
                notes.append(f"{r['lora_params']:,} LoRA params; losses " + " ".join(f"{v:.5f}" for v in r["losses"]))
            if "rounds" in r:
                notes.append("rounds " + " ".join(f"{v:.2f}" for v in r["rounds"]))
            elif "times" in r:
                notes.append("times " + " ".join(f"{v:.2f}" for v in r["times"]))
            if task in ("sample", "classgen"):
                notes.append(f"{r['images']} img, batch {r['batch']}, {r['steps']} steps")
            ratio_t = ratio_m = diff = ""
            if impl == "ours" and "time_s" in d and "time_s" in o:
                ratio_t = f"{_ratio(o_runs, d_runs, 'time_s'):.2f}x ({_ratio(o_runs, d_runs, 'cpu_s'):.2f}x)"
                ratio_m = f"{o[mem_key] / d[mem_key]:.2f}x"
                diff = "" if results["diffs"].get(task) is None else f"{results['diffs'][task]:.2e}"
            rows.append(
                (
                    task,
                    impl,
                    f"{r['time_s']:.3f} {unit}",
                    f"{r['cpu_s']:.3f} s",
                    f"{r[mem_key]:.2f} GiB",
                    ratio_t,
                    ratio_m,
                    diff,
                    "; ".join(notes),
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine(device) -> str:
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {mem:.0f} GB RAM"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default="sdxl", help="UNetConfig preset: sdxl (full size) or tiny_sdxl (smoke test)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 32 on cpu, 128 on cuda)")
    p.add_argument("--resolution", type=int, default=None, help="pixel side; sets --latent to resolution / 8")
    p.add_argument("--batch", type=int, default=1, help="UNet batch for forward and train")
    p.add_argument("--precision", default=None, choices=list(DTYPES), help="default fp32 on cpu, fp16 on cuda")
    p.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=True)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet call (both implementations)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {TASKS}")
    p.add_argument("--impls", default="ours,diffusers")
    p.add_argument("--reps", type=int, default=3, help="UNet forwards (first one is warm-up)")
    p.add_argument("--train-steps", type=int, default=3, help="training steps (first one is warm-up)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 on cpu, 50 on cuda)")
    p.add_argument("--images", type=int, default=1, help="images for the sample task (batch 1)")
    p.add_argument("--class-images", type=int, default=None, help="images for classgen (default 2 cpu, 8 cuda)")
    p.add_argument("--class-batch", type=int, default=None, help="classgen batch (default 2 cpu, 4 cuda)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat each task's pair N times, alternating which goes "
        "first; the table shows medians and the median of the per-round ratios (for a noisy machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--json", default=None, help="where to write the results (default bench/results/<device>-<time>.json)"
    )
    p.add_argument("--show", default=None, help="print the table of a results JSON written earlier, run nothing")
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    if a.resolution:
        a.latent = a.resolution // 8
    a.latent = a.latent or (128 if gpu else 32)
    a.precision = a.precision or ("fp16" if gpu else "fp32")
    a.steps = a.steps or (50 if gpu else 4)
    a.class_images = a.class_images or (8 if gpu else 2)
    a.class_batch = a.class_batch or (4 if gpu else 2)
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.worker_out:
        return worker(args)
    if args.show:
        print(report(json.loads(Path(args.show).read_text())))
        return None
    if args.device == "cuda":
        from minidiff.train.hardware import check_gpu

        check_gpu("cuda")
    tasks = [t for t in args.tasks.split(",") if t]
    bad = set(tasks) - set(TASKS)
    if bad:
        raise SystemExit(f"unknown tasks {sorted(bad)}: expected some of {TASKS}")
    setup = {k: v for k, v in vars(args).items() if k not in ("task", "impl", "worker_out")}
    setup.update(tasks=tasks, machine=machine(args.device), torch=torch.__version__, command=" ".join(sys.argv))
    try:
        import diffusers
        import peft

        setup.update(diffusers=diffusers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    results = {"setup": setup, "runs": [], "diffs": {}}
    path = (
        Path(args.json)
        if args.json
        else ROOT / "bench" / "results" / (f"{args.device}-{args.config}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            for k, impl in _schedule(args.impls.split(","), args.rounds):
                print(f"[bench] {task} / {impl} (round {k + 1} of {args.rounds}) ...", file=sys.stderr, flush=True)
                r = dict(run_worker(args, task, impl, tmp), round=k)
                print(f"[bench]   {json.dumps(r)}", file=sys.stderr, flush=True)
                results["runs"].append(r)
                results["diffs"][task] = max_diff(tmp, task)
                write_json(results, path)  # after every run: an interrupted benchmark keeps what it measured
    print(report(results))
    print(f"wrote {path}")
    return results


def _schedule(impls, rounds):
    """(round, impl) pairs, the order flipped every other round so that a machine that slows down (or warms up)
    over the run does not favour whichever implementation always goes first."""
    return [(k, impl) for k in range(rounds) for impl in (impls if k % 2 == 0 else impls[::-1])]


def write_json(results, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(results, indent=1))
    os.replace(tmp_path, path)


def report(results) -> str:
    """The header lines and the table (also: python bench/bench.py --show RESULTS.json)."""
    s = results["setup"]
    return "\n".join(
        [
            f"{s['machine']}; torch {s['torch']}, diffusers {s.get('diffusers')}, peft {s.get('peft')}",
            f"config {s['config']}, latent {s['latent']}x{s['latent']}, batch {s['batch']}, {s['precision']}, "
            f"checkpointing {s['checkpointing']}, channels_last {s['channels_last']}, compile {s['compile']}",
            table(results),
        ]
    )


if __name__ == "__main__":
    main()
