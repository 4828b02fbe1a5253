"""minidiff: teach a pretrained diffusion model an original character from six drawings.

Bare PyTorch: the SDXL UNet and VAE, noise schedules, samplers, LoRA and DreamBooth written out to be read.
The public loading API is re-exported here; everything else lives in one file per concept (see docs/design.md).
"""

__version__ = "0.1.0"


def load_unet(path, dtype=None, device="cpu"):
    """Load a UNet from a diffusers component folder, a diffusers pipeline folder or an original single file."""
    from .weights.pretrained import load_unet as _load_unet

    return _load_unet(path, dtype=dtype, device=device)


def load_vae(path, dtype=None, device="cpu"):
    """Load an AutoencoderKL from a diffusers component folder, a pipeline folder or an original single file."""
    from .weights.pretrained import load_vae as _load_vae

    return _load_vae(path, dtype=dtype, device=device)
