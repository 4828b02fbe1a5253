"""The miniature's pretraining world: many individuals per class word, made by recolouring the Kenney bodies.

DreamBooth needs a class that is a distribution ("a picture of a girl" = many girls) for the identifier to specialise.
The Kenney set has one drawing per character, so the world recolours four of the bodies region by region:

    body               class word   regions recoloured            individuals (looks)
    female_person      girl         hair, skin, shirt, trousers   5 x 3 x 6 x 6 = 540, minus 72 close to the target
    male_person        man          hair, skin, shirt, trousers   5 x 3 x 7 x 6 = 630   ("shirt" = his vest)
    zombie             zombie       skin, shirt, trousers         3 x 7 x 6     = 126
    robot              robot        metal                         6

Left out on purpose: female_adventurer (the DreamBooth target, a "girl") and male_adventurer (the second character
the model never sees, a "man"). Girls never wear a blue shirt and never have brown or red hair with pale skin: that
is the target's look (brown hair, pale skin, blue shirt), so nothing close to her is in the world.

A look is one named colour per region (`COLOURS`), and the caption names it:

    a picture of a <class>[ with <hair> hair][ and][ <skin> skin][ in a <shirt> shirt][ and <trousers> trousers]
        [ <action>][ seen from the <view>]          e.g. "a picture of a girl with blonde hair and pale skin in a red
                                                     shirt and grey trousers walking seen from the side"

Recolouring (`planes`): every opaque pixel of a body is given to the region of its nearest key colour (`KEYS`, the
drawing's own palette; pixels nearest a `None` key keep their colour: eyes, outlines, shoes). With l(c) the
luminance 0.299 R + 0.587 G + 0.114 B and c_r the region's main key colour, a pixel p of region r becomes

    p' = new_r * l(p) / l(c_r)                      (the drawing's shading, carried over to the new colour)

The image at size S is linear in the region colours, so it is precomputed once per (body, pose) as planes and the
individuals are composed on the fly: x = F + sum_r P_r * new_r, F = the fixed pixels and the white canvas
(premultiplied by alpha), P_r = alpha * [pixel in r] * l(p) / l(c_r), each plane padded to a square and resized to
S x S with PIL's LANCZOS filter (the filter `data.fit_square` uses for the real drawings).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import torch

from .. import data

CLASS_WORD = {
    "female_person": "girl",
    "male_person": "man",
    "zombie": "zombie",
    "robot": "robot",
    "female_adventurer": "girl",
    "male_adventurer": "man",
}
WORLD_BODIES = ("female_person", "male_person", "zombie", "robot")
SECOND_CHARACTER = "male_adventurer"  # never in pretraining: the "second character" DreamBooth check ("sks man")
REGIONS = {
    "female_person": ("hair", "skin", "shirt", "trousers"),
    "male_person": ("hair", "skin", "shirt", "trousers"),
    "zombie": ("skin", "shirt", "trousers"),
    "robot": ("metal",),
}

# key colours of each drawing (its own palette, RGB) -> region (None: keep the pixel's colour); the first key of a
# region is its main colour c_r
KEYS = {
    "female_person": [
        ((60, 62, 65), "hair"),
        ((73, 78, 85), "hair"),
        ((191, 121, 88), "skin"),
        ((163, 110, 85), "skin"),
        ((168, 96, 63), "skin"),
        ((149, 84, 53), "skin"),
        ((60, 189, 121), "shirt"),
        ((36, 167, 98), "shirt"),
        ((58, 152, 104), "shirt"),
        ((57, 120, 89), "shirt"),
        ((36, 138, 85), "shirt"),
        ((96, 98, 184), "trousers"),
        ((255, 255, 255), None),
        ((113, 162, 190), None),
        ((212, 212, 212), None),
        ((165, 183, 197), None),
        ((241, 241, 241), None),
        ((225, 153, 93), None),
        ((99, 137, 158), None),
        ((124, 90, 75), None),
        ((104, 75, 62), None),
        ((77, 96, 108), None),
    ],
    "male_person": [
        ((60, 62, 65), "hair"),
        ((72, 77, 84), "hair"),
        ((191, 121, 88), "skin"),
        ((158, 106, 82), "skin"),
        ((149, 84, 54), "skin"),
        ((238, 161, 96), "shirt"),
        ((206, 133, 70), "shirt"),
        ((218, 147, 88), "shirt"),
        ((182, 112, 63), "shirt"),
        ((98, 101, 189), "trousers"),
        ((69, 71, 155), "trousers"),
        ((85, 88, 172), "trousers"),
        ((255, 255, 255), None),
        ((222, 222, 222), None),
        ((226, 238, 247), None),
        ((178, 198, 213), None),
        ((158, 175, 189), None),
        ((191, 212, 229), None),
        ((206, 206, 208), None),
        ((125, 91, 76), None),
        ((108, 74, 59), None),
    ],
    "zombie": [
        ((61, 191, 158), "skin"),
        ((41, 166, 134), "skin"),
        ((36, 146, 118), "skin"),
        ((60, 154, 151), "skin"),
        ((25, 126, 100), "skin"),
        ((57, 100, 92), "skin"),
        ((102, 105, 197), "shirt"),
        ((73, 75, 164), "shirt"),
        ((91, 93, 176), "shirt"),
        ((61, 63, 139), "shirt"),
        ((224, 151, 90), "trousers"),
        ((60, 62, 65), None),
        ((74, 79, 86), None),
        ((255, 204, 0), None),
        ((255, 255, 255), None),
    ],
    "robot": [
        ((83, 147, 197), "metal"),
        ((71, 124, 166), "metal"),
        ((63, 109, 147), "metal"),
        ((57, 95, 124), "metal"),
        ((50, 77, 98), "metal"),
        ((40, 61, 78), "metal"),
        ((164, 195, 221), "metal"),
        ((191, 212, 229), "metal"),
        ((163, 179, 192), "metal"),
        ((255, 204, 0), None),
        ((255, 102, 153), None),
        ((255, 255, 255), None),
        ((235, 93, 140), None),
    ],
}

COLOURS = {  # region -> colour name -> main colour (RGB); each drawing's own colours are among them
    "hair": {
        "black": (60, 62, 65),
        "brown": (150, 90, 55),
        "blonde": (236, 196, 88),
        "red": (205, 80, 45),
        "white": (222, 222, 222),
    },
    "skin": {"brown": (191, 121, 88), "tan": (226, 166, 122), "pale": (255, 215, 177)},
    "shirt": {
        "green": (60, 189, 121),
        "red": (222, 72, 72),
        "yellow": (240, 202, 60),
        "purple": (102, 105, 197),
        "orange": (238, 161, 96),
        "pink": (240, 130, 180),
        "blue": (80, 140, 215),
    },
    "trousers": {
        "purple": (96, 98, 184),
        "blue": (60, 96, 170),
        "black": (60, 62, 65),
        "brown": (150, 95, 60),
        "grey": (150, 150, 150),
        "orange": (224, 151, 90),
    },
    "metal": {
        "blue": (83, 147, 197),
        "red": (200, 80, 80),
        "green": (80, 170, 100),
        "gold": (220, 180, 60),
        "grey": (150, 155, 165),
        "purple": (140, 100, 200),
    },
}
ZOMBIE_SKIN = {"green": (61, 191, 158), "grey": (150, 160, 150), "blue": (100, 160, 210)}
ACTION = {"climb": "climbing", "fall": "falling", "idle": "standing", "jump": "jumping", "walk": "walking"}
VIEW = {"climb": "back", "fall": "front", "idle": "front", "jump": "front", "walk": "side"}


def palette(body: str, region: str) -> dict:
    """The named colours a region of a body can take."""
    if body == "zombie" and region == "skin":
        return ZOMBIE_SKIN
    colours = COLOURS[region]
    if region == "shirt" and body == "female_person":  # the target's blue shirt stays out of the girls
        colours = {k: v for k, v in colours.items() if k != "blue"}
    return colours


def allowed(body: str, look: dict) -> bool:
    """False for a girl close to the DreamBooth target's look (brown or red hair with pale skin)."""
    return not (body == "female_person" and look.get("hair") in ("brown", "red") and look.get("skin") == "pale")


def looks(body: str) -> list[dict]:
    """Every individual of a body: {region: colour name}, in a fixed order."""
    regions = REGIONS[body]
    combos = itertools.product(*(palette(body, r) for r in regions))
    return [look for look in (dict(zip(regions, c)) for c in combos) if allowed(body, look)]


def original_look(body: str) -> dict:
    """The Kenney drawing's own colours, named (the nearest named colour of each region's main key)."""
    main = {r: next(k for k, reg in KEYS[body] if reg == r) for r in REGIONS[body]}
    return {
        r: min(palette(body, r), key=lambda n: sum(abs(a - b) for a, b in zip(palette(body, r)[n], main[r])))
        for r in REGIONS[body]
    }


def family(pose: str) -> str:
    return pose.rstrip("0123456789")


def caption(body: str, look: dict, pose: str, parts=(True, True, True, True)) -> str:
    """The caption grammar of the module docstring; `parts` = (keep looks, keep action, keep view, all looks)."""
    keep_looks, keep_action, keep_view, _ = parts
    words = ["a picture of a", CLASS_WORD[body]]
    if keep_looks and look:
        withs = [f"{look[r]} {r}" for r in ("hair", "skin") if r in look]
        ins = [f"{look[r]} {r}" for r in ("shirt", "trousers", "metal") if r in look]
        if withs:
            words.append("with " + " and ".join(withs))
        if ins:
            words.append("in " + ("a " if "shirt" in look else "") + " and ".join(ins))
    if keep_action:
        words.append(ACTION[family(pose)])
    if keep_view:
        words += ["seen from the", VIEW[family(pose)]]
    return " ".join(words)


def random_caption(body: str, look: dict, pose: str, rng: random.Random, keep=0.6, name=None) -> str:
    """A caption with the looks, the action and the view each kept with probability `keep`; when looks are kept,
    each region's colour is kept with probability `keep` too (so "a girl with blonde hair" is in distribution).
    A named individual is "<name> <class>" instead of "a <class>" ("a picture of dax girl walking")."""
    part = [rng.random() < keep for _ in range(3)]
    some = {r: c for r, c in look.items() if rng.random() < keep} if part[0] else {}
    text = caption(body, some, pose, (part[0], part[1], part[2], True))
    return text.replace("a picture of a ", f"a picture of {name} ", 1) if name else text


# Named individuals: NAMES[i] is always the same individual (`named`), so pretraining teaches what DreamBooth asks
# for later: a rare word before the class word picks one member of the class. "sks" is not a name: it stays unseen.
NAMES = (
    "bix",
    "dax",
    "fen",
    "gub",
    "hol",
    "jot",
    "kip",
    "lum",
    "mox",
    "nib",
    "pim",
    "quo",
    "rud",
    "tez",
    "vop",
    "wex",
    "yad",
    "zib",
    "bor",
    "cav",
    "dul",
    "fip",
    "gax",
    "hev",
    "jun",
    "kel",
    "lof",
    "mip",
    "nox",
    "pev",
    "rax",
    "sul",
    "tib",
    "vek",
    "wib",
    "yul",
    "zop",
    "bem",
    "cuz",
    "dif",
)
NAMED_SHARE = 0.25  # of pretraining rows show a named individual


def named(seed=0) -> dict:
    """name -> (body, look): the individuals the NAMES stand for, fixed by `seed`, bodies in turn."""
    rng = random.Random(seed)
    return {n: (b, rng.choice(looks(b))) for n, b in zip(NAMES, itertools.cycle(WORLD_BODIES))}


def vocabulary() -> set:
    """Every word a world caption can contain."""
    words = {
        "a",
        "picture",
        "of",
        "with",
        "and",
        "in",
        "seen",
        "from",
        "the",
        *ACTION.values(),
        *VIEW.values(),
        *CLASS_WORD.values(),
        *REGIONS_WORDS,
        *NAMES,
    }
    for body in WORLD_BODIES:
        for r in REGIONS[body]:
            words |= set(palette(body, r))
    return words


REGIONS_WORDS = ("hair", "skin", "shirt", "trousers", "metal")


# ------------------------------------------------------------------------------------------------------- rendering
def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _resize(plane: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Pad a float plane [H, W] to a square with `fill` (centred, as data.fit_square) and LANCZOS-resize it."""
    from PIL import Image

    h, w = plane.shape
    side = max(h, w)
    canvas = np.full((side, side), fill, dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = plane
    return np.asarray(Image.fromarray(canvas, mode="F").resize((size, size), Image.Resampling.LANCZOS))


def planes(body: str, pose: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F [3, S, S] in [0, 1], P [R, S, S], alpha [1, S, S]) of one drawing (module docstring), R = len(REGIONS[body])."""
    from PIL import Image

    with Image.open(data.kenney_path(body, pose)) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    rgb, alpha = rgba[..., :3], rgba[..., 3] / 255.0
    keys = np.array([k for k, _ in KEYS[body]], dtype=np.float64)
    nearest = np.abs(rgb[..., None, :] - keys).sum(-1).argmin(-1)  # [H, W] index into KEYS[body]
    region_of_key = [reg for _, reg in KEYS[body]]
    lum = _luminance(rgb)
    fixed = np.ones(len(keys), dtype=bool)
    P = []
    for r in REGIONS[body]:
        main = next(k for k, reg in KEYS[body] if reg == r)
        in_r = np.isin(nearest, [i for i, reg in enumerate(region_of_key) if reg == r])
        fixed &= np.array([reg != r for reg in region_of_key])
        P.append(_resize(alpha * in_r * lum / _luminance(np.array(main, dtype=np.float64)), size, 0.0))
    keep = fixed[nearest]
    F_ = [_resize(alpha * keep * rgb[..., c] / 255.0 + (1 - alpha), size, 1.0) for c in range(3)]
    A = _resize(alpha, size, 0.0)
    as_t = lambda a: torch.from_numpy(np.stack(a)).float()  # noqa: E731
    return as_t(F_), as_t(P), as_t([A]).clamp(0, 1)


class World:
    """All (body, pose) planes at one size, and a sampler of random individuals with their captions."""

    def __init__(self, size: int, bodies=WORLD_BODIES):
        self.size, self.bodies = size, tuple(bodies)
        self.planes = {(b, p): planes(b, p, size) for b in self.bodies for p in data.POSES}
        self.looks = {b: looks(b) for b in self.bodies}
        self.named = {n: (b, look) for n, (b, look) in named().items() if b in self.bodies}

    def render(self, body: str, pose: str, look: dict) -> torch.Tensor:
        """One individual, [3, S, S] in [-1, 1] on white."""
        F_, P, _ = self.planes[(body, pose)]
        x = F_.clone()
        for plane, r in zip(P, REGIONS[body]):
            x += plane[None] * torch.tensor(palette(body, r)[look[r]], dtype=torch.float32)[:, None, None] / 255.0
        return x.clamp(0, 1) * 2 - 1

    def draw(self, n: int, rng: random.Random, named_share: float = 0.0):
        """n random rows: x [n, 3, S, S] in [-1, 1], and (body, pose, look, name or None) per row: with probability
        `named_share` a random named individual, else body uniform, then look uniform; pose uniform."""
        rows = []
        for _ in range(n):
            if rng.random() < named_share:
                name = rng.choice(sorted(self.named))
                body, look = self.named[name]
            else:
                name, body = None, rng.choice(self.bodies)
                look = rng.choice(self.looks[body])
            rows.append((body, rng.choice(data.POSES), look, name))
        return torch.stack([self.render(*r[:3]) for r in rows]), rows

    def counts(self) -> dict:
        return {CLASS_WORD[b] + f" ({b})": len(self.looks[b]) for b in self.bodies}
