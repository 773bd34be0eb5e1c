"""DAgger, a privileged ceiling (world only, not RL): the editor's own states labelled by the world.

Every turn of every rollout whose input still shows the true scene before the turn (read by the
verifier: the content is intact, the pixels are the editor's own) enters the replay buffer as (that
input, text, latents of the *true* scene after turn k): draw the edit cleanly from your own imperfect
picture. Off-track states are left out: their label would have to restore content the input no longer
holds, which no editor can learn from the image (kept, they taught the editor to ignore its input and
it collapsed: turn-1 success 0.99 → 0.04, ``docs/rl_notebook.md``). Trained on by
L = ‖v_θ(x_t) − (ε − x0)‖² (:class:`~training.objectives.base.Replay`); no reward is read; the Polyak
average is exported.
"""

from __future__ import annotations

from mteditlab.rewards.features import parse_cached
from mteditlab.world import render
from training.objectives.base import Replay, needs_the_world, register_objective


@register_objective("dagger")
class DAgger(Replay):
    """The learner's own states, the world's next scene as label (:func:`dagger_examples`)."""

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        needs_the_world(cfg, "the world's true next scenes (--algo dagger)")

    def examples(self, editor, sessions, turns, scores):
        return dagger_examples(editor, sessions, turns)


def dagger_examples(editor, sessions, turns) -> list[tuple]:
    """(own input, text, latents of the true scene after the turn) for every rollout and turn whose
    input parses to the true scene before the turn; rollout ``i`` of a batch belongs to session ``i // G``."""
    examples = []
    for k, turn in enumerate(turns):
        group = len(turn.before) // len(sessions)
        targets = editor.encode_images([render(s.turns[k].after) for s in sessions]).cpu()
        for i, before in enumerate(turn.before):
            if parse_cached(before, before.width) == sessions[i // group].turns[k].before:
                examples.append((before, turn.texts[i][1] or turn.texts[i][0], targets[i // group]))
    return examples
