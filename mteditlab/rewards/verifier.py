"""``verifier``: the world's exact verifier under the reward protocol (world only).

Each :class:`~mteditlab.rewards.base.EditSample` must carry its ground truth in ``meta``:

* ``meta["session"]`` — the :class:`mteditlab.world.Session` the turn belongs to;
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

A sample without ``meta["session"]`` / ``meta["turn"]`` (or with a turn out of range, or images
that are not PIL images) is a reported failure (NaN scores, a reason in ``failures``), never a
number. Deterministic; ``seed`` is unused.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image

from mteditlab.rewards.base import CC, GA, IF, QUALITY, EditSample, RewardModel, RewardOutput
from mteditlab.rewards.features import QUALITY_RMS_SCALE, image_features, parse_cached
from mteditlab.world import Session, render_array, score_turn
from mteditlab.world.verifier import to_array

MATCH = "match"


def _check(sample: EditSample) -> str | None:
    meta = sample.meta if isinstance(sample.meta, dict) else {}
    session, turn = meta.get("session"), meta.get("turn")
    if not isinstance(session, Session):
        return "verifier needs meta['session'] (a world Session) and meta['turn']"
    if isinstance(turn, bool) or not isinstance(turn, (int, np.integer)):
        return "verifier needs meta['turn'] (the 0-based turn index, an int)"
    if not 0 <= int(turn) < len(session.turns):
        return f"meta['turn'] = {turn} is out of range for a session of {len(session.turns)} turns"
    for name in ("source", "edited"):
        if not isinstance(getattr(sample, name), PIL.Image.Image):
            return f"{name} is not a PIL image"
    return None


class VerifierReward(RewardModel):
    """The exact verifier as a reward backend (see the module docstring)."""

    name = "verifier"
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
                    verdict = score_turn(sample.meta["session"], k, before, after)
                    scores[IF][i], scores[CC][i] = float(verdict.if_), float(verdict.cc)
                    scores[GA][i] = float(verdict.ga) if k > 0 else np.nan
                    scores[QUALITY][i] = image_features(sample.edited, scene=after)["quality"]
                    edited = to_array(sample.edited, sample.edited.width)
                    intended = render_array(sample.meta["session"].turns[k].after, sample.edited.width)
                    scores[MATCH][i] = 1.0 - min(1.0, float(np.sqrt(((edited - intended) ** 2).mean())) / QUALITY_RMS_SCALE)
                    overall[i] = float(verdict.success)
                except Exception as exc:  # an unreadable image: report it, never a number
                    reason = f"verifier failed: {type(exc).__name__}: {exc}"
                    for arr in scores.values():
                        arr[i] = np.nan
            failures.append(reason)
        return RewardOutput(scores=scores, overall=overall, failures=failures,
                            details={"rule": "overall = success (if and cc and ga)"})
