"""LoRA, the one place to import it from: `from minidiff.lora import inject_lora, save_lora, load_lora`.

Two files, read in this order:
    layers.py   the math and the model surgery: LoRALinear / LoRAConv2d (y = W0 x + b + m (alpha/r) B A x), target
                presets, inject_lora, merge / unmerge, multiplier, enable / disable. Touches no file.
    files.py    the files people exchange adapters in (kohya / diffusers / peft naming): save_lora, load_lora,
                read_lora, parse_lora, lora_state_dict. Imports layers.py, never the reverse.
This file only re-exports them, so there is no circle: lora -> layers, lora -> files -> layers. (Until issue 17 the
layers were minidiff/lora.py and the files minidiff/weights/lora_files.py, which imported each other; the public
names did not change.)
"""

from .files import FORMATS, LoRAEntry, load_lora, lora_state_dict, parse_lora, read_lora, save_lora
from .layers import (
    TARGETS,
    Adapter,
    LoRAConv2d,
    LoRALinear,
    adapters_of,
    check_name,
    components,
    disable_lora,
    enable_lora,
    find_targets,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_shapes,
    merge_lora,
    set_lora_scale,
    unmerge_lora,
    wrap,
)

__all__ = [
    "TARGETS",
    "Adapter",
    "LoRALinear",
    "LoRAConv2d",
    "lora_shapes",
    "lora_layers",
    "find_targets",
    "wrap",
    "check_name",
    "inject_lora",
    "components",
    "adapters_of",
    "lora_parameters",
    "set_lora_scale",
    "enable_lora",
    "disable_lora",
    "merge_lora",
    "unmerge_lora",
    "FORMATS",
    "LoRAEntry",
    "lora_state_dict",
    "save_lora",
    "read_lora",
    "parse_lora",
    "load_lora",
]
