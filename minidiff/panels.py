"""One comic panel from its settings (page_file.Panel): text to image, img2img of an image or an earlier panel, or
inpainting with a mask file; the panel's LoRAs switched on at their scales and every other LoRA off.

    text to image   generate(prompt)
    img2img         generate(prompt, init_images = init, strength)                 SDEdit (pipeline.generate)
    inpainting      inpaint(prompt, init, mask, blur, only_masked, strength)       feathered paste-back (inpaint.py)
    outpainting     outpaint(prompt, init, left, top, right, bottom)               grow the canvas, fill the border
    control         generate(..., controls = [(ControlNet, control image, scale)])  text to image or img2img
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import MinidiffError


class LoRASwitch:
    """Loads each LoRA file once (adapter `lora<i>`) and turns on exactly the ones a panel asks for."""

    def __init__(self, pipe):
        self.modules, self.names = pipe.modules(), {}

    def use(self, loras) -> list:
        """loras: [(path, scale)] -> the metadata [{file, scale, sha256}] of what is on now."""
        from .lora import disable_lora, enable_lora, load_lora, set_lora_scale
        from .weights.pretrained import file_hash

        for path, _ in loras:
            if str(path) not in self.names:
                self.names[str(path)] = load_lora(self.modules, path, name=f"lora{len(self.names)}")
        if self.names:
            disable_lora(self.modules)
        for path, scale in loras:
            enable_lora(self.modules, self.names[str(path)])
            set_lora_scale(self.modules, scale, self.names[str(path)])
        return [{"file": path.name, "scale": scale, "sha256": file_hash(path)} for path, scale in loras]


def _image(source, size, what) -> Image.Image:
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
    except OSError as e:
        raise MinidiffError(f"{what}: cannot read {source}: {e}") from None
    return image.resize(size, Image.LANCZOS) if size is not None and image.size != size else image


def panel_controls(pipe, panel, width, height, nets: dict) -> tuple[list, list]:
    """([(ControlNet, control image [1, 3, height, width], scale)], their PNG metadata) of a panel's controls; `nets`
    caches the ControlNets loaded so far by path (a page loads each once)."""
    from .control_images import read_control
    from .controlnet import load_controlnet

    if panel.controls and not panel.controlnets:
        raise MinidiffError(f"panel {panel.number}: 'control' needs a 'controlnet' (a ControlNet made for this model)")
    out, meta = [], []
    for i, (path, kind, scale) in enumerate(panel.controls):
        net_path = panel.controlnets[min(i, len(panel.controlnets) - 1)]
        if str(net_path) not in nets:
            nets[str(net_path)] = load_controlnet(net_path).to(pipe.device, pipe.unet.dtype)
        out.append((nets[str(net_path)], read_control(path, kind, height, width), scale))
        meta.append({"image": path.name, "type": kind, "scale": scale, "controlnet": str(net_path)})
    return out, meta


def generate_panel(
    pipe, panel, panel_image, progress=True, switch: LoRASwitch | None = None, controlnets: dict | None = None
):
    """(PIL image, settings for its PNG metadata) of one panel. `panel_image(k)` gives panel k's image (for an
    edit of an earlier panel); `controlnets` caches ControlNets across panels (panel_controls)."""
    import torch

    from .images import from_pil, to_pil
    from .inpaint import inpaint, outpaint
    from .pipeline import generate, model_sampler

    native = pipe.unet.config.sample_size * pipe.scale
    width, height = panel.size or (native, native)
    loras = (switch or LoRASwitch(pipe)).use(panel.loras)
    sampler = panel.sampler or model_sampler(pipe)
    kw = dict(
        steps=panel.steps,
        cfg=panel.cfg,
        sampler=sampler,
        seed=panel.seed,
        negative=panel.negative,
        prompt_2=panel.prompt_2,
        progress=progress,
    )
    controls, control_meta = panel_controls(pipe, panel, width, height, {} if controlnets is None else controlnets)
    where = f"panel {panel.number}"
    meta = {
        "panel": panel.number,
        "prompt": panel.prompt,
        "prompt_2": panel.prompt_2,
        "negative": panel.negative,
        "seed": panel.seed,
        "steps": panel.steps,
        "cfg": panel.cfg,
        "sampler": sampler,
        "width": width,
        "height": height,
        "loras": loras,
    }
    if controls:  # text to image or img2img (page_file.read_page refuses control on inpainting / outpainting panels)
        kw["controls"], meta["controls"] = controls, control_meta
    if panel.init is None:
        x = generate(pipe, [panel.prompt], width=width, height=height, **kw)[0]
        return to_pil(x), meta
    source = panel_image(panel.init) if isinstance(panel.init, int) else panel.init
    meta.update(init=f"panel {panel.init}" if isinstance(panel.init, int) else str(panel.init), strength=panel.strength)
    if panel.outpaint is not None:
        init = from_pil(_image(source, None, f"{where}: 'init'").convert("RGB"))
        left, top, right, bottom = panel.outpaint
        w, h = init.shape[2] + left + right, init.shape[1] + top + bottom
        if w % 8 or h % 8:
            raise MinidiffError(
                f"{where}: 'outpaint' grows {init.shape[2]}x{init.shape[1]} to {w}x{h}: the new "
                f"size must be multiples of 8"
            )
        kw.pop("progress")
        x = outpaint(
            pipe, panel.prompt, init, left, top, right, bottom, blur_radius=panel.mask_blur, progress=progress, **kw
        )
        meta.update(outpaint=list(panel.outpaint), width=w, height=h)
        return to_pil(x), meta
    init = from_pil(_image(source, (width, height), f"{where}: 'init'").convert("RGB"))
    if panel.mask is None:
        x = generate(pipe, [panel.prompt], init_images=init[None], strength=panel.strength, **kw)[0]
        return to_pil(x), meta
    mask_image = _image(panel.mask, (width, height), f"{where}: 'mask'").convert("L")
    mask = torch.from_numpy(np.asarray(mask_image, dtype=np.float32).copy())[None] / 255  # [1, H, W], 1 = white
    if not (mask >= 0.5).any():
        raise MinidiffError(f"{where}: 'mask' {panel.mask} is all black: nothing to repaint (white = repaint)")
    meta.update(mask=str(panel.mask), mask_blur=panel.mask_blur, only_masked=panel.only_masked)
    kw.pop("progress")
    x = inpaint(
        pipe,
        panel.prompt,
        init,
        mask,
        blur_radius=panel.mask_blur,
        only_masked=panel.only_masked,
        strength=panel.strength,
        progress=progress,
        **kw,
    )
    return to_pil(x), meta
