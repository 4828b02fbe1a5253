"""The miniature's ControlNet: pose control from an edge map or a scribble, trained here on the pretraining world.

    net   = ControlNetModel.from_unet(miniature UNet, conditioning_embedding_out_channels=HINT)   (pixel space: the
            condition encoder does not downsample, the control image is the 32 x 32 picture's own size)
    data  = the miniature's pretraining world (the target character is not in it), x-flipped at random; the control
            image of each picture is made from it: its Canny edges, or the scribble of its silhouette (threshold near
            white, thinned to a 1-px stick figure: control_images.scribble), half and half
    loss  = || target - unet(x_t, t, context, pooled, ids, *net(x_t, t, context, pooled, ids, control)) ||^2, the UNet
            and text encoders frozen, target = eps (or v for a v-prediction miniature); half the captions dropped, so
            the ControlNet learns to carry the pose alone (Zhang et al. 2023 drop 50 % of prompts); half the rows
            draw t from the noisier half [T/2, T), where sampling decides the pose (`train`)

Why the noisy half: under classifier-free guidance (cfg 5) the prompt's own pose prior (the miniature draws "a
picture of a girl" as a front-facing walker) is amplified 5 x, and a ControlNet that only nudges the first, noisiest
steps loses to it; the first run (665 steps, t uniform) steered at cfg 1 and not at cfg 5.

Evaluation (pose_control.evaluate): the target character's 13 drawings (nobody's drawings like hers were trained on; her
data.HELD_OUT_POSES are those no DreamBooth run sees) as canny and scribble control images; samples of "a picture
of a girl" with and without the control, and under a prompt whose action word contradicts the drawing; the
classifier's pose family of each sample against the drawing's, also family-balanced (`shares`). Run
`python -m minidiff.bundled.tiny_controlnet --out DIR` (train, evaluate, figure) or `--eval-only` on shipped weights
(`--lora FILE --prompt "a picture of sks girl"`: with a DreamBooth LoRA).
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
from ..controlnet import ControlNetModel
from . import assets_dir, tiny, world
from .pose_control import CANNY, PROMPT, SCRIBBLE, control_images, evaluate, figure

CONTROLNET_DIR = assets_dir() / "tiny-controlnet"
HINT = (32,)  # conv_in 3 -> 32, SiLU, zero conv_out 32 -> the UNet's width: no downsampling in pixel space
TRAIN_COMMAND = "python -m minidiff.bundled.tiny_controlnet --out minidiff/assets/tiny-controlnet"


# ------------------------------------------------------------------------------------------------------------- data
class WorldSampler:
    """Random pictures of the miniature's pretraining world (bundled/world.py, the recoloured Kenney bodies the
    miniature was trained on) and their captions."""

    def __init__(self, size=tiny.SIZE):
        self.world = world.World(size)

    def draw(self, n: int, rng: random.Random, plain: bool = False):
        """(x [n, 3, S, S] in [-1, 1], captions): the world's random captions, or with `plain` the class prompt
        alone ("a picture of a girl": no action or view, the pose is the control's to give)."""
        x, rows = self.world.draw(n, rng)
        if plain:
            return x, [f"a picture of a {world.CLASS_WORD[b]}" for b, *_ in rows]
        return x, [world.random_caption(b, look, p, rng) for b, p, look, *_ in rows]


def target(schedule_config: dict, x0, eps, alpha_bar):
    """What the UNet predicts: eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (v-prediction)."""
    if schedule_config.get("prediction_type", "epsilon") == "v_prediction":
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    return eps


# --------------------------------------------------------------------------------------------------------- training
def train(
    pipe,
    out_dir,
    steps=2500,
    batch_size=16,
    lr=1e-3,
    caption_dropout=0.5,
    ema_decay=0.99,
    seed=0,
    progress=True,
    command=None,
    minutes=None,
    new_lr_mult=10.0,
    high_t=0.5,
) -> ControlNetModel:
    """Train a ControlNet for pipe's UNet (frozen) and save its EMA weights to out_dir (diffusers layout), for
    `steps` steps or until `minutes` of wall-clock time have passed (then it saves and stops early). The parts that
    start at zero (condition encoder, zero convs) learn at new_lr_mult x lr: both zero at first, they would otherwise
    take thousands of steps to open (the paper's "sudden convergence"), more than a CPU budget has. A share `high_t`
    of the rows draws t from the noisier half [T/2, T) (the rest from [0, T)): the pose is decided there, in the
    first steps of sampling, while the last ones only sharpen what is already drawn.
    loss.csv also logs `val_control` / `val_free`: the EMA net's loss on a fixed batch of world pictures
    captioned "a picture of a <class>" at t in {T-1, 0.8 T}, with the control and without (the UNet alone): the gap
    is what the control tells the UNet about the picture (`validation_loss`)."""
    from ..train.state import EMA, LossLog, check_finite
    from ..weights.controlnet_files import save_controlnet

    torch.manual_seed(seed)
    rng, gen, out = random.Random(seed), torch.Generator().manual_seed(seed), Path(out_dir)
    unet = pipe.unet.eval().requires_grad_(False)
    pipe.text.requires_grad_(False)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT).train()
    new = [p for n, p in net.named_parameters() if n.startswith("controlnet_")]  # condition encoder, zero convs
    copied = [p for n, p in net.named_parameters() if not n.startswith("controlnet_")]  # the UNet's encoder copy
    groups = [
        {"params": copied, "lr": lr, "base": lr},
        {"params": new, "lr": lr * new_lr_mult, "base": lr * new_lr_mult},
    ]
    ema, opt = EMA(net, ema_decay), torch.optim.AdamW(groups, weight_decay=0.0)
    sampler, alpha_bar = WorldSampler(), pipe.schedule.alpha_bar.float()
    val = validation_batch(pipe, sampler)
    T = len(alpha_bar)

    log, start, cpu = LossLog(out), time.time(), time.process_time()
    for step in tqdm(range(1, steps + 1), desc="training tiny ControlNet", disable=not progress):
        x0, captions = sampler.draw(batch_size, rng)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        cond = control_images(x0, [rng.choice(("canny", "scribble")) for _ in range(batch_size)])
        captions = [("" if rng.random() < caption_dropout else c) for c in captions]
        with torch.no_grad():
            context, pooled = tiny.embed(pipe.text, captions)  # "" rows: all zeros, the unconditional input
        t = torch.randint(0, T, (batch_size,), generator=gen)
        noisy = torch.rand(batch_size, generator=gen) < high_t
        t = torch.where(noisy, T // 2 + t // 2, t)  # U[0, T) or U[T/2, T)
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
        last = step == steps or (minutes is not None and time.time() - start > 60 * minutes)
        if step % 100 == 0 or last:
            log.log(step, loss=loss.item(), **validation_loss(pipe, ema.module, val))
        elif step % 25 == 0:
            log.log(step, loss=loss.item())
        if step % 500 == 0 or last:
            save_controlnet(ema.module, out)
            log.plot(title="tiny ControlNet training loss")
            info = {
                "command": command,
                "steps": step,
                "batch_size": batch_size,
                "lr": lr,
                "new_lr_mult": new_lr_mult,
                "ema_decay": ema_decay,
                "high_t": high_t,
                "caption_dropout": caption_dropout,
                "seed": seed,
                "torch_threads": torch.get_num_threads(),
                "minutes": round((time.time() - start) / 60, 2),
                "cpu_minutes": round((time.process_time() - cpu) / 60, 2),
                "hint": list(HINT),
                "canny": CANNY,
                "scribble": SCRIBBLE,
                "world": "world.World",
                "parameters": sum(p.numel() for p in net.parameters()),
            }
            io.write_json(info, out / "train.json")
        if last:
            break
    return ema.module.eval()


def validation_batch(pipe, sampler, n=32, seed=1234) -> dict:
    """A fixed batch of n world pictures with plain class captions, their control images (canny and scribble in
    turn), noise and x_t at t = T - 1 (pure noise under a zero-terminal-SNR schedule) and t = 0.8 T, half each."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x0, captions = sampler.draw(n, rng, plain=True)
    T, alpha_bar = len(pipe.schedule.alpha_bar), pipe.schedule.alpha_bar.float()
    t = torch.tensor([T - 1, int(0.8 * T)] * (n // 2))
    eps, ab = torch.randn(x0.shape, generator=gen), alpha_bar[t][:, None, None, None]
    with torch.no_grad():
        context, pooled = tiny.embed(pipe.text, captions)
    return dict(
        x_t=ab.sqrt() * x0 + (1 - ab).sqrt() * eps,
        t=t,
        context=context,
        pooled=pooled,
        ids=tiny.size_ids(n, gen),
        cond=control_images(x0, ["canny", "scribble"] * (n // 2)),
        target=target(pipe.scheduler_config, x0, eps, ab),
    )


@torch.no_grad()
def validation_loss(pipe, net, val: dict) -> dict:
    """{val_control: MSE of the UNet steered by net, val_free: MSE of the UNet alone} on validation_batch."""
    args = (val["x_t"], val["t"], val["context"], val["pooled"], val["ids"])
    down, mid = net.eval()(*args, val["cond"])
    steered = pipe.unet(*args, down_residuals=down, mid_residual=mid)
    return {
        "val_control": F.mse_loss(steered.float(), val["target"]).item(),
        "val_free": F.mse_loss(pipe.unet(*args).float(), val["target"]).item(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m minidiff.bundled.tiny_controlnet",
        description="Train and evaluate the miniature's pose ControlNet.",
    )
    p.add_argument("--model", default=str(tiny.TINY_DIR))
    p.add_argument("--out", default=str(CONTROLNET_DIR))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--high-t", type=float, default=0.5, help="share of rows with t drawn from the noisier half")
    p.add_argument("--minutes", type=float, default=None, help="stop training after this much wall-clock time")
    p.add_argument("--n", type=int, default=8, help="samples per pose and control type")
    p.add_argument("--prompt", default=PROMPT, help="evaluation prompt (with --lora: e.g. 'a picture of sks girl')")
    p.add_argument("--lora", default=None, help="evaluate with this LoRA file loaded into the miniature")
    p.add_argument("--eval-out", default=None, help="write eval.json / samples.png here (default: --out)")
    p.add_argument("--sampler", default=None, help="evaluation sampler (default: the model's own)")
    p.add_argument("--guess-mode", action="store_true", help="evaluate in guess mode (controlnet.Control)")
    p.add_argument("--scale", type=float, default=1.0, help="evaluation conditioning scale of the ControlNet")
    p.add_argument("--cfg", type=float, default=tiny.GUIDANCE, help="evaluation guidance (default: the miniature's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-only", action="store_true", help="evaluate the ControlNet in --out")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    def run():
        from ..controlnet import load_controlnet
        from ..weights.pretrained import load_pipeline

        pipe = load_pipeline(a.model)
        if a.lora:
            from ..lora import load_lora

            load_lora(pipe.modules(), a.lora)
        t0 = time.time()
        if a.eval_only:
            net = load_controlnet(a.out)
        else:
            net = train(
                pipe,
                a.out,
                a.steps,
                a.batch_size,
                a.lr,
                seed=a.seed,
                minutes=a.minutes,
                high_t=a.high_t,
                command=shlex.join(["python", "-m", "minidiff.bundled.tiny_controlnet", *argv]),
            )
        t1 = time.time()
        measured, samples = evaluate(
            pipe,
            net,
            a.n,
            prompt=a.prompt,
            scale=a.scale,
            steps=30,
            cfg=a.cfg,
            sampler=a.sampler,
            guess_mode=a.guess_mode,
        )
        out = Path(a.eval_out or a.out)
        figure(samples, out / "samples.png", prompt=a.prompt)
        result = {
            "pose_family_match": measured,
            "n_per_pose_and_kind": a.n,
            "held_out_poses": list(data.HELD_OUT_POSES),
            "prompt": a.prompt,
            "lora": a.lora,
            "sampler": a.sampler,
            "guess_mode": a.guess_mode,
            "scale": a.scale,
            "cfg": a.cfg,
            "steps": 30,
            "command": shlex.join(["python", "-m", "minidiff.bundled.tiny_controlnet", *argv]),
            "train_minutes": None if a.eval_only else round((t1 - t0) / 60, 2),
            "eval_minutes": round((time.time() - t1) / 60, 2),
        }
        io.write_json(result, out / "eval.json")
        print(json.dumps(result, indent=2))

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
