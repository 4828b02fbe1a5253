"""Files of weights: pretrained models (pretrained.py: find, load, save), the key layouts between the original single
file and diffusers (layouts.py), and how frozen weights are stored once loaded (base_precision.py: fp16 / bf16 /
fp8). LoRA files (kohya / diffusers / peft naming) are minidiff/lora/files.py's: a LoRA file is read only into a model
that has LoRA layers, so the format sits beside the layers."""
