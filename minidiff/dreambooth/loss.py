"""The DreamBooth loss with prior preservation: one batch of instance rows then class rows, one number.

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

Data-parallel (torchrun, minidiff/train/ddp.py): every process draws the same global batch of W * B instance and
W * B class rows (same seed, same RNG stream), keeps its own B + B (`rows_of_rank`), and the LoRA gradients are
averaged before the optimizer step. L is a mean over equal-sized halves, so the average of the W per-process losses
is the loss of the global batch: W processes at --batch-size B train like one process at --batch-size W * B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MinidiffError, TrainingError
from .cache import Examples


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


def compute_loss(
    unet, batch, schedule, embed, prediction_type="epsilon", prior_weight=1.0, min_snr_gamma=None, autocast_dtype=None
):
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
