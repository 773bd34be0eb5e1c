"""What an editor reads at each turn: the instruction as typed and the intent a reconstructor gives it
(:mod:`mteditlab.reconstructors`), kept per rollout item across turns; and the per-turn seed.

    intents = TurnIntents("rule")                          # or a built Reconstructor
    texts = intents(k, inputs, items)                      # [(instruction, intent or None)] of turn k

Every caller that conditions an editor on an intent goes through :class:`TurnIntents`: the rollout's
editor step, the trainer's sampling, the SFT control's gold pairs, the annotator simulation.
"""

from __future__ import annotations

import functools
from typing import Sequence

from PIL import Image

from mteditlab.reconstructors import IntentQuery, Reconstruction, Reconstructor, build_reconstructor


@functools.cache
def shared_reconstructor(spec: str) -> Reconstructor:
    """The reconstructor ``spec`` names, built once per process (a learned one loads its weights once,
    a served one keeps one client) and shared by every caller that names it."""
    return build_reconstructor(spec)


def session_of(item):
    """The session of a rollout item: the item itself, or the first of a ``(session, generation)`` pair."""
    return item[0] if isinstance(item, tuple) else item


class TurnIntents:
    """The intents of one rollout's items, turn by turn, from one reconstructor (built, or its spec:
    :func:`shared_reconstructor`).

    ``intents(k, inputs, items, rows)`` returns ``(instruction, intent)`` of turn ``k`` (0-based) for each
    item, ``inputs`` being the images the turn edits. ``items`` are sessions (the world's or data ones)
    or ``(session, generation)`` pairs; ``rows`` are their positions in the rollout's item list (default
    ``0, 1, …``) and key each item's history: its turn-1 input (the source) and the intents reconstructed
    for its earlier turns. A row's turn is reconstructed once, by the first call that reaches it (the
    rollout's own); a later call for the same turn (the benchmark's teacher-forced pass) reuses it, so
    both passes tell the editor the same thing. Turns must be asked in order.

    ``results[row]``: that row's :class:`~mteditlab.reconstructors.Reconstruction` per turn so far.
    """

    def __init__(self, reconstructor: Reconstructor | str = "oracle"):
        self.reconstructor = (shared_reconstructor(reconstructor) if isinstance(reconstructor, str)
                              else reconstructor)
        self.results: dict[int, list[Reconstruction]] = {}
        self.sources: dict[int, Image.Image] = {}

    def __call__(self, k: int, inputs: Sequence[Image.Image], items: Sequence,
                 rows: Sequence[int] | None = None) -> list[tuple[str, str | None]]:
        rows = list(range(len(items))) if rows is None else list(rows)
        sessions = [session_of(item) for item in items]
        fresh: dict[int, int] = {}   # row -> position in this call, for the rows whose turn k is new
        for j, row in enumerate(rows):
            done = len(self.results.setdefault(row, []))
            if done < k:
                raise ValueError(f"turn {k + 1} of item {row} was asked before its turn {done + 1}: "
                                 "ask a rollout's turns in order, starting from turn 1 on the sources")
            if k == 0:
                self.sources.setdefault(row, inputs[j])
            if done == k:
                fresh.setdefault(row, j)
        queries = [IntentQuery([t.instruction for t in sessions[j].turns[:k + 1]],
                               [r.intent for r in self.results[row]], inputs[j], self.sources[row], sessions[j])
                   for row, j in fresh.items()]
        answers = self.reconstructor.reconstruct(queries) if queries else []
        if len(answers) != len(queries):
            raise ValueError(f"reconstructor {self.reconstructor.name!r} gave {len(answers)} intents for "
                             f"{len(queries)} queries")
        for row, answer in zip(fresh, answers):
            self.results[row].append(answer)
        return [(sessions[j].turns[k].instruction, self.results[row][k].intent) for j, row in enumerate(rows)]

    def told(self, row: int) -> list[str | None]:
        """The intents given to ``row``'s turns so far (None: the instruction alone)."""
        return [r.intent for r in self.results.get(row, [])]

    def failures(self, k: int) -> int:
        """How many rows' turn ``k`` the reconstructor failed on (and fell back to the instruction)."""
        return sum(len(r) > k and r[k].failure is not None for r in self.results.values())


def turn_seed(seed: int, session_index: int, k: int) -> int:
    """Per-(session, turn) sampling seed, shared by both sides of a comparison."""
    return seed * 1_000_003 + session_index * 101 + k
