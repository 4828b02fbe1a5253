"""The page composer: a page file (page_file.read_page) -> panels generated one by one (panels.generate_panel) ->
borders and lettering (lettering.py) -> page.png + strip.png.

    python sample.py --page examples/page.json                 every panel, then page.png and strip.png
    python sample.py --page examples/page.json --panel 3       only panel 3 (+ any panel whose PNG is missing)

The page file's format is in page_file.py. Writes panel-NN.png (the generated image, its settings in the PNG
metadata), page.png and strip.png (the panels one under the other at the page's content width, for scrolling).
Panels are numbered from 1 in reading order.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import MinidiffError
from .lettering import INK, PAPER, draw_text, fit, letter
from .page_file import Page, Panel


# ------------------------------------------------------------------------------------------------ layout, drawing
def title_height(page: Page) -> int:
    return round(page.size[1] * 0.06) if page.title else 0


def layout(page: Page) -> list:
    """Panel boxes (x0, y0, x1, y1) in reading order: rows share the height by their relative heights, panels
    share their row's width by their relative widths, `gutter` pixels apart, inside the margins and title."""
    W, H = page.size
    top = page.margin + title_height(page) + (page.gutter if page.title else 0)
    avail_h = H - top - page.margin - page.gutter * (len(page.rows) - 1)
    total_h, boxes, y = sum(h for h, _ in page.rows), [], top
    for h, panels in page.rows:
        row_h = round(avail_h * h / total_h)
        avail_w = W - 2 * page.margin - page.gutter * (len(panels) - 1)
        total_w, x = sum(p.width for p in panels), page.margin
        for p in panels:
            w = round(avail_w * p.width / total_w)
            boxes.append((x, y, x + w, y + row_h))
            x += w + page.gutter
        y += row_h + page.gutter
    return boxes


def cover(image: Image.Image, w: int, h: int, resample: str) -> Image.Image:
    """Scale `image` to cover w x h (aspect kept) and crop the middle; `resample` auto = nearest from 3x up."""
    s = max(w / image.width, h / image.height)
    mode = resample if resample != "auto" else ("nearest" if s >= 3 else "lanczos")
    size = (max(w, math.ceil(image.width * s)), max(h, math.ceil(image.height * s)))
    big = image.convert("RGB").resize(size, Image.NEAREST if mode == "nearest" else Image.LANCZOS)
    left, top = (big.width - w) // 2, (big.height - h) // 2
    return big.crop((left, top, left + w, top + h))


def draw_panel(canvas: Image.Image, box, image: Image.Image, panel: Panel, page: Page):
    x0, y0, x1, y1 = box
    canvas.paste(cover(image, x1 - x0, y1 - y0, page.resample), (x0, y0))
    draw = ImageDraw.Draw(canvas)
    letter(draw, box, panel.texts, page.font, line=max(1, page.border - 1))
    if page.border:
        draw.rectangle(box, outline=INK, width=page.border)


def draw_title(canvas, page: Page, y0: int):
    if page.title:
        draw = ImageDraw.Draw(canvas)
        h, w = title_height(page), canvas.width - 2 * page.margin
        draw_text(draw, fit(draw, page.title, w, h, page.font, max_size=h), (canvas.width / 2, y0 + h / 2))


def compose_page(page: Page, images: list) -> Image.Image:
    canvas = Image.new("RGB", page.size, PAPER)
    draw_title(canvas, page, page.margin)
    for box, image, panel in zip(layout(page), images, page.panels):
        draw_panel(canvas, box, image, panel, page)
    return canvas


def compose_strip(page: Page, images: list) -> Image.Image:
    """The panels one under the other at the page's content width, each with its page box's aspect ratio."""
    width = page.size[0] - 2 * page.margin
    heights = [round(width * (y1 - y0) / (x1 - x0)) for x0, y0, x1, y1 in layout(page)]
    top = page.margin + (title_height(page) + page.gutter if page.title else 0)
    canvas = Image.new(
        "RGB", (page.size[0], top + sum(heights) + page.gutter * (len(heights) - 1) + page.margin), PAPER
    )
    draw_title(canvas, page, page.margin)
    y = top
    for h, image, panel in zip(heights, images, page.panels):
        draw_panel(canvas, (page.margin, y, page.margin + width, y + h), image, panel, page)
        y += h + page.gutter
    return canvas


# ------------------------------------------------------------------------------------------------ rendering
def panel_file(out: Path, n: int) -> Path:
    return Path(out) / f"panel-{n:02d}.png"


def render_page(pipe, page: Page, out, only=None, model="", progress=True) -> dict:
    """Generate the panels (all, or those in `only` plus any whose PNG is missing), then write page.png and
    strip.png from the panel files. Returns {"panels": [paths written], "page": path, "strip": path}."""
    from .images import save_png
    from .panels import LoRASwitch, generate_panel

    out = Path(out)
    numbers = [p.number for p in page.panels]
    for n in only or ():
        if n not in numbers:
            raise MinidiffError(f"--panel {n}: the page has panels 1..{len(numbers)}")
    todo = [p for p in page.panels if only is None or p.number in only or not panel_file(out, p.number).is_file()]
    written, switch, controlnets = [], LoRASwitch(pipe), {}
    for p in todo:
        image, meta = generate_panel(
            pipe, p, lambda k: Image.open(panel_file(out, k)).convert("RGB"), progress, switch, controlnets
        )
        written.append(
            save_png(
                image,
                panel_file(out, p.number),
                {**meta, "model": model, "page": page.source.name if page.source else None},
            )
        )
        if progress:
            print(written[-1])
    redone = {p.number for p in todo}
    for p in page.panels:
        if isinstance(p.init, int) and p.init in redone and p.number not in redone:
            print(
                f"note: panel {p.number} is an edit of panel {p.init}, which changed: re-render it with "
                f"--panel {p.number}",
                file=sys.stderr,
            )
    images = [Image.open(panel_file(out, p.number)).convert("RGB") for p in page.panels]
    meta = {
        "page": page.source.name if page.source else None,
        "panels": [p.prompt for p in page.panels],
        "seeds": [p.seed for p in page.panels],
        "model": model,
    }
    return {
        "panels": written,
        "page": save_png(compose_page(page, images), out / "page.png", meta),
        "strip": save_png(compose_strip(page, images), out / "strip.png", meta),
    }
