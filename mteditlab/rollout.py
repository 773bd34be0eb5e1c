"""The multi-turn rollout loop: turn k of every session is edited from that session's turn k−1 output.

    per_turn = rollout(sessions, EditStep(editor.edit_batch, seed=0, intent="rule"), turns=5, sources=sources)
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

from mteditlab.intent import TurnIntents, session_of, turn_seed
from mteditlab.reconstructors import Reconstructor

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


class EditStep:
    """The step of an editor over sessions: ``edit_batch(images, instructions, *, intents, seeds, steps)``
    (an :class:`~mteditlab.editors.Editor`'s, or a function of its signature) in chunks of
    ``batch_size``, each item told its turn's instruction and the intent ``intent`` reconstructs (a
    reconstructor or its spec, :mod:`mteditlab.reconstructors`), with the seed
    ``turn_seed(seed, session.index, k)``, so an output depends only on its session, turn and input,
    never on the batch it was in.

    ``step(k, inputs, items, rows=None)``: ``rows`` are the items' positions in the rollout's item list
    when the step is called on a subset (default ``0, 1, …``); ``intents`` (a
    :class:`~mteditlab.intent.TurnIntents`) keeps what each row was told, turn by turn."""

    def __init__(self, edit_batch: Callable[..., list[Image.Image]], *, seed: int, steps: int | None = None,
                 intent: Reconstructor | str = "oracle", batch_size: int = 64):
        self.edit_batch, self.seed, self.steps, self.batch_size = edit_batch, seed, steps, batch_size
        self.intents = TurnIntents(intent)

    def __call__(self, k: int, inputs: list[Image.Image], items: Sequence,
                 rows: Sequence[int] | None = None) -> list[Image.Image]:
        rows = list(range(len(items))) if rows is None else list(rows)
        outputs = []
        for start in range(0, len(items), self.batch_size):
            chunk, images = items[start:start + self.batch_size], inputs[start:start + self.batch_size]
            texts = self.intents(k, images, chunk, rows[start:start + self.batch_size])
            outputs += self.edit_batch(images, [text for text, _ in texts], intents=[intent for _, intent in texts],
                                       seeds=[turn_seed(self.seed, session_of(s).index, k) for s in chunk],
                                       steps=self.steps)
        return outputs
