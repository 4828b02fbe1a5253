"""The miniature's pose controls: the control images its tiny ControlNet is trained on and judged by, and the judging.

control_images   Canny edges (CANNY) or the scribble of the silhouette (SCRIBBLE) of 32 px pictures, with the
                 settings the tiny ControlNet was trained with (minidiff/control_images.py does the work)
evaluate         the target character's 13 drawings as control images: does the sample's pose family (the
                 classifier's) follow the drawing's, with and without the control, also family-balanced
                 (`shares`), and under a prompt whose action word contradicts the drawing
figure           the sheet of drawings, controls and samples (tiny-controlnet/samples.png)
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .. import data
from ..control_images import make_control
from . import tiny, world

CANNY = dict(low=60, high=120, sigma=0.6)  # 32 px sprites: a light blur, OpenCV-unit thresholds
SCRIBBLE = dict(threshold=0.9)  # everything not near-white is the figure: its skeleton is a stick figure
PROMPT = "a picture of a girl"  # the evaluation prompt (no action word: the drawing sets the pose)


def control_images(x: torch.Tensor, kinds) -> torch.Tensor:
    """Control images [N, 3, S, S] in [0, 1] of pictures x [N, 3, S, S] in [-1, 1], kinds[i] in canny / scribble."""
    settings = {"canny": CANNY, "scribble": SCRIBBLE}
    return torch.stack([make_control((xi + 1) / 2, k, **settings[k]) for xi, k in zip(x, kinds)])


# ------------------------------------------------------------------------------------------------------- evaluation
def target_controls(poses=data.POSES, kinds=("canny", "scribble")):
    """[(pose, kind, drawing [3, S, S] in [-1, 1], control [3, S, S] in [0, 1])] of the target character's drawings."""
    x = data.load_tensor_set([data.kenney_path(data.TARGET_CHARACTER, p) for p in poses], tiny.SIZE, fit="pad")
    return [(p, k, xi, control_images(xi[None], [k])[0]) for p, xi in zip(poses, x) for k in kinds]


def held_out_controls(kinds=("canny", "scribble")):
    """target_controls of the target's held-out poses (data.HELD_OUT_POSES: no DreamBooth run sees them)."""
    return target_controls(data.HELD_OUT_POSES, kinds)


def conflicting_action(pose: str) -> str:
    """An action word that contradicts the pose's family: walking for a climb, else jumping (walking for a jump)."""
    fam = world.family(pose)
    return world.ACTION["walk" if fam in ("climb", "jump") else "jump"]


def shares(matches: dict) -> dict:
    """{pose: [bool]} -> {"all": share of all samples, "family-balanced": mean over families of each family's
    share} (all poses of a family pooled): 1 / (number of families) is chance, whatever the model's prior."""
    from ..eval.classifier import pose_family

    fams = {}
    for pose, m in matches.items():
        fams.setdefault(pose_family(pose), []).extend(m)
    pooled = [x for m in matches.values() for x in m]
    return {
        "all": round(sum(pooled) / len(pooled), 3),
        "family-balanced": round(sum(sum(m) / len(m) for m in fams.values()) / len(fams), 3),
    }


@torch.no_grad()
def evaluate(
    pipe, net, n=8, prompt=PROMPT, scale=1.0, steps=30, cfg=tiny.GUIDANCE, sampler=None, guess_mode=False, progress=True
) -> tuple[dict, dict]:
    """({measurements}, {(pose, kind or None, prompt): samples [n, 3, S, S]}): the classifier's pose family of each
    sample against the control drawing's, seeds 0 .. n - 1, the model's sampler by default.

    Controls: all 13 drawings of the target character (the ControlNet saw nobody's pose drawn like hers), as canny
    and as scribble; "held-out" = her data.HELD_OUT_POSES. Without control the same n samples of `prompt` are judged
    against every pose; since 6 of the 7 held-out poses are walks, a model that always draws a walk scores 6/7 there
    (the miniature does), so each measure is also given family-balanced (`shares`; chance 1 / families).
    Conflicting prompt: each held-out pose's canny control under `prompt` + an action of another family
    (`conflicting_action`), with and without the control: does the drawing beat the words? `guess_mode`: the
    ControlNet steers the prompt's half of the guided batch only (controlnet.Control; its residuals scaled 0.1 .. 1),
    so guidance amplifies the control too, not just the prompt."""
    from ..controlnet import Control
    from ..eval.classifier import load_classifier, pose_family, predict
    from ..pipeline import generate

    model = load_classifier()
    kw = dict(steps=steps, cfg=cfg, sampler=sampler, width=tiny.SIZE, height=tiny.SIZE, batch_size=n, progress=False)

    def steer(control):
        return [Control(net, control[None], scale, guess_mode=guess_mode)]

    def matches(x, pose):
        return [pose_family(p) == pose_family(pose) for p in predict(x, model)[1]]

    samples = {(None, None, prompt): generate(pipe, [prompt] * n, **kw)}
    free = samples[(None, None, prompt)]
    with_c, kinds, free_m = {}, {}, {}
    controls = target_controls()
    for pose, kind, _, control in tqdm(controls, desc="evaluating", disable=not progress):
        x = samples[(pose, kind, prompt)] = generate(pipe, [prompt] * n, controls=steer(control), **kw)
        m = matches(x, pose)
        with_c.setdefault(pose, []).extend(m)
        kinds.setdefault(kind, {})[pose] = m
        free_m[pose] = matches(free, pose)
    held = lambda d: {p: d[p] for p in data.HELD_OUT_POSES}  # noqa: E731
    out = {
        "held-out poses": {"with control": shares(held(with_c)), "without control": shares(held(free_m))},
        "all 13 poses": {"with control": shares(with_c), "without control": shares(free_m)},
    }
    for kind, d in kinds.items():
        out["held-out poses"][kind] = shares(held(d))
    out["per pose, with control"] = {p: round(sum(m) / len(m), 3) for p, m in with_c.items()}
    families = [pose_family(p) for p in predict(free, model)[1]]
    out["without control: families"] = {f: families.count(f) for f in sorted(set(families))}
    controlled = torch.cat([samples[(pose, kind, prompt)] for pose, kind, _, _ in controls])
    out["recognised as the target"] = {  # what a DreamBooth LoRA (--lora) keeps of her under the control
        name: round(sum(c == data.TARGET_CHARACTER for c in predict(x, model)[0]) / len(x), 3)
        for name, x in (("with control", controlled), ("without control", free))
    }
    conflict = {"with control": {}, "without control": {}}
    for pose, kind, _, control in controls:
        if kind != "canny" or pose not in data.HELD_OUT_POSES:
            continue
        words = f"{prompt} {conflicting_action(pose)}"
        x = samples[(pose, kind, words)] = generate(pipe, [words] * n, controls=steer(control), **kw)
        conflict["with control"][pose] = matches(x, pose)
        if (None, None, words) not in samples:
            samples[(None, None, words)] = generate(pipe, [words] * n, **kw)
        conflict["without control"][pose] = matches(samples[(None, None, words)], pose)
    out["held-out poses, conflicting prompt (canny)"] = {k: shares(v) for k, v in conflict.items()}
    return out, samples


def figure(samples: dict, path, prompt=PROMPT, per_row=6):
    """One row per pose of the target: her drawing, its canny control and samples under it, its scribble and
    samples; then `prompt` without control; then the held-out poses under a conflicting prompt (canny control and
    samples, then that prompt's samples without control). per_row samples at most per group (fewer when fewer
    were drawn: blank cells keep the columns aligned)."""
    from ..images import labelled_grid, save_png

    k = min(per_row, min(len(v) for v in samples.values()))
    blank = torch.ones(3, tiny.SIZE, tiny.SIZE)
    cells, rows = [], []
    by_pose = {}
    for pose, kind, drawing, control in target_controls():
        by_pose.setdefault(pose, [drawing])
        by_pose[pose] += [control * 2 - 1, *samples[(pose, kind, prompt)][:k]]
    for pose, row in by_pose.items():
        cells += row
        rows.append(pose + (" (held out)" if pose in data.HELD_OUT_POSES else ""))
    free = samples[(None, None, prompt)]
    cells += [blank, blank, *free[:k], blank, *free[k : 2 * k], *[blank] * (2 * k - len(free[: 2 * k]))]
    rows.append("no control")
    for pose, kind, drawing, control in held_out_controls(("canny",)):
        words = f"{prompt} {conflicting_action(pose)}"
        cells += [drawing, control * 2 - 1, *samples[(pose, kind, words)][:k], blank, *samples[(None, None, words)][:k]]
        rows.append(f"{pose} + '{conflicting_action(pose)}'")
    cols = ["drawing", "canny", *[""] * k, "scribble", *[""] * k]
    sheet = labelled_grid(torch.stack(cells), rows, cols, scale=3)
    return save_png(
        sheet,
        path,
        {
            "prompt": prompt,
            "seeds": list(range(k)),
            "rows": "each pose of the target: drawing, canny + samples, scribble + samples; "
            "no control; held-out poses under a conflicting action word: canny + "
            "samples, then that prompt's samples without control",
        },
    )
