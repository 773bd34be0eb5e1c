"""Reward-filtered self-training (RFT): the turns that passed the reward, replayed with the flow-matching loss.

Every turn of a rollout whose turns so far all passed (fused reward Σw·r / Σw ≥ ``rft_threshold``)
enters the replay buffer as (the turn's own input, text, target), target = the rollout's output
(``own``) or the verifier's clean re-render of the scene it shows (``render``, world only), trained on
by L = ‖v_θ(x_t) − (ε − x0)‖² (:class:`~training.objectives.base.Replay`); the Polyak average is exported.
"""

from __future__ import annotations

import numpy as np

from mteditlab.editors.flow_policy import FlowPolicy
from mteditlab.rewards.features import parse_cached
from mteditlab.world import render
from training.objectives.base import Replay, needs_the_world, register_objective
from training.sampling import TurnSamples
from training.scoring import turn_passed


@register_objective("rft")
class RFT(Replay):
    """Every turn of a rollout whose turns so far all passed the reward is an example (:func:`rft_examples`)."""

    settings = (*Replay.settings, "rft_target", "rft_threshold", "rft_share", "rft_mixed_only")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.rft_target == "render":
            needs_the_world(cfg, "clean re-renders (--rft-target render)")

    def examples(self, editor, sessions, turns, scores):
        cfg = self.cfg
        passed = turn_passed(scores.trained, cfg.reward_weights, cfg.rft_threshold)
        return rft_examples(editor, turns, passed, cfg.rft_target, cfg.rft_share, cfg.rft_mixed_only)


def rft_examples(editor: FlowPolicy, turns: list[TurnSamples], passed: np.ndarray, target: str,
                 share: bool = False, mixed_only: bool = False) -> list[tuple]:
    """(input image, text, target latents) from a batch of rollouts; ``passed`` is ``[S, G, T]``.

    A rollout is *on track* at turn k when its turns before k all passed. Every on-track rollout that
    passed turn k is an example with its own output as target; with ``share``, every on-track rollout
    that failed turn k learns from a sibling that passed it (same session, same turn: its input shows
    the same scene), its own input paired with the sibling's target (best-of-G distillation). With
    ``mixed_only``, only (session, turn) groups whose on-track rollouts both passed and failed give
    examples (what every rollout already gets right teaches little; DAPO's dynamic-sampling idea).
    ``own``: the winner's output latents; ``render``: the latents of the clean render of the scene the
    verifier reads in the winner's output (world only)."""
    S, G, T = passed.shape
    on_track = np.concatenate([np.ones((S, G, 1), bool), np.cumprod(passed, -1)[..., :-1].astype(bool)], -1)
    examples = []
    for k, turn in enumerate(turns):
        for s in range(S):
            ready = np.flatnonzero(on_track[s, :, k])
            winners = [g for g in ready if passed[s, g, k]]
            if mixed_only and len(winners) == len(ready):
                continue
            for j, g in enumerate(ready if share and winners else winners):
                w = s * G + (g if passed[s, g, k] else winners[j % len(winners)])
                if target == "own":
                    x0 = turn.x0[w]
                else:
                    clean = render(parse_cached(turn.after[w], turn.after[w].width), turn.after[w].width)
                    x0 = editor.encode_images([clean])[0]
                i = s * G + g
                examples.append((turn.before[i], turn.texts[i][1] or turn.texts[i][0], x0.cpu()))
    return examples
