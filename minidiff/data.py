"""Image folders -> training tensors: loading, squaring, captions, kohya "N_trigger class" repeats, Kenney characters.

What happens to every image, in order (`load_image`, then `fit_square`):

1. EXIF orientation is applied (a phone photo shot sideways is stored sideways with a rotate tag).
2. Transparency (RGBA, LA, palette images with a transparent index) is composited onto white: the drawings we
   learn from are on white, and a transparent background read as black would teach the model black backgrounds.
   Grayscale, 16-bit grayscale, palette and CMYK images are converted to RGB.
3. The image is made square at the training size S. `fit="pad"` (default) scales the longer side to S and pads the
   rest with white, so the whole character survives; `fit="crop"` scales the shorter side to S and cuts the middle
   (what diffusers' CenterCrop does: head and feet of a standing figure are lost).

Captions come from a sidecar file next to the image (`img.txt` or `img.caption`), else from the `caption`
argument, else from a kohya-style folder name: `10_sks girl/` means "repeat each image 10 times per epoch" and
caption "sks girl". Items are in sorted-path order so a seed reproduces a run.

The bundled CC0 Kenney characters (minidiff/assets/kenney-characters/<character>/<camelName>_<pose>.png, 96x128
RGBA) give the default task: six drawings of `female_adventurer` (INSTANCE_POSES) to learn from; her other seven
poses (HELD_OUT_POSES) and the five other characters are for evaluation.
"""

import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .bundled import assets_dir
from .errors import DataError
from .images import from_pil

KENNEY_DIR = assets_dir() / "kenney-characters"
CHARACTERS = ("female_adventurer", "female_person", "male_adventurer", "male_person", "robot", "zombie")
POSES = ("climb0", "climb1", "fall", "idle", "jump") + tuple(f"walk{i}" for i in range(8))
TARGET_CHARACTER = "female_adventurer"
INSTANCE_POSES = ("climb0", "idle", "jump", "walk0", "walk3", "fall")  # climb0 is the back view
HELD_OUT_POSES = tuple(p for p in POSES if p not in INSTANCE_POSES)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTS = (".txt", ".caption")
TINY_FACTOR = 4  # warn when an image must be upscaled more than this to reach the training size


class DataWarning(UserWarning):
    """Something in the data was skipped or looks wrong, but training can go on."""


# ----------------------------------------------------------------------------------------------- Kenney characters
def kenney_path(character, pose):
    """Path of one bundled drawing, e.g. ("female_adventurer", "idle") -> .../femaleAdventurer_idle.png."""
    if character not in CHARACTERS:
        raise DataError(f"unknown character {character!r}; expected one of {', '.join(CHARACTERS)}")
    if pose not in POSES:
        raise DataError(f"unknown pose {pose!r}; expected one of {', '.join(POSES)}")
    first, *rest = character.split("_")
    camel = first + "".join(w.capitalize() for w in rest)
    return KENNEY_DIR / character / f"{camel}_{pose}.png"


def instance_images(character=TARGET_CHARACTER, poses=INSTANCE_POSES):
    """The default "six drawings of one character" (or any character / poses) as a list of paths."""
    return [kenney_path(character, p) for p in poses]


# ----------------------------------------------------------------------------------------------- one image
def to_rgb_on_white(img):
    """Any PIL mode -> RGB; transparent pixels (alpha, or a palette's transparent index) become white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I") or img.mode == "F":  # 16-bit / float grayscale
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) > 255:
            a = a / 65535.0 * 255.0
        img = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8))  # uint8 [H, W] -> L
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path):
    """Open an image file as RGB: EXIF orientation applied, alpha composited onto white. Raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb_on_white(im)
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, struct.error, ...)
        why = "corrupt, or not a PNG/JPEG/WebP" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise DataError(f"cannot read image {path} ({why})") from None


def fit_square(img, size, fit="pad"):
    """Make `img` a `size` x `size` RGB image. pad: all of it, on white. crop: fill the square, cut the middle."""
    if fit not in ("pad", "crop"):
        raise DataError(f"fit must be 'pad' or 'crop', got {fit!r}")
    w, h = img.size
    if fit == "pad":
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    else:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


# ----------------------------------------------------------------------------------------------- aspect-ratio buckets
def bucket_sizes(size, step=64, max_ratio=2.0):
    """kohya's buckets: sides (h, w) that are multiples of `step`, h * w <= size^2, aspect ratio at most `max_ratio`;
    for w = step, 2 step, ..: h = the largest multiple of step with h * w <= size^2, and (w, h) as well."""
    out = set()
    for w in range(step, int(size * max_ratio) + 1, step):
        h = size * size // w // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out |= {(h, w), (w, h)}
    return sorted(out)


def nearest_bucket(width, height, buckets):
    """The bucket (h, w) whose aspect ratio is closest to the image's (in log ratio)."""
    return min(buckets, key=lambda b: abs(math.log(width / height) - math.log(b[1] / b[0])))


def fit_bucket(img, bucket):
    """Scale `img` to cover the bucket (h, w), cut the middle: (image, (top, left) of the crop in the scaled image)."""
    (bh, bw), (w, h) = bucket, img.size
    scale = max(bw / w, bh / h)
    W, H = max(bw, round(w * scale)), max(bh, round(h * scale))
    top, left = (H - bh) // 2, (W - bw) // 2
    img = img.resize((W, H), Image.Resampling.LANCZOS).crop((left, top, left + bw, top + bh))
    return img, (top, left)


# ----------------------------------------------------------------------------------------------- captions, folders
def parse_kohya_name(name):
    """ "10_sks girl" -> (10, "sks girl"); a name without the N_ prefix -> None."""
    m = re.fullmatch(r"(\d+)_(.*)", name)
    if m is None:
        return None
    repeats = int(m.group(1))
    if repeats < 1:
        raise DataError(f"folder {name!r}: the repeat count before '_' must be at least 1")
    return repeats, m.group(2).strip()


def read_caption(image_path):
    """The caption in `img.txt` or `img.caption` next to the image, or None (also for an empty file)."""
    for ext in CAPTION_EXTS:
        p = Path(image_path).with_suffix(ext)
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8-sig").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read caption file {p} (expected UTF-8 text): {e}") from None
            return " ".join(text.split()) or None
    return None


def _list_images(folder):
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix.lower() in IMAGE_EXTS], files


def scan_folder(root):
    """[(path, repeats, folder_caption)] for the images in `root` and in its sub-folders (one level), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    entries, others = [], []
    try:
        folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read image folder {root} ({e.strerror})") from None
    for folder in folders:
        repeats, caption = parse_kohya_name(folder.name) or (1, None)
        try:
            images, files = _list_images(folder)
        except OSError as e:
            raise DataError(f"cannot read image folder {folder} ({e.strerror})") from None
        entries += [(p, repeats, caption) for p in images]
        others += [p.name for p in files if p.suffix.lower() not in IMAGE_EXTS + CAPTION_EXTS]
    if not entries:
        found = f" (found only: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''})" if others else ""
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {root}{found}")
    return entries


# ----------------------------------------------------------------------------------------------- dataset
class ImageFolder(torch.utils.data.Dataset):
    """Training images as items {"pixels": Tensor[3, S, S] in [-1, 1], "caption": str, "path": str}.

    root_or_paths: a folder (images in it and in kohya `N_trigger class` sub-folders) or a list of image paths.
    Every image is decoded once here and kept as uint8; unreadable files are skipped with a warning naming them.
    flip: mirror left-right with probability 1/2 per item (uses torch's global RNG, so a seed reproduces it).
    caption: the caption for images without a sidecar file (overrides the folder name's "trigger class").
    buckets: a list of (h, w): each image goes to its nearest aspect ratio instead of a square (`fit_bucket`).
    Attributes: paths, captions, images (uint8 [3, S, S], or [3, h, w] of its bucket) and crops ((top, left), with
    buckets) per distinct image; index maps item -> image (repeats).
    """

    def __init__(self, root_or_paths, size, fit="pad", flip=False, caption=None, buckets=None):
        if isinstance(root_or_paths, (str, Path)):
            entries = scan_folder(root_or_paths)
            where = str(root_or_paths)
        else:
            entries = [(Path(p), 1, None) for p in sorted(map(str, root_or_paths))]
            where = "the given list of images"
            if not entries:
                raise DataError("no image paths given")
        self.size, self.fit, self.flip = int(size), fit, flip
        self.images, self.captions, self.paths, self.index, self.crops = [], [], [], [], []
        skipped, tiny = [], []
        for path, repeats, folder_caption in entries:
            try:
                img = load_image(path)
            except DataError as e:
                skipped.append(str(e))
                continue
            if max(img.size) * TINY_FACTOR < self.size:
                tiny.append(f"{path.name} ({img.size[0]}x{img.size[1]})")
            if buckets:
                pixels, crop = fit_bucket(img, nearest_bucket(*img.size, buckets))
                self.crops.append(crop)
            else:
                pixels = fit_square(img, self.size, fit)
            self.images.append(torch.from_numpy(np.asarray(pixels, dtype=np.uint8).copy()).permute(2, 0, 1))
            cap = read_caption(path)
            self.captions.append(cap if cap is not None else caption if caption is not None else folder_caption or "")
            self.paths.append(str(path))
            self.index += [len(self.images) - 1] * repeats
        for msg in skipped:
            warnings.warn(f"skipping {msg}", DataWarning, stacklevel=2)
        if not self.images:
            raise DataError(f"no usable images in {where}: all {len(entries)} files were unreadable")
        if tiny:
            warnings.warn(
                f"{len(tiny)} image(s) are much smaller than the training size {self.size}px and will be "
                f"upscaled more than {TINY_FACTOR}x (blurry): {', '.join(tiny)}",
                DataWarning,
                stacklevel=2,
            )

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = self.index[i]
        pixels = self.images[j].float() / 127.5 - 1
        if self.flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {"pixels": pixels, "caption": self.captions[j], "path": self.paths[j]}

    def tensors(self):
        """All distinct images (no repeats, no flip) as one [N, 3, S, S] tensor in [-1, 1]."""
        return torch.stack(self.images).float() / 127.5 - 1


def load_tensor_set(paths, size, fit="pad"):
    """Images -> [N, 3, S, S] in [-1, 1], in the given order (e.g. for metrics). Any unreadable file is an error."""
    paths = list(paths)
    if not paths:
        raise DataError("no image paths given")
    return torch.stack([from_pil(fit_square(load_image(p), size, fit)) for p in paths])
