"""What the phases of one fine-tuning run share (`Job`), and what it makes trainable and writes.

`run.py` tells the story in order; this file holds the parts it calls:

    Job.class_images   the missing class images, sampled from the frozen base (class_images.py does the files)
    Job.cache          every image -> latents (VAE) and every caption -> context, pooled (text encoders), once
    make_trainable     LoRA on the UNet (and the text encoders), the whole UNet, and/or a new token's vectors
    Job.save_*         LoRA files with kohya's ss_* metadata, the token's vectors, and (--train full) the UNet
    Job.validate       a grid of validation images, no grad, text from the cache
"""

import dataclasses
import hashlib
from pathlib import Path

import torch

from .. import data, io, lora
from ..buckets import encode_buckets
from ..bundled.tiny import default_cfg
from ..images import labelled_grid, save_png
from ..pipeline import generate, model_sampler
from ..textual_inversion import learn_token
from ..train import ddp
from ..train.loop import autocast
from ..weights.embedding_files import write_embedding
from ..weights.pretrained import file_hash
from .cache import PromptCache, encode_captions, encode_examples
from .class_images import generate_class_images

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Job:
    """What the phases of `run` share: the pipeline, the cached data, and the files written so far.
    `cfg` is run.FinetuneConfig (or finetune.py's flags); `cfg.validation_prompt` is already resolved."""

    def __init__(self, cfg, pipe, device, autocast_dtype, size, lr, out, ctx):
        self.cfg, self.pipe, self.device, self.autocast_dtype, self.ctx = cfg, pipe, device, autocast_dtype, ctx
        self.size, self.lr, self.out, self.files, self.models = size, lr, out, [], {"unet": pipe.unet}
        self.ti_tables = {}  # textual inversion: {'clip_l' | 'clip_g' | 'emb_params': NewTokenEmbedding}
        self.save_dtype = SAVE_DTYPES[cfg.save_precision]
        self.prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
        self.base_hash = model_hash(cfg.model)
        self.validation_prompts = [p for p in cfg.validation_prompt or [] if p]

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def class_images(self, class_dir):
        """The missing class images, sampled with the base model (seed + i for image i); their ImageFolder."""
        a, size = self.cfg, self.size
        guidance = default_cfg(a.model)  # 2 for the bundled miniature, SDXL's 5 otherwise (bundled/tiny.py)
        settings = {
            "model": Path(a.model).name,
            "steps": a.class_steps,
            "sampler": model_sampler(self.pipe),
            "cfg": guidance,
            "width": size,
            "height": size,
        }

        def make(prompts, seeds):  # seeds are consecutive: generate gives image i the seed seed + i
            with self.autocast():
                return generate(
                    self.pipe,
                    prompts,
                    steps=a.class_steps,
                    cfg=guidance,
                    seed=seeds[0],
                    width=size,
                    height=size,
                    batch_size=len(prompts),
                    progress=False,
                )

        paths, written = generate_class_images(
            make,
            class_dir,
            a.num_class_images,
            a.class_prompt,
            a.class_batch_size,
            seed=a.seed,
            settings=settings,
            progress=self.ctx.is_main,
            ctx=self.ctx,
        )
        ddp.barrier(self.ctx)  # every process's share is on disk
        print(
            f"class images: {len(paths)} in {class_dir} ({written} generated now"
            + (f" by process 0 of {self.ctx.world_size})" if self.ctx.world_size > 1 else ")")
        )
        return data.ImageFolder(paths, size, fit=a.fit, caption=a.class_prompt)

    def cache(self, instance_set, klass_set):
        """Latents (VAE once) and, while the text encoders are frozen, text embeddings (once per caption); then the
        VAE and text encoders leave the GPU."""
        a, pipe, device = self.cfg, self.pipe, self.device
        batch = 1 if self.size >= 512 else 8
        show = self.ctx.is_main
        if a.buckets:
            self.instance = encode_buckets(instance_set, pipe.vae, device, a.instance_prompt, show)
        else:
            self.instance = encode_examples(instance_set, pipe.vae, device, a.instance_prompt, batch, show)
        self.klass = encode_examples(klass_set, pipe.vae, device, a.class_prompt, batch, show) if klass_set else None
        self.text_cache = None
        if a.train_text_encoder or a.train == "ti" or a.train_ti:  # gradients flow through the encoders
            self.embed = lambda captions: encode_captions(pipe.text, captions)
        else:
            captions = self.instance.captions + (self.klass.captions if self.klass else []) + self.validation_prompts
            self.embed = self.text_cache = PromptCache(pipe.text, captions, device)
            pipe.text.to("cpu")
        if pipe.vae is not None:
            pipe.vae.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.data_hash = dataset_hash(self.instance)
        print(
            f"cached {len(self.instance)} instance"
            + (f" and {len(self.klass)} class" if self.klass else "")
            + f" images at {self.size}px, {len(set(self.instance.captions))} distinct instance caption(s)"
        )

    def save_lora(self, path, fmt, steps_done):
        meta = lora_metadata(
            self.cfg,
            self.lr,
            steps_done,
            self.size,
            self.base_hash,
            self.data_hash,
            self.instance,
            self.klass,
            self.prediction_type,
        )
        carriers = {k: m for k, m in self.models.items() if not k.startswith("ti_")}
        lora.save_lora(
            carriers if len(carriers) > 1 else self.pipe.unet, path, format=fmt, metadata=meta, dtype=self.save_dtype
        )
        self.files.append(str(path))

    def save_embedding(self, path):
        vectors = {name: table.new for name, table in self.ti_tables.items()}
        write_embedding(path, vectors, self.cfg.ti_token, self.save_dtype, {"minidiff.base_model_hash": self.base_hash})
        self.files.append(str(path))

    def save_step(self, step, fmt):
        """Every --save-every steps: the LoRA and/or the token's vectors so far."""
        if self.cfg.train == "lora":
            self.save_lora(self.out / f"lora-step-{step:06d}.safetensors", fmt, step)
        if self.ti_tables:
            self.save_embedding(self.out / f"{self.cfg.ti_token}-step-{step:06d}.safetensors")

    def validate(self, label):
        """A grid of --validation-images per prompt (fixed seeds): no grad, eval mode, one image at a time, text from
        the cache, the VAE on the GPU only for the decode."""
        a, pipe, guidance = self.cfg, self.pipe, default_cfg(self.cfg.model)
        if not a.validation_images or not self.validation_prompts:
            return
        pipe.unet.eval()
        vpipe = dataclasses.replace(pipe, text=self.text_cache) if self.text_cache is not None else pipe
        if pipe.vae is not None:
            pipe.vae.to(self.device)
        prompts = [p for p in self.validation_prompts for _ in range(a.validation_images)]
        with self.autocast():
            images = generate(
                vpipe,
                prompts,
                steps=a.validation_steps,
                cfg=guidance,
                seed=a.seed,
                width=self.size,
                height=self.size,
                batch_size=1,
                progress=False,
            )
        if pipe.vae is not None:
            pipe.vae.to("cpu")
        grid = labelled_grid(
            images, self.validation_prompts, [f"seed {a.seed + i}" for i in range(a.validation_images)]
        )
        path = save_png(
            grid,
            self.out / "samples" / f"{label}.png",
            {
                "prompts": self.validation_prompts,
                "seed": a.seed,
                "steps": a.validation_steps,
                "sampler": model_sampler(vpipe),
                "cfg": guidance,
                "training_step": label,
                "model": str(a.model),
            },
        )
        self.files.append(str(path))


def make_trainable(cfg, pipe, lr):
    """LoRA adapters (fp32) on the frozen UNet (and text encoders), or the whole UNet, and/or a new token's vectors
    (textual inversion): (modules to checkpoint, parameter groups with their learning rates, the TI tables)."""
    models, groups, tables = {"unet": pipe.unet}, [], {}
    if cfg.train == "full":
        pipe.unet.requires_grad_(True)
        groups.append({"params": list(pipe.unet.parameters())})
    elif cfg.train == "lora":
        drop = dict(dropout=cfg.lora_dropout, rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)
        lora.inject_lora(pipe.unet, cfg.targets, cfg.rank, cfg.alpha, **drop)
        groups.append({"params": lora.lora_parameters(pipe.unet)})
        if cfg.train_text_encoder:
            text = {k: m for k, m in pipe.modules().items() if k != "unet"}
            for m in text.values():
                lora.inject_lora(m, "text", cfg.rank, cfg.alpha, **drop)
                m.train()
            models.update(text)
            groups.append(
                {"params": [p for m in text.values() for p in lora.lora_parameters(m)], "lr": cfg.text_encoder_lr or lr}
            )
    if cfg.train == "ti" or cfg.train_ti:  # the token's vectors V in every text encoder (textual_inversion.py)
        tables = learn_token(pipe.text, cfg.ti_token, cfg.ti_vectors, cfg.ti_init or cfg.class_prompt.split()[-1])
        models.update({f"ti_{k}": t for k, t in tables.items()})
        groups.append({"params": [t.new for t in tables.values()], "lr": cfg.ti_lr})
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing(True)
        for name in ("text_encoder", "text_encoder_2"):
            if name in models:  # transformers' switch (renamed activation_checkpointing_enable in v5)
                te = models[name]
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    return models, groups, tables


def save_unet(unet, folder):
    """--train full: the UNet in diffusers layout (config.json + diffusion_pytorch_model.safetensors), atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = io.save_safetensors(unet.state_dict(), folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    io.write_json(unet.config.to_diffusers(), folder / "config.json")
    return [weights, folder / "config.json"]


def model_hash(path):
    """sha256 of a single-file model, or of the UNet weight files of a diffusers folder (the part a LoRA fits)."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    files = sorted((path / "unet").glob("*.safetensors")) or sorted(path.glob("*.safetensors"))
    files = [f for f in files if ".fp16." not in f.name] or files
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_hash(f)}\n".encode())
    return h.hexdigest()


def dataset_hash(examples):
    """sha256 over the instance images' bytes and captions: which data a LoRA was trained on."""
    h = hashlib.sha256()
    for path, caption in sorted(zip(examples.paths, examples.captions)):
        h.update(hashlib.sha256(Path(path).read_bytes()).hexdigest().encode() + caption.encode() + b"\n")
    return h.hexdigest()


def lora_metadata(cfg, lr, steps, size, base_hash, data_hash, instance, klass, prediction_type):
    """safetensors metadata: kohya's ss_* keys (ComfyUI / A1111 / civitai read them) and minidiff.* settings.
    (lora.save_lora adds ss_network_module/dim/alpha/args and ss_base_model_version itself.)"""
    return {
        "ss_v2": "False",
        "ss_sd_model_name": Path(cfg.model).name,
        "ss_sd_model_hash": base_hash[:12],
        "ss_new_sd_model_hash": base_hash,
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(steps),
        "ss_seed": str(cfg.seed),
        "ss_resolution": f"({size}, {size})",
        "ss_num_train_images": str(len(instance)),
        "ss_num_reg_images": str(len(klass) if klass is not None else 0),
        "ss_prior_loss_weight": str(cfg.prior_weight if klass is not None else 0.0),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_lr_scheduler": cfg.lr_schedule,
        "ss_lr_warmup_steps": str(cfg.warmup),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_optimizer": "torch.optim." + {"adamw": "AdamW", "adafactor": "Adafactor", "sgd": "SGD"}[cfg.optimizer],
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or lr),
        "ss_max_grad_norm": "1.0",
        "ss_training_comment": f"minidiff DreamBooth: {cfg.instance_prompt!r}",
        "minidiff.base_model_hash": base_hash,
        "minidiff.dataset_hash": data_hash,
        "minidiff.instance_prompt": cfg.instance_prompt,
        "minidiff.class_prompt": cfg.class_prompt if klass is not None else "",
        "minidiff.steps": str(steps),
        "minidiff.lr": str(lr),
        "minidiff.resolution": str(size),
        "minidiff.prediction_type": prediction_type,
        "minidiff.train_text_encoder": str(cfg.train_text_encoder),
    }
