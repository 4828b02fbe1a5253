#!/usr/bin/env python
"""Train a pixel-space DDPM (Ho et al. 2020) on a handful of drawings (default: the six bundled female_adventurer).

    python train_ddpm.py                             # 32 px, one CPU core, ~5 min: recognisable (memorised) characters
    python train_ddpm.py --schedule linear --sample-steps 1000  # Ho et al.'s betas and their 1000-step sampler
    python train_ddpm.py --size 64 --steps 20000 --device cuda  # 64 px (256 px works too, on a GPU)
    python train_ddpm.py --recipe seed               # the seed project's "diffusion": why it made colour blobs
    python train_ddpm.py --resume latest             # continue runs/train_ddpm from its newest checkpoint

The DDPM recipe (`--recipe ho`): T = 1000 steps of betas (linear 1e-4..0.02 as Ho et al., or iDDPM's cosine), the
network predicts the noise eps of x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps and is trained with
L_simple = E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2 (Ho et al. eq. 14), Adam, grad-norm clip 1, an EMA of the
weights, random x-flips. The UNet is minidiff/unet.py's (the SDXL family) without text: `UNetConfig.pixel`, with
self-attention at 16x16. Samples come from the EMA weights, predicted x_0 clipped to [-1, 1].

Defaults are sized for a 2-core CPU (800 steps at batch 8, ~0.2 CPU-s a step) and were chosen by measurement
(metrics on 25 samples, see docs): the cosine schedule beats linear betas at 32 px (iDDPM's finding), and after so
few steps ancestral DDPM sampling (100 steps) beats deterministic DDIM, whose samples keep a veil of noise: the
model's small eps errors at high noise (amplified by sigma_t in x_0) are never washed out by fresh noise.

`--recipe seed` is the seed's notebook (Seachaos' "diffusion from scratch", as run in
https://github.com/maelysjb/Character-Generation-for-Comics/tree/c6e64b46): 5 deterministic steps
of a linear blend x_a = (1 - a) x_0 + a n (not variance preserving), a small conv net fed the raw integer step that
predicts the next, less noisy blend directly, MAE loss, Adam 8e-4, 400 steps at batch 2. Sampling applies the net
5 times to Gaussian noise, without fresh noise. The regression pulls every output to (nearly) the same average of
the training images, whatever the noise: on the seed's six differently framed drawings that average was a blob in
the right colours; on the aligned Kenney sprites it is one blurry figure, repeated (see `diversity` in metrics.json).

Writes to --out: grid.png (5x5 samples; PNG metadata holds settings and seed), loss.csv + loss.png,
checkpoints/step-XXXXXX.safetensors every --save-every steps and at the end (model, EMA, optimizer, RNG: `--resume`
continues bit for bit), samples/step-XXXXXX.png every --sample-every steps, and metrics.json
(minidiff.eval.metrics.evaluate of the 25 samples against the training images, plus timings).
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff import data, io, run_folder
from minidiff.bundled import tiny
from minidiff.cli import ArgumentParser as Parser
from minidiff.cli import check_counts, exit_code
from minidiff.errors import MinidiffError
from minidiff.eval import metrics
from minidiff.images import make_grid, save_png
from minidiff.samplers import sample
from minidiff.schedule import Schedule
from minidiff.train import hardware, loop, resume, state
from minidiff.unet import UNet, UNetConfig

DEFAULTS = {  # per recipe; every one can be overridden on the command line
    "ho": dict(
        size=32,
        steps=800,
        batch_size=8,
        lr=1e-3,
        ema_decay=0.999,
        schedule="cosine",
        sampler="ddpm",
        save_every=400,
        sample_every=0,
    ),
    "seed": dict(
        size=32,
        steps=400,
        batch_size=2,
        lr=8e-4,
        ema_decay=0.0,
        schedule="linear",
        sampler="ddim",
        save_every=200,
        sample_every=0,
    ),
}
WIDTHS = {
    32: (32, 64, 64),
    64: (32, 64, 128, 128),
    128: (32, 64, 128, 128, 256),  # UNet block_out_channels
    256: (64, 64, 128, 128, 256, 256),
}  # Ho et al.'s 256 px net is (128, 128, 256, 256, 512, 512)
SEED_STEPS = 5  # the seed notebook's `timesteps`
N_SAMPLES = 25  # grid.png is 5 x 5
RESUME_KEYS = ("recipe", "data", "fit", "size", "schedule", "batch_size", "lr", "ema_decay", "dropout", "seed", "unet")
SAMPLE_SEED_OFFSET = 1  # sampling noise comes from torch.Generator().manual_seed(seed + 1), apart from training's RNG


def build_parser():
    p = Parser(
        prog=Path(__file__).name,
        description="Train a pixel-space DDPM on a few images (Ho et al. 2020), or the seed's failed recipe.",
    )
    p.add_argument(
        "--recipe",
        choices=tuple(DEFAULTS),
        default="ho",
        help="ho: DDPM done right (default); seed: the seed project's 5-step linear-blend model",
    )
    p.add_argument("--data", default=None, help="image folder (default: the six bundled female_adventurer drawings)")
    p.add_argument("--fit", choices=("pad", "crop"), default="pad", help="square images by padding (white) or crop")
    p.add_argument("--size", type=int, choices=tuple(WIDTHS), default=None, help="image side (default 32)")
    p.add_argument(
        "--schedule",
        choices=("linear", "cosine"),
        default=None,
        help="betas: linear 1e-4..0.02 (Ho et al.) or cosine (iDDPM; default, better at 32-64 px)",
    )
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="ancestral ddpm (default) or ddim (eta 0)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default 100; 1000 = the paper's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: ho 800, seed 400)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: ho 8, seed 2)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: ho 1e-3, seed 8e-4)")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay (default 0.999; 0 = sample the raw net)")
    p.add_argument("--dropout", type=float, default=0.0, help="ResBlock dropout (Ho et al. used 0.1 on CIFAR-10)")
    p.add_run_flags(out="runs/train_ddpm", samples="samples/step-N.png")
    return p


def resolve_args(args):
    """Fill the recipe defaults and check the numbers: MinidiffError (one line) on bad input."""

    for key, value in DEFAULTS[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sample_steps is None:
        args.sample_steps = SEED_STEPS if args.recipe == "seed" else 100
    check_counts(
        args, positive=("steps", "batch_size", "sample_steps", "threads"), non_negative=("save_every", "sample_every")
    )
    if not args.lr > 0:
        raise MinidiffError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        raise MinidiffError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0 <= args.dropout < 1:
        raise MinidiffError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.sample_steps > 1000:
        raise MinidiffError(f"--sample-steps must be at most T = 1000, got {args.sample_steps}")
    if args.recipe == "seed" and args.sample_steps != SEED_STEPS:
        raise MinidiffError(f"--recipe seed always samples in its {SEED_STEPS} training steps (drop --sample-steps)")
    if args.data is not None and not Path(args.data).is_dir():
        raise MinidiffError(f"--data {args.data}: no such folder (expected a folder of .png/.jpg images)")
    args.device = str(hardware.resolve_device(args.device))
    return args


# ---------------------------------------------------------------------------------------------- DDPM (Ho et al.)
def ddpm_loss(model, schedule, x0, cond=None):
    """L_simple (Ho et al. eq. 14): t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x_0, t, eps),
    loss = mean ||eps - model(x_t, t, **cond)||^2. `cond` (e.g. context/text_embeds/time_ids for a text-conditioned
    UNet) is passed through unchanged. Randomness: torch's global RNG (saved in checkpoints)."""
    t = torch.randint(0, schedule.T, (x0.shape[0],)).to(x0.device)
    eps = torch.randn(x0.shape).to(x0.device)
    x_t = schedule.q_sample(x0, t, eps)
    return F.mse_loss(model(x_t, t, **(cond or {})), eps)


def train_step(model, optimizer, ema, loss_fn, clip=1.0):
    """One optimizer step on `loss_fn()` with grad-norm clipping, then the EMA update. Returns the detached loss."""
    loss = loss_fn()
    loss.backward()
    loop.optimizer_step(optimizer=optimizer, params=model.parameters(), max_grad_norm=clip, ema=ema, model=model)
    return loss.detach()


# ---------------------------------------------------------------------------------------------- the seed's recipe
class SeedNet(nn.Module):
    """The seed notebook's network (Seachaos' Keras model, in the seed repository above), ported layer for layer.

    Step input: the raw integer t -> Dense(192) -> LayerNorm -> ReLU. block(x): relu(conv_a(x)) * relu(dense(t))
    + conv_b(x), LayerNorm over channels, ReLU (128 channels). Down: 3 x (block, maxpool) + block; an MLP
    bottleneck [flatten | t] -> Dense(128) -> Dense((S/8)^2 * 32); up: 3 x (concat skip, block, upsample), concat,
    block, 1x1 conv to RGB. It outputs the next, less noisy image itself (no noise prediction).
    """

    def __init__(self, size=32, width=128, t_dim=192):
        super().__init__()
        self.side = size // 8
        self.t_in = nn.Linear(1, t_dim)
        self.t_norm = nn.LayerNorm(t_dim)
        ins = [3, width, width, width, 32 + width, 2 * width, 2 * width, 2 * width]
        self.conv_a = nn.ModuleList(nn.Conv2d(c, width, 3, padding=1) for c in ins)
        self.conv_b = nn.ModuleList(nn.Conv2d(c, width, 3, padding=1) for c in ins)
        self.dense = nn.ModuleList(nn.Linear(t_dim, width) for _ in ins)
        self.norm = nn.ModuleList(nn.LayerNorm(width) for _ in ins)
        self.mlp1, self.mlp_norm1 = nn.Linear(self.side**2 * width + t_dim, 128), nn.LayerNorm(128)
        self.mlp2, self.mlp_norm2 = nn.Linear(128, self.side**2 * 32), nn.LayerNorm(self.side**2 * 32)
        self.out = nn.Conv2d(width, 3, 1)

    def block(self, i, x, ts):
        h = F.relu(self.conv_a[i](x)) * F.relu(self.dense[i](ts))[:, :, None, None] + self.conv_b[i](x)
        return F.relu(self.norm[i](h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))  # Keras LayerNorm: channel axis

    def forward(self, x, t):
        ts = F.relu(self.t_norm(self.t_in(t.float().reshape(-1, 1).expand(x.shape[0], 1))))
        skips = []
        for i in range(3):
            x = self.block(i, x, ts)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.block(3, x, ts)
        skips.append(x)
        h = F.relu(self.mlp_norm1(self.mlp1(torch.cat([x.flatten(1), ts], 1))))
        x = F.relu(self.mlp_norm2(self.mlp2(h))).reshape(-1, 32, self.side, self.side)
        for i in range(4, 8):
            x = self.block(i, torch.cat([x, skips.pop()], 1), ts)
            if i < 7:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.out(x)


def seed_blend(x0, noise, t, steps=SEED_STEPS):
    """The seed's forward process: a = 1 - t/steps, x_a = (1 - a) x_0 + a noise (t = 0 is pure noise).
    Not variance preserving: halfway, x is 0.5 x_0 + 0.5 noise, with std ~0.7 instead of 1."""
    a = (1 - t.float() / steps).reshape(-1, 1, 1, 1).to(x0.device)
    return (1 - a) * x0 + a * noise


def seed_loss(model, x0):
    """MAE between the net's output on blend t and the blend t + 1 made with the SAME noise."""
    t = torch.randint(0, SEED_STEPS, (x0.shape[0],)).to(x0.device)
    noise = torch.randn(x0.shape).to(x0.device)
    return (model(seed_blend(x0, noise, t), t) - seed_blend(x0, noise, t + 1)).abs().mean()


@torch.no_grad()
def seed_sample(model, noise):
    """x <- model(x, t) for t = 0 .. 4, from Gaussian noise, deterministically."""
    x = noise
    for t in range(SEED_STEPS):
        x = model(x, torch.tensor(t, device=x.device))
    return x


# ---------------------------------------------------------------------------------------------- the run
def build_model(args):
    if args.recipe == "seed":
        return SeedNet(args.size), None
    widths = WIDTHS[args.size]
    config = UNetConfig.pixel(
        image_size=args.size,
        block_out_channels=widths,
        layers_per_block=1,
        attention_resolutions=(16,),
        head_dim=32,
        dropout=args.dropout,
        norm_num_groups=min(32, widths[0] // 4),
    )
    return UNet(config), config


@torch.no_grad()
def generate(model, schedule, args, n=N_SAMPLES, progress=True):
    """n samples in [-1, 1] from the given model; the noise comes from seed + 1, never from the training RNG."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(args.seed + SAMPLE_SEED_OFFSET)
    noise = torch.randn(n, 3, args.size, args.size, generator=g).to(device)
    model.eval()
    if args.recipe == "seed":
        return seed_sample(model, noise).clamp(-1, 1).cpu()
    x = sample(
        model,
        schedule,
        noise,
        steps=args.sample_steps,
        sampler=args.sampler,
        spacing="trailing",
        generator=g,
        progress=progress,
        clip_x0=1.0,
    )
    return x.clamp(-1, 1).cpu()


def run(args):
    resolve_args(args)
    out = Path(args.out)
    if args.resume:
        state.find_checkpoint(args.resume, out)  # "checkpoint not found" before the folder is made
    lock = run_folder.claim(out)  # noqa: F841 (a writable folder, ours until run returns)
    device = torch.device(args.device)
    if device.type == "cuda":
        hardware.check_gpu(device)
    else:
        torch.set_num_threads(args.threads)
    state.seed_all(args.seed)
    dataset = data.ImageFolder(
        args.data if args.data is not None else data.instance_images(),
        args.size,
        fit=args.fit,
        flip=args.recipe == "ho",
    )
    schedule = Schedule.from_name(args.schedule)
    model, config = build_model(args)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = state.EMA(model, args.ema_decay) if args.ema_decay > 0 else None
    modules = {"model": model, **({"ema": ema} if ema else {})}
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    settings |= {
        "n_images": len(dataset.images),
        "unet": config.__dict__ if config else "SeedNet",
        "params": sum(p.numel() for p in model.parameters()),
    }
    step = 0
    if args.resume:  # the settings first (resume.py: a change is refused), then the content, then restore
        file, _, extra = state.checkpoint_extra(args.resume, out)
        resume.check_settings(extra.get("settings", {}), settings, RESUME_KEYS, file, "--steps and the output flags")
        step, extra = state.load_checkpoint(file, modules, {"adam": optimizer}, out_dir=out)
    log = state.LossLog(out, resume_step=step if args.resume else None)
    sampler_model = ema.module if ema else model

    def loss_fn():
        idx = torch.randint(0, len(dataset), (args.batch_size,))
        x0 = torch.stack([dataset[int(i)]["pixels"] for i in idx]).to(device)
        model.train()
        return seed_loss(model, x0) if args.recipe == "seed" else ddpm_loss(model, schedule, x0)

    def write_grid(path, at_step, x):
        save_png(
            make_grid(x, nrow=5),
            path,
            {
                "step": at_step,
                "seed": args.seed,
                "recipe": args.recipe,
                "weights": "EMA" if ema else "raw",
                "settings": settings,
            },
        )

    def step_fn(step):
        if ema is not None:  # warm-up: p_ema follows the net closely at first, then averages ~1/(1 - decay) steps
            ema.decay = min(args.ema_decay, (1 + step) / (10 + step))
        return {"loss": train_step(model, optimizer, ema, loss_fn)}

    def write_samples(step):
        write_grid(
            out / "samples" / f"step-{step:06d}.png", step, generate(sampler_model, schedule, args, progress=False)
        )

    def save(step):
        return state.save_checkpoint(out, step, modules, {"adam": optimizer}, extra={"settings": settings})

    summary = loop.train(
        step_fn=step_fn,
        steps=args.steps,
        start=step,
        log=log,
        hint="lower --lr",
        hooks=[(args.sample_every, write_samples, False), (args.save_every, save, True)],
        postfix=lambda logs: {"loss": f"{logs['loss'].item():.4f}"},
        postfix_every=10,
        on_stop=save,
        desc=f"ddpm {args.recipe}",
        dynamic_ncols=True,
    )
    train_seconds = summary["seconds"]

    log.plot(title=f"DDPM ({args.recipe}): training loss")
    t0 = time.perf_counter()
    samples = generate(sampler_model, schedule, args)
    sample_seconds = time.perf_counter() - t0
    write_grid(out / "grid.png", args.steps, samples)
    result = metrics.evaluate(samples, dataset.tensors())
    result.update(
        recipe=args.recipe,
        steps=args.steps,
        size=args.size,
        seed=args.seed,
        sampler=args.sampler,
        sample_steps=args.sample_steps,
        train_seconds=train_seconds,
        sample_seconds=sample_seconds,
    )
    io.write_json(result, out / "metrics.json")
    print(
        f"ddpm {args.recipe}: {args.steps} steps in {train_seconds:.0f}s, {N_SAMPLES} samples in "
        f"{sample_seconds:.0f}s -> {out}/grid.png; palette_distance {result['palette_distance']:.2f}, identity "
        f"{result['identity']:.2f}, nn_distance {result['nn_distance']:.3f}, diversity {result['diversity']:.3f}"
    )
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:2] == [
        "--preset",
        "tiny-sdxl",
    ]:  # captions + two CLIPs + the SDXL UNet: the loop is minidiff/bundled/tiny.py's
        return tiny.main(argv[2:])
    args = build_parser().parse_args(argv)
    return exit_code(run, args)


if __name__ == "__main__":
    sys.exit(main())
