"""Lettering a comic panel with Pillow: text wrapped and sized to fit, caption boxes, narration bands, speech bubbles
with a tail pointing at a spot, thought bubbles with a trail of small circles.

The font is Pillow's own default, Aileron Regular (by Sora Sagano, released into the public domain under CC0; it
ships inside Pillow >= 10.1 and scales with `ImageFont.load_default(size=...)`), so no font file needs bundling; a
page may name any .ttf/.otf instead. Without FreeType, Pillow falls back to its small bitmap font (no scaling).

Fitting: the largest size in [min_size, max_size] whose greedily word-wrapped lines fit the box, found by bisection
(text height grows with size, so the fitting sizes form an interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import ImageDraw, ImageFont

from .errors import MinidiffError

INK, PAPER, CAPTION = (0, 0, 0), (255, 255, 255), (255, 241, 176)


def load_font(path: str | None, size: int):
    """A FreeType font of `size` px from `path`, or Pillow's default (Aileron) when path is None."""
    if path is None:
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError, AttributeError):  # Pillow without FreeType
            return ImageFont.load_default()
    try:
        return ImageFont.truetype(str(path), size)
    except OSError as e:
        raise MinidiffError(f"cannot read the font {path}: {e} (expected a .ttf or .otf file)") from None


def wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` px; explicit newlines kept; a word longer than a line stands alone."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def text_size(draw, lines, font, spacing) -> tuple[int, int]:
    """(width, height) in px of lines drawn `spacing` px apart."""
    box = draw.multiline_textbbox((0, 0), "\n".join(lines), font=font, spacing=spacing, align="center")
    return box[2] - box[0], box[3] - box[1]


@dataclass
class Fitted:
    lines: list
    font: object
    spacing: int
    size: tuple  # (w, h) px


def fit(draw, text: str, width: int, height: int, font_path=None, max_size=40, min_size=8) -> Fitted:
    """The largest font size whose wrapped text fits width x height (the smallest size if none does)."""

    def attempt(size):
        font, spacing = load_font(font_path, size), max(1, size // 5)
        lines = wrap(draw, text, font, width)
        return Fitted(lines, font, spacing, text_size(draw, lines, font, spacing))

    lo, hi, best = min_size, max_size, None
    while lo <= hi:
        mid = (lo + hi) // 2
        f = attempt(mid)
        if f.size[0] <= width and f.size[1] <= height:
            best, lo = f, mid + 1
        else:
            hi = mid - 1
    return best or attempt(min_size)


def draw_text(draw, f: Fitted, center: tuple[float, float]):
    """The fitted lines centred on `center`."""
    x0, y0, x1, y1 = draw.multiline_textbbox((0, 0), "\n".join(f.lines), font=f.font, spacing=f.spacing, align="center")
    xy = (center[0] - (x0 + x1) / 2, center[1] - (y0 + y1) / 2)
    draw.multiline_text(xy, "\n".join(f.lines), fill=INK, font=f.font, spacing=f.spacing, align="center")


# ---------------------------------------------------------------------------------------------- the text kinds
def caption(draw, box, text, at="top-left", font_path=None, line=2, max_size=28):
    """A yellow rectangle in a corner of the panel box (x0, y0, x1, y1), at most half its width."""
    x0, y0, x1, y1 = box
    pad = max(4, (x1 - x0) // 40)
    f = fit(draw, text, (x1 - x0) // 2 - 2 * pad, (y1 - y0) // 3 - 2 * pad, font_path, max_size)
    w, h = f.size[0] + 2 * pad, f.size[1] + 2 * pad
    left = x0 + line if "left" in at else x1 - line - w if "right" in at else (x0 + x1 - w) // 2
    top = y0 + line if "top" in at else y1 - line - h
    draw.rectangle((left, top, left + w, top + h), fill=CAPTION, outline=INK, width=line)
    draw_text(draw, f, (left + w / 2, top + h / 2))


def narration(draw, box, text, at="bottom", font_path=None, line=2, max_size=28):
    """A white band across the whole width of the panel box, at its top or bottom, as tall as the text needs
    (at most a quarter of the panel)."""
    x0, y0, x1, y1 = box
    pad = max(4, (x1 - x0) // 50)
    f = fit(draw, text, x1 - x0 - 4 * pad, (y1 - y0) // 4 - 2 * pad, font_path, max_size)
    h = f.size[1] + 2 * pad
    top = y0 if at == "top" else y1 - h
    draw.rectangle((x0, top, x1, top + h), fill=PAPER, outline=INK, width=line)
    draw_text(draw, f, ((x0 + x1) / 2, top + h / 2))


def _ellipse_point(cx, cy, rx, ry, angle):
    return cx + rx * math.cos(angle), cy + ry * math.sin(angle)


def bubble(draw, box, text, at=(0.5, 0.25), tail=None, width=0.55, thought=False, font_path=None, line=2, max_size=28):
    """A speech bubble (ellipse + a wedge tail ending at `tail`) or a thought bubble (ellipse + three shrinking
    circles towards `tail`), centred at `at` (moved inside the panel if it would cross it); positions are
    fractions of the panel box, `width` the bubble's largest width as a fraction of the panel's. The text is
    fitted to the rectangle inscribed in the ellipse (sides / sqrt 2)."""
    x0, y0, x1, y1 = box
    W, H = x1 - x0, y1 - y0
    cx, cy = x0 + at[0] * W, y0 + at[1] * H
    f = fit(draw, text, int(width * W / math.sqrt(2)), int(0.4 * H / math.sqrt(2)), font_path, max_size)
    rx = max(f.size[0] / math.sqrt(2), f.size[1]) + 6
    ry = max(f.size[1] / math.sqrt(2) + 6, rx / 3)
    edge = line + 2 + (0.28 * min(rx, ry) + 3 if thought else 0)  # keep the whole bubble inside the panel
    cx = min(max(cx, x0 + rx + edge), max(x1 - rx - edge, x0 + rx + edge))
    cy = min(max(cy, y0 + ry + edge), max(y1 - ry - edge, y0 + ry + edge))
    if tail is not None:
        tx, ty = x0 + tail[0] * W, y0 + tail[1] * H
        angle = math.atan2((ty - cy) / ry, (tx - cx) / rx)  # where the tail leaves the ellipse
        if thought:
            for k, r in enumerate((0.16, 0.1, 0.06)):
                bx, by = _ellipse_point(cx, cy, rx, ry, angle)
                s = 0.35 + 0.25 * k
                px, py = bx + (tx - bx) * s, by + (ty - by) * s
                rr = r * ry + 2
                draw.ellipse((px - rr, py - rr, px + rr, py + rr), fill=PAPER, outline=INK, width=line)
        else:
            a = _ellipse_point(cx, cy, rx, ry, angle - 0.25)
            b = _ellipse_point(cx, cy, rx, ry, angle + 0.25)
            draw.polygon([a, (tx, ty), b], fill=PAPER, outline=INK, width=line)
    if thought:  # a cloud: bumps around the ellipse, then the ellipse over their inner halves
        for k in range(12):
            px, py = _ellipse_point(cx, cy, rx, ry, 2 * math.pi * k / 12)
            rr = 0.28 * min(rx, ry) + 3
            draw.ellipse((px - rr, py - rr, px + rr, py + rr), fill=PAPER, outline=INK, width=line)
    draw.ellipse(
        (cx - rx, cy - ry, cx + rx, cy + ry), fill=PAPER, outline=None if thought else INK, width=0 if thought else line
    )
    if not thought and tail is not None:  # cover the tail's base inside the ellipse
        draw.polygon(
            [
                _ellipse_point(cx, cy, rx - line, ry - line, angle - 0.22),
                _ellipse_point(cx, cy, rx - line, ry - line, angle + 0.22),
                (cx, cy),
            ],
            fill=PAPER,
        )
    draw_text(draw, f, (cx, cy))


def letter(draw, box, texts, font_path=None, line=2):
    """Draw every text of a panel (dicts with kind caption / narration / speech / thought) into its box."""
    for t in texts:
        kind = t["kind"]
        if kind == "caption":
            caption(draw, box, t["text"], t.get("at", "top-left"), font_path, line)
        elif kind == "narration":
            narration(draw, box, t["text"], t.get("at", "bottom"), font_path, line)
        else:
            bubble(
                draw,
                box,
                t["text"],
                tuple(t.get("at", (0.5, 0.2))),
                t.get("tail"),
                t.get("width", 0.55),
                kind == "thought",
                font_path,
                line,
            )
