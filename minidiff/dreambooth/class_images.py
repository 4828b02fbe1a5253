"""Class images for prior preservation: which files a class folder holds, which are missing, and making them.

The class half of every DreamBooth batch (loss.py) is drawn from images of the class made by the frozen base model
with the class prompt ("a picture of a girl"). Images a user put in the folder are used first; ours are
`class-00000.png` .. and a missing one is made again with its own seed, so an interrupted set resumes byte-identical.
"""

import re
from pathlib import Path

from tqdm import tqdm

from ..data import IMAGE_EXTS
from ..errors import DataError
from ..images import save_png

CLASS_NAME = "class-{:05d}.png"
OURS = re.compile(r"class-\d{5,}\.png")  # generated class images; any other image in the class folder is the user's


# ----------------------------------------------------------------------------------------------- class images
def class_image_plan(class_dir, n):
    """(images to use, indices to generate) for a class set of `n` images in `class_dir`.

    Images a user put there (any other name) come first; the rest are ours, `class-00000.png` .. in index order.
    An index whose file is missing is (re)generated, so an interrupted generation resumes where it stopped.
    """
    class_dir = Path(class_dir)
    try:
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS) if class_dir.is_dir() else []
    except OSError as e:
        raise DataError(f"cannot read the class image folder {class_dir} ({e.strerror})") from None
    ours = {p.name for p in files if OURS.fullmatch(p.name)}
    user = [p for p in files if p.name not in ours][:n]
    wanted = [class_dir / CLASS_NAME.format(i) for i in range(n - len(user))]
    missing = [i for i, p in enumerate(wanted) if p.name not in ours]
    return user + wanted, missing


def check_class_images(class_dir, n, can_generate):
    """Raise a one-line DataError when class images are missing and cannot be made (before any model loads)."""
    for p in (Path(class_dir), *Path(class_dir).parents):
        if p.exists() and not p.is_dir():
            raise DataError(f"--class-dir {class_dir}: {p} is a file, not a folder")
    paths, missing = class_image_plan(class_dir, n)
    if not missing:
        return paths, missing
    have = n - len(missing)
    if not can_generate:
        raise DataError(
            f"prior preservation needs {n} class images but {class_dir} has {have}, and generating "
            f"is off (--no-generate): add images, lower --num-class-images, or pass --no-prior"
        )
    class_dir = Path(class_dir)
    probe = class_dir if class_dir.is_dir() else next((p for p in class_dir.parents if p.exists()), class_dir)
    if not _writable(probe):
        raise DataError(
            f"prior preservation needs {n} class images but {class_dir} has {have} and is not "
            f"writable, so the missing ones cannot be generated: use another --class-dir or --no-prior"
        )
    return paths, missing


def _writable(folder):
    test = Path(folder) / ".minidiff-write-test"
    try:
        test.write_bytes(b"")
        test.unlink()
        return True
    except OSError:
        return False


def generate_class_images(generate, class_dir, n, prompt, batch_size=4, seed=0, settings=None, progress=True, ctx=None):
    """Make the missing ones of `n` class images with `generate(prompts, seeds) -> [k, 3, H, W] in [-1, 1]`.

    Image i always has seed `seed + i` and is made in the fixed batch [i - i % batch_size, ...): a batch with any
    file missing is sampled again whole and only its missing files are written, so a resumed or repaired set is
    byte-identical to one made in a single go. Each PNG carries prompt, seed and `settings` in its metadata.
    With a distributed `ctx`, process r makes the batches c with c mod W = r (fixed by c alone, so no process needs
    to know what the others wrote): the same files as one process; the caller waits at a barrier after.
    Returns (paths of the n images, number of files this process wrote).
    """
    class_dir = Path(class_dir)
    paths, missing = class_image_plan(class_dir, n)
    ours = [p for p in paths if OURS.fullmatch(p.name)]
    chunks = sorted({i // batch_size for i in missing})
    if ctx is not None:
        chunks = [c for c in chunks if c % ctx.world_size == ctx.rank]
    written = 0
    for c in tqdm(chunks, desc=f"class images ({len(missing)} to make)", disable=not progress or not chunks):
        idx = list(range(c * batch_size, min((c + 1) * batch_size, len(ours))))
        images = generate([prompt] * len(idx), [seed + i for i in idx])
        for i, img in zip(idx, images):
            if i in missing:
                save_png(img, ours[i], {"prompt": prompt, "seed": seed + i, "index": i, **(settings or {})})
                written += 1
    return paths, written
