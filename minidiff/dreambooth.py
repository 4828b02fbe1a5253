"""DreamBooth with prior preservation: teach a model one subject from a few images without forgetting its class.

Ruiz et al. 2022 (arXiv 2208.12242) eq. 2, in the symbols of the code below. Instance images (latents z_0 = E(x))
come with a prompt holding a rare identifier ("a picture of sks girl"); class images are drawn from the frozen base
model with the class prompt ("a picture of a girl"). One batch holds B instance rows, then B class rows:

    z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,      eps ~ N(0, I),   t ~ U{0, .., T-1}   per row
    y   = eps                                                      (epsilon prediction)
        = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0        (v-prediction, Salimans & Ho 2022)
    m_b = mean_{c,h,w} (unet(z_t, t, context_b, pooled_b, time_ids_b) - y_b)^2        one number per row b
    L   = mean_{b in I} w_b m_b  +  lambda * mean_{b in C} w_b m_b                      lambda = prior weight (1)

w_b = 1, or the min-SNR-gamma weight of row b's OWN timestep (Hang et al. 2023): min(SNR(t_b), gamma) / SNR(t_b)
for eps, min(SNR(t_b), gamma) / (SNR(t_b) + 1) for v. Noise offset (Guttenberg 2023): eps = n + o * n', with
n' ~ N(0, I) of shape [B, C, 1, 1], one shift per row and channel, so the model can learn to move mean brightness.

Every row carries its own conditioning: the context and pooled embedding of its own caption, and SDXL's
micro-conditioning time_ids = (original h, w, crop top, left, target h, w) of its own image. diffusers' basic SDXL
script gives the class rows the instance image's sizes and computes min-SNR from all 2B timesteps against B
losses (https://github.com/huggingface/diffusers/blob/58eb52c0803e/examples/dreambooth/train_dreambooth_lora_sdxl.py); here both come from the row itself and a test checks it by hand.

Everything the frozen parts compute is computed once (`Examples`, `PromptCache`): the VAE encodes each image once
(its posterior mean and std are kept and a fresh z_0 = mean + std * n is drawn per step; for a pixel-space model
z_0 is the image), and the text encoders encode each distinct caption once; after that they can leave the GPU.
A dropped caption (`caption_dropout`) is the all-zero embedding, the unconditional input SDXL was trained with
(sgm's ucg_rate zeroes it) and the one our sampler's classifier-free guidance uses.

Data-parallel (torchrun, minidiff/train/ddp.py): every process draws the same global batch of W * B instance and
W * B class rows (same seed, same RNG stream), keeps its own B + B (`rows_of_rank`), and the LoRA gradients are
averaged before the optimizer step. L is a mean over equal-sized halves, so the average of the W per-process losses
is the loss of the global batch: W processes at --batch-size B train like one process at --batch-size W * B.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .train import ddp, interrupt, state
from .data import IMAGE_EXTS, ImageFolder, load_image
from .errors import DataError, MinidiffError, TrainingError
from .optimizers import make_optimizer
from .text import time_ids as text_time_ids

CLASS_NAME = "class-{:05d}.png"
OURS = re.compile(r"class-\d{5,}\.png")  # generated class images; any other image in the class folder is the user's


# ----------------------------------------------------------------------------------------------- class images
def class_image_plan(class_dir, n):
    """(images to use, indices to generate) for a class set of `n` images in `class_dir`.

    Images a user put there (any other name) come first; the rest are ours, `class-00000.png` .. in index order.
    An index whose file is missing is (re)generated, so an interrupted generation resumes where it stopped.
    """
    class_dir = Path(class_dir)
    try:
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS) if class_dir.is_dir() else []
    except OSError as e:
        raise DataError(f"cannot read the class image folder {class_dir} ({e.strerror})") from None
    ours = {p.name for p in files if OURS.fullmatch(p.name)}
    user = [p for p in files if p.name not in ours][:n]
    wanted = [class_dir / CLASS_NAME.format(i) for i in range(n - len(user))]
    missing = [i for i, p in enumerate(wanted) if p.name not in ours]
    return user + wanted, missing


def check_class_images(class_dir, n, can_generate):
    """Raise a one-line DataError when class images are missing and cannot be made (before any model loads)."""
    for p in (Path(class_dir), *Path(class_dir).parents):
        if p.exists() and not p.is_dir():
            raise DataError(f"--class-dir {class_dir}: {p} is a file, not a folder")
    paths, missing = class_image_plan(class_dir, n)
    if not missing:
        return paths, missing
    have = n - len(missing)
    if not can_generate:
        raise DataError(f"prior preservation needs {n} class images but {class_dir} has {have}, and generating "
                        f"is off (--no-generate): add images, lower --num-class-images, or pass --no-prior")
    class_dir = Path(class_dir)
    probe = class_dir if class_dir.is_dir() else next((p for p in class_dir.parents if p.exists()), class_dir)
    if not _writable(probe):
        raise DataError(f"prior preservation needs {n} class images but {class_dir} has {have} and is not "
                        f"writable, so the missing ones cannot be generated: use another --class-dir or --no-prior")
    return paths, missing


def _writable(folder):
    test = Path(folder) / ".minidiff-write-test"
    try:
        test.write_bytes(b"")
        test.unlink()
        return True
    except OSError:
        return False


def generate_class_images(generate, class_dir, n, prompt, batch_size=4, seed=0, settings=None, progress=True,
                          ctx=None):
    """Make the missing ones of `n` class images with `generate(prompts, seeds) -> [k, 3, H, W] in [-1, 1]`.

    Image i always has seed `seed + i` and is made in the fixed batch [i - i % batch_size, ...): a batch with any
    file missing is sampled again whole and only its missing files are written, so a resumed or repaired set is
    byte-identical to one made in a single go. Each PNG carries prompt, seed and `settings` in its metadata.
    With a distributed `ctx`, process r makes the batches c with c mod W = r (fixed by c alone, so no process needs
    to know what the others wrote): the same files as one process; the caller waits at a barrier after.
    Returns (paths of the n images, number of files this process wrote).
    """
    from .images import save_png

    class_dir = Path(class_dir)
    paths, missing = class_image_plan(class_dir, n)
    ours = [p for p in paths if OURS.fullmatch(p.name)]
    chunks = sorted({i // batch_size for i in missing})
    if ctx is not None:
        chunks = [c for c in chunks if c % ctx.world_size == ctx.rank]
    written = 0
    for c in tqdm(chunks, desc=f"class images ({len(missing)} to make)", disable=not progress or not chunks):
        idx = list(range(c * batch_size, min((c + 1) * batch_size, len(ours))))
        images = generate([prompt] * len(idx), [seed + i for i in idx])
        for i, img in zip(idx, images):
            if i in missing:
                save_png(img, ours[i], {"prompt": prompt, "seed": seed + i, "index": i, **(settings or {})})
                written += 1
    return paths, written


# ----------------------------------------------------------------------------------------------- cached examples
def size_ids(path, size, fit="pad"):
    """SDXL micro-conditioning of one training image (Podell et al. 2023 sec. 2.2) as 6 floats:
    (h, w) of the file as stored (EXIF applied), the crop's (top, left) in the resized image ((0, 0) when the
    image is padded to a square, data.fit_square), and the target (size, size)."""
    w, h = load_image(path).size
    top = left = 0
    if fit == "crop":
        side = min(w, h)
        top, left = round((h - side) // 2 * size / side), round((w - side) // 2 * size / side)
    return [float(h), float(w), float(top), float(left), float(size), float(size)]


@dataclass
class Examples:
    """One half of the training data, encoded once (module docstring). Rows are distinct images; `index` lists
    the rows to draw from (an image in a kohya `10_sks girl` folder is listed 10 times)."""

    mean: torch.Tensor  # [N, C, h, w] scaled latent mean (pixel space: the pixels)
    std: torch.Tensor | None  # [N, C, h, w] scaled latent std, None in pixel space
    time_ids: torch.Tensor  # [N, 6]
    captions: list
    index: list
    paths: list

    def __len__(self):
        return self.mean.shape[0]

    def draw(self, n, caption_dropout=0.0, noise_offset=0.0, T=1000):
        """n random rows with fresh noise: {z0, eps, t, time_ids, captions}. All randomness comes from torch's
        global RNG, so a training checkpoint (which stores it) resumes the same sequence."""
        picked = [self.index[i] for i in torch.randint(len(self.index), (n,)).tolist()]
        rows = torch.tensor(picked, device=self.mean.device)
        z0 = self.mean[rows]
        if self.std is not None:
            z0 = z0 + self.std[rows] * torch.randn_like(z0)
        captions = [self.captions[r] for r in picked]
        if caption_dropout > 0:
            drop = (torch.rand(n) < caption_dropout).tolist()
            captions = ["" if d else c for d, c in zip(drop, captions)]
        eps = torch.randn_like(z0)
        if noise_offset:
            eps = eps + noise_offset * torch.randn(n, z0.shape[1], 1, 1, device=z0.device, dtype=z0.dtype)
        t = torch.randint(0, T, (n,), device=z0.device)
        return {"z0": z0, "eps": eps, "t": t, "time_ids": self.time_ids[rows], "captions": captions}


@torch.no_grad()
def encode_examples(dataset: ImageFolder, vae=None, device="cpu", default_caption="", batch_size=4,
                    progress=True) -> Examples:
    """Encode an ImageFolder once: latents (VAE posterior mean and std, times the scaling factor) or pixels,
    per-image time ids, captions (an image without one gets `default_caption`)."""
    chunks = [dataset.images[i : i + batch_size] for i in range(0, len(dataset.images), batch_size)]
    means, stds = [], []
    for chunk in tqdm(chunks, desc="encoding images", disable=not progress or vae is None, leave=False):
        x = torch.stack(chunk).float() / 127.5 - 1  # uint8 -> [-1, 1], a few images at a time
        if vae is None:
            means.append(x.to(device))
            continue
        p = next(vae.parameters())
        post = vae.encode(x.to(p.device, p.dtype))
        means.append((post.mean.float() * vae.scaling_factor).to(device))
        stds.append((post.std.float() * vae.scaling_factor).to(device))
    mean, std = torch.cat(means), (torch.cat(stds) if stds else None)
    ids = torch.tensor([size_ids(p, dataset.size, dataset.fit) for p in dataset.paths], device=device)
    captions = [c or default_caption for c in dataset.captions]
    return Examples(mean, std, ids, captions, list(dataset.index), list(dataset.paths))


def encode_captions(text, captions):
    """(context [B, L, D], pooled [B, P]) of captions through the text encoders; "" rows are all zeros."""
    context, pooled = text.encode(list(captions))
    keep = torch.tensor([c != "" for c in captions], device=context.device, dtype=context.dtype)
    return context * keep[:, None, None], pooled * keep[:, None].to(pooled.dtype)


class PromptCache:
    """context and pooled embedding of each distinct caption, encoded once while the text encoders are frozen."""

    def __init__(self, text, captions, device="cpu", batch_size=8):
        captions = sorted({c for c in captions if c != ""})
        self.table = {}
        with torch.no_grad():
            for i in range(0, len(captions), batch_size):
                chunk = captions[i : i + batch_size]
                context, pooled = text.encode(chunk)
                for j, c in enumerate(chunk):
                    self.table[c] = (context[j].float().to(device), pooled[j].float().to(device))
        some = next(iter(self.table.values()), None)
        if some is None:  # only empty captions: derive the shapes from one encode of a dummy prompt
            with torch.no_grad():
                context, pooled = text.encode(["x"])
            some = (context[0].float().to(device), pooled[0].float().to(device))
        self.zeros = (torch.zeros_like(some[0]), torch.zeros_like(some[1]))

    def __call__(self, captions):
        pairs = [self.table[c] if c != "" else self.zeros for c in captions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def encode(self, prompts, negative=None, prompts_2=None, negative_2=None, emphasis=False):
        """TextConditioner.encode from the cache, so `pipeline.generate` can sample without the text encoders.
        The cache holds the plain encodings (what training sees), also when `emphasis` asks for A1111's syntax;
        a second encoder's own prompt is not cached."""
        if prompts_2 is not None or negative_2 is not None:
            raise MinidiffError("the text-embedding cache holds no prompt_2 / negative_2 encodings")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = sorted({p for p in prompts + ([negative] if isinstance(negative, str) else list(negative or []))
                          if p != "" and p not in self.table})
        if missing:
            raise MinidiffError(f"prompt not in the text-embedding cache: {missing[0]!r}")
        context, pooled = self(prompts)
        if negative is None:
            return context, pooled
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        neg_context, neg_pooled = self(negative)
        return torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])

    time_ids = staticmethod(text_time_ids)


# ----------------------------------------------------------------------------------------------- batch and loss
def make_batch(instance: Examples, klass: Examples | None, batch_size, caption_dropout=0.0, noise_offset=0.0, T=1000):
    """B instance rows, then (with prior preservation) B class rows, concatenated; `n_instance` = B.
    The instance half is drawn first, so a run without class rows sees the same instance rows."""
    halves = [instance.draw(batch_size, caption_dropout, noise_offset, T)]
    if klass is not None:
        halves.append(klass.draw(batch_size, caption_dropout, noise_offset, T))
    if len({h["z0"].shape[1:] for h in halves}) > 1:  # instance rows of a non-square bucket (buckets.py)
        return {"parts": halves, "n_instance": batch_size, "captions": [c for h in halves for c in h["captions"]]}
    batch = {k: torch.cat([h[k] for h in halves]) for k in ("z0", "eps", "t", "time_ids")}
    batch["captions"] = [c for h in halves for c in h["captions"]]
    batch["n_instance"] = batch_size
    return batch


def rows_of_rank(batch, ctx):
    """Process r's share of a global batch of W * B instance then W * B class rows: instance rows r*B .. r*B + B - 1
    and the same span of the class rows (module docstring). Unchanged for a single process."""
    if ctx is None or ctx.world_size == 1:
        return batch
    if "parts" in batch:
        raise TrainingError("aspect-ratio buckets with prior preservation run on one process (no torchrun)")
    n = batch["n_instance"]
    b = n // ctx.world_size
    mine = list(range(ctx.rank * b, (ctx.rank + 1) * b))
    if len(batch["captions"]) > n:
        mine += [n + i for i in mine]
    rows = torch.tensor(mine, device=batch["z0"].device)
    share = {k: batch[k][rows] for k in ("z0", "eps", "t", "time_ids")}
    share.update(captions=[batch["captions"][i] for i in mine], n_instance=b)
    return share


def diffusion_target(schedule, z0, eps, t, prediction_type="epsilon"):
    """y = eps, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0 (module docstring)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return schedule.v_target(z0, eps, t)
    raise MinidiffError(f"prediction type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def row_weights(schedule, t, min_snr_gamma=None, prediction_type="epsilon"):
    """w_b per row: 1, or min-SNR-gamma of the row's own timestep t_b (float32 [B])."""
    if not min_snr_gamma:
        return torch.ones(t.shape[0], device=t.device)
    return schedule.min_snr_weight(t, min_snr_gamma, prediction_type).float().to(t.device)


def prior_preservation_loss(pred, target, weights, n_instance, prior_weight=1.0):
    """L = mean_{b < n} w_b m_b + lambda * mean_{b >= n} w_b m_b with m_b the per-row MSE (in fp32).
    Returns (L, instance term, prior term); the prior term is 0 without class rows."""
    m = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return combine_rows(m, weights, n_instance, prior_weight)


def combine_rows(m, weights, n_instance, prior_weight=1.0):
    """(L, instance term, prior term) from the per-row MSE m_b [B] and weights w_b [B] (prior_preservation_loss)."""
    wm = weights * m
    instance = wm[:n_instance].mean()
    prior = wm[n_instance:].mean() if m.shape[0] > n_instance else torch.zeros_like(instance)
    return instance + prior_weight * prior, instance, prior


def compute_loss(unet, batch, schedule, embed, prediction_type="epsilon", prior_weight=1.0, min_snr_gamma=None,
                 autocast_dtype=None):
    """Noise the batch, run the UNet once on all rows, return (L, instance term, prior term). A batch of two shapes
    (instance rows of one aspect-ratio bucket, square class rows: "parts") runs it once per shape."""
    m, weights = [], []
    for part in batch.get("parts", [batch]):
        z0, eps, t = part["z0"], part["eps"], part["t"]
        z_t = schedule.q_sample(z0, t, eps)
        target = diffusion_target(schedule, z0, eps, t, prediction_type)
        with torch.autocast(z0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            context, pooled = embed(part["captions"])
            pred = unet(z_t, t, context=context, text_embeds=pooled, time_ids=part["time_ids"])
        m.append(F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim()))))
        weights.append(row_weights(schedule, t, min_snr_gamma, prediction_type))
    return combine_rows(torch.cat(m), torch.cat(weights), batch["n_instance"], prior_weight)


# ----------------------------------------------------------------------------------------------- training loop
@dataclass
class TrainConfig:
    """The knobs of `train` (finetune.py's flags of the same names)."""

    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    lr_schedule: str = "constant"  # constant | cosine | linear, after `warmup` linear warm-up steps
    warmup: int = 0
    prior_weight: float = 1.0
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    prediction_type: str = "epsilon"
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-4  # AdamW, as diffusers' DreamBooth-LoRA script
    optimizer: str = "adamw"  # adamw | adafactor | sgd (optimizers.py)
    save_every: int = 0
    validate_every: int = 0


def lr_factor(step, steps, warmup=0, schedule="constant"):
    """Multiplier of the base lr after `step` optimizer steps: linear warm-up to 1 over `warmup` steps, then
    constant, linear decay to 0, or half a cosine to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise TrainingError(f"lr schedule must be constant, cosine or linear, got {schedule!r}")


def train(unet, params, schedule, instance, klass, embed, cfg: TrainConfig, out_dir, modules, precision=(None, False),
          resume=None, on_save=None, on_validate=None, progress=True, ctx=None, settings=None):
    """The DreamBooth loop: AdamW (or cfg.optimizer) on `params` (tensors, or groups {"params", "lr"}), lr
    warm-up/decay, gradient accumulation, clipping at 1, an fp16
    GradScaler when `precision` asks for one, a loss log, checkpoints every `save_every` steps (`modules`:
    {name: module or state.Trainable} to store, with optimizer, lr schedule, step and RNG) and `resume`
    (a checkpoint file, out dir or "latest"). on_save(step) / on_validate(step) are called after those steps;
    validation runs under torch.random.fork_rng, so it cannot change what training draws next.
    `ctx` (minidiff.train.ddp.Context): data-parallel over W processes (module docstring); every process
    resumes from the same checkpoint, and only process 0 logs, saves, and calls on_save / on_validate.
    `settings` (JSON-able) is stored in every checkpoint's extra, for the caller to compare when resuming.
    CTRL-C stops at the end of the current step, after a checkpoint (interrupt.Stopped, exit status 130).
    Returns {"steps", "resumed_from", "seconds", "s_per_step" (optimizer steps only), "loss" (the last)}."""
    autocast_dtype, use_scaler = precision
    device = instance.mean.device
    ctx = ctx or ddp.Context(device=device)
    groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup, cfg.lr_schedule))
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    start = 0
    if resume is not None:
        start, extra = state.load_checkpoint(resume, modules, {"optimizer": optimizer}, {"lr": lr_sched},
                                                out_dir=out_dir)
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if start >= cfg.steps:
            raise TrainingError(f"the checkpoint is at step {start}, nothing left to do for --steps {cfg.steps}")
        _share_device_rng(ctx, device)
    log = state.LossLog(out_dir, resume_step=start if resume is not None else None) if ctx.is_main else None
    unet.train()
    t0, aside, loss_value = time.perf_counter(), 0.0, float("nan")  # aside: time in checkpoints and validation
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc="training",
               disable=not progress or not ctx.is_main)

    def checkpoint(step):
        extra = {"settings": settings or {}} | ({"scaler": scaler.state_dict()} if scaler is not None else {})
        return state.save_checkpoint(out_dir, step, modules, {"optimizer": optimizer}, {"lr": lr_sched}, extra)

    stop = interrupt.steps(bar, checkpoint if ctx.is_main else lambda step: None, lambda f: ddp.any_process(f, ctx))
    for step in stop:  # CTRL-C: every process ends the step, process 0 writes a checkpoint, exit status 130
        sums = torch.zeros(3, device=device)
        for _ in range(cfg.grad_accum):
            batch = make_batch(instance, klass, cfg.batch_size * ctx.world_size, cfg.caption_dropout,
                               cfg.noise_offset, schedule.T)
            batch = rows_of_rank(batch, ctx)
            terms = compute_loss(unet, batch, schedule, embed, cfg.prediction_type, cfg.prior_weight,
                                 cfg.min_snr_gamma, autocast_dtype)
            state.check_finite(terms[0], step)
            loss = terms[0] / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            sums += torch.stack([x.detach() for x in terms]) / cfg.grad_accum
        ddp.average_gradients(params, ctx)  # before unscaling: every process sees the same inf/NaN
        if ctx.world_size > 1:  # log the global batch's loss
            torch.distributed.all_reduce(sums)
            sums /= ctx.world_size
        lr_used = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_sched.step()
        loss_value, inst, prior = sums.tolist()
        values = {"loss": loss_value, "instance": inst, "lr": lr_used}
        if klass is not None:
            values["prior"] = prior
        bar.set_postfix(loss=f"{loss_value:.4f}")
        t_aside = time.perf_counter()
        if not ctx.is_main:
            continue
        log.log(step, **values)
        if cfg.save_every and step % cfg.save_every == 0:
            checkpoint(step)
            if on_save is not None:
                on_save(step)
        if on_validate is not None and cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                on_validate(step)
            unet.train()
        aside += time.perf_counter() - t_aside
    if ctx.is_main:
        log.plot(title=f"DreamBooth loss ({cfg.steps} steps)")
    seconds = time.perf_counter() - t0
    return {"steps": cfg.steps, "resumed_from": start, "seconds": seconds, "loss": loss_value,
            "s_per_step": (seconds - aside) / max(cfg.steps - start, 1)}


def _share_device_rng(ctx, device):
    """After a resume, give every GPU process rank 0's generator state of its own GPU: the checkpoint holds
    per-device states indexed by GPU, and process r draws on cuda:r, whose saved state rank 0 never advanced."""
    if ctx.world_size > 1 and device.type == "cuda":
        state = torch.cuda.get_rng_state(device).to(device)
        torch.distributed.broadcast(state, src=0)
        torch.cuda.set_rng_state(state.cpu(), device)
