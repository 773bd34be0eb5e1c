"""The supervised control (SFT): the world's gold pairs, teacher-forced, replayed with the flow-matching loss.

Every turn of the iteration's sessions enters the replay buffer as (the true scene before, text, latents
of the true scene after), trained on by L = ‖v_θ(x_t) − (ε − x0)‖²
(:class:`~training.objectives.base.Replay`); no rollouts are drawn, the Polyak average is exported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mteditlab.editors.flow_policy import FlowPolicy
from mteditlab.intent import TurnIntents
from mteditlab.world import Session, render
from training.objectives.base import Replay, needs_the_world, register_objective

if TYPE_CHECKING:
    from training.config import GRPOConfig


@register_objective("sft")
class SFT(Replay):
    """The supervised control: the world's gold pairs (:func:`gold_examples`); no rollouts."""

    samples = False

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        needs_the_world(cfg, "the world's gold pairs (--algo sft)")

    def examples(self, editor, sessions, turns, scores):
        return gold_examples(editor, sessions, self.cfg)


def gold_examples(editor: FlowPolicy, sessions: list[Session], cfg: GRPOConfig) -> list[tuple]:
    """Teacher-forced (true scene before, text, latents of the true scene after) for every turn, the text
    being the intent ``cfg.intent`` reconstructs on the true scenes (else the instruction)."""
    befores = [[render(s.turns[k].before) for s in sessions] for k in range(cfg.turns)]
    intents = TurnIntents(cfg.intent)
    texts = [intents(k, befores[k], sessions) for k in range(cfg.turns)]
    examples = []
    for i, s in enumerate(sessions):
        for k in range(cfg.turns):
            text, intent = texts[k][i]
            examples.append((befores[k][i], intent or text, editor.encode_images([render(s.turns[k].after)])[0].cpu()))
    return examples
