"""What the app knows about the built-in world: the verifier's target and verdicts, test-split
scenes and the grammar notice (a source is read with ``mteditlab.world.read_world_scene``).

The verifier judges both sides against one target, what the world's rule reads the person to
mean (:func:`reference_intent`): the registered ``rule`` reconstructor
(:mod:`mteditlab.reconstructors.rule`, the one implementation every caller shares) along the
*intended* session — the source scene, then each earlier turn's reading applied.  What a side's
own reconstructor told its editor (:mod:`ui.intents`) does not move the target: a side whose
reconstructor misreads "make it bigger" fails instruction following like an editor that
misdraws it.  Once a turn cannot be read, the intended scene is unknown, so later turns have no
target and no verdict, and the UI says so.
"""

from __future__ import annotations

import random
from typing import Sequence

from PIL import Image

from mteditlab.world import (BACKGROUNDS, CELLS, COLOURS, SHAPES, Scene, Session, Turn, generate_session,
                             parse_instruction, render, score_turn)

TEST_SESSIONS = 10_000
EXAMPLES = (0, 3, 7, 12)  # indices of test sessions offered as examples


def reference_intent(source: Image.Image, scene: Scene | None, instructions: Sequence[str],
                     earlier: Sequence[str | None]) -> str | None:
    """The world's rule reading of the last of ``instructions`` after the earlier turns' readings
    ``earlier`` (the verifier's target, see the module docstring), or None: the source is no world
    scene, an earlier turn has no reading, or the rule cannot resolve this one."""
    from mteditlab.intent import shared_reconstructor
    from mteditlab.reconstructors import IntentQuery

    if scene is None or any(intent is None for intent in earlier):
        return None
    query = IntentQuery(list(instructions), list(earlier), source, source)
    try:
        [result] = shared_reconstructor("rule").reconstruct([query])
    except Exception:  # noqa: BLE001 - the resolver is rule-based; odd text must not crash
        return None
    return result.intent if result.details.get("scene") == "intended" else None


def intended_session(source: Scene, intents: Sequence[str | None]) -> Session | None:
    """The world session the ``intents`` describe from ``source`` (each parsed and applied to the
    scene before it), or None when one of them is missing, unparseable or not applicable."""
    scene, turns = source, []
    for i, intent in enumerate(intents):
        edit = parse_instruction(intent, scene) if intent else None
        if edit is None or not edit.applicable(scene):
            return None
        after = edit.apply(scene)
        turns.append(Turn(f"turn {i}", intent, edit, scene, after, False))
        scene = after
    return Session("arena", 0, source, turns)


def verdict(source: Scene | None, targets: Sequence[str | None], k: int, before: Image.Image,
            after: Image.Image) -> dict | None:
    """The verifier's IF / CC / GA / success for turn ``k`` of one side (``before`` → ``after``)
    against the targets of turns ``0..k`` (:func:`reference_intent`), or None when the intended
    session up to ``k`` is not known."""
    if source is None or len(targets) <= k:
        return None
    session = intended_session(source, targets[: k + 1])
    if session is None:
        return None
    score = score_turn(session, k, before, after)
    return {key: bool(value) for key, value in score.as_dict().items()}


def format_verdict(v: dict | None) -> str:
    if v is None:
        return "verifier: n/a"
    marks = " ".join(f"{name.upper()}{'✓' if v[key] else '✗'}"
                     for name, key in (("if", "if"), ("cc", "cc"), ("ga", "ga")))
    return f"{'✅' if v['success'] else '❌'} {marks}"


def test_scene(index: int) -> tuple[Image.Image, list[str], str]:
    """Source image, scripted instructions and a label of test-split session ``index``."""
    session = generate_session("test", index, turns=5)
    return render(session.source), [t.instruction for t in session.turns], f"test scene #{index}"


def random_test_scene(rng: random.Random | None = None) -> tuple[Image.Image, list[str], str]:
    return test_scene((rng or random).randrange(TEST_SESSIONS))


GRAMMAR = f"""**What the mini editor understands** (the built-in world's grammar; other text is
passed through but the mini editor was never trained on it):

* **add** — “add a *small|large* *colour* *shape* at the *place*” (also *put a*, *draw a*)
* **remove** — “remove the *colour* *shape*” (also *delete*, *take away*)
* **recolour** — “make the *colour* *shape* *colour*”, “paint …”, “change the colour of … to …”
* **move** — “move the *colour* *shape* to the *place*”, “… to the left/right”, “… up/down”,
  “shift … one cell left”
* **resize** — “make … bigger/smaller”, “enlarge …”, “shrink …”
* **swap** — “swap the red circle and the blue square”
* **background** — “change the background to *{'/'.join(BACKGROUNDS)}*”
* **referential follow-ups** — “make it bigger”, “move the one you just added to the left”,
  “change it back to red”, “undo the colour change”

Colours: {', '.join(COLOURS)} · shapes: {', '.join(SHAPES)} · sizes: small, large ·
places: {', '.join(CELLS)} (a 3×3 grid). Add “at the *place*” to tell apart two equal objects.
"""
