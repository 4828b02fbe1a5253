"""A full fine-tune's result as a model: the trained UNet plus the base model's frozen parts, one diffusers folder.

`finetune.py --train full` trains only the UNet. Its output folder becomes a complete diffusers pipeline folder that
`sample.py --model OUT`, `finetune.py --model OUT` and diffusers' `from_pretrained` all read:

    OUT/unet/                       the trained UNet (written by the trainer: config.json + safetensors)
    OUT/vae/ text_encoder*/ tokenizer*/ scheduler/ model_index.json
                                    symbolic links to the base folder's own (absolute paths; nothing copied), or
                                    copies where the file system has no links; `--vae DIR` is linked as vae/
    a single-file base              has no folders to link: its frozen parts are written out (save_pipeline)

Links keep a 7 GB SDXL run at the size of its UNet; they also mean the folder needs its base to stay where it was
(manifest.json records the base path and hash). The other way, a UNet alone into any model, is
`load_pipeline(model, unet=DIR)` (`sample.py --unet DIR`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FROZEN = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "model_index.json")


def link_or_copy(src: Path, dst: Path) -> str:
    """dst -> src as a symbolic link (absolute), or a copy where links are not allowed; 'link' or 'copy'."""
    src = Path(src).resolve()
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        shutil.rmtree(dst)
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
        return "link"
    except OSError:  # e.g. Windows without developer mode, some network file systems
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        return "copy"


def complete_model_folder(out, base, pipe=None, vae=None) -> list[str]:
    """Make `out` (holding the trained unet/) a whole pipeline folder around it (module docstring): the base folder's
    frozen parts linked in (`vae` replaces the base's VAE), or for a single-file base, `pipe`'s written out.
    Returns the paths it made."""
    from .pretrained import save_pipeline

    out, base = Path(out), Path(base)
    if base.is_file():  # nothing to link to: write the whole pipeline (unet/ again, identical)
        save_pipeline(pipe, out)
        return [str(out / name) for name in FROZEN if (out / name).exists()]
    made = []
    for name in FROZEN:
        src = Path(vae) if name == "vae" and vae else base / name
        if name == "vae" and src.is_file():  # a VAE file (e.g. sdxl_vae.safetensors): write the loaded one
            made += [str(p) for p in write_vae(pipe.vae, out / "vae")]
        elif src.exists():
            link_or_copy(src, out / name)
            made.append(str(out / name))
    return made


def write_vae(vae, folder) -> list[Path]:
    """vae/ in diffusers layout: config.json + diffusion_pytorch_model.safetensors (each atomic)."""
    from .. import io

    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
    return [
        io.save_safetensors(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors"),
        io.write_json({**vae.config.to_diffusers(), "_class_name": "AutoencoderKL"}, folder / "config.json"),
    ]
