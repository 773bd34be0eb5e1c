"""The judge's defect simulator: one output of a session turn, correct or with a controlled defect.

:func:`make_output` produces the output kinds of :data:`DEFECTS` at the judge's resolution
(:data:`RESOLUTION`):

* ``correct`` — the render of what the verifier expects; ``perturbed`` — the same, mildly blurred /
  noised / JPEG-compressed; ``degraded`` — heavily so;
* ``identity`` — the input unchanged; ``other_edit`` — a different applicable edit;
  ``wrong_object`` — the right op on another object (or cell); ``wrong_value`` — the right object,
  another colour / destination / added object / background; ``extra_change`` — the edit plus an
  unrelated edit elsewhere; ``undo_earlier`` — the edit, but a cell set by an earlier turn reverts to
  its source value (breaks GA);
* ``blend`` — a mix of input and correct output; ``partial`` — the correct output with the edited
  cells (half the image for a background change) only partly drawn over the input.

A kind that cannot apply to the turn falls back to a related one (``undo_earlier`` → ``extra_change``
→ ``other_edit`` → ``identity``; ``wrong_value`` → ``wrong_object`` → ``other_edit``). :data:`DEFECTS`
weights the evaluation mix, :data:`TRAIN_DEFECTS` the training mix (more binding errors), :data:`CHAIN`
the output a rollout goes on from.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from mteditlab.world import Obj, Scene, render_array
from mteditlab.world.edits import Edit
from mteditlab.world.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, cell_bounds
from mteditlab.world.sessions import Session, random_edit
from mteditlab.world.verifier import expected_after

RESOLUTION = 32
DEFECTS = {  # weights of a random branch's output kind in the evaluation mix (and the first judge's training)
    "correct": 0.14, "perturbed": 0.14, "degraded": 0.05, "identity": 0.08, "other_edit": 0.1,
    "wrong_object": 0.11, "wrong_value": 0.08, "extra_change": 0.09, "undo_earlier": 0.07, "blend": 0.07,
    "partial": 0.07,
}
TRAIN_DEFECTS = {  # training mix: more of the binding errors (wrong object / wrong value) the judge missed
    **DEFECTS, "correct": 0.12, "perturbed": 0.1, "wrong_object": 0.16, "wrong_value": 0.13,
}
CHAIN = {  # weights of the output the rollout goes on from (mostly right: like a decent editor)
    "correct": 0.55, "perturbed": 0.2, "identity": 0.04, "other_edit": 0.03, "wrong_object": 0.04,
    "wrong_value": 0.03, "extra_change": 0.04, "undo_earlier": 0.03, "blend": 0.02, "partial": 0.02,
}


def to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.round(array * 255), 0, 255).astype(np.uint8)


def render_u8(scene: Scene) -> np.ndarray:
    return to_uint8(render_array(scene, RESOLUTION))


def perturb(image: np.ndarray, rng: random.Random, heavy: bool = False) -> np.ndarray:
    """Blur, pixel noise or JPEG at mild (default) or heavy strength."""
    kind = rng.choice(("blur", "noise", "jpeg"))
    if kind == "blur":
        sigma = rng.uniform(1.0, 2.0) if heavy else rng.uniform(0.3, 0.8)
        return to_uint8(gaussian_filter(image.astype(np.float32) / 255, sigma=(sigma, sigma, 0), mode="nearest"))
    if kind == "noise":
        std = rng.uniform(0.07, 0.15) if heavy else rng.uniform(0.01, 0.045)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, std, image.shape)
        return to_uint8(image.astype(np.float32) / 255 + noise)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=rng.randint(5, 20) if heavy else rng.randint(40, 90))
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)


def _differs(edit: Edit, scene: Scene, target: Scene) -> bool:
    return edit.applicable(scene) and edit.apply(scene) != target


def _wrong_object(edit: Edit, state: Scene, target: Scene, rng: random.Random) -> Edit | None:
    objects, empty = [c for c, _ in state.objects()], state.empty_cells()
    if edit.op == "add":
        options = [Edit("add", cell=c, obj=edit.obj) for c in empty if c != edit.cell]
    elif edit.op in ("remove", "recolour", "resize"):
        options = [Edit(edit.op, cell=c, value=edit.value) for c in objects if c != edit.cell]
    elif edit.op == "move":
        options = [Edit("move", cell=c, to=edit.to) for c in objects if c != edit.cell]
    elif edit.op == "swap":
        options = [Edit("swap", cell=a, to=b) for a in objects for b in objects if a < b and {a, b} != {edit.cell, edit.to}]
    else:
        return None
    options = [e for e in options if _differs(e, state, target)]
    return rng.choice(options) if options else None


def _wrong_value(edit: Edit, state: Scene, target: Scene, rng: random.Random) -> Edit | None:
    if edit.op == "add":
        o = edit.obj
        options = ([Edit("add", cell=edit.cell, obj=Obj(s, o.colour, o.size)) for s in SHAPES if s != o.shape]
                   + [Edit("add", cell=edit.cell, obj=Obj(o.shape, c, o.size)) for c in COLOURS if c != o.colour]
                   + [Edit("add", cell=edit.cell, obj=Obj(o.shape, o.colour, z)) for z in SIZES if z != o.size])
    elif edit.op == "recolour":
        options = [Edit("recolour", cell=edit.cell, value=c) for c in COLOURS if c != edit.value]
    elif edit.op == "move":
        options = [Edit("move", cell=edit.cell, to=c) for c in state.empty_cells() if c != edit.to]
    elif edit.op == "background":
        options = [Edit("background", value=b) for b in BACKGROUNDS if b != edit.value]
    else:
        return None
    options = [e for e in options if _differs(e, state, target)]
    return rng.choice(options) if options else None


def _other_edit(state: Scene, target: Scene, rng: random.Random, avoid: set[int] = frozenset(),
                no_background: bool = False) -> Edit | None:
    for _ in range(20):
        e = random_edit(state, rng)
        if (not set(e.cells()) & avoid and not (no_background and e.op == "background")
                and _differs(e, state, target)):
            return e
    return None


def make_output(defect: str, session: Session, k: int, before: np.ndarray, state: Scene,
                rng: random.Random) -> tuple[np.ndarray, Scene | None, str]:
    """One output of turn ``k``: ``(uint8 image, its exact scene when it is a clean render else None,
    the defect actually produced)`` — a defect that cannot apply falls back to a related one."""
    turn = session.turns[k]
    edit = turn.edit
    target = expected_after(edit, state, turn.before)
    if defect == "correct":
        return render_u8(target), target, defect
    if defect in ("perturbed", "degraded"):
        return perturb(render_u8(target), rng, heavy=defect == "degraded"), None, defect
    if defect == "blend":
        alpha = rng.uniform(0.25, 0.75)
        mixed = alpha * render_u8(target).astype(np.float32) + (1 - alpha) * before.astype(np.float32)
        return np.round(mixed).astype(np.uint8), None, defect
    if defect == "partial":
        mask = np.zeros((RESOLUTION, RESOLUTION, 1), np.float32)
        if edit.op == "background":
            half = RESOLUTION // 2
            mask[[slice(0, half), slice(half, None)][rng.randrange(2)]] = 1
            if rng.random() < 0.5:
                mask = mask.transpose(1, 0, 2).copy()
        else:
            for cell in edit.cells():
                y0, y1, x0, x1 = cell_bounds(cell, RESOLUTION)
                mask[y0:y1, x0:x1] = 1
        beta = rng.uniform(0.0, 0.6)  # how much of the correct output shows in the masked region
        out = render_u8(target).astype(np.float32)
        partial = mask * (beta * out + (1 - beta) * before.astype(np.float32)) + (1 - mask) * out
        return np.round(partial).astype(np.uint8), None, defect
    if defect == "undo_earlier":
        earlier = {c for t in session.turns[:k] for c in t.edit.cells()} - set(edit.cells())
        cells = [c for c in sorted(earlier) if target.cells[c] != session.source.cells[c]]
        if cells:
            cell = rng.choice(cells)
            scene = target.with_cell(cell, session.source.cells[cell])
            return render_u8(scene), scene, defect
        defect = "extra_change"
    wrong_edits = {  # defect -> (a wrong edit or None, the scene it applies to, the defect tried next)
        "extra_change": lambda: (_other_edit(target, target, rng, avoid=set(edit.cells()),
                                             no_background=edit.op == "background"), target, "other_edit"),
        "wrong_value": lambda: (_wrong_value(edit, state, target, rng), state, "wrong_object"),
        "wrong_object": lambda: (_wrong_object(edit, state, target, rng), state, "other_edit"),
        "other_edit": lambda: (_other_edit(state, target, rng), state, "identity"),
    }
    while defect in wrong_edits:
        wrong, base, fallback = wrong_edits[defect]()
        if wrong is not None:
            scene = wrong.apply(base)
            return render_u8(scene), scene, defect
        defect = fallback
    if defect == "identity":
        return before.copy(), None, defect
    raise ValueError(f"unknown defect {defect!r}; known: {list(DEFECTS)}")


def choose(weights: dict[str, float], rng: random.Random) -> str:
    """One kind, drawn with probability proportional to its weight."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]
