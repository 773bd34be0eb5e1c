"""Seeded multi-turn editing sessions with fixed, disjoint train / val / test splits.

A session's split is decided by a hash of its *source scene*, so the same source (and therefore the
same instruction sequence) can never appear in two splits. Session ``i`` of a split is a pure
function of ``(split, i, turns)``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from .edits import DIRECTIONS, Edit, intent_text, phrase, phrase_followup
from .scene import BACKGROUNDS, COLOURS, GRID, SHAPES, SIZES, Obj, Scene, neighbour

SPLITS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}  # buckets of hash % 10
MAX_OBJECTS = 6
FOLLOWUP_RATE = 0.4


@dataclass(frozen=True)
class Turn:
    instruction: str      # as the user says it (possibly referential)
    intent: str           # the reconstructed explicit instruction
    edit: Edit
    before: Scene
    after: Scene
    referential: bool


@dataclass
class Session:
    split: str
    index: int
    source: Scene
    turns: list[Turn] = field(default_factory=list)

    @property
    def scenes(self) -> list[Scene]:
        """True scenes S_0 (source) .. S_T."""
        return [self.source] + [t.after for t in self.turns]


def split_of(scene: Scene) -> str:
    bucket = int(hashlib.sha256(scene.key().encode()).hexdigest()[:8], 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def random_object(rng: random.Random) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))


def random_scene(rng: random.Random) -> Scene:
    scene = Scene.empty(rng.choice(list(BACKGROUNDS)))
    for cell in rng.sample(range(GRID * GRID), rng.randint(2, 4)):
        scene = scene.with_cell(cell, random_object(rng))
    return scene


def random_edit(scene: Scene, rng: random.Random) -> Edit:
    """A uniformly chosen op among those applicable to ``scene``, with random arguments."""
    objects, empty = scene.objects(), scene.empty_cells()
    candidates = []
    if empty and len(objects) < MAX_OBJECTS:
        candidates.append(lambda: Edit("add", cell=rng.choice(empty), obj=random_object(rng)))
    if len(objects) > 1:
        candidates.append(lambda: Edit("remove", cell=rng.choice(objects)[0]))
    if objects:
        def recolour():
            cell, obj = rng.choice(objects)
            return Edit("recolour", cell=cell, value=rng.choice([c for c in COLOURS if c != obj.colour]))

        def resize():
            cell, obj = rng.choice(objects)
            return Edit("resize", cell=cell, value="small" if obj.size == "large" else "large")
        candidates += [recolour, resize]
    if objects and empty:
        def move():
            cell, _ = rng.choice(objects)
            near = [n for d in DIRECTIONS if (n := neighbour(cell, d)) is not None and n in empty]
            return Edit("move", cell=cell, to=rng.choice(near if near and rng.random() < 0.5 else empty))
        candidates.append(move)
    pairs = [(a, b) for a, oa in objects for b, ob in objects if a < b and oa != ob]
    if pairs:
        candidates.append(lambda: Edit("swap", *rng.choice(pairs)))
    candidates.append(lambda: Edit("background", value=rng.choice([b for b in BACKGROUNDS if b != scene.background])))
    return rng.choice(candidates)()


def _followup_edit(scene: Scene, previous: Edit, previous_scene: Scene, rng: random.Random) -> Edit | None:
    """An edit of the previous turn's focus object, so it can be phrased referentially."""
    cell = previous.focus()
    if cell is None or not isinstance(scene.cells[cell], Obj):
        return None
    obj = scene.cells[cell]
    options = [Edit("resize", cell=cell, value="small" if obj.size == "large" else "large"),
               Edit("recolour", cell=cell, value=rng.choice([c for c in COLOURS if c != obj.colour]))]
    near = [n for d in DIRECTIONS if (n := neighbour(cell, d)) is not None and scene.cells[n] is None]
    if near:
        options.append(Edit("move", cell=cell, to=rng.choice(near)))
    if len(scene.objects()) > 1:
        options.append(Edit("remove", cell=cell))
    if previous.op == "recolour":  # "change it back to <old colour>"
        options.append(Edit("recolour", cell=cell, value=previous_scene.cells[previous.cell].colour))
    return rng.choice(options)


def generate_session(split: str, index: int, turns: int = 5) -> Session:
    """Session ``index`` of ``split``: a source scene of that split and ``turns`` valid edits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    rng = random.Random(f"mteditlab/{split}/{index}/{turns}")
    source = random_scene(rng)
    while split_of(source) != split:
        source = random_scene(rng)
    session = Session(split, index, source)
    scene = source
    for k in range(turns):
        previous = session.turns[-1] if session.turns else None
        edit = instruction = None
        if previous and rng.random() < FOLLOWUP_RATE:
            edit = _followup_edit(scene, previous.edit, previous.before, rng)
            instruction = edit and phrase_followup(edit, scene, previous.edit, previous.before, rng)
        referential = instruction is not None
        if not referential:
            edit = random_edit(scene, rng)
            instruction = phrase(edit, scene, rng)
        after = edit.apply(scene)
        session.turns.append(Turn(instruction, intent_text(edit, scene), edit, scene, after, referential))
        scene = after
    return session


def sessions(split: str, count: int, turns: int = 5, start: int = 0) -> list[Session]:
    return [generate_session(split, i, turns) for i in range(start, start + count)]
