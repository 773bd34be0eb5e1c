"""How close a reconstructed intent is to the world's gold one, for one turn of a world session.

``exact``: the same text after case and whitespace are normalised. ``equivalent`` (parse-equivalence):
the world's parser maps both to the same edit of the turn's true scene — what the editor would be
asked to do is the same, whatever the wording. A missing intent (``None``) is neither.
"""

from __future__ import annotations

from mteditlab.world import parse_instruction
from mteditlab.world.sessions import Session


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def intent_agreement(intent: str | None, session: Session, k: int) -> tuple[bool, bool]:
    """``(exact, equivalent)`` of ``intent`` against turn ``k`` (0-based) of ``session``."""
    if intent is None:
        return False, False
    gold = session.turns[k].intent
    scene = session.turns[k].before
    if _normal(intent) == _normal(gold):
        return True, True
    edit = parse_instruction(gold, scene)
    return False, edit is not None and parse_instruction(intent, scene) == edit
