#!/usr/bin/env python
"""Train the GAN baseline on a handful of drawings (default: the six bundled female_adventurer poses).

    python train_gan.py                              # data-efficient recipe, CPU, a few minutes
    python train_gan.py --recipe dcgan               # the seed project's DCGAN: D wins, G makes noise
    python train_gan.py --data drawings/ --size 64 --steps 20000 --r1 auto --device cuda
    python train_gan.py --resume latest              # continue runs/train_gan from its newest checkpoint

Writes to --out: loss.csv + loss.png (D(x), D(G(z)) as mean sigmoid and raw scores, both losses; d_outputs.png
shows D(x) and D(G(z)) alone: the seed's failure is D(x) -> 1 with D(G(z)) -> 0), an 8x8 sample
grid grid-XXXXXX.png every --sample-every steps and grid.png at the end (from the EMA generator; PNG metadata holds
the settings and seed), checkpoints/step-XXXXXX.safetensors every --save-every steps and at the end (G, D, EMA,
both optimizers, RNG: `--resume` continues bit for bit), and metrics.json (minidiff.eval.metrics.evaluate of 64 samples
against the training images). The networks, DiffAugment, losses and one training step live in minidiff/baselines/gan.py.

Default recipe settings, chosen so each run takes ~2.5 CPU-minutes (one thread) and so ~3-4 minutes of wall time on
the shared 2-core machine; measured with `python train_gan.py [--recipe dcgan]`, seed 0, six bundled drawings:

    recipe           size  batch               steps  CPU s  palette_distance  identity  nn_distance  diversity
    dcgan            64    6 (= all; seed 128)  600   142    18.30             0.00      0.363        0.043
    data-efficient   32    8                   2000   154     2.92             1.00      0.081        0.062

The DCGAN reproduces the seed's failure: D(x) ~ 1.00 from step 10 on, D(G(z)) falls to ~0.002 by step 100 and
stays under ~0.2 (d_outputs.png), L_G 6-8 with spikes to 20 (as in the seed's logs), and its grid is coloured
noise (the classifier calls all 64 samples "unknown"). The data-efficient GAN keeps D(x) ~ D(G(z)) ~ 0.5 and draws
the character, though in fewer poses than the six it saw. Why 32 px: at 64 px a step costs ~3x more, so
the same budget buys ~700 steps, too few. Batch 8 x 2000 steps and batch 16 x 1500 steps (10% more CPU) came out
alike (palette 2.92 / 2.74, diversity 0.062 / 0.058). More steps help: 3000 steps gave palette 2.2-2.5 and
diversity 0.07-0.08 (the six training images: 0.117); Adam betas (0, 0.99) instead of (0.5, 0.999): no clear gain.
"""

import sys
from dataclasses import asdict
from pathlib import Path

import torch

from minidiff import data, io, run_folder
from minidiff.baselines import gan
from minidiff.cli import ArgumentParser as Parser
from minidiff.cli import check_counts, exit_code
from minidiff.errors import MinidiffError
from minidiff.eval import metrics
from minidiff.images import make_grid, save_png
from minidiff.train import hardware, loop, resume, state

DEFAULTS = {  # per recipe; every one can be overridden on the command line
    "dcgan": dict(size=64, steps=600, batch_size=128, width=64, save_every=300, sample_every=200),
    "data-efficient": dict(size=32, steps=2000, batch_size=8, width=64, save_every=500, sample_every=500),
}
GRID_SEED_OFFSET = 1  # the fixed latents of every grid come from torch.Generator().manual_seed(seed + 1)
N_GRID = 64


def build_parser():
    p = Parser(
        prog=Path(__file__).name,
        description="Train a DCGAN-sized GAN on a few images: the seed's recipe or the data-efficient one.",
    )
    p.add_argument(
        "--recipe",
        choices=("dcgan", "data-efficient"),
        default="data-efficient",
        help="dcgan: the seed's (BN, sigmoid+BCE, no augmentation); data-efficient: DiffAugment + "
        "spectral norm + hinge + EMA (default)",
    )
    p.add_argument("--data", default=None, help="image folder (default: the six bundled female_adventurer drawings)")
    p.add_argument("--fit", choices=("pad", "crop"), default="pad", help="square images by padding (white) or crop")
    p.add_argument("--size", type=int, default=None, help="image side, a power of two >= 16 (dcgan 64, else 32)")
    p.add_argument("--steps", type=int, default=None, help="D+G steps (dcgan 600, data-efficient 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="dcgan 128 capped at the number of images, else 8")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G and D")
    p.add_argument("--width", type=int, default=None, help="G's last / D's first conv width (64: 512-256-128-64)")
    p.add_argument("--r1", default="0", help="R1 gamma (lazy, every 16 D steps); 'auto' = 0.0002*size^2/batch; 0 off")
    p.add_run_flags(out="runs/train_gan", samples="grid-XXXXXX.png")
    return p


def resolve_args(args):
    """Fill the recipe defaults and check the numbers: MinidiffError (one line) on bad input."""

    for key, value in DEFAULTS[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_counts(
        args, positive=("steps", "batch_size", "width", "threads"), non_negative=("save_every", "sample_every")
    )
    if not args.lr > 0:
        raise MinidiffError(f"--lr must be positive, got {args.lr}")
    if args.size < 16 or args.size > 1024 or args.size & (args.size - 1):
        raise MinidiffError(f"--size must be a power of two from 16 to 1024 (16, 32, 64, 128 ...), got {args.size}")
    if args.r1 == "auto":
        args.r1 = 0.0002 * args.size**2 / args.batch_size  # StyleGAN2-ADA's heuristic
    else:
        try:
            args.r1 = float(args.r1)
        except ValueError:
            raise MinidiffError(f"--r1 must be a number >= 0 or 'auto', got {args.r1!r}") from None
        if not args.r1 >= 0:
            raise MinidiffError(f"--r1 must be a number >= 0 or 'auto', got {args.r1}")
    args.device = str(hardware.resolve_device(args.device))
    return args


def load_training_images(args):
    """[N, 3, S, S] in [-1, 1]: --data, or the bundled six drawings."""

    source = args.data if args.data is not None else data.instance_images()
    return data.ImageFolder(source, args.size, fit=args.fit).tensors()


def batch_indices(n, batch_size):
    """One batch: random permutations of the n images, concatenated and cut to batch_size (torch's global RNG).
    batch_size = n (the dcgan recipe) gives every image exactly once per step, as the seed's one batch per epoch."""
    perms = torch.cat([torch.randperm(n) for _ in range(-(-batch_size // n))])
    return perms[:batch_size]


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
        torch.set_num_threads(args.threads)  # cli.exit_code restores the count after
    state.seed_all(args.seed)
    reals = load_training_images(args).to(device)
    n = reals.shape[0]
    batch_size = min(args.batch_size, n) if args.recipe == "dcgan" else args.batch_size  # Keras: batch <= dataset
    cfg = gan.GANConfig.from_recipe(
        args.recipe, size=args.size, lr=args.lr, g_width=args.width, d_width=args.width, r1_gamma=args.r1
    )
    G, D = (m.to(device) for m in gan.build(cfg))
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=cfg.betas)
    ema = state.EMA(G, cfg.ema_decay) if cfg.ema_decay > 0 else None
    modules = {"G": G, "D": D, **({"G_ema": ema} if ema else {})}
    optimizers = {"G": opt_g, "D": opt_d}
    settings = {k: v for k, v in vars(args).items() if k not in ("resume",)} | {
        "batch_size": batch_size,
        "config": asdict(cfg),
        "n_images": n,
    }
    step = 0
    if args.resume:  # the settings first (resume.py: a change is refused), then the content, then restore
        file, _, extra = state.checkpoint_extra(args.resume, out)
        resume.check_settings(
            extra.get("config", {}), asdict(cfg), list(asdict(cfg)), file, "--steps and the output flags"
        )
        step, extra = state.load_checkpoint(file, modules, optimizers, out_dir=out)
    log = state.LossLog(out, resume_step=step if args.resume else None)
    z_grid = torch.randn(N_GRID, cfg.latent, generator=torch.Generator().manual_seed(args.seed + GRID_SEED_OFFSET))
    z_grid = z_grid.to(device)
    sampler = ema.module if ema else G

    def write_grid(path, at_step):
        x = gan.sample(sampler, z_grid)
        save_png(
            make_grid(x, nrow=8),
            path,
            {
                "step": at_step,
                "seed": args.seed,
                "recipe": args.recipe,
                "generator": "EMA" if ema else "G",
                "settings": settings,
            },
        )

    def checkpoint(at_step):
        return state.save_checkpoint(out, at_step, modules, optimizers, extra={"config": asdict(cfg), "args": settings})

    def step_fn(step):
        return gan.train_step(G, D, opt_g, opt_d, reals[batch_indices(n, batch_size).to(device)], cfg, step, ema)

    def postfix(logs):
        return {
            "D(x)": f"{logs['d_x']:.3f}",
            "D(G(z))": f"{logs['d_g_z']:.3f}",
            "L_D": f"{logs['loss_d']:.3f}",
            "L_G": f"{logs['loss_g']:.3f}",
        }

    summary = loop.train(
        step_fn=step_fn,
        steps=args.steps,
        start=step,
        log=log,
        finite=("loss_d", "loss_g"),
        hint="lower --lr, or try --r1 auto",
        hooks=[
            (args.sample_every, lambda s: write_grid(out / f"grid-{s:06d}.png", s), False),
            (args.save_every, checkpoint, True),
        ],
        postfix=postfix,
        postfix_every=10,
        on_stop=checkpoint,
        desc=f"gan {args.recipe}",
        dynamic_ncols=True,
    )
    train_seconds = summary["seconds"]

    log.plot(title=f"GAN ({args.recipe}): losses, D(x) and D(G(z))")
    log.plot(
        title=f"GAN ({args.recipe}): D(x) and D(G(z)), mean sigmoid", path=out / "d_outputs.png", names=["d_x", "d_g_z"]
    )
    write_grid(out / "grid.png", args.steps)
    samples = gan.sample(sampler, z_grid).float().cpu()
    result = metrics.evaluate(samples, reals.float().cpu())
    result.update(
        recipe=args.recipe,
        steps=args.steps,
        size=args.size,
        seed=args.seed,
        train_seconds=train_seconds,
        generator="EMA" if ema else "G",
    )
    io.write_json(result, out / "metrics.json")
    print(
        f"{args.recipe}: {args.steps} steps in {train_seconds:.0f}s -> {out}/grid.png; palette_distance "
        f"{result['palette_distance']:.2f}, identity {result['identity']:.2f}, nn_distance "
        f"{result['nn_distance']:.3f}, diversity {result['diversity']:.3f}"
    )
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    return exit_code(run, args)


if __name__ == "__main__":
    sys.exit(main())
