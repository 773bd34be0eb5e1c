"""What the app knows about the built-in world: reconstructing intents, verifier verdicts, test-split
scenes and the grammar notice (a source is read with ``mteditlab.world.read_world_scene``).

Intent reconstruction follows the *intended* session: the source scene read by the verifier,
then each instruction resolved (``mteditlab.world.resolve``) against the intended scene with
the history of earlier ``(edit, scene before)`` pairs, and applied to get the next intended
scene.  Both sides get the same intent (the user's intent does not depend on what an editor
drew).  Once a turn cannot be resolved, the intended scene is unknown, so later turns are not
resolved either, and the UI says so.
"""

from __future__ import annotations

import dataclasses
import random

from PIL import Image

from mteditlab.world import (BACKGROUNDS, CELLS, COLOURS, SHAPES, Edit, Scene, Session, Turn, generate_session,
                             parse_instruction, render, resolve, score_turn)

TEST_SESSIONS = 10_000
EXAMPLES = (0, 3, 7, 12)  # indices of test sessions offered as examples


@dataclasses.dataclass(frozen=True)
class IntentStep:
    """One turn of the intended session: the resolved intent and the world edit, or why not."""

    intent: str | None
    edit: Edit | None
    before: Scene | None
    after: Scene | None
    note: str   # what the UI shows


def resolve_turn(instruction: str, source: Scene | None, steps: list[IntentStep]) -> IntentStep:
    """Reconstruct the operative intent of ``instruction`` after the intended ``steps``."""
    if source is None:
        return IntentStep(None, None, None, None,
                          "not reconstructed: the source is not a scene of the built-in world")
    if any(s.edit is None for s in steps):
        return IntentStep(None, None, None, None,
                          "not reconstructed: an earlier turn was not understood, so the "
                          "intended scene is unknown")
    scene = steps[-1].after if steps else source
    history = [(s.edit, s.before) for s in steps]
    try:
        intent = resolve(instruction, scene, history)
    except Exception:  # noqa: BLE001 - the resolver is rule-based; odd text must not crash
        intent = None
    if intent is None:
        return IntentStep(None, None, scene, None,
                          "could not resolve: outside the world's grammar, or it does not apply "
                          "to the current scene")
    edit = parse_instruction(intent, scene)
    if edit is None or not edit.applicable(scene):
        return IntentStep(intent, None, scene, None, f"resolved to “{intent}” but not applicable")
    return IntentStep(intent, edit, scene, edit.apply(scene), f"“{intent}”")


def verdict(source: Scene, steps: list[IntentStep], k: int, before: Image.Image,
            after: Image.Image) -> dict | None:
    """The verifier's IF / CC / GA / success for turn ``k`` of one side, or None when the
    intended session up to ``k`` is not known."""
    if source is None or len(steps) <= k or any(s.edit is None for s in steps[: k + 1]):
        return None
    session = Session("arena", 0, source, [
        Turn(f"turn {i}", s.intent, s.edit, s.before, s.after, False) for i, s in enumerate(steps[: k + 1])])
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
