"""DAgger, a privileged ceiling (world only, not RL): the editor's own states labelled by the world.

Every turn of every rollout enters the replay buffer as (the rollout's own input at turn k, text, latents
of the *true* scene after turn k): what the expert would have the editor produce from the state the
editor actually reached, including states where it had already lost content (then the label restores
it). Trained on by L = ‖v_θ(x_t) − (ε − x0)‖² (:class:`~training.objectives.base.Replay`); no reward is
read; the Polyak average is exported.
"""

from __future__ import annotations

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
    """(own input, text, latents of the true scene after the turn) for every rollout and turn; rollout
    ``i`` of a batch belongs to session ``i // G``."""
    examples = []
    for k, turn in enumerate(turns):
        group = len(turn.before) // len(sessions)
        targets = editor.encode_images([render(s.turns[k].after) for s in sessions]).cpu()
        for i, before in enumerate(turn.before):
            examples.append((before, turn.texts[i][1] or turn.texts[i][0], targets[i // group]))
    return examples
