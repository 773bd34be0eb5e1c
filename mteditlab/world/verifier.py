"""The exact verifier: read an image back into a scene, and score a turn (IF, CC, GA).

Parsing is nearest-template matching per cell: both the image and every candidate cell content
(empty, or any shape × colour × size) are blurred with the same Gaussian (σ = 1 px at 32×32),
which makes the match robust to blur, pixel noise and JPEG artefacts. The background is the one
whose nine cell matches have the least total error. A cell whose best match is still far off
(RMS error above ``UNKNOWN_RMS``) is ``UNKNOWN``: it matches nothing, so it fails CC / GA / IF.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .edits import Edit
from .scene import (BACKGROUNDS, COLOURS, DEFAULT_RESOLUTION, GRID, SHAPES, SIZES, UNKNOWN, Obj, Scene,
                    cell_bounds, render_array)
from .sessions import Session

UNKNOWN_RMS = 0.12
WORLD_RMS = 0.08  # max RMS difference between a world image and its parsed scene's render
_BLUR = 1.0
_EXTRA_BLUR = (0.0, 0.7, 1.1)
_CANDIDATES = [None] + [Obj(s, c, z) for s in SHAPES for c in COLOURS for z in SIZES]


def _blur(image: np.ndarray, extra: float = 0.0) -> np.ndarray:
    sigma = float(np.hypot(_BLUR, extra))
    return gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest")


def _patches(image: np.ndarray, resolution: int) -> list[np.ndarray]:
    return [image[y0:y1, x0:x1] for y0, y1, x0, x1 in (cell_bounds(c, resolution) for c in range(GRID * GRID))]


@lru_cache(maxsize=2)
def _templates(resolution: int) -> tuple[list[tuple[str, float]], list[np.ndarray], list[np.ndarray]]:
    """Blurred cell renders of every candidate: ``keys`` = (background, extra blur) pairs, and per cell
    an array ``[len(keys), len(_CANDIDATES), h·w·3]`` plus its squared norms. The extra blur levels
    model an editor (or a codec) that softens its output."""
    keys = [(bg, extra) for bg in BACKGROUNDS for extra in _EXTRA_BLUR]
    per_cell = [[] for _ in range(GRID * GRID)]
    for bg, extra in keys:
        for cell in range(GRID * GRID):
            renders = [_blur(render_array(Scene.empty(bg).with_cell(cell, obj), resolution), extra) for obj in _CANDIDATES]
            per_cell[cell].append(np.stack([_patches(r, resolution)[cell].ravel() for r in renders]))
    stacks = [np.stack(t) for t in per_cell]
    return keys, stacks, [(t**2).sum(-1) for t in stacks]


def to_array(image: Image.Image, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Any PIL image → float RGB ``[resolution, resolution, 3]`` in [0, 1] (box-resized if needed)."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255


def parse_image(image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION) -> Scene:
    """Read the scene an image shows (``UNKNOWN`` for unreadable cells).

    The (background, blur level) pair with the least total error over the nine cells wins; each cell
    then takes its nearest candidate under that pair."""
    array = image if isinstance(image, np.ndarray) else to_array(image, resolution)
    keys, stacks, norms = _templates(resolution)
    # mean squared error of every (background, blur) × candidate for every cell: [cells, keys, candidates]
    errors = np.stack([(n - 2 * t @ p.ravel() + p.ravel() @ p.ravel()) / p.size
                       for t, n, p in zip(stacks, norms, _patches(_blur(array), resolution))])
    best = int(errors.min(-1).sum(0).argmin())
    cells = tuple(_CANDIDATES[int(e.argmin())] if np.sqrt(max(e.min(), 0.0)) <= UNKNOWN_RMS else UNKNOWN
                  for e in errors[:, best])
    return Scene(keys[best][0], cells)


def read_world_scene(image: Image.Image) -> Scene | None:
    """The scene ``image`` shows when it is a scene of the world: every cell readable and the image
    within RMS :data:`WORLD_RMS` of that scene's render (at :data:`DEFAULT_RESOLUTION`); else None
    (a photo, a drawing, an editor's garbled output)."""
    array = to_array(image)
    scene = parse_image(array)
    if any(cell is UNKNOWN for cell in scene.cells):
        return None
    rms = float(np.sqrt(((render_array(scene) - array) ** 2).mean()))
    return scene if rms <= WORLD_RMS else None


@dataclass(frozen=True)
class TurnScore:
    """Verdict on one turn. ``if_``: the requested change happened (the edited cells show what the
    edit asks for, and they changed: an edit made moot by an earlier failure cannot pass); ``cc``: nothing else changed
    versus the turn's input; ``ga``: every cell set by an earlier turn (and not re-edited since)
    still holds its session value."""

    if_: bool
    cc: bool
    ga: bool
    parsed: Scene

    @property
    def success(self) -> bool:
        return self.if_ and self.cc and self.ga

    def as_dict(self) -> dict[str, float]:
        return {"if": float(self.if_), "cc": float(self.cc), "ga": float(self.ga), "success": float(self.success)}


def expected_after(edit: Edit, parsed_before: Scene, true_before: Scene) -> Scene:
    """What the turn should produce from its actual input: the edit applied to what the input shows,
    or — when the input lacks what the edit needs — to the true scene."""
    return edit.apply(parsed_before if edit.applicable(parsed_before) else true_before)


def score_turn(session: Session, k: int, before: Image.Image | Scene, after: Image.Image | Scene) -> TurnScore:
    """Score turn ``k`` (0-based) of ``session`` given the image it was fed and the image produced."""
    parsed_before = before if isinstance(before, Scene) else parse_image(before)
    parsed = after if isinstance(after, Scene) else parse_image(after)
    turn = session.turns[k]
    edit, touched = turn.edit, set(turn.edit.cells())
    expected = expected_after(edit, parsed_before, turn.before)
    if edit.op == "background":
        if_ = parsed.background == expected.background != parsed_before.background
    else:  # the edited cells show the expected content, and something visibly changed there
        if_ = all(parsed.cells[c] == expected.cells[c] for c in touched) and \
            any(parsed.cells[c] != parsed_before.cells[c] for c in touched)
    cc = all(parsed.cells[c] == parsed_before.cells[c] for c in range(GRID * GRID) if c not in touched)
    cc = cc and (edit.op == "background" or parsed.background == parsed_before.background)
    earlier = {c for t in session.turns[:k] for c in t.edit.cells()} - touched
    ga = all(parsed.cells[c] == turn.after.cells[c] for c in earlier)
    if edit.op != "background" and any(t.edit.op == "background" for t in session.turns[:k]):
        ga = ga and parsed.background == turn.after.background
    return TurnScore(if_, cc, ga, parsed)
