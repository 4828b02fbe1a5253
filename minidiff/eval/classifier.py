"""Who is in the picture, and in which pose: the judge behind the `identity` metric.

A small CNN (0.30 M parameters, 17 M multiply-adds per 64x64 image) with two heads on a shared trunk:

    h = trunk(preprocess(x))                   x: [N, 3, H, W] in [-1, 1], any H, W
    p_char = softmax(W_c h)   over the 6 data.CHARACTERS
    p_pose = softmax(W_p h)   over the 13 data.POSES
    p_family(f) = sum_{pose in f} p_pose(pose)   f in FAMILIES = climb, fall, idle, jump, walk

`preprocess` pads to a square with white (like `data.fit_square(fit="pad")`) and resizes to INPUT_SIZE = 64 with an
antialiased bilinear filter, so 32, 64 and 96 px outputs of the generators and 1024 px SDXL images all fit.

Training data are the 78 bundled Kenney drawings (6 characters x 13 poses) and recoloured individuals of the
miniature's world (`world_set`: 12 random looks per (body, pose) of the 4 world bodies, labelled with their body:
a blonde girl in a red shirt is still "female_person"), drawn with probability 1 / (rows of their character) so the
13 drawings of each held-out character weigh as much as the world's hundreds. Every batch is drawn afresh through
heavy augmentation (`augment`) that imitates what a generator gets wrong: random zoom / aspect / shift / small
rotation, a horizontal flip, small colour jitter, a light background colour now and then, downsample-then-upsample
to 16..64 px (the look of a 32 px sample), gaussian noise and a cutout rectangle. Flips keep the pose label: the
drawings all face right, the pixel baselines train with x-flip, and a mirrored walk is still a walk. The price: the
walk cycle's two halves are mirror images of each other (walk k and walk k+4 swap the forward leg; climb0 and climb1
swap the raised arm), so exact poses are only told apart up to these mirror pairs; pose families are not affected.
female_adventurer and male_adventurer are known only in their own colours: a recoloured copy of them is nobody the
classifier was taught, which is what "identity" should mean.

Measured accuracy (written into the file's metadata by --train; print it with --eval):
    held-out: a model trained on the 6 data.INSTANCE_POSES of all 6 characters (36 drawings), tested on the
              7 data.HELD_OUT_POSES it never saw (42 drawings): character 1.00 (clean and at 32 px),
              pose family 0.88 (clean and at 32 px; exact pose is undefined for unseen poses)
    shipped:  trained on all 78: character 1.00, pose family 1.00, exact pose 0.73 (the mirror pairs above), on the
              78 training drawings clean and at 32 px (training-set numbers: the held-out ones are the honest ones)

Reproduce the shipped weights (CPU, one thread by design; 2.6 min of CPU, 6.6 min wall on the shared busy machine;
the held-out model is trained first, then the shipped one, 600 steps of batch 64 each):

    python -m minidiff.eval.classifier --train --out minidiff/assets/classifier.safetensors --seed 0 --steps 600

Identity rule used by `metrics.evaluate`: a sample shows the target character iff argmax p_char == target.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from .. import data, io
from ..bundled import assets_dir
from ..cli import ArgumentParser, exit_code
from ..errors import CheckpointError, DataError
from ..images import square
from ..train import loop

CLASSIFIER_PATH = assets_dir() / "classifier.safetensors"
INPUT_SIZE = 64
FORMAT = "minidiff-classifier-v1"
TRAIN_COMMAND = (
    "python -m minidiff.eval.classifier --train --out minidiff/assets/classifier.safetensors --seed 0 --steps 600"
)
FAMILIES = ("climb", "fall", "idle", "jump", "walk")


def pose_family(pose: str) -> str:
    """climb0, climb1 -> climb; walk0..walk7 -> walk; fall, idle, jump are their own family."""
    return pose.rstrip("0123456789")


# ------------------------------------------------------------------------------------------------------------ model
def preprocess(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """[N,3,H,W] in [-1,1] -> [N,3,size,size]: pad the short side with white (1.0), then antialiased resize."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"expected an image tensor [N, 3, H, W] in [-1, 1], got {shape}")
    x = images.float()
    x = square(x, size, fill=1.0)
    return x.clamp(-1, 1)


def conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class CharacterClassifier(nn.Module):
    """VGG-style trunk: stride-2 stem, then per stage one stride-2 conv and one conv; global average pool; 2 heads.

    64 -> 32 (stem, widths[0]) -> 16 -> 8 -> 4 (widths[1:]) -> pool -> dropout -> {character, pose} logits.
    """

    def __init__(self, widths=(24, 32, 64, 128), n_characters=6, n_poses=13, dropout=0.2):
        super().__init__()
        layers = [conv_bn(3, widths[0], stride=2), conv_bn(widths[0], widths[0])]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [conv_bn(c_in, c_out, stride=2), conv_bn(c_out, c_out)]
        self.trunk = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.character_head = nn.Linear(widths[-1], n_characters)
        self.pose_head = nn.Linear(widths[-1], n_poses)
        self.widths = tuple(widths)

    def forward(self, x):
        """x: [N,3,INPUT_SIZE,INPUT_SIZE] (already preprocessed) -> (character logits [N,6], pose logits [N,13])."""
        h = self.dropout(self.trunk(x).mean(dim=(2, 3)))
        return self.character_head(h), self.pose_head(h)


# ----------------------------------------------------------------------------------------------------- augmentation
def _u(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: torch.Tensor, alpha: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of each image. x: [B,3,S,S] in [-1,1] on white; alpha: [B,1,S,S] in [0,1] (1 = character)."""
    B, _, S, _ = x.shape
    # geometry: out(p) = in(A p + t), A = rotation(theta) @ diag(sx, sy); s > 1 zooms out (character gets smaller)
    s, aspect = _u(g, B, 0.8, 1.25), _u(g, B, 0.9, 1.1)
    sx, sy = s * aspect.sqrt(), s / aspect.sqrt()
    sx = torch.where(torch.rand(B, generator=g) < 0.5, -sx, sx)  # horizontal flip
    th = _u(g, B, -0.17, 0.17)  # +-10 degrees
    theta = torch.stack(
        [
            torch.stack([sx * th.cos(), -sy * th.sin(), _u(g, B, -0.15, 0.15)], 1),
            torch.stack([sx * th.sin(), sy * th.cos(), _u(g, B, -0.15, 0.15)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x - 1, grid, align_corners=False) + 1  # zeros padding of (x - 1) = white outside
    a = F.grid_sample(alpha, grid, align_corners=False)
    # background: 25% of views get a light random colour instead of white
    bg = torch.where(torch.rand(B, 1, 1, 1, generator=g) < 0.25, 1 - 0.5 * torch.rand(B, 3, 1, 1, generator=g), 1.0)
    x = x + (1 - a) * (bg - 1)
    # colour, in [0,1] units: brightness, contrast, saturation, per-channel gain (small: identity lives in colour)
    y = (x + 1) / 2
    y = y + _u(g, B, -0.08, 0.08).view(B, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = mean + (y - mean) * _u(g, B, 0.85, 1.15).view(B, 1, 1, 1)
    gray = y.mean(dim=1, keepdim=True)
    y = gray + (y - gray) * _u(g, B, 0.8, 1.2).view(B, 1, 1, 1)
    y = y * _u(g, B * 3, 0.95, 1.05).view(B, 3, 1, 1)
    x = (y * 2 - 1).clamp(-1, 1)
    # resolution: 60% of views go down to 16..56 px and back up (what a 32 px generator sample looks like at 64)
    for i in torch.nonzero(torch.rand(B, generator=g) < 0.6).flatten().tolist():
        r = int(torch.randint(16, 57, (1,), generator=g))
        small = F.interpolate(x[i : i + 1], size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        x[i] = F.interpolate(small, size=(S, S), mode="bilinear", align_corners=False)[0]
    # gaussian noise on half of the views, sigma up to 0.12 (in [-1,1] units)
    sigma = _u(g, B, 0, 0.12) * (torch.rand(B, generator=g) < 0.5)
    x = x + sigma.view(B, 1, 1, 1) * torch.randn(x.shape, generator=g)
    # cutout: half of the views lose a rectangle of 10..35% side to a random flat colour
    for i in torch.nonzero(torch.rand(B, generator=g) < 0.5).flatten().tolist():
        h, w = (int(S * float(_u(g, 1, 0.1, 0.35))) for _ in range(2))
        top = int(torch.randint(0, S - h + 1, (1,), generator=g))
        left = int(torch.randint(0, S - w + 1, (1,), generator=g))
        x[i, :, top : top + h, left : left + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------- training
def kenney_set(poses=None, size=INPUT_SIZE):
    """The bundled drawings as (x [N,3,S,S] on white, alpha [N,1,S,S], character index [N], pose index [N])."""
    poses = tuple(poses or data.POSES)
    pairs = [(c, p) for c in data.CHARACTERS for p in poses]
    paths = [data.kenney_path(c, p) for c, p in pairs]
    x = preprocess(data.load_tensor_set(paths, 128, fit="pad"), size)
    alphas = []
    for path in paths:  # the alpha channel, padded and resized exactly like the colours (data.fit_square, fit="pad")
        with Image.open(path) as im:
            a = im.convert("RGBA").getchannel("A")
        m = max(a.size)
        canvas = Image.new("L", (m, m), 0)
        canvas.paste(a, ((m - a.size[0]) // 2, (m - a.size[1]) // 2))
        alphas.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None, None])
    alpha = F.interpolate(torch.cat(alphas), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    chars = torch.tensor([data.CHARACTERS.index(c) for c, _ in pairs])
    pose_idx = torch.tensor([data.POSES.index(p) for _, p in pairs])
    return x, alpha.clamp(0, 1), chars, pose_idx


def world_set(poses=None, per_pose=12, seed=0, size=INPUT_SIZE):
    """Recoloured individuals of the world's bodies (minidiff/bundled/world.py), `per_pose` random looks per (body, pose),
    as kenney_set: (x, alpha, character index, pose index). The miniature draws these; the judge must know them."""
    import random

    from ..bundled import world

    rng, scene = random.Random(seed), world.World(size)
    rows = [
        (b, p, rng.choice(scene.looks[b])) for b in scene.bodies for p in (poses or data.POSES) for _ in range(per_pose)
    ]
    x = torch.stack([scene.render(*r) for r in rows])
    alpha = torch.stack([scene.planes[(b, p)][2] for b, p, _ in rows])
    chars = torch.tensor([data.CHARACTERS.index(b) for b, _, _ in rows])
    return x, alpha, chars, torch.tensor([data.POSES.index(p) for _, p, _ in rows])


def training_set(poses=None, seed=0):
    """The bundled drawings of `poses` and world individuals in the same poses, concatenated."""
    return tuple(torch.cat(pair) for pair in zip(kenney_set(poses), world_set(poses, seed=seed)))


def train_model(x, alpha, chars, poses, steps=600, batch=64, lr=3e-3, seed=0, desc="classifier"):
    """AdamW + one-cycle cosine schedule on freshly augmented batches; loss = CE(character) + CE(pose). Rows are
    drawn with probability 1 / (rows of their character), so the 13 drawings of a character outside the world
    weigh as much as the hundreds of world individuals of another."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = CharacterClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    weights = 1.0 / torch.bincount(chars).double()[chars]  # balanced: every character equally often

    def step_fn(step):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        logits_c, logits_p = model(augment(x[idx].clone(), alpha[idx], g))
        loss = F.cross_entropy(logits_c, chars[idx], label_smoothing=0.1) + F.cross_entropy(
            logits_p, poses[idx], label_smoothing=0.1
        )
        loss.backward()
        loop.optimizer_step(optimizer=opt, params=model.parameters(), lr_scheduler=sched)
        return {"loss": loss.detach()}

    loop.train(step_fn=step_fn, steps=steps, postfix=lambda logs: {"loss": f"{logs['loss'].item():.3f}"}, desc=desc)
    return model.eval()


@torch.no_grad()
def _probs(model, images, batch=256):
    pc, pp = [], []
    for i in range(0, len(images), batch):
        lc, lp = model(preprocess(images[i : i + batch]))
        pc.append(lc.softmax(-1))
        pp.append(lp.softmax(-1))
    return torch.cat(pc), torch.cat(pp)


def family_probs(pose_probs: torch.Tensor) -> torch.Tensor:
    """[N,13] pose probabilities -> [N,5] family probabilities (sum over the poses of each family)."""
    member = torch.tensor([[float(pose_family(p) == f) for f in FAMILIES] for p in data.POSES])
    return pose_probs @ member


def accuracies(model, images, chars, poses) -> dict:
    """Character, exact-pose and pose-family accuracy of `model` on labelled images."""
    pc, pp = _probs(model.eval(), images)
    fam_true = torch.tensor([FAMILIES.index(pose_family(data.POSES[i])) for i in poses.tolist()])
    return {
        "character": (pc.argmax(-1) == chars).float().mean().item(),
        "pose": (pp.argmax(-1) == poses).float().mean().item(),
        "family": (family_probs(pp).argmax(-1) == fam_true).float().mean().item(),
    }


def _report(model, poses, exact_pose=True) -> dict:
    """Accuracies on clean 64 px drawings of `poses` and on their 32 px versions (upsampled back inside)."""
    x, _, c, p = kenney_set(poses)
    x32 = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    out = {"clean": accuracies(model, x, c, p), "32px": accuracies(model, x32, c, p)}
    xw, _, cw, pw = world_set(poses, per_pose=4, seed=12345)  # individuals the training never drew
    out["world_32px"] = accuracies(
        model, F.interpolate(xw, size=(32, 32), mode="bilinear", antialias=True, align_corners=False), cw, pw
    )
    if not exact_pose:  # a pose the model never saw has no right exact answer; only character and family count
        for acc in out.values():
            del acc["pose"]
    return out


# ------------------------------------------------------------------------------------------------------ load, predict
def load_classifier(path=None) -> CharacterClassifier:
    """The shipped classifier (minidiff/assets/classifier.safetensors) or the one at `path`, in eval mode."""
    path = Path(path or CLASSIFIER_PATH)
    if not path.is_file():
        raise CheckpointError(f"classifier weights not found at {path}; rebuild them with: {TRAIN_COMMAND}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's file problem
        raise CheckpointError(f"cannot read classifier weights {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minidiff classifier file (metadata format={meta.get('format')!r})")
    if json.loads(meta.get("characters", "[]")) != list(data.CHARACTERS) or json.loads(meta.get("poses", "[]")) != list(
        data.POSES
    ):
        raise CheckpointError(f"{path} was trained on other classes than data.CHARACTERS / data.POSES")
    model = CharacterClassifier(widths=json.loads(meta["widths"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit CharacterClassifier: {str(e).splitlines()[0]}") from None
    model.metadata = meta
    return model.eval()


UNKNOWN = "unknown"
MIN_CONFIDENCE = 0.8  # below this the classifier is guessing: a DCGAN's noise patterns get 0.6-0.7, clean drawings 0.9+


def predict(images: torch.Tensor, model: CharacterClassifier = None, min_confidence: float = MIN_CONFIDENCE):
    """[N,3,H,W] in [-1,1] -> (character names [N], pose names [N], {"character": [N,6], "pose": [N,13],
    "family": [N,5]} probabilities, columns in data.CHARACTERS / data.POSES / FAMILIES order).

    A sample is recognised as character c only when p(c | sample) >= min_confidence; otherwise its character is
    UNKNOWN. A softmax always picks someone, and without this floor pure noise patterns were "recognised" as the
    target (the collapsed DCGAN scored identity 1.0 on noise)."""
    model = model if model is not None else load_classifier()
    pc, pp = _probs(model.eval(), images)
    conf, best = pc.max(-1)
    characters = [data.CHARACTERS[i] if c >= min_confidence else UNKNOWN for i, c in zip(best.tolist(), conf.tolist())]
    poses = [data.POSES[i] for i in pp.argmax(-1).tolist()]
    return characters, poses, {"character": pc, "pose": pp, "family": family_probs(pp)}


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = ArgumentParser(
        prog="python -m minidiff.eval.classifier",
        description="Train the character/pose classifier on the 78 bundled drawings.",
    )
    ap.add_argument("--train", action="store_true", help="train (held-out model first, then the shipped model)")
    ap.add_argument("--eval", action="store_true", help="print the metadata and accuracies of --out")
    ap.add_argument("--out", default=str(CLASSIFIER_PATH))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args(argv)
    if not (args.train or args.eval):
        ap.error("nothing to do: pass --train or --eval")
    return exit_code(run, args)


def run(args):
    if args.eval:
        print(json.dumps(load_classifier(args.out).metadata, indent=1))
        print(json.dumps({"all_78": _report(load_classifier(args.out), data.POSES)}, indent=1))
        return

    # one thread: no thread-count dependent summation order, so a seed gives the same weights again; and on a
    # shared, busy CPU 2 threads were several times slower than 1 (they wait on each other)
    torch.set_num_threads(1)
    t0 = time.time()
    held = train_model(
        *training_set(data.INSTANCE_POSES, args.seed), steps=args.steps, seed=args.seed, desc="held-out model"
    )
    acc = {
        "heldout_poses": _report(held, data.HELD_OUT_POSES, exact_pose=False),
        "heldout_setup": "trained on data.INSTANCE_POSES of all 6 characters, tested on data.HELD_OUT_POSES",
    }
    model = train_model(*training_set(None, args.seed), steps=args.steps, seed=args.seed, desc="final model")
    acc["train_all_78"] = _report(model, data.POSES)
    minutes = (time.time() - t0) / 60
    command = f"python -m minidiff.eval.classifier --train --out {args.out} --seed {args.seed} --steps {args.steps}"
    meta = {
        "format": FORMAT,
        "characters": json.dumps(list(data.CHARACTERS)),
        "poses": json.dumps(list(data.POSES)),
        "families": json.dumps(list(FAMILIES)),
        "input_size": str(INPUT_SIZE),
        "widths": json.dumps(model.widths),
        "accuracy": json.dumps(acc),
        "command": command,
        "train_minutes": f"{minutes:.1f}",
        "torch": torch.__version__,
        "identity_rule": "argmax of the character probabilities == target character",
    }
    io.save_safetensors(model.state_dict(), args.out, metadata=meta)
    print(json.dumps(acc, indent=1))
    n = sum(v.numel() for v in model.parameters())
    print(f"wrote {args.out} ({n / 1e3:.0f} k parameters) in {minutes:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
