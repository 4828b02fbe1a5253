"""What minidiff ships: the CC0 Kenney characters, the miniature SDXL (tiny.py: its config, captions, tokenizer and
pretraining recipe) and the classifier's weights. The files are package data in minidiff/assets/; `assets_dir()` is
the one place that knows where."""

from pathlib import Path


def assets_dir() -> Path:
    """minidiff/assets/: the bundled characters, the miniature's diffusers folder, the classifier's weights."""
    return Path(__file__).resolve().parent.parent / "assets"
