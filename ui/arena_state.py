"""Per-person arena state and the checks on what people type (no gradio here).

State
    :class:`ArenaState` lives in a ``gr.State``: small and deep-copyable (images are sha256
    keys into the process's :class:`~ui.images.ImageBank`).  Gradio hands the same
    object to every event of a browser session, so operations mutate it in place, under a
    per-session lock, and only after everything that can fail has succeeded.
"""

from __future__ import annotations

import dataclasses
import unicodedata

CRITERIA = ("overall", "instruction", "consistency", "quality")
MAX_INSTRUCTION_CHARS = 500
MAX_TURNS = 20
MAX_SEED = 2**31 - 1
# Unicode categories that show nothing on their own: controls, format characters (zero-width
# spaces, joiners, soft hyphens), surrogates, private use, unassigned, separators (spaces),
# combining marks; and the letters and symbols drawn as blank space
_UNSEEN = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"))
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


class ArenaError(ValueError):
    """A request the arena refuses; ``str()`` is shown to the user and nothing changes."""


@dataclasses.dataclass
class TurnRecord:
    instruction: str
    told: dict                     # side -> ui.intents.SideIntent: what that side's editor got
    target: str | None             # the world's reading, the verifier's target (None: unknown)
    seed: int
    steps: int | None
    outputs: dict                  # side -> sha256
    seconds: dict                  # side -> float
    verdicts: dict                 # side -> dict | None
    shown_at: float
    vote: dict | None = None


@dataclasses.dataclass
class ArenaState:
    arena_id: str = ""
    branch: int = 0
    source: str | None = None      # sha256 of the prepared source
    source_label: str = ""
    scene: object = None           # world Scene of the source, or None
    suggestions: list = dataclasses.field(default_factory=list)
    left: str = "A"                # which side ('A'/'B') is shown on the left
    anonymous: bool = True
    revealed: bool = False
    turns: list = dataclasses.field(default_factory=list)
    stored: set = dataclasses.field(default_factory=set)     # image shas already in the store
    saved_prefix: int = 0          # turns of this branch already stored as a comparison
    voter: str | None = None
    votes: int = 0                 # votes cast in this arena session (all branches)
    message: str = ""
    # display and behaviour settings (changed by the UI's checkboxes)
    use_intent: bool = True        # each side's reconstructor tells its editor the intent
    show_verdict: bool = False     # show the verifier's verdicts (world sources only)
    anonymous_next: bool = True    # anonymity of the next session started
    arena_key: int | None = None   # which Arena (process-wide registry) owns this state
    # blindness: a new random default seed per session, and what gives a turn's sides away
    seed: int = 0                  # the session's default seed (edits that give none use it)
    prints: set = dataclasses.field(default_factory=set)  # this session's turns (all branches)
    known: set = dataclasses.field(default_factory=set)   # turns this person saw with names
    recognised: bool = False       # a turn of this session repeats one in ``known``

    @property
    def n(self) -> int:
        return len(self.turns)

    def side_on(self, screen: str) -> str:
        return self.left if screen == "left" else ("B" if self.left == "A" else "A")

    def input_of(self, side: str, k: int) -> str:
        """sha of what ``side`` edited at turn ``k`` (the source, or its own output k-1)."""
        return self.source if k == 0 else self.turns[k - 1].outputs[side]

    def latest_of(self, side: str) -> str:
        return self.input_of(side, self.n)

    def names_visible(self) -> bool:
        return not self.anonymous or self.revealed

    def blind(self) -> bool:
        """Whether a vote now is blind: the names are hidden and no turn of this session
        repeats one this person has seen with the names shown."""
        return self.anonymous and not self.recognised

    def can_vote(self) -> bool:
        return bool(self.turns) and self.turns[-1].vote is None and not self.revealed


def check_instruction(text) -> str:
    """``text`` unchanged when it can be an instruction, else an :class:`ArenaError` saying what
    to change.  Kept exactly as typed (line breaks, tabs, repeated spaces): what the editors
    get, what the store keeps and what the screen shows.  Refused: more than
    :data:`MAX_INSTRUCTION_CHARS` characters, half of a character (a lone UTF-16 surrogate,
    which cannot be encoded), control characters other than tab and line breaks, and text with
    no visible character (spaces, zero-width and other invisible characters only)."""
    if not isinstance(text, str):
        raise ArenaError("Type an instruction first.")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise ArenaError(f"That instruction has {len(text):,} characters; the limit is "
                         f"{MAX_INSTRUCTION_CHARS}. Say it in fewer words.")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ArenaError("That instruction contains half of a character (part of an emoji or "
                         "symbol got cut off): delete it and type that character again.")
    control = next((ch for ch in text if unicodedata.category(ch) == "Cc"
                    and ch not in "\t\n\r"), None)
    if control is not None:
        raise ArenaError(f"That instruction contains a control character (U+{ord(control):04X}): "
                         "remove it and try again.")
    if all(ch in _BLANK or unicodedata.category(ch) in _UNSEEN for ch in text):
        raise ArenaError("That instruction is empty: it has no visible characters. Type the "
                         "edit you want.")
    return text


def whole_number(value, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``, or an :class:`ArenaError` naming ``name``."""
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ArenaError(f"{name} must be a whole number between {low} and {high}.") from None
    if not low <= number <= high:
        raise ArenaError(f"{name} must be between {low} and {high}; got {number}.")
    return number
