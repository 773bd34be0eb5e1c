"""The multi-turn rollout loop: turn k of every session is edited from that session's turn k−1 output.

    per_turn = rollout(sessions, edit_step(editor.edit_batch, seed=0), turns=5, sources=sources)
    # per_turn[k][i]: session i, turn k

Every multi-turn caller goes through :func:`rollout`: the benchmark, judge training data, the label
queue's items, the annotator simulation and the RL trainer's sampling. What differs between them is
the *step* (which editor, which seeds, whether it records SDE log-probs) and what they do with each
turn (``on_turn``: score, store, record); the loop is this one.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from PIL import Image
from tqdm import tqdm

from mteditlab.intent import turn_seed, turn_text

Item = TypeVar("Item")
Step = Callable[[int, list[Image.Image], Sequence[Item]], list[Image.Image]]
"""``step(k, inputs, items) -> outputs``: turn ``k`` of each item, one output per input."""


def rollout(items: Sequence[Item], step: Step, *, turns: int, sources: Sequence[Image.Image],
            on_turn: Callable[[int, list[Image.Image], list[Image.Image]], None] | None = None,
            progress: bool = False, desc: str = "rollout") -> list[list[Image.Image]]:
    """Run ``turns`` turns of ``step`` over ``items``, each turn fed the previous turn's outputs
    (turn 1 fed ``sources``); return the outputs, ``per_turn[k][i]``. ``on_turn(k, inputs, outputs)``
    runs after each turn. ``items`` are whatever the step needs to know per row (a session, or a
    (session, generation) pair); the loop only keeps them aligned with the images."""
    if len(sources) != len(items):
        raise ValueError(f"rollout needs one source image per item, got {len(sources)} for {len(items)}")
    current, per_turn = list(sources), []
    for k in tqdm(range(turns), desc=desc, disable=not progress):
        outputs = step(k, current, items)
        if len(outputs) != len(current):
            raise ValueError(f"turn {k + 1}: the step returned {len(outputs)} outputs for {len(current)} inputs")
        if on_turn is not None:
            on_turn(k, current, outputs)
        per_turn.append(outputs)
        current = outputs
    return per_turn


def edit_step(edit_batch: Callable[..., list[Image.Image]], *, seed: int, steps: int | None = None,
              intent: str = "reconstruct", batch_size: int = 64) -> Step:
    """The step of an editor over sessions: ``edit_batch(images, instructions, *, intents, seeds,
    steps)`` (an :class:`~mteditlab.editors.Editor`'s, or a function of its signature) in chunks of
    ``batch_size``, with the turn's text for ``intent`` mode (:func:`~mteditlab.intent.turn_text`)
    and the seed ``turn_seed(seed, session.index, k)``, so an output depends only on its session,
    turn and input, never on the batch it was in."""

    def step(k: int, inputs: list[Image.Image], sessions: Sequence) -> list[Image.Image]:
        outputs = []
        for start in range(0, len(sessions), batch_size):
            chunk = sessions[start:start + batch_size]
            texts = [turn_text(s, k, intent) for s in chunk]
            outputs += edit_batch(inputs[start:start + batch_size], [t[0] for t in texts],
                                  intents=[t[1] for t in texts],
                                  seeds=[turn_seed(seed, s.index, k) for s in chunk], steps=steps)
        return outputs

    return step
