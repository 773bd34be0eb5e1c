"""Edit operations, their phrasings, and the rule-based intent resolver.

An ``Edit`` is a cell-level operation on a scene. Every instruction of the world is either
*explicit* (names its object by colour, shape and, when needed, position) or *referential*
("make it bigger", "move the one you just added to the left", "change it back to red"), whose
meaning needs the history. ``resolve`` turns either kind into the canonical explicit intent
("make the red circle at the top left bigger") — the world's intent reconstruction.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .scene import BACKGROUNDS, CELLS, COLOURS, SHAPES, Obj, Scene, neighbour

OPS = ("add", "remove", "recolour", "move", "resize", "swap", "background")
DIRECTIONS = ("left", "right", "up", "down")


@dataclass(frozen=True)
class Edit:
    """A cell-level edit. ``cell`` is where the object is before the edit; ``to`` is the move
    destination or the swap partner; ``obj`` the object to add; ``value`` the new colour, size or
    background."""

    op: str
    cell: int | None = None
    to: int | None = None
    obj: Obj | None = None
    value: str | None = None

    def cells(self) -> tuple[int, ...]:
        """Cells whose content the edit changes."""
        if self.op == "background":
            return ()
        return (self.cell,) if self.to is None else (self.cell, self.to)

    def focus(self) -> int | None:
        """Where the edited object is after the edit ("it" in a follow-up), if there is one."""
        if self.op in ("add", "recolour", "resize"):
            return self.cell
        if self.op == "move":
            return self.to
        return None

    def applicable(self, scene: Scene) -> bool:
        """Whether the scene has what the edit needs (an object to act on, a free cell, ...)."""
        if self.op == "background":
            return scene.background != self.value
        here = scene.cells[self.cell]
        if self.op == "add":
            return here is None
        if not isinstance(here, Obj):
            return False
        if self.op == "move":
            return scene.cells[self.to] is None
        if self.op == "swap":
            return isinstance(scene.cells[self.to], Obj) and scene.cells[self.to] != here
        if self.op == "recolour":
            return here.colour != self.value
        if self.op == "resize":
            return here.size != self.value
        return True  # remove

    def apply(self, scene: Scene) -> Scene:
        """The scene after the edit (the edit must be applicable)."""
        if self.op == "background":
            return Scene(self.value, scene.cells)
        here = scene.cells[self.cell]
        if self.op == "add":
            return scene.with_cell(self.cell, self.obj)
        if self.op == "remove":
            return scene.with_cell(self.cell, None)
        if self.op == "recolour":
            return scene.with_cell(self.cell, Obj(here.shape, self.value, here.size))
        if self.op == "resize":
            return scene.with_cell(self.cell, Obj(here.shape, here.colour, self.value))
        if self.op == "move":
            return scene.with_cell(self.cell, None).with_cell(self.to, here)
        if self.op == "swap":
            return scene.with_cell(self.cell, scene.cells[self.to]).with_cell(self.to, here)
        raise ValueError(f"unknown op {self.op!r}")


# ---- phrasing ---------------------------------------------------------------------------------

def where(cell: int) -> str:
    return "in the center" if CELLS[cell] == "center" else f"at the {CELLS[cell]}"


def refer(scene: Scene, cell: int, explicit: bool = False) -> str:
    """Shortest unambiguous description of the object at ``cell``; ``explicit`` always adds its place."""
    obj = scene.cells[cell]
    same = [c for c, o in scene.objects() if (o.colour, o.shape) == (obj.colour, obj.shape)]
    if explicit or len(same) > 1:
        return f"the {obj.colour} {obj.shape} {where(cell)}"
    return f"the {obj.colour} {obj.shape}"


def intent_text(edit: Edit, scene: Scene) -> str:
    """The canonical explicit instruction for ``edit`` applied to ``scene`` (what ``resolve`` returns)."""
    if edit.op == "background":
        return f"change the background to {edit.value}"
    if edit.op == "add":
        return f"add a {edit.obj.describe(with_size=True)} {where(edit.cell)}"
    ref = refer(scene, edit.cell, explicit=True)
    if edit.op == "remove":
        return f"remove {ref}"
    if edit.op == "recolour":
        return f"make {ref} {edit.value}"
    if edit.op == "resize":
        return f"make {ref} {'bigger' if edit.value == 'large' else 'smaller'}"
    if edit.op == "move":
        return f"move {ref} to the {CELLS[edit.to]}"
    return f"swap {ref} and {refer(scene, edit.to, explicit=True)}"


def _direction(a: int, b: int) -> str | None:
    return next((d for d in DIRECTIONS if neighbour(a, d) == b), None)


def phrase(edit: Edit, scene: Scene, rng: random.Random, ref: str | None = None) -> str:
    """One of several surface forms of ``edit``. ``ref`` overrides the object's description
    (a referential phrase such as "it" or "the one you just added")."""
    if edit.op == "background":
        return rng.choice(["change the background to {v}", "make the background {v}",
                           "paint the background {v}"]).format(v=edit.value)
    if edit.op == "add":
        return rng.choice(["add a {o} {w}", "put a {o} {w}", "draw a {o} {w}"]).format(
            o=edit.obj.describe(with_size=True), w=where(edit.cell))
    r = ref or refer(scene, edit.cell)
    if edit.op == "remove":
        return rng.choice(["remove {r}", "delete {r}", "take away {r}"]).format(r=r)
    if edit.op == "recolour":
        return rng.choice(["make {r} {v}", "change the colour of {r} to {v}", "paint {r} {v}"]).format(r=r, v=edit.value)
    if edit.op == "resize":
        word = "bigger" if edit.value == "large" else "smaller"
        verb = "enlarge" if edit.value == "large" else "shrink"
        return rng.choice([f"make {r} {word}", f"{verb} {r}"])
    if edit.op == "move":
        direction = _direction(edit.cell, edit.to)
        forms = ["move {r} to the {p}", "put {r} at the {p}"]
        if direction:
            forms += ["move {r} {d}" if direction in ("up", "down") else "move {r} to the {d}",
                      "shift {r} one cell {d}"]
        return rng.choice(forms).format(r=r, p=CELLS[edit.to], d=direction)
    r2 = refer(scene, edit.to)
    return rng.choice(["swap {a} and {b}", "exchange the positions of {a} and {b}"]).format(a=r, b=r2)


def phrase_followup(edit: Edit, scene: Scene, previous: Edit, previous_scene: Scene, rng: random.Random) -> str | None:
    """A referential phrasing of ``edit`` whose object is the previous turn's focus, or None."""
    if edit.op in ("add", "background", "swap") or previous.focus() != edit.cell:
        return None
    if edit.op == "recolour" and previous.op == "recolour" and edit.value == previous_scene.cells[previous.cell].colour:
        return rng.choice(["change it back to {v}", "make it {v} again", "undo the colour change"]).format(v=edit.value)
    ref = rng.choice(["it", {"add": "the one you just added", "move": "the one you just moved",
                             "recolour": "the one you just recoloured", "resize": "the one you just resized"}[previous.op]])
    return phrase(edit, scene, rng, ref=ref)


# ---- the resolver: any instruction of the world + history -> the explicit intent ----------------

_WORD = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}
_REFERENTIAL = re.compile(r"\b(it|the one you just \w+|undo the colour change)\b")
_MENTION = re.compile(r"\b(?:the|a)\s+(?:(small|large)\s+)?(?:(" + "|".join(COLOURS) + r")\s+)?(" + "|".join(SHAPES)
                      + r")(?:\s+(?:at|in)\s+the\s+(" + "|".join(sorted(CELLS, key=len, reverse=True)) + r"))?")
_PLACE = re.compile(r"\bto the (" + "|".join(sorted(CELLS, key=len, reverse=True)) + r")\b|\bat the ("
                    + "|".join(sorted(CELLS, key=len, reverse=True)) + r")\s*$")


def _find(scene: Scene, size: str | None, colour: str | None, shape: str, place: str | None) -> int | None:
    hits = [c for c, o in scene.objects() if o.shape == shape and colour in (None, o.colour)
            and size in (None, o.size) and place in (None, CELLS[c])]
    return hits[0] if len(hits) == 1 else None


def parse_instruction(text: str, scene: Scene, history: list[Edit] | None = None) -> Edit | None:
    """Parse an instruction of the world's grammar into an applicable ``Edit`` on ``scene``.

    ``history`` (earlier edits, oldest first) resolves referential phrases. Returns None for text the
    grammar cannot express or that does not apply to the scene."""
    text = " ".join(text.lower().replace(",", " ").split())
    colours = [w for w in re.findall(r"[a-z]+", text) if w in COLOURS or w in BACKGROUNDS]
    if "background" in text:
        value = next((c for c in colours if c in BACKGROUNDS), None)
        edit = Edit("background", value=value) if value else None
        return edit if edit and edit.applicable(scene) else None
    previous = history[-1] if history else None
    focus = previous.focus() if previous else None
    if text.startswith(("add ", "put a ", "draw a ")):
        m = _MENTION.search(text)
        if not (m and m.group(2) and m.group(4)):
            return None
        edit = Edit("add", cell=CELLS.index(m.group(4)), obj=Obj(m.group(3), m.group(2), m.group(1) or "small"))
        return edit if edit.applicable(scene) else None
    mentions = list(_MENTION.finditer(text))
    targets = [_find(scene, *m.groups()) for m in mentions]
    is_move = text.startswith(("move", "shift", "put"))
    place = _PLACE.search(text)
    if is_move and targets and targets[0] is None and mentions[0].group(4):
        # "put the red circle at the center": the place is the destination, not part of the reference
        targets = [_find(scene, *mentions[0].groups()[:3], None)]
    if _REFERENTIAL.search(text) and focus is not None:
        targets = [focus]
    if not targets or targets[0] is None:
        return None
    cell = targets[0]
    edit: Edit | None = None
    if text.startswith(("swap", "exchange")):
        edit = Edit("swap", cell=cell, to=targets[1]) if len(targets) == 2 and targets[1] is not None else None
    elif text.startswith(("remove", "delete", "take away")):
        edit = Edit("remove", cell=cell)
    elif is_move:
        direction = next((d for d in DIRECTIONS if re.search(rf"\b{d}\s*$", text)), None)
        if place:
            edit = Edit("move", cell=cell, to=CELLS.index(place.group(1) or place.group(2)))
        elif direction and neighbour(cell, direction) is not None:
            edit = Edit("move", cell=cell, to=neighbour(cell, direction))
    elif re.search(r"\b(bigger|larger|enlarge)\b", text):
        edit = Edit("resize", cell=cell, value="large")
    elif re.search(r"\b(smaller|shrink)\b", text):
        edit = Edit("resize", cell=cell, value="small")
    elif "undo the colour change" in text and previous is not None and previous.op == "recolour":
        edit = None  # needs the colour before the previous edit: resolved by ``resolve`` from the scenes
    else:
        value = next((c for c in reversed(colours) if c in COLOURS), None)
        edit = Edit("recolour", cell=cell, value=value) if value else None
    return edit if edit and edit.applicable(scene) else None


def resolve(text: str, scene: Scene, history: list[tuple[Edit, Scene]] | None = None) -> str | None:
    """Reconstruct the operative intent: the canonical explicit form of ``text`` given the history
    (``(edit, scene_before_edit)`` pairs, oldest first), or None if the text cannot be resolved."""
    history = history or []
    if "undo the colour change" in text.lower() and history and history[-1][0].op == "recolour":
        previous, before = history[-1]
        edit = Edit("recolour", cell=previous.cell, value=before.cells[previous.cell].colour)
    else:
        edit = parse_instruction(text, scene, [e for e, _ in history])
    return intent_text(edit, scene) if edit and edit.applicable(scene) else None
