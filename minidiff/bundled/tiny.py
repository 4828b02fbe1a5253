"""The miniature: a tiny SDXL (same UNet class, two tiny CLIPs, same loader) pretrained on the Kenney characters.

No SDXL weights can be downloaded where minidiff is built and tested, so minidiff ships its own small pretrained
model of the same family (minidiff/assets/tiny-sdxl, a diffusers folder read by `checkpoint.load_pipeline`):

    UNet      UNetConfig.tiny_sdxl(in_channels=3, ...): 'text_time' added conditioning (pooled text + 6 size ids),
              cross-attention on [CLIP-L-like (32) || bigG-like (64)] penultimate states, at 32 x 32 pixels
    text      CLIPTextModel + CLIPTextModelWithProjection (transformers) with tiny configs, and a CLIP BPE
              tokenizer whose merges make every caption word ONE token (`build_tokenizer`); "sks" is in the
              vocabulary but in no pretraining caption (a rare identifier for DreamBooth). Pads as SDXL:
              tokenizer with <|endoftext|>, tokenizer_2 with "!".
    schedule  SDXL's own (scaled_linear betas 0.00085 .. 0.012, eps prediction, leading spacing). DDPM's linear
              betas were tried first: their sigma_max = 157 makes the default Euler sampler blow up the colours of
              an imperfect pixel model (x_0 = x - sigma eps amplifies eps errors 157x); SDXL's sigma_max is 14.6.
    vae       none: pixel space. No VAE can be pretrained well in this budget, and a weak one would blur every
              sample; without it, what the samples show is what the UNet learned (the miniature stays honest).

Pretraining data: every pose of 5 of the 6 Kenney characters (65 drawings, x-flipped at random), EXCLUDING the
DreamBooth target `data.TARGET_CHARACTER` (female_adventurer), who is new to the model. Captions are generated
(`caption`): character kind, looks, pose, view, e.g. "a picture of a robot with one eye in blue metal jumping seen
from the front" (no comma, so that decoding a caption's tokens gives it back exactly). female_person is a "girl",
the class word of the target. Each part but the kind is dropped at random so that short prompts ("a picture of a
girl") are in distribution, and 10 % of rows are trained uncaptioned (all-zero context and pooled vector, what
`pipeline.generate` uses as the unconditional input of classifier-free guidance).

Loss (Ho et al. 2020 eq. 14, SDXL's conditioning): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
L = || eps - unet(x_t, t, context, pooled, time_ids) ||^2, with the UNet and both text encoders trained together
(AdamW) and an EMA of all three shipped. Reproduce the shipped weights with `TRAIN_COMMAND` (see assets/README.md).
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
from tqdm import tqdm

from .. import data
from ..cli import ArgumentParser, exit_code
from . import assets_dir

TINY_DIR = assets_dir() / "tiny-sdxl"
SIZE = 32
TRAIN_COMMAND = "python train_ddpm.py --preset tiny-sdxl --out minidiff/assets/tiny-sdxl"
SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
             "timestep_spacing": "leading", "steps_offset": 1}  # SDXL's own

# ---------------------------------------------------------------------------------------------------- captions
KIND = {"female_person": "girl", "male_adventurer": "boy", "male_person": "man", "robot": "robot",
        "zombie": "zombie", "female_adventurer": "girl"}
LOOKS = {"female_person": ("with black hair", "in a green shirt"),
         "male_adventurer": ("with brown hair", "in a green shirt"),
         "male_person": ("with black hair and a mustache", "in an orange vest"),
         "robot": ("with one eye", "in blue metal"),
         "zombie": ("with green skin", "in a purple shirt")}
ACTION = {"climb": "climbing", "fall": "falling", "idle": "standing", "jump": "jumping", "walk": "walking"}
VIEW = {"climb": "back", "fall": "front", "idle": "front", "jump": "front", "walk": "side"}
PRETRAIN_CHARACTERS = tuple(c for c in data.CHARACTERS if c != data.TARGET_CHARACTER)
IDENTIFIER, CLASS_WORD = "sks", "girl"


def family(pose: str) -> str:
    """climb0 -> climb, walk5 -> walk (the pose family the classifier also reports)."""
    return pose.rstrip("0123456789")


def caption(character: str, pose: str, looks=True, action=True, view=True) -> str:
    """'a picture of a <kind>[ <looks>][ <action>][ seen from the <view>]'."""
    words = ["a picture of a", KIND[character]]
    if looks and character in LOOKS:
        words += list(LOOKS[character])
    if action:
        words.append(ACTION[family(pose)])
    text = " ".join(words)
    return text + f" seen from the {VIEW[family(pose)]}" if view else text


def random_caption(character: str, pose: str, rng: random.Random, keep=0.6) -> str:
    """A caption with each optional part (looks, action, view) kept with probability `keep`."""
    return caption(character, pose, *(rng.random() < keep for _ in range(3)))


def dreambooth_prompts() -> list[str]:
    """The prompts DreamBooth and its evaluation use: 'a picture of sks girl[ <action>]', 'a picture of a girl[...]'."""
    out = []
    for subject in (f"{IDENTIFIER} {CLASS_WORD}", f"a {CLASS_WORD}"):
        out += [f"a picture of {subject}"] + [f"a picture of {subject} {a}" for a in ACTION.values()]
    return out


def pretraining_captions() -> list[str]:
    """Every caption `random_caption` can produce for the pretraining characters."""
    flags = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    return sorted({caption(ch, p, *f) for ch in PRETRAIN_CHARACTERS for p in data.POSES for f in flags})


def all_captions() -> list[str]:
    """The pretraining captions and the DreamBooth prompts: the words the tokenizer must keep whole."""
    return pretraining_captions() + dreambooth_prompts()


# ---------------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict:
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table: the 256 base symbols of the BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE of one word: start from characters (the last one marked '</w>'), then repeatedly merge the
    adjacent pair of lowest rank until none of the pairs is a merge."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1e9), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1e9:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bpe_tables(words) -> tuple[dict, list]:
    """(vocab, merges) of a CLIP BPE in which every word of `words` is one token.

    Vocab = the 256 byte symbols, the same with '</w>' (CLIP's layout), then one token per merge result, then
    <|startoftext|>, <|endoftext|>. Merges are found greedily: while some word still splits into several parts,
    append the merge of its first adjacent pair (appended merges have the lowest priority, so they cannot undo
    a word already made whole; the loop ends because each new merge shortens some word).
    """
    base = list(_bytes_to_unicode().values())
    merges, ranks = [], {}
    while True:
        split = [p for p in (_bpe(w, ranks) for w in sorted(words)) if len(p) > 1]
        if not split:
            break
        pair = (split[0][0], split[0][1])
        ranks[pair] = len(merges)
        merges.append(pair)
    tokens = base + [b + "</w>" for b in base]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(folder, pad_token="<|endoftext|>", words=None):
    """Write vocab.json + merges.txt for every word of `all_captions()` (and "sks") and return the CLIPTokenizerFast
    read back from them. SDXL pads tokenizer/ with <|endoftext|> and tokenizer_2/ with "!" (id 0)."""
    from transformers import CLIPTokenizerFast

    if words is None:
        words = {w for c in all_captions() for w in c.split()} | {IDENTIFIER}
    vocab, merges = bpe_tables(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizerFast(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


# ---------------------------------------------------------------------------------------------------- the model
def text_configs(vocab_size: int):
    """Tiny CLIPs of SDXL's structure: encoder 1 (CLIP-L's role) width 32, encoder 2 (bigG's) width 64 with a
    64-d projection; 2 layers each (the context is the penultimate layer, the pooled vector the last)."""
    from transformers import CLIPTextConfig

    common = dict(vocab_size=vocab_size, max_position_embeddings=77, num_hidden_layers=2, bos_token_id=vocab_size - 2,
                  eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    c1 = CLIPTextConfig(hidden_size=32, intermediate_size=128, num_attention_heads=2, hidden_act="quick_gelu",
                        projection_dim=32, **common)
    c2 = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, hidden_act="gelu",
                        projection_dim=64, **common)
    return c1, c2


def unet_config():
    """UNetConfig.tiny_sdxl in pixel space: 3 channels at 32 x 32, levels 32 -> 16 -> 8 with 16, 32, 64 channels,
    one ResBlock per level (SDXL: 2), cross-attention at 8 x 8 and in the middle (SDXL: none at its top level
    either). Sized for the CPU budget: ~1 M parameters, 0.24 GFLOP per image."""
    from ..unet import UNetConfig

    return UNetConfig.tiny_sdxl(block_out_channels=(16, 32, 64), layers_per_block=1, transformer_depth=(0, 0, 1),
                                head_dim=16, cross_attention_dim=96, pooled_dim=64, in_channels=3, sample_size=SIZE,
                                norm_num_groups=8)


def build_pipeline(tok_dir, seed=0):
    """A randomly initialised miniature Pipeline (tokenizers written to tok_dir/tokenizer, tok_dir/tokenizer_2)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..weights.pretrained import schedule_from_config
    from ..pipeline import Pipeline
    from ..text import TextConditioner
    from ..unet import UNet2DConditionModel

    torch.manual_seed(seed)
    tok = build_tokenizer(Path(tok_dir) / "tokenizer", "<|endoftext|>")
    tok2 = build_tokenizer(Path(tok_dir) / "tokenizer_2", "!")
    c1, c2 = text_configs(len(tok))
    text = TextConditioner(tok, CLIPTextModel(c1), tok2, CLIPTextModelWithProjection(c2))
    return Pipeline(unet=UNet2DConditionModel(unet_config()), vae=None, text=text,
                    schedule=schedule_from_config(SCHEDULER), name="tiny-sdxl", scheduler_config=dict(SCHEDULER))


# ---------------------------------------------------------------------------------------------------- pretraining
def pretraining_set():
    """x [65, 3, 32, 32] in [-1, 1] (white padded), with (character, pose) per row, target character excluded."""
    rows = [(c, p) for c in PRETRAIN_CHARACTERS for p in data.POSES]
    x = data.load_tensor_set([data.kenney_path(c, p) for c, p in rows], SIZE, fit="pad")
    return x, rows


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
    """One prompt per (pretraining character, pose family) and the class prompts: what samples.png shows."""
    return [caption(c, f + "0" if f in ("climb", "walk") else f, looks=False, view=False)
            for c in PRETRAIN_CHARACTERS for f in ACTION]


def save_snapshot(nets, pipe, out: Path, step: int, info: dict, preview=True):
    """Write the EMA weights as a diffusers folder (checkpoint.save_pipeline), train.json and a preview grid."""
    from ..weights.pretrained import save_pipeline
    from ..pipeline import Pipeline
    from ..text import TextConditioner

    text = TextConditioner(pipe.text.tokenizer, nets["text_encoder"], pipe.text.tokenizer_2, nets["text_encoder_2"])
    snap = Pipeline(unet=nets["unet"], vae=None, text=text, schedule=pipe.schedule, name="tiny-sdxl",
                    scheduler_config=dict(SCHEDULER))
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
    settings = {"steps": 30, "cfg": 5.0, "sampler": "euler_a", "seed": 0, "width": SIZE, "height": SIZE}
    x = generate(pipe, prompts, progress=False, **settings)
    grid = make_grid(x.cpu(), nrow=len(ACTION))
    save_png(grid.resize((grid.width * 4, grid.height * 4), 0), path,
             {"prompts": prompts, **settings, "training_step": step, "rows": list(PRETRAIN_CHARACTERS), "scale": 4})


def pretrain(out_dir, steps=3000, batch_size=16, lr=1e-3, warmup=200, ema_decay=0.999, caption_dropout=0.1,
             seed=0, device="cpu", save_every=200, progress=True, command=None) -> Path:
    """Train the miniature from scratch on the 65 non-target drawings (module docstring) and write it to out_dir,
    every `save_every` steps and at the end (so a run cut short still leaves a usable model)."""
    from ..train.state import EMA, LossLog, check_finite

    out, rng, gen = Path(out_dir), random.Random(seed), torch.Generator().manual_seed(seed)
    pipe = build_pipeline(out, seed)
    nets = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text.text_encoder,
                                "text_encoder_2": pipe.text.text_encoder_2}).to(device).train()
    ema = EMA(nets, ema_decay)
    opt = torch.optim.AdamW(nets.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    x, rows = pretraining_set()
    x, alpha_bar = x.to(device), pipe.schedule.alpha_bar.float().to(device)
    info = {"command": command, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
            "ema_decay": ema_decay,
            "caption_dropout": caption_dropout, "seed": seed, "device": str(device),
            "torch_threads": torch.get_num_threads(), "characters": list(PRETRAIN_CHARACTERS)}
    log, start = LossLog(out), time.time()
    for step in tqdm(range(1, steps + 1), desc="pretraining tiny-sdxl", disable=not progress):
        idx = torch.randint(len(rows), (batch_size,), generator=gen)
        x0 = x[idx]
        flip = (torch.rand(batch_size, generator=gen) < 0.5).to(device)[:, None, None, None]
        x0 = torch.where(flip, x0.flip(-1), x0)
        captions = ["" if rng.random() < caption_dropout else random_caption(*rows[i], rng) for i in idx.tolist()]
        context, pooled = embed(pipe.text, captions)
        t = torch.randint(0, len(alpha_bar), (batch_size,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        ab = alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # q(x_t | x_0)
        pred = nets["unet"](x_t, t, context=context, text_embeds=pooled, time_ids=size_ids(batch_size, gen).to(device))
        loss = F.mse_loss(pred.float(), eps)
        check_finite(loss, step)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / max(1, warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        ema.decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early snapshots forget the init
        ema.update(nets)
        if step % 25 == 0 or step == steps:
            log.log(step, loss=loss.item())
        if step % save_every == 0 or step == steps:
            info["minutes"] = round((time.time() - start) / 60, 2)
            save_snapshot(ema.module, pipe, out, step, info, preview=step == steps)
            log.plot(title="tiny-sdxl pretraining loss (eps MSE)")
    return out


def main(argv=None):
    """`python train_ddpm.py --preset tiny-sdxl [flags]` (or `python -m minidiff.bundled.tiny [flags]`)."""
    p = ArgumentParser(prog="train_ddpm.py --preset tiny-sdxl",
                                description="Pretrain the bundled miniature SDXL (minidiff/assets/tiny-sdxl).")
    p.add_argument("--out", default=str(TINY_DIR))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared machine, more threads "
                   "spin-wait for each other and cost 10x the CPU time per step)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    return exit_code(pretrain, a.out, a.steps, a.batch_size, a.lr, a.warmup, a.ema_decay, a.caption_dropout, a.seed,
                     a.device, a.save_every,
                     command=shlex.join(["python", "train_ddpm.py", "--preset", "tiny-sdxl", *argv]))


if __name__ == "__main__":
    sys.exit(main())
