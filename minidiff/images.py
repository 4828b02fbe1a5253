"""Tensors <-> PIL, sample grids, PNGs that carry their settings, and loss curves drawn with PIL only.

Images inside minidiff are float tensors in [-1, 1]; this file and `data.py` are the only places that touch PIL.
A pixel value v in [0, 255] and a tensor value x in [-1, 1] are related by

    x = v / 127.5 - 1          v = round((x + 1) * 127.5)   (x clamped to [-1, 1] first)

PNGs people look at carry the prompt, seed and settings as PNG text chunks (`save_png(..., metadata)`), each value
JSON-encoded, so `read_png_metadata` gives back the same dict. Every write is atomic (write `path.tmp`, then
`os.replace`), so an interrupted run never leaves a half-written file where a good one was.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from . import io
from .errors import DataError

WHITE = (255, 255, 255)


# ----------------------------------------------------------------------------------------------- tensors <-> PIL
def to_pil(x):
    """[C, H, W] (or [1, C, H, W]) float in [-1, 1], C = 1 or 3 -> PIL image (L or RGB). Values are clamped."""
    x = x.detach()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"to_pil expects a [C,H,W] tensor with C = 1 or 3, got shape {tuple(x.shape)}")
    v = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if v.shape[0] == 1:
        return Image.fromarray(v[0].numpy())  # uint8 [H, W] -> mode L
    return Image.fromarray(v.permute(1, 2, 0).contiguous().numpy())  # uint8 [H, W, 3] -> mode RGB


def from_pil(img):
    """PIL image -> [3, H, W] float32 in [-1, 1] (converted to RGB first)."""
    a = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1


def make_grid(x, nrow=None, pad=2):
    """[N, C, H, W] in [-1, 1] -> one PIL image, `nrow` images per row (default: about square), white gaps.

    torchvision.utils.make_grid: `pad` pixels between cells and around the border, so the grid is
    (ncol * (W + pad) + pad) wide and (nrows * (H + pad) + pad) high, with ncol = min(nrow, N). (torchvision returns
    a single image unpadded; it gets the same white border here, so every grid looks alike.)
    """
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"make_grid expects a non-empty [N,C,H,W] tensor, got shape {tuple(x.shape)}")
    x, nrow = x.detach().float().cpu(), nrow or math.ceil(math.sqrt(x.shape[0]))
    if x.shape[0] == 1:
        return to_pil(F.pad(x[0], (pad, pad, pad, pad), value=1.0))
    return to_pil(torchvision.utils.make_grid(x, nrow=nrow, padding=pad, pad_value=1.0))


def labelled_grid(x, rows, cols=None, scale=4, pad=2):
    """A grid people can read: len(rows) rows of [N / len(rows)] images each, upscaled `scale` x with nearest
    neighbour (a 32 px sample stays sharp), each row labelled on the left, each column (optional) on top."""
    from PIL import Image, ImageDraw

    grid = make_grid(x, nrow=x.shape[0] // len(rows), pad=pad)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 8 + max(probe.textbbox((0, 0), r, font=font)[2] for r in rows)
    top = 22 if cols else 0
    sheet = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    sheet.paste(grid, (left, top))
    d = ImageDraw.Draw(sheet)
    cell_h, cell_w = (grid.height - pad * scale) / len(rows), (grid.width - pad * scale) / max(1, len(cols or [0]))
    for i, r in enumerate(rows):
        _text(d, (4, top + pad * scale + (i + 0.5) * cell_h), r, font, "lm")
    for j, c in enumerate(cols or []):
        _text(d, (left + pad * scale + (j + 0.5) * cell_w, 11), c, font, "mm")
    return sheet


# ----------------------------------------------------------------------------------------------- PNG files
def save_png(img, path, metadata=None):
    """Write `img` (PIL, or a [C,H,W] / [N,C,H,W] tensor in [-1, 1]) as a PNG with `metadata` in text chunks.

    Every value is JSON-encoded (ASCII, so it fits a tEXt chunk); `read_png_metadata` decodes it back. Atomic.
    """
    if isinstance(img, torch.Tensor):
        img = make_grid(img) if img.dim() == 4 and img.shape[0] > 1 else to_pil(img)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), json.dumps(value, ensure_ascii=True, default=str))
    io.save_image(img, path, pnginfo=info)
    return Path(path)


def read_png_metadata(path):
    """The text chunks of a PNG as a dict; JSON values are decoded, anything else (other tools' PNGs) stays a str."""
    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read PNG metadata from {path}: {e}") from None
    out = {}
    for key, value in text.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- loss curves
COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]  # the usual "tab10" colours


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, AttributeError):
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()  # small bitmap font: still readable


def _text(d, xy, s, font, anchor="la", fill=(0, 0, 0)):
    """Draw text aligned like PIL's anchor ("l"/"m"/"r" then "t"/"m"/"b"), which bitmap fonts lack."""
    x0, y0, x1, y1 = d.textbbox((0, 0), s, font=font)
    x = xy[0] - {"l": x0, "m": (x0 + x1) / 2, "r": x1}[anchor[0]]
    y = xy[1] - {"t": y0, "m": (y0 + y1) / 2, "b": y1, "a": 0}[anchor[1]]
    d.text((x, y), s, fill=fill, font=font)


def _nice_ticks(lo, hi, n=6):
    """About n round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)], step


def _fmt(v, step=None):
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    if step is not None and step >= 1 and float(v).is_integer():
        return f"{int(v)}"
    digits = max(0, -math.floor(math.log10(step))) if step else 3
    return f"{v:.{min(digits, 4)}f}"


def _smooth(ys, window):
    """Centered moving average, to draw a readable trend over noisy per-step losses."""
    if window <= 1 or len(ys) < 3:
        return ys
    a = np.asarray(ys, dtype=np.float64)
    k = np.ones(window) / window
    pad = window // 2
    padded = np.concatenate([np.full(pad, a[0]), a, np.full(window - 1 - pad, a[-1])])
    return list(np.convolve(padded, k, mode="valid"))


def plot_curves(series, path, title="", log_y=None, xlabel="step", ylabel="", size=(900, 520), smooth="auto"):
    """Line plot of several series {name: [(step, value), ...]} written as a PNG (PIL only, no matplotlib).

    log_y: True / False, or None = log scale when every value is > 0 and they span more than 30x.
    smooth: window of a moving average drawn bold over the faint raw curve ("auto": ~1/40 of the points when a
    series has more than 100 points, 0 = raw only). NaN / inf points are left out. Returns the path.
    """
    clean = {}
    for name, pts in series.items():
        pts = [(float(s), float(v)) for s, v in pts if math.isfinite(float(v))]
        if pts:
            clean[name] = sorted(pts)
    all_y = [v for pts in clean.values() for _, v in pts]
    if log_y is None:
        log_y = bool(all_y) and min(all_y) > 0 and max(all_y) / min(all_y) > 30
    if log_y and all_y and min(all_y) <= 0:
        log_y = False  # log of a non-positive value: fall back to linear rather than dropping points

    W, H = size
    left, right, top, bottom = 80, 20, 40 if title else 20, 55
    img = Image.new("RGB", size, WHITE)
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    if title:
        _text(d, (W // 2, 10), title, _font(16), "mt")
    x0, y0, x1, y1 = left, top, W - right, H - bottom
    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    if not all_y:
        _text(d, ((x0 + x1) // 2, (y0 + y1) // 2), "no data yet", font, "mm", fill=(120, 120, 120))
        io.save_image(img, path)
        return Path(path)

    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [s for pts in clean.values() for s, _ in pts]
    xlo, xhi = min(xs), max(xs)
    xticks, xstep = _nice_ticks(xlo, xhi)
    xlo, xhi = min(xlo, xticks[0]), max(xhi, xticks[-1])
    ylo, yhi = fy(min(all_y)), fy(max(all_y))
    if log_y:
        ylo, yhi = math.floor(ylo * 2) / 2, math.ceil(yhi * 2) / 2  # half decades
        if yhi <= ylo:
            yhi = ylo + 0.5
        decades = range(math.floor(ylo), math.ceil(yhi) + 1)
        mults = (1, 2, 5) if yhi - ylo <= 3 else (1,)
        yticks = [math.log10(m * 10.0**e) for e in decades for m in mults if ylo <= math.log10(m * 10.0**e) <= yhi]
        ylabels = [f"{10**t:.3g}" for t in yticks]
    else:
        yticks, ystep = _nice_ticks(ylo, yhi)
        ylo, yhi = min(ylo, yticks[0]), max(yhi, yticks[-1])
        ylabels = [_fmt(t, ystep) for t in yticks]

    def px(s):
        return x0 + (s - xlo) / ((xhi - xlo) or 1) * (x1 - x0)

    def py(v):
        return y1 - (fy(v) - ylo) / ((yhi - ylo) or 1) * (y1 - y0)

    for t in xticks:  # grid lines, ticks and numbers
        X = px(t)
        d.line([X, y0, X, y1], fill=(232, 232, 232))
        d.line([X, y1, X, y1 + 5], fill=(0, 0, 0))
        _text(d, (X, y1 + 8), _fmt(t, xstep), small, "mt")
    for t, lab in zip(yticks, ylabels):
        Y = y1 - (t - ylo) / ((yhi - ylo) or 1) * (y1 - y0)
        d.line([x0, Y, x1, Y], fill=(232, 232, 232))
        d.line([x0 - 5, Y, x0, Y], fill=(0, 0, 0))
        _text(d, (x0 - 8, Y), lab, small, "rm")
    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    _text(d, ((x0 + x1) // 2, H - 18), xlabel + ("        (y: log scale)" if log_y else ""), font, "mm")
    if ylabel:
        lab = Image.new("RGB", (H, 20), WHITE)
        _text(ImageDraw.Draw(lab), (H // 2, 10), ylabel, font, "mm")
        img.paste(lab.rotate(90, expand=True), (4, 0))

    for i, (name, pts) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        steps, vals = [s for s, _ in pts], [v for _, v in pts]
        window = (max(1, len(pts) // 40) if len(pts) > 100 else 1) if smooth == "auto" else int(smooth or 1)
        if window > 1:
            faint = tuple(int(c + (255 - c) * 0.7) for c in color)
            d.line([(px(s), py(v)) for s, v in pts], fill=faint, width=1)
            vals = _smooth(vals, window)
        line = [(px(s), py(v)) for s, v in zip(steps, vals)]
        if len(line) == 1:
            X, Y = line[0]
            d.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=color)
        else:
            d.line(line, fill=color, width=2, joint="curve")

    names = list(clean)  # legend, top right
    lw = max(d.textlength(n, font=font) for n in names) + 40
    lx, ly = x1 - lw - 10, y0 + 10
    d.rectangle([lx, ly, x1 - 10, ly + 20 * len(names) + 6], fill=WHITE, outline=(160, 160, 160))
    for i, name in enumerate(names):
        yy = ly + 13 + 20 * i
        d.line([lx + 6, yy, lx + 28, yy], fill=COLORS[i % len(COLORS)], width=3)
        _text(d, (lx + 34, yy), name, font, "lm")
    io.save_image(img, path)
    return Path(path)


def square(x: torch.Tensor, size: int, fill: float = 1.0) -> torch.Tensor:
    """[N,C,H,W] -> [N,C,size,size]: pad the short side with `fill` (white: 1.0 in [-1,1] or in [0,1]) so nothing
    is cut, then an antialiased bilinear resize. The tensor twin of data.fit_square(fit="pad")."""
    h, w = x.shape[-2:]
    if h != w:
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top), value=fill)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _wrap(d, s, font, width):
    """Greedy word wrap of `s` into lines no wider than `width` pixels."""
    lines, line = [], ""
    for word in s.split():
        trial = f"{line} {word}".strip()
        if line and d.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def grouped_grid(rows, columns, path, metadata=None, cell=128):
    """A sweep sheet (labelled_grid with column groups): rows [(label, images [K, 3, H, W] in [-1, 1])], each image
    upscaled (nearest) to `cell` px wide; the row label on the left; `columns` [(header, [sub-labels])] on top, each
    header over its sub-columns (e.g. a prompt over its seeds). Written with save_png (metadata in the PNG). Returns
    the path."""
    k = sum(len(subs) for _, subs in columns)
    h, w = rows[0][1].shape[-2:]
    cw, ch = cell, round(cell * h / w)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font, small = _font(14), _font(12)
    left = int(max(probe.textlength(label, font=font) for label, _ in rows)) + 16
    head_lines = max(len(_wrap(probe, head, small, cw * len(subs) - 6)) for head, subs in columns)
    top = 16 * head_lines + 24
    sheet = Image.new("RGB", (left + k * (cw + 2) + 2, top + len(rows) * (ch + 2) + 2), WHITE)
    d = ImageDraw.Draw(sheet)
    x = left + 2
    for head, subs in columns:
        span = len(subs) * (cw + 2)
        for i, line in enumerate(_wrap(d, head, small, span - 6)):
            _text(d, (x + span // 2, 4 + 16 * i), line, small, "mt")
        for j, sub in enumerate(subs):
            _text(d, (x + j * (cw + 2) + cw // 2, top - 6), str(sub), small, "mb", fill=(90, 90, 90))
        d.line([x - 1, 2, x - 1, sheet.height], fill=(200, 200, 200))
        x += span
    for r, (label, images) in enumerate(rows):
        y = top + r * (ch + 2) + 2
        _text(d, (8, y + ch // 2), label, font, "lm")
        for j, img in enumerate(images[:k]):
            sheet.paste(to_pil(img).resize((cw, ch), Image.Resampling.NEAREST), (left + 2 + j * (cw + 2), y))
    return save_png(sheet, path, metadata or {})
