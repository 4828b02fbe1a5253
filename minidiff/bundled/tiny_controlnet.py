"""The miniature's ControlNet: pose control from an edge map or a scribble, trained here on the pretraining world.

    net   = ControlNetModel.from_unet(miniature UNet, conditioning_embedding_out_channels=HINT)   (pixel space: the
            condition encoder does not downsample, the control image is the 32 x 32 picture's own size)
    data  = the miniature's pretraining world (the target character is not in it), x-flipped at random; the control
            image of each picture is made from it: its Canny edges, or the scribble of its silhouette (threshold near
            white, thinned to a 1-px stick figure: control_images.scribble), half and half
    loss  = || target - unet(x_t, t, context, pooled, ids, *net(x_t, t, context, pooled, ids, control)) ||^2, the UNet
            and text encoders frozen, target = eps (or v for a v-prediction miniature); half the captions dropped, so
            the ControlNet learns to carry the pose alone (Zhang et al. 2023 drop 50 % of prompts)

Evaluation (`evaluate`): the target character's HELD_OUT_POSES, which nothing was trained on, as canny and scribble
control images; samples of "a picture of a girl" with and without the control; the classifier's pose family of each
sample against the control drawing's. Run `python -m minidiff.bundled.tiny_controlnet --out DIR` (train, evaluate,
figure)
or `--eval-only` on shipped weights.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import data, io
from ..cli import exit_code
from ..control_images import make_control
from ..controlnet import ControlNetModel
from . import assets_dir, tiny

CONTROLNET_DIR = assets_dir() / "tiny-controlnet"
HINT = (32,)  # conv_in 3 -> 32, SiLU, zero conv_out 32 -> the UNet's width: no downsampling in pixel space
CANNY = dict(low=60, high=120, sigma=0.6)  # 32 px sprites: a light blur, OpenCV-unit thresholds
SCRIBBLE = dict(threshold=0.9)  # everything not near-white is the figure: its skeleton is a stick figure
TRAIN_COMMAND = "python -m minidiff.bundled.tiny_controlnet --out minidiff/assets/tiny-controlnet"
PROMPT = "a picture of a girl"


# ------------------------------------------------------------------------------------------------------------- data
def control_images(x: torch.Tensor, kinds) -> torch.Tensor:
    """Control images [N, 3, S, S] in [0, 1] of pictures x [N, 3, S, S] in [-1, 1], kinds[i] in canny / scribble."""
    settings = {"canny": CANNY, "scribble": SCRIBBLE}
    return torch.stack([make_control((xi + 1) / 2, k, **settings[k]) for xi, k in zip(x, kinds)])


class WorldSampler:
    """Random pictures of the miniature's pretraining world and their captions: the recoloured world of
    minidiff/world.py where it exists (the miniature trained on it), else the 65 pretraining drawings."""

    def __init__(self, size=tiny.SIZE):
        try:
            from . import world
        except ImportError:
            world = None
        self.world = world and world.World(size)
        if self.world is None:
            self.x, self.rows = tiny.pretraining_set()

    def draw(self, n: int, rng: random.Random):
        if self.world is not None:
            from . import world

            x, rows = self.world.draw(n, rng)
            return x, [world.random_caption(b, look, p, rng) for b, p, look, *_ in rows]
        idx = [rng.randrange(len(self.rows)) for _ in range(n)]
        return self.x[idx], [tiny.random_caption(*self.rows[i], rng) for i in idx]


def target(schedule_config: dict, x0, eps, alpha_bar):
    """What the UNet predicts: eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (v-prediction)."""
    if schedule_config.get("prediction_type", "epsilon") == "v_prediction":
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    return eps


# --------------------------------------------------------------------------------------------------------- training
def train(pipe, out_dir, steps=2500, batch_size=16, lr=1e-3, caption_dropout=0.5, ema_decay=0.99, seed=0,
          progress=True, command=None, minutes=None, new_lr_mult=10.0) -> ControlNetModel:
    """Train a ControlNet for pipe's UNet (frozen) and save its EMA weights to out_dir (diffusers layout), for
    `steps` steps or until `minutes` of wall-clock time have passed (then it saves and stops early). The parts that
    start at zero (condition encoder, zero convs) learn at new_lr_mult x lr: both zero at first, they would otherwise
    take thousands of steps to open (the paper's "sudden convergence"), more than a CPU budget has."""
    from ..train.state import EMA, LossLog, check_finite
    from ..weights.controlnet_files import save_controlnet

    torch.manual_seed(seed)
    rng, gen, out = random.Random(seed), torch.Generator().manual_seed(seed), Path(out_dir)
    unet = pipe.unet.eval().requires_grad_(False)
    pipe.text.requires_grad_(False)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT).train()
    new = [p for n, p in net.named_parameters() if n.startswith("controlnet_")]  # condition encoder, zero convs
    copied = [p for n, p in net.named_parameters() if not n.startswith("controlnet_")]  # the UNet's encoder copy
    groups = [{"params": copied, "lr": lr, "base": lr},
              {"params": new, "lr": lr * new_lr_mult, "base": lr * new_lr_mult}]
    ema, opt = EMA(net, ema_decay), torch.optim.AdamW(groups, weight_decay=0.0)
    world, alpha_bar = WorldSampler(), pipe.schedule.alpha_bar.float()

    log, start, cpu = LossLog(out), time.time(), time.process_time()
    for step in tqdm(range(1, steps + 1), desc="training tiny ControlNet", disable=not progress):
        x0, captions = world.draw(batch_size, rng)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        cond = control_images(x0, [rng.choice(("canny", "scribble")) for _ in range(batch_size)])
        captions = [("" if rng.random() < caption_dropout else c) for c in captions]
        with torch.no_grad():
            context, pooled = tiny.embed(pipe.text, captions)  # "" rows: all zeros, the unconditional input
        t = torch.randint(0, len(alpha_bar), (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # q(x_t | x_0)
        ids = tiny.size_ids(batch_size, gen)
        down, mid = net(x_t, t, context, pooled, ids, cond)
        pred = unet(x_t, t, context, pooled, ids, down_residuals=down, mid_residual=mid)
        loss = F.mse_loss(pred.float(), target(pipe.scheduler_config, x0, eps, ab))
        check_finite(loss, step)
        for g in opt.param_groups:
            g["lr"] = g["base"] * min(1.0, step / 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.decay = min(ema_decay, (1 + step) / (10 + step))
        ema.update(net)
        if step % 25 == 0 or step == steps:
            log.log(step, loss=loss.item())
        last = step == steps or (minutes is not None and time.time() - start > 60 * minutes)
        if step % 500 == 0 or last:
            save_controlnet(ema.module, out)
            log.plot(title="tiny ControlNet training loss")
            info = {"command": command, "steps": step, "batch_size": batch_size, "lr": lr, "new_lr_mult": new_lr_mult,
                    "ema_decay": ema_decay,
                    "caption_dropout": caption_dropout, "seed": seed, "torch_threads": torch.get_num_threads(),
                    "minutes": round((time.time() - start) / 60, 2),
                    "cpu_minutes": round((time.process_time() - cpu) / 60, 2), "hint": list(HINT), "canny": CANNY,
                    "scribble": SCRIBBLE, "world": "world.World" if world.world is not None else "pretraining_set",
                    "parameters": sum(p.numel() for p in net.parameters())}
            io.write_json(info, out / "train.json")
        if last:
            break
    return ema.module.eval()


# ------------------------------------------------------------------------------------------------------- evaluation
def held_out_controls(kinds=("canny", "scribble")):
    """[(pose, kind, drawing [3, S, S] in [-1, 1], control [3, S, S] in [0, 1])] for the target's held-out poses."""
    x = data.load_tensor_set([data.kenney_path(data.TARGET_CHARACTER, p) for p in data.HELD_OUT_POSES], tiny.SIZE,
                             fit="pad")
    return [(p, k, xi, control_images(xi[None], [k])[0]) for p, xi in zip(data.HELD_OUT_POSES, x) for k in kinds]


@torch.no_grad()
def evaluate(pipe, net, n=8, prompt=PROMPT, scale=1.0, steps=30, cfg=5.0, sampler=None,
             progress=True) -> tuple[dict, dict]:
    """({share of samples whose pose family is the control drawing's}, {(pose, kind or None): samples [n, 3, S, S]})
    over the target's held-out poses, seeds 0 .. n - 1 (the model's sampler by default). Shares per
    control kind, per pose, and without control (the same 2n uncontrolled samples judged against each pose)."""
    from ..eval.classifier import load_classifier, pose_family, predict
    from ..pipeline import generate

    model = load_classifier()
    kw = dict(steps=steps, cfg=cfg, sampler=sampler, width=tiny.SIZE, height=tiny.SIZE, batch_size=2 * n,
              progress=False)
    free = generate(pipe, [prompt] * 2 * n, **kw)
    free_families = [pose_family(p) for p in predict(free, model)[1]]
    hits, samples = {}, {}
    for pose, kind, _, control in tqdm(held_out_controls(), desc="evaluating", disable=not progress):
        samples[(pose, kind)] = generate(pipe, [prompt] * n, controls=[(net, control[None], scale)], **kw)
        samples[(pose, None)] = free[:n]
        match = [pose_family(p) == pose_family(pose) for p in predict(samples[(pose, kind)], model)[1]]
        for key in (kind, f"{kind} {pose}", "with control"):
            hits.setdefault(key, []).extend(match)
        if kind == "canny":  # once per pose
            hits.setdefault("without control", []).extend(f == pose_family(pose) for f in free_families)
            hits.setdefault(f"without control {pose}", []).extend(f == pose_family(pose) for f in free_families)
    shares = {k: round(sum(v) / len(v), 3) for k, v in hits.items()}
    shares["uncontrolled families"] = {f: free_families.count(f) for f in sorted(set(free_families))}
    return shares, samples


def figure(samples: dict, path, per_row=6):
    """Rows: each held-out pose x (canny, scribble, none); columns: the drawing, its control, then samples."""
    from ..images import make_grid, save_png

    cells = []
    for pose, kind, drawing, control in held_out_controls():
        cells += [drawing, control * 2 - 1, *samples[(pose, kind)][:per_row]]
    for pose in data.HELD_OUT_POSES:
        blank = torch.ones(3, tiny.SIZE, tiny.SIZE)
        cells += [blank, blank, *samples[(pose, None)][:per_row]]
    grid = make_grid(torch.stack(cells), nrow=per_row + 2)
    return save_png(grid.resize((grid.width * 3, grid.height * 3), 0), path,
                    {"prompt": PROMPT, "rows": "held-out poses x (canny, scribble), then each pose without control",
                     "seeds": list(range(per_row))})


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minidiff.bundled.tiny_controlnet",
                                description="Train and evaluate the miniature's pose ControlNet.")
    p.add_argument("--model", default=str(tiny.TINY_DIR))
    p.add_argument("--out", default=str(CONTROLNET_DIR))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="stop training after this much wall-clock time")
    p.add_argument("--n", type=int, default=8, help="samples per held-out pose and control type")
    p.add_argument("--sampler", default=None, help="evaluation sampler (default: the model's own)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-only", action="store_true", help="evaluate the ControlNet in --out")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    def run():
        from ..weights.controlnet_files import load_controlnet
        from ..weights.pretrained import load_pipeline

        pipe = load_pipeline(a.model)
        t0 = time.time()
        if a.eval_only:
            net = load_controlnet(a.out)
        else:
            net = train(pipe, a.out, a.steps, a.batch_size, a.lr, seed=a.seed, minutes=a.minutes,
                        command=shlex.join(["python", "-m", "minidiff.bundled.tiny_controlnet", *argv]))
        t1 = time.time()
        shares, samples = evaluate(pipe, net, a.n, sampler=a.sampler)
        figure(samples, Path(a.out) / "samples.png")
        result = {"pose_family_match": shares, "n_per_pose_and_kind": a.n, "held_out_poses": list(data.HELD_OUT_POSES),
                  "prompt": PROMPT, "sampler": a.sampler,
                  "train_minutes": None if a.eval_only else round((t1 - t0) / 60, 2),
                  "eval_minutes": round((time.time() - t1) / 60, 2)}
        io.write_json(result, Path(a.out) / "eval.json")
        print(json.dumps(result, indent=2))

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
