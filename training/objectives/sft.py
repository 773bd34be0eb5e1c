"""The supervised control (SFT): the world's gold pairs, teacher-forced, replayed with the flow-matching loss.

Every turn of the iteration's sessions enters the replay buffer as (the true scene before, text, latents
of the true scene after), trained on by L = ‖v_θ(x_t) − (ε − x0)‖²
(:class:`~training.objectives.base.Replay`); no rollouts are drawn, the Polyak average is exported.
With ``--input-degradation a`` the inputs are degraded the way the editor's own outputs are
(:func:`degrade`): what a careful practitioner would try against exposure bias without RL.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from mteditlab.editors.flow_policy import FlowPolicy
from mteditlab.intent import TurnIntents
from mteditlab.world import Session, render
from training.objectives.base import Replay, needs_the_world, register_objective, require

if TYPE_CHECKING:
    from training.config import GRPOConfig


@register_objective("sft")
class SFT(Replay):
    """The supervised control: the world's gold pairs (:func:`gold_examples`); no rollouts."""

    samples = False
    settings = (*Replay.settings, "input_degradation")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        needs_the_world(cfg, "the world's gold pairs (--algo sft)")
        require(cfg, input_degradation=(cfg.input_degradation >= 0, ">= 0"))

    def examples(self, editor, sessions, turns, scores):
        examples = gold_examples(editor, sessions, self.cfg)
        if self.cfg.input_degradation:
            rng = random.Random(f"{self.cfg.seed}/degrade/{sessions[0].index}")
            examples = [(degrade(before, self.cfg.input_degradation, rng), text, x0) for before, text, x0 in examples]
        return examples


def degrade(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """``image`` as the editor's own outputs spoil it, each effect drawn in [0, ``strength``]: a blur
    (Gaussian, radius ≤ 0.6·strength px, half the time), a background tint (per-channel shift of std
    ≤ 3·strength / 255) and speckle (per-pixel noise of std ≤ 8·strength / 255)."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6 * strength)))
    noise = np.random.default_rng(rng.getrandbits(32))
    x = np.asarray(image, np.float32)
    x = x + noise.normal(0, rng.uniform(0, 3 * strength), 3) + noise.normal(0, rng.uniform(0, 8 * strength), x.shape)
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8), "RGB")


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
