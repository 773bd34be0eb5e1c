"""What an editor is told at each turn: the instruction as typed, the history joined, or the
reconstructed operative intent (Edit-R2)."""

from __future__ import annotations

from mteditlab.world import Session

INTENT_MODES = ("none", "concat", "reconstruct")


def turn_text(session: Session, k: int, mode: str = "reconstruct") -> tuple[str, str | None]:
    """``(instruction, intent)`` for turn ``k`` (0-based) under ``mode``:

    * ``none``: the instruction alone (referential ones stay ambiguous);
    * ``concat``: every instruction so far joined with "; " (oldest first) as the intent;
    * ``reconstruct``: the rule-based explicit intent ("make the red circle at the top left bigger").
    """
    instruction = session.turns[k].instruction
    if mode == "none":
        return instruction, None
    if mode == "concat":
        return instruction, "; ".join(t.instruction for t in session.turns[: k + 1])
    if mode == "reconstruct":
        return instruction, session.turns[k].intent
    raise ValueError(f"unknown intent mode {mode!r}; choose one of {INTENT_MODES}")


def turn_seed(seed: int, session_index: int, k: int) -> int:
    """Per-(session, turn) sampling seed, shared by both sides of a comparison."""
    return seed * 1_000_003 + session_index * 101 + k
