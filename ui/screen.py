"""Votes as shown on screen: 'left', 'right', 'tie', 'both_bad', whichever session is left.

The store records choices by session ('A' = ``session_a``) and which session was shown on
the left; :func:`choice_from_screen` maps a screen vote to that choice."""

from __future__ import annotations

from labeling.schema import SIDES

PICKS = ("left", "right", "tie", "both_bad")


def choice_from_screen(pick: str, left: str) -> str:
    """Map a screen vote (one of :data:`PICKS`) to a session choice ('A', 'B', 'tie',
    'both_bad') given ``left``, the session ('A' or 'B') shown on the left."""
    if left not in SIDES:
        raise ValueError(f"left must be one of {SIDES}, got {left!r}")
    right = "B" if left == "A" else "A"
    mapping = {"left": left, "right": right, "tie": "tie", "both_bad": "both_bad"}
    if pick not in mapping:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    return mapping[pick]
