"""The miniature: a tiny SDXL (same UNet class, two tiny CLIPs, same loader) pretrained on a world of Kenney characters.

No SDXL weights can be downloaded where minidiff is built and tested, so minidiff ships its own small pretrained
model of the same family (minidiff/assets/tiny-sdxl, a diffusers folder read by `checkpoint.load_pipeline`):

    UNet      UNetConfig.tiny_sdxl(in_channels=3, ...): 'text_time' added conditioning (pooled text + 6 size ids),
              cross-attention on [CLIP-L-like (64) || bigG-like (128)] penultimate states at 16 x 16, 8 x 8 and in
              the middle, at 32 x 32 pixels
    text      CLIPTextModel + CLIPTextModelWithProjection (transformers) with tiny configs, and a CLIP BPE
              tokenizer whose merges make every caption word ONE token (`tokenizer.build_tokenizer`); "sks" is in the
              vocabulary but in no pretraining caption (a rare identifier for DreamBooth). Pads as SDXL:
              tokenizer with <|endoftext|>, tokenizer_2 with "!".
    schedule  DDPM's linear betas 1e-4 .. 0.02 rescaled to zero terminal SNR, v-prediction, trailing timesteps
              (Lin et al. 2024), stored with diffusers' own keys (`SCHEDULER`). With SDXL's eps-prediction and
              alpha_bar_T = 0.0047 the image mean survived in x_T (SNR ~ 3 for a 32 x 32 image's mean) and samples
              started from pure noise came out with tinted, grainy backgrounds; at zero terminal SNR x_T is pure
              noise in training as in sampling, and v stays a well-posed target there (v = -x_0).
    vae       none: pixel space. No VAE can be pretrained well in this budget, and a weak one would blur every
              sample; without it, what the samples show is what the UNet learned (the miniature stays honest).

Pretraining data: the world of minidiff/bundled/world.py, individuals drawn afresh every step (4 bodies x 13 poses x their
recoloured looks: 468 girls, 630 men, 126 zombies, 6 robots), x-flipped at random, captioned with their looks,
action and view ("a picture of a girl with blonde hair and pale skin in a red shirt and grey trousers walking seen
from the side"; each part dropped at random so "a picture of a girl" is in distribution and names the whole class).
Neither the DreamBooth target `data.TARGET_CHARACTER` (female_adventurer, a "girl") nor the second test character
`world.SECOND_CHARACTER` (male_adventurer, a "man") is in it. 10 % of rows are trained uncaptioned (all-zero
context and pooled vector, what `pipeline.generate` uses as the unconditional input of classifier-free guidance).

Loss (Salimans & Ho 2022, SDXL's conditioning): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, L = || v - unet(x_t, t, context, pooled, time_ids) ||^2,
with the UNet and both text encoders trained together (AdamW) and an EMA of all three shipped. Reproduce the
shipped weights with `TRAIN_COMMAND` (see assets/README.md).
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cli import ArgumentParser, exit_code
from ..train import loop
from ..train.state import EMA, LossLog, check_finite
from . import assets_dir, world
from .tokenizer import build_tokenizer

TINY_DIR = assets_dir() / "tiny-sdxl"
SIZE = 32
CHANNELS = (16, 32, 64)
TRAIN_COMMAND = "python train_ddpm.py --preset tiny-sdxl --out minidiff/assets/tiny-sdxl"
SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}

# ---------------------------------------------------------------------------------------------------- captions
ACTION, VIEW, family = world.ACTION, world.VIEW, world.family
PRETRAIN_CHARACTERS = world.WORLD_BODIES
IDENTIFIER, CLASS_WORD = "sks", "girl"
SECOND_CLASS_WORD = world.CLASS_WORD[world.SECOND_CHARACTER]  # "man": the second DreamBooth check


def dreambooth_prompts(class_word=CLASS_WORD) -> list[str]:
    """The prompts DreamBooth and its evaluation use: 'a picture of sks girl[ <action>]', 'a picture of a girl[...]'."""
    out = []
    for subject in (f"{IDENTIFIER} {class_word}", f"a {class_word}"):
        out += [f"a picture of {subject}"] + [f"a picture of {subject} {a}" for a in ACTION.values()]
    return out


# Guidance on the miniature. A LoRA taught six drawings at CFG 5 collapses onto one washed-out, speckled image per
# prompt, and the back view ("sks girl climbing") is not recognised (0-2 of 16); at CFG 2 the same LoRA draws her
# in 16 of 16 (docs/dreambooth-table.md). The base model's class prompts stay recognised at 2 as at 5. 32 px images
# of a 1.8 M-parameter model need less push than SDXL's 1024 px (whose usual 5-7 would oversaturate it).
GUIDANCE = 2.0


def default_cfg(model=None) -> float:
    """The classifier-free guidance scale used when none is given: GUIDANCE for the bundled miniature (model None or
    its folder), 5.0 (SDXL's usual) for any other model."""
    return GUIDANCE if model is None or Path(model).resolve() == TINY_DIR.resolve() else 5.0


def instance_captions(prompt: str, paths) -> list[str]:
    """Captions of bundled Kenney drawings, written as an artist captions a kohya set: the instance prompt and the
    drawing's action ("a picture of sks girl" + femaleAdventurer_climb0.png -> "a picture of sks girl climbing").
    With one caption for all six drawings the identifier absorbs the poses, and "sks girl climbing" draws an average
    of them that nobody recognises (docs/dreambooth-table.md)."""
    return [f"{prompt} {ACTION[family(Path(p).stem.rsplit('_', 1)[-1])]}" for p in paths]


def all_captions() -> list[str]:
    """One full caption per individual of the world (walking), and the DreamBooth prompts of both classes."""
    return (
        [world.caption(b, look, "walk0") for b in world.WORLD_BODIES for look in world.looks(b)]
        + dreambooth_prompts()
        + dreambooth_prompts(SECOND_CLASS_WORD)
    )


def all_words() -> set:
    """The words the tokenizer must keep whole: the world's captions and the identifier."""
    return world.vocabulary() | {IDENTIFIER}


# ---------------------------------------------------------------------------------------------------- the model
def text_configs(vocab_size: int):
    """Tiny CLIPs of SDXL's structure: encoder 1 (CLIP-L's role) width 64, encoder 2 (bigG's) width 128 with a
    128-d projection; 2 layers each (the context is the penultimate layer, the pooled vector the last)."""
    from transformers import CLIPTextConfig

    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        num_hidden_layers=2,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    c1 = CLIPTextConfig(
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=2,
        hidden_act="quick_gelu",
        projection_dim=64,
        **common,
    )
    c2 = CLIPTextConfig(
        hidden_size=128, intermediate_size=512, num_attention_heads=4, hidden_act="gelu", projection_dim=128, **common
    )
    return c1, c2


def unet_config():
    """UNetConfig.tiny_sdxl in pixel space: 3 channels at 32 x 32, levels 32 -> 16 -> 8 with CHANNELS channels,
    one ResBlock per level (SDXL: 2), cross-attention at 16 x 16, 8 x 8 and in the middle (SDXL: none at its top
    level either), context 64 + 128 = 192 channels, pooled 128."""
    from ..unet import UNetConfig

    return UNetConfig.tiny_sdxl(
        block_out_channels=CHANNELS,
        layers_per_block=1,
        transformer_depth=(0, 1, 1),
        head_dim=16,
        cross_attention_dim=192,
        pooled_dim=128,
        in_channels=3,
        sample_size=SIZE,
        norm_num_groups=8,
    )


def build_pipeline(tok_dir, seed=0):
    """A randomly initialised miniature Pipeline (tokenizers written to tok_dir/tokenizer, tok_dir/tokenizer_2)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..pipeline import Pipeline
    from ..text import TextConditioner
    from ..unet import UNet2DConditionModel
    from ..weights.pretrained import schedule_from_config

    torch.manual_seed(seed)
    tok = build_tokenizer(Path(tok_dir) / "tokenizer", all_words(), "<|endoftext|>")
    tok2 = build_tokenizer(Path(tok_dir) / "tokenizer_2", all_words(), "!")
    c1, c2 = text_configs(len(tok))
    text = TextConditioner(tok, CLIPTextModel(c1), tok2, CLIPTextModelWithProjection(c2))
    return Pipeline(
        unet=UNet2DConditionModel(unet_config()),
        vae=None,
        text=text,
        schedule=schedule_from_config(SCHEDULER),
        name="tiny-sdxl",
        scheduler_config=dict(SCHEDULER),
    )


# ---------------------------------------------------------------------------------------------------- pretraining
def size_ids(batch: int, gen: torch.Generator) -> torch.Tensor:
    """SDXL micro-conditioning for pretraining rows [batch, 6]: half of them the drawings' true ids (stored 128 x 96,
    padded, no crop: what dreambooth.size_ids gives them), half (32, 32, 0, 0, 32, 32), what `generate` passes at
    inference, so both kinds are in distribution."""
    true = torch.tensor([128.0, 96.0, 0.0, 0.0, SIZE, SIZE])
    plain = torch.tensor([SIZE, SIZE, 0.0, 0.0, SIZE, SIZE], dtype=torch.float32)
    pick = torch.rand(batch, 1, generator=gen) < 0.5
    return torch.where(pick, true, plain)


def embed(text, captions: list[str]):
    """(context, pooled) of captions through the (training) text encoders; "" rows are all zeros (dropped caption)."""
    context, pooled = text.encode(captions)
    keep = torch.tensor([c != "" for c in captions], device=context.device, dtype=context.dtype)
    return context * keep[:, None, None], pooled * keep[:, None]


def preview_prompts() -> list[str]:
    """samples.png: per class word, the plain class prompt and one per action (rows: girl, man, zombie, robot)."""
    words = [world.CLASS_WORD[b] for b in PRETRAIN_CHARACTERS]
    return [f"a picture of a {w}" + (f" {a}" if a else "") for w in words for a in ("", *ACTION.values())]


def save_snapshot(nets, pipe, out: Path, step: int, info: dict, preview=True):
    """Write the EMA weights as a diffusers folder (checkpoint.save_pipeline), train.json and a preview grid."""
    from ..pipeline import Pipeline
    from ..text import TextConditioner
    from ..weights.pretrained import save_pipeline

    text = TextConditioner(pipe.text.tokenizer, nets["text_encoder"], pipe.text.tokenizer_2, nets["text_encoder_2"])
    snap = Pipeline(
        unet=nets["unet"],
        vae=None,
        text=text,
        schedule=pipe.schedule,
        name="tiny-sdxl",
        scheduler_config=dict(SCHEDULER),
    )
    save_pipeline(snap, out)
    (out / "train.json").write_text(json.dumps({**info, "step": step}, indent=2) + "\n")
    if preview:
        write_preview(snap, out / "samples.png", step)
    return snap


def write_preview(pipe, path, step=None):
    """samples.png: one image per preview prompt (rows: characters, columns: actions), settings in its metadata."""
    from ..images import make_grid, save_png
    from ..pipeline import generate

    prompts = preview_prompts()
    settings = {
        "steps": 30,
        "cfg": 5.0,
        "sampler": "euler_a",
        "seed": 0,
        "width": SIZE,
        "height": SIZE,
        "guidance_rescale": 0.7,
    }
    x = generate(pipe, prompts, progress=False, **settings)
    grid = make_grid(x.cpu(), nrow=len(ACTION) + 1)
    save_png(
        grid.resize((grid.width * 4, grid.height * 4), 0),
        path,
        {"prompts": prompts, **settings, "training_step": step, "rows": list(PRETRAIN_CHARACTERS), "scale": 4},
    )


def pretrain(
    out_dir,
    steps=2500,
    batch_size=16,
    lr=1e-3,
    warmup=200,
    ema_decay=0.999,
    caption_dropout=0.1,
    seed=0,
    device="cpu",
    save_every=250,
    progress=True,
    command=None,
) -> Path:
    """Train the miniature from scratch on the world (minidiff/bundled/world.py: random individuals of 4 bodies x 13 poses,
    x-flipped at random) and write it to out_dir every `save_every` steps and at the end (a run cut short still
    leaves a usable model). Loss: v-prediction MSE on the zero-terminal-SNR schedule (module docstring)."""
    out, rng, gen = Path(out_dir), random.Random(seed), torch.Generator().manual_seed(seed)
    pipe = build_pipeline(out, seed)
    nets = (
        torch.nn.ModuleDict(
            {"unet": pipe.unet, "text_encoder": pipe.text.text_encoder, "text_encoder_2": pipe.text.text_encoder_2}
        )
        .to(device)
        .train()
    )
    ema = EMA(nets, ema_decay)
    opt = torch.optim.AdamW(nets.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    scene = world.World(SIZE)
    schedule = pipe.schedule
    info = {
        "command": command,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "caption_dropout": caption_dropout,
        "seed": seed,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "characters": list(PRETRAIN_CHARACTERS),
        "individuals": scene.counts(),
        "parameters": sum(p.numel() for p in nets.parameters()),
    }
    log, start, last = LossLog(out), time.time(), {}

    def step_fn(step):
        x0, rows = scene.draw(batch_size, rng, world.NAMED_SHARE)
        flip = (torch.rand(batch_size, generator=gen) < 0.5)[:, None, None, None]
        x0 = torch.where(flip, x0.flip(-1), x0).to(device)  # [B, 3, 32, 32]
        captions = [
            "" if rng.random() < caption_dropout else world.random_caption(b, look, p, rng, name=name)
            for b, p, look, name in rows
        ]
        context, pooled = embed(pipe.text, captions)
        t = torch.randint(0, schedule.T, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        x_t = schedule.q_sample(x0, t, eps)  # q(x_t | x_0)
        pred = nets["unet"](
            x_t, t.to(device), context=context, text_embeds=pooled, time_ids=size_ids(batch_size, gen).to(device)
        )
        loss = F.mse_loss(pred.float(), schedule.v_target(x0, eps, t))  # v = sqrt(ab) eps - sqrt(1 - ab) x_0
        check_finite(loss, step)  # before backward: nothing NaN reaches the weights
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / max(1, warmup))
        loss.backward()
        ema.decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early snapshots forget the init
        loop.optimizer_step(optimizer=opt, params=list(nets.parameters()), max_grad_norm=1.0, ema=ema, model=nets)
        last["loss"] = loss.item()
        return last

    def snapshot(step):
        info["minutes"] = round((time.time() - start) / 60, 2)
        save_snapshot(ema.module, pipe, out, step, info, preview=step == steps)
        log.plot(title="tiny-sdxl pretraining loss (v MSE)")

    loop.train(
        step_fn=step_fn,
        steps=steps,
        finite=(),
        desc="pretraining tiny-sdxl",
        progress=progress,
        hooks=[(25, lambda step: log.log(step, loss=last["loss"]), True), (save_every, snapshot, True)],
    )
    return out


def main(argv=None):
    """`python train_ddpm.py --preset tiny-sdxl [flags]` (or `python -m minidiff.bundled.tiny [flags]`)."""
    p = ArgumentParser(
        prog="train_ddpm.py --preset tiny-sdxl",
        description="Pretrain the bundled miniature SDXL (minidiff/assets/tiny-sdxl).",
    )
    p.add_argument("--out", default=str(TINY_DIR))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared machine, more threads "
        "spin-wait for each other and cost 10x the CPU time per step)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    return exit_code(
        pretrain,
        a.out,
        a.steps,
        a.batch_size,
        a.lr,
        a.warmup,
        a.ema_decay,
        a.caption_dropout,
        a.seed,
        a.device,
        a.save_every,
        command=shlex.join(["python", "train_ddpm.py", "--preset", "tiny-sdxl", *argv]),
    )


if __name__ == "__main__":
    sys.exit(main())
