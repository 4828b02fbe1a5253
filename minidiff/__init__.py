"""minidiff: teach a pretrained diffusion model an original character from six drawings.

Bare PyTorch: the SDXL UNet and VAE, noise schedules, samplers, LoRA and DreamBooth written out to be read. The few
calls a notebook needs are re-exported here; everything else lives in one file per concept (see docs/design.md):

    load_pipeline, save_pipeline, load_unet, load_vae   minidiff.weights.pretrained (was minidiff.checkpoint)
    generate                                            minidiff.pipeline
    inject_lora, save_lora, load_lora                   minidiff.lora (layers.py, files.py)
"""

from .lora import inject_lora, load_lora, save_lora
from .pipeline import generate
from .weights.pretrained import load_pipeline, load_unet, load_vae, save_pipeline

__version__ = "0.1.0"
__all__ = [
    "load_pipeline",
    "save_pipeline",
    "load_unet",
    "load_vae",
    "generate",
    "inject_lora",
    "load_lora",
    "save_lora",
]
