"""``verifier``: the world's exact verifier under the reward protocol (world only).

Each :class:`~mteditlab.rewards.base.EditSample` names its ground truth in ``meta``, as plain data
(:func:`world_meta` writes it):

* ``meta["world"]`` — ``{"split", "index", "turns"}``: the world session
  ``generate_session(split, index, turns)`` the turn belongs to (the key the label store keeps too);
* ``meta["turn"]`` — the 0-based turn index ``k``.

``source`` is the image the turn was fed (the editor's own previous output in a rollout) and
``edited`` the image it produced; the verdict is exactly
:func:`mteditlab.world.score_turn(session, k, source, edited) <mteditlab.world.score_turn>`.

Sub-scores (each 0.0 or 1.0 except ``quality``):

* ``if`` / ``cc`` / ``ga`` — the verifier's IF, CC, GA. ``ga`` is NaN at turn 0 (no earlier
  constraint exists: *not applicable*, the protocol's convention for an item without history).
* ``quality`` — ``1 − min(1, RMS(edited − render(parse(edited))) / 0.25)``: how close the image is
  to a clean render of the scene it shows (1 = pixel-exact; blur, noise, a background tint or junk
  lower it). See :mod:`mteditlab.rewards.features`.
* ``match`` — ``1 − min(1, RMS(edited − render(intended)) / 0.25)`` (the quality scale) with ``intended`` the true scene
  after the turn: a dense version of success (1 = the pixel-exact intended image), for RL
  (``--reward verifier.match=W``). It needs the ground truth, so it is not a rubric sub-score: a
  reward model fit on the verifier's sub-scores (``training.reward_model``) never sees it.

``overall`` = success = IF ∧ CC ∧ GA (1.0 or 0.0); it ignores ``quality`` — the verifier judges
content, not looks.

A sample without ``meta["world"]`` / ``meta["turn"]`` (or with a turn out of range, or images
that are not PIL images) is a reported failure (NaN scores, a reason in ``failures``), never a
number. Deterministic; ``seed`` is unused.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import PIL.Image

from mteditlab.rewards.base import CC, GA, IF, QUALITY, EditSample, RewardModel, RewardOutput, register_reward
from mteditlab.rewards.features import QUALITY_RMS_SCALE, image_features, parse_cached
from mteditlab.world import Session, generate_session, render_array, score_turn
from mteditlab.world.verifier import to_array

MATCH = "match"


def world_meta(session: Session, turn: int) -> dict:
    """The plain ``meta`` the verifier reads for turn ``turn`` of world session ``session``."""
    return {"world": {"split": session.split, "index": session.index, "turns": len(session.turns)}, "turn": turn}


@functools.lru_cache(maxsize=4096)
def _world_session(split: str, index: int, turns: int) -> Session:
    return generate_session(split, index, turns)


def world_session(meta: dict) -> Session | str:
    """The world session ``meta["world"]`` names, or why there is none."""
    world = meta.get("world")
    if not isinstance(world, dict):
        return "verifier needs meta['world'] ({split, index, turns} of a world session) and meta['turn']"
    try:
        return _world_session(str(world["split"]), int(world["index"]), int(world["turns"]))
    except (KeyError, TypeError, ValueError) as error:
        return f"meta['world'] = {world!r} names no world session: {error}"


def _check(sample: EditSample) -> str | None:
    meta = sample.meta if isinstance(sample.meta, dict) else {}
    session, turn = world_session(meta), meta.get("turn")
    if isinstance(session, str):
        return session
    if isinstance(turn, bool) or not isinstance(turn, (int, np.integer)):
        return "verifier needs meta['turn'] (the 0-based turn index, an int)"
    if not 0 <= int(turn) < len(session.turns):
        return f"meta['turn'] = {turn} is out of range for a session of {len(session.turns)} turns"
    for name in ("source", "edited"):
        if not isinstance(getattr(sample, name), PIL.Image.Image):
            return f"{name} is not a PIL image"
    return None


@register_reward("verifier")
class VerifierReward(RewardModel):
    """The exact verifier as a reward backend (see the module docstring)."""
    sub_scores = (IF, CC, QUALITY, GA)   # the rubric; ``match`` is reported besides them, for RL only

    def score(self, samples: Sequence[EditSample], *, seed: int = 0) -> RewardOutput:
        n = len(samples)
        scores = {key: np.full(n, np.nan) for key in (*self.sub_scores, MATCH)}
        overall = np.full(n, np.nan)
        failures: list[str | None] = []
        for i, sample in enumerate(samples):
            reason = _check(sample)
            if reason is None:
                try:
                    k = int(sample.meta["turn"])
                    before, after = parse_cached(sample.source), parse_cached(sample.edited)
                    session = world_session(sample.meta)
                    verdict = score_turn(session, k, before, after)
                    scores[IF][i], scores[CC][i] = float(verdict.if_), float(verdict.cc)
                    scores[GA][i] = float(verdict.ga) if k > 0 else np.nan
                    scores[QUALITY][i] = image_features(sample.edited, scene=after)["quality"]
                    edited = to_array(sample.edited, sample.edited.width)
                    intended = render_array(session.turns[k].after, sample.edited.width)
                    scores[MATCH][i] = 1.0 - min(1.0, float(np.sqrt(((edited - intended) ** 2).mean())) / QUALITY_RMS_SCALE)
                    overall[i] = float(verdict.success)
                except Exception as exc:  # an unreadable image: report it, never a number
                    reason = f"verifier failed: {type(exc).__name__}: {exc}"
                    for arr in scores.values():
                        arr[i] = np.nan
            failures.append(reason)
        return RewardOutput(scores=scores, overall=overall, failures=failures,
                            details={"rule": "overall = success (if and cc and ga)"})
