"""Files of weights: pretrained models (pretrained.py: find, load, save), the key layouts between the original single
file and diffusers (layouts.py), and LoRA files in kohya / diffusers / peft naming (lora_files.py, which imports
lora.py, never the reverse)."""
