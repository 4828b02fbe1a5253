"""minidiff: teach a pretrained diffusion model an original character from six drawings.

Bare PyTorch: the SDXL UNet and VAE, noise schedules, samplers, LoRA and DreamBooth written out to be read. The few
calls a notebook needs are re-exported here; everything else lives in one file per concept (see docs/design.md):

    load_pipeline, save_pipeline, load_unet, load_vae   minidiff.weights.pretrained (was minidiff.checkpoint)
    generate                                            minidiff.pipeline
    inject_lora                                         minidiff.lora
    save_lora, load_lora                                minidiff.weights.lora_files
"""

from . import lora
from .lora import inject_lora
from .pipeline import generate
from .weights import lora_files
from .weights.lora_files import load_lora, save_lora
from .weights.pretrained import load_pipeline, load_unet, load_vae, save_pipeline

__version__ = "0.1.0"
__all__ = ["load_pipeline", "save_pipeline", "load_unet", "load_vae", "generate", "inject_lora", "load_lora",
           "save_lora"]

# `minidiff.lora.save_lora` and friends, the spellings earlier issues promised, stay valid as aliases of the file API:
# lora.py itself never imports the file formats (weights/lora_files.py imports lora.py), and this file runs before
# any `minidiff.*` submodule, so `from minidiff.lora import save_lora` always finds them.
for _name in ("save_lora", "load_lora", "read_lora", "parse_lora", "lora_state_dict"):
    setattr(lora, _name, getattr(lora_files, _name))
del _name
