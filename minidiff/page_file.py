"""A comic page file (JSON) read into a Page of Panels, every mistake a one-line error naming the panel and field.

The page composer (comic.py) draws what it describes:

    python sample.py --page examples/page.json                 every panel, then page.png and strip.png
    python sample.py --page examples/page.json --panel 3       only panel 3 (+ any panel whose PNG is missing)

A page file (every field but "rows" and each panel's "prompt" optional; sizes in pixels, positions as fractions
of the panel):

    {"size": [1024, 1400], "margin": 32, "gutter": 18, "border": 3, "title": "...", "font": null,
     "resample": "auto",                                   nearest when a panel is upscaled >= 3x, else lanczos
     "defaults": {"steps": 20, "cfg": 5.0, "seed": 0, "size": [32, 32], "negative": "", "sampler": null,
                  "loras": [{"file": "runs/finetune/lora.safetensors", "scale": 1.0, "optional": true}]},
     "rows": [{"height": 1.0, "panels": [
        {"width": 2, "prompt": "a picture of (sks girl:1.2) walking", "seed": 4, "size": [48, 32],
         "texts": [{"kind": "narration", "text": "One morning...", "at": "top"},
                   {"kind": "speech", "text": "Hi!", "at": [0.3, 0.2], "tail": [0.45, 0.6]},
                   {"kind": "thought", "text": "...", "at": [0.7, 0.2], "tail": [0.6, 0.5]},
                   {"kind": "caption", "text": "Later", "at": "top-left"}]},
        {"prompt": "...", "init": {"panel": 1}, "strength": 0.6},                  img2img of panel 1
        {"prompt": "...", "init": {"panel": 1}, "mask": "mask.png", "mask_blur": 2},      inpainting (white = repaint)
        {"prompt": "...", "init": {"panel": 2}, "outpaint": [16, 0, 16, 0]},         outpainting (grow, then fill)
        {"prompt": "...", "control": "pose.png:scribble:0.9"}]}]}          pose from a sketch (a ControlNet)

A panel takes prompt, prompt_2, negative, seed, size, steps, cfg, sampler, loras, init (an image file or
{"panel": k}, an earlier panel), strength, mask, mask_blur, only_masked, outpaint, control, controlnet, texts.
"control" is sample.py --control's IMAGE[:TYPE[:SCALE]] (TYPE canny, scribble or image; or a list of them) on a
text-to-image or img2img panel; "controlnet" a ControlNet folder or file (or a list: one per control), else
sample.py's --controlnet, else the bundled miniature's tiny ControlNet when that is the model. Unset fields come from
"defaults", then from the model (its native size, its sampler); the seed defaults to defaults.seed + panel number - 1.
Relative paths are read against the page file's folder, then the current folder. A LoRA marked "optional" that
is missing is skipped with a one-line note (the example page works before `python finetune.py` has run).

Writes panel-NN.png (the generated image, its settings in the PNG metadata), page.png and strip.png (the panels
one under the other at the page's content width, for scrolling). Panels are numbered from 1 in reading order.
Bad page files stop before anything loads with one line naming the panel and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MinidiffError
from .lettering import load_font

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")
PANEL_KEYS = {
    "width",
    "prompt",
    "prompt_2",
    "negative",
    "seed",
    "size",
    "steps",
    "cfg",
    "sampler",
    "loras",
    "init",
    "strength",
    "mask",
    "mask_blur",
    "only_masked",
    "outpaint",
    "control",
    "controlnet",
    "texts",
}
PAGE_KEYS = {"size", "margin", "gutter", "border", "title", "font", "resample", "defaults", "rows"}
TEXT_KINDS = ("caption", "narration", "speech", "thought")


@dataclass
class Panel:
    number: int
    prompt: str
    seed: int
    steps: int = 30
    cfg: float = 5.0
    negative: str = ""
    prompt_2: str | None = None
    sampler: str | None = None
    size: tuple | None = None  # (width, height) of the generated image
    loras: list = field(default_factory=list)  # [(path, scale)]
    init: object = None  # Path, or int (an earlier panel)
    strength: float = 1.0
    mask: Path | None = None
    mask_blur: float = 4.0
    only_masked: bool = False
    outpaint: tuple | None = None  # (left, top, right, bottom) pixels to grow the init image by
    controls: list = field(default_factory=list)  # [(image Path, type, scale)]
    controlnets: list = field(default_factory=list)  # [Path]: one for all controls, or one per control
    texts: list = field(default_factory=list)
    width: float = 1.0  # relative width in its row


@dataclass
class Page:
    rows: list  # [(relative height, [Panel])]
    size: tuple = (1024, 1400)
    margin: int = 32
    gutter: int = 18
    border: int = 3
    title: str | None = None
    font: Path | None = None
    resample: str = "auto"
    source: Path | None = None

    @property
    def panels(self) -> list:
        return [p for _, row in self.rows for p in row]


# ------------------------------------------------------------------------------------------------ reading a page
def _fail(where, message):
    raise MinidiffError(f"{where}: {message}")


def _path(value, base: Path, where, key):
    if not isinstance(value, str) or not value:
        _fail(where, f"'{key}' must be a file path, got {value!r}")
    for p in (base / value, Path(value)):
        if p.is_file():
            return p
    return None


def _number(d, key, where, kind=float, lo=None, hi=None, lo_open=False, default=None):
    if key not in d:
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        _fail(where, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    if bad_lo or (hi is not None and v > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        _fail(where, f"'{key}' must be in {interval}, got {v!r}")
    return kind(v)


def _loras(value, base, where, notes):
    if not isinstance(value, list):
        _fail(where, f'\'loras\' must be a list of {{"file": PATH, "scale": S}} or "PATH:SCALE", got {value!r}')
    out = []
    for item in value:
        if isinstance(item, str):
            path, sep, scale = item.rpartition(":")
            item = (
                {"file": path, "scale": float(scale)}
                if sep and path and scale.replace(".", "", 1).isdigit()
                else {"file": item}
            )
        if not isinstance(item, dict) or "file" not in item:
            _fail(where, f"each of 'loras' needs a 'file', got {item!r}")
        scale = _number(item, "scale", where + " lora", default=1.0)
        path = _path(item["file"], base, where, "loras")
        if path is None and item.get("optional"):
            notes.add(f"note: optional LoRA {item['file']} not found: drawn without it (python finetune.py makes it)")
        elif path is None:
            _fail(where, f"LoRA file {item['file']} not found")
        else:
            out.append((path, scale))
    return out


def _texts(value, where):
    if not isinstance(value, list):
        _fail(where, f"'texts' must be a list, got {value!r}")
    for i, t in enumerate(value, 1):
        w = f"{where} text {i}"
        if not isinstance(t, dict) or t.get("kind") not in TEXT_KINDS:
            got = t.get("kind") if isinstance(t, dict) else t
            _fail(w, f"'kind' must be one of {', '.join(TEXT_KINDS)}, got {got!r}")
        if not isinstance(t.get("text"), str) or not t["text"].strip():
            _fail(w, f"'text' must be a non-empty string, got {t.get('text')!r}")
        places = {
            "caption": ("top-left", "top-right", "bottom-left", "bottom-right", "top", "bottom"),
            "narration": ("top", "bottom"),
        }.get(t["kind"])
        if places and t.get("at", places[0]) not in places:
            _fail(w, f"'at' of a {t['kind']} must be one of {', '.join(places)}, got {t['at']!r}")
        for key in ("at", "tail"):
            if key in t and t["kind"] in ("speech", "thought"):
                v = t[key]
                if not (
                    isinstance(v, list) and len(v) == 2 and all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in v)
                ):
                    _fail(w, f"'{key}' must be [x, y] with fractions of the panel in [0, 1], got {v!r}")
    return value


def _panel(d: dict, defaults: dict, number: int, base: Path, notes: set) -> Panel:
    where = f"panel {number}"
    if not isinstance(d, dict):
        _fail(where, f"expected an object with at least a 'prompt', got {d!r}")
    unknown = sorted(set(d) - PANEL_KEYS)
    if unknown:
        _fail(where, f"unknown field '{unknown[0]}' (expected some of {', '.join(sorted(PANEL_KEYS))})")
    own_seed = "seed" in d
    d = {**defaults, **d}
    if not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
        _fail(where, f"'prompt' must be a non-empty string, got {d.get('prompt')!r}")
    for key in ("negative", "prompt_2"):
        if key in d and not isinstance(d[key], str):
            _fail(where, f"'{key}' must be a string, got {d[key]!r}")
    p = Panel(
        number=number,
        prompt=d["prompt"],
        negative=d.get("negative", ""),
        prompt_2=d.get("prompt_2"),
        seed=_number(d, "seed", where, int)
        if own_seed
        else _number(defaults, "seed", "defaults", int, default=0) + number - 1,
        steps=_number(d, "steps", where, int, lo=1, default=30),
        cfg=_number(d, "cfg", where, lo=0, default=5.0),
        width=_number(d, "width", where, lo=0, lo_open=True, default=1.0),
        mask_blur=_number(d, "mask_blur", where, lo=0, default=4.0),
        only_masked=bool(d.get("only_masked")),
    )
    if d.get("sampler") is not None:
        if d["sampler"] not in SAMPLERS:
            _fail(where, f"'sampler' must be one of {', '.join(SAMPLERS)}, got {d['sampler']!r}")
        p.sampler = d["sampler"]
    if d.get("size") is not None:
        s = d["size"]
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 and v % 8 == 0 for v in s)):
            _fail(where, f"'size' must be [width, height], positive multiples of 8, got {s!r}")
        p.size = tuple(s)
    p.loras = _loras(d.get("loras", []), base, where, notes)
    p.texts = _texts(d.get("texts", []), where)
    if "init" in d:
        init = d["init"]
        if isinstance(init, dict) and set(init) == {"panel"}:
            k = init["panel"]
            if not isinstance(k, int) or not 1 <= k < number:
                _fail(where, f"'init' {{\"panel\": k}} must name an earlier panel (1..{number - 1}), got {k!r}")
            p.init = k
        else:
            p.init = _path(init, base, where, "init") or _fail(where, f"'init' image {init} not found")
    p.strength = _number(d, "strength", where, lo=0, hi=1, lo_open=True, default=1.0)
    if "strength" in d and p.init is None:
        _fail(where, "'strength' needs an 'init' image (or {\"panel\": k}) to start from")
    if "outpaint" in d:
        g = d["outpaint"]
        if not (isinstance(g, list) and len(g) == 4 and all(isinstance(v, int) and v >= 0 for v in g) and any(g)):
            _fail(where, f"'outpaint' must be [left, top, right, bottom] pixels >= 0 to grow by, got {g!r}")
        if p.init is None or "mask" in d:
            _fail(
                where,
                "'outpaint' needs an 'init' image (or {\"panel\": k}) and no 'mask' (the grown border is "
                "the mask; the grown image sets the size)",
            )
        p.outpaint = tuple(g)
    if "mask" in d:
        if p.init is None:
            _fail(where, "'mask' needs an 'init' image (or {\"panel\": k}) to repaint")
        p.mask = _path(d["mask"], base, where, "mask") or _fail(where, f"'mask' image {d['mask']} not found")
    p.controls, p.controlnets = _controls(d, base, where)
    if p.controls and (p.mask is not None or p.outpaint is not None):
        _fail(where, "'control' steers text-to-image and img2img panels, not 'mask' or 'outpaint' ones")
    return p


def _strings(d: dict, key: str, where, expected: str) -> list:
    """A field that holds one non-empty string or a list of them, as a list ([] when absent)."""
    value = d.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        _fail(where, f"'{key}' must be {expected}, got {d[key]!r}")
    return value


def _controls(d: dict, base: Path, where) -> tuple[list, list]:
    """([(image, type, scale)], [ControlNet path]) of a panel's "control" and "controlnet" fields."""
    from .control_images import KINDS, parse_control

    specs = _strings(d, "control", where, f'"IMAGE[:TYPE[:SCALE]]" (TYPE one of {", ".join(KINDS)}) or a list of them')
    controls = []
    for spec in specs:
        try:
            path, kind, scale = parse_control(spec)
        except MinidiffError as e:
            _fail(where, str(e))
        found = _path(path, base, where, "control") or _fail(
            where, f"'control' image {path} not found (expected IMAGE[:TYPE[:SCALE]], TYPE one of {', '.join(KINDS)})"
        )
        controls.append((found, kind, scale))
    nets = _strings(d, "controlnet", where, "a ControlNet folder or file path (or a list of them)")
    found_nets = []
    for n in nets:
        hit = next((c for c in (base / n, Path(n)) if c.exists()), None)
        found_nets.append(hit or _fail(where, f"'controlnet' {n} not found"))
    if found_nets and len(found_nets) not in (1, len(controls)):
        _fail(
            where,
            f"{len(controls)} 'control' images but {len(found_nets)} 'controlnet': give one ControlNet for "
            "all, or one per control image",
        )
    return controls, found_nets


def read_page(path) -> tuple[Page, list]:
    """(Page, notes) from a page file; MinidiffError naming the panel and field for anything wrong."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MinidiffError(f"cannot read the page file {path}: {e.strerror}") from None
    except ValueError as e:
        raise MinidiffError(f"{path} is not valid JSON: {e}") from None
    where = f"page {path.name}"
    if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or not d["rows"]:
        _fail(where, "expected an object with a non-empty 'rows' list")
    unknown = sorted(set(d) - PAGE_KEYS)
    if unknown:
        _fail(where, f"unknown field '{unknown[0]}' (expected some of {', '.join(sorted(PAGE_KEYS))})")
    defaults = d.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - PANEL_KEYS:
        _fail(where, f"'defaults' must be an object of panel fields, got {defaults!r}")
    base, notes, rows, n = path.parent, set(), [], 0
    for r, row in enumerate(d["rows"], 1):
        if not isinstance(row, dict) or not isinstance(row.get("panels"), list) or not row["panels"]:
            _fail(f"row {r}", "expected an object with a non-empty 'panels' list")
        panels = []
        for spec in row["panels"]:
            n += 1
            panels.append(_panel(spec, defaults, n, base, notes))
        rows.append((_number(row, "height", f"row {r}", lo=0, lo_open=True, default=1.0), panels))
    s = d.get("size", [1024, 1400])
    if not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v >= 64 for v in s)):
        _fail(where, f"'size' must be [width, height] in pixels (>= 64), got {s!r}")
    if d.get("resample", "auto") not in ("auto", "nearest", "lanczos"):
        _fail(where, f"'resample' must be auto, nearest or lanczos, got {d['resample']!r}")
    font = None
    if d.get("font") is not None:
        font = _path(d["font"], base, where, "font") or _fail(where, f"font file {d['font']} not found")
        load_font(font, 12)  # readable?
    page = Page(
        rows=rows,
        size=tuple(s),
        margin=_number(d, "margin", where, int, lo=0, default=32),
        gutter=_number(d, "gutter", where, int, lo=0, default=18),
        border=_number(d, "border", where, int, lo=0, default=3),
        title=d.get("title"),
        font=font,
        resample=d.get("resample", "auto"),
        source=path,
    )
    return page, sorted(notes)
