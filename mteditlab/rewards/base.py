"""The reward protocol every reward backend implements (VLM judge, learned judge, verifier, ...).

A backend scores a batch of :class:`EditSample` (one editing turn each) and returns a
:class:`RewardOutput`: one ``[N]`` float array per sub-score, an ``overall`` array and a per-item
failure reason. Contracts:

* every score lies in ``[0, 1]`` (higher is better) or is NaN;
* a sub-score is NaN where it failed (unparsable judge reply, non-finite logits, ...) or does not
  apply (``ga`` for an item without history);
* ``overall[i]`` is NaN **iff** ``failures[i]`` is a reason (a string) — a failed item is never
  silently a number, and a number always comes with ``failures[i] is None``.

Sub-scores (Edit-R2 / MT-EditFlow naming): ``if`` instruction following, ``cc`` content consistency
(nothing the instruction did not ask for changed), ``quality`` perceptual quality, ``ga`` global
awareness (constraints set in earlier turns of the session still hold; needs ``history``).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import PIL.Image

from mteditlab.registry import Registry

if TYPE_CHECKING:
    import torch

IF, CC, QUALITY, GA = "if", "cc", "quality", "ga"
SUB_SCORES: tuple[str, ...] = (IF, CC, QUALITY, GA)
SEMANTIC_SUB_SCORES: tuple[str, ...] = (IF, CC, GA)  # VIEScore's "semantic consistency" group
OVERALL_RULES: tuple[str, ...] = ("mean", "viescore")


@dataclass
class EditSample:
    """One editing turn to score: plain data (images, strings and a JSON-serialisable ``meta``), so a
    sample can be pickled and scored in another process."""

    source: PIL.Image.Image  # the image the turn started from
    edited: PIL.Image.Image  # the editor's output
    instruction: str  # this turn's instruction as the user typed it
    history: list[str] = field(default_factory=list)  # earlier instructions of the session, oldest first
    intent: str | None = None  # reconstructed explicit intent, when available
    meta: dict = field(default_factory=dict)  # JSON-serialisable extras (e.g. the verifier's ``world`` key, a pairwise ``group``)


def combine_overall(scores: dict[str, np.ndarray], rule: str = "mean") -> np.ndarray:
    """Per-item overall score from sub-scores, ignoring NaN (not applicable) sub-scores.

    * ``"mean"``: mean of the item's available sub-scores.
    * ``"viescore"``: ``sqrt(SC · PQ)`` with ``SC = min`` of the available semantic sub-scores
      (``if``, ``cc``, ``ga``) and ``PQ = quality`` (VIEScore's combination); needs ``quality``
      and at least one semantic sub-score.

    An item with nothing to combine gets NaN. Callers mark failed items themselves (see
    :meth:`RewardOutput.from_scores`).
    """
    if rule not in OVERALL_RULES:
        raise ValueError(f"unknown overall rule {rule!r}; expected one of {OVERALL_RULES}")
    if not scores:
        raise ValueError("no sub-scores to combine")

    def stack(names):
        rows = [np.asarray(scores[n], dtype=np.float64) for n in names if n in scores]
        return np.stack(rows) if rows else None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN item gives NaN, by contract
        if rule == "mean":
            return np.nanmean(stack(scores), axis=0)
        semantic, quality = stack(SEMANTIC_SUB_SCORES), scores.get(QUALITY)
        if semantic is None or quality is None:
            raise ValueError("the 'viescore' rule needs 'quality' and one of 'if', 'cc', 'ga'")
        return np.sqrt(np.nanmin(semantic, axis=0) * np.asarray(quality, dtype=np.float64))


@dataclass
class RewardOutput:
    """Scores of a batch of N samples (see the module docstring for the NaN / failure contract).

    ``details`` holds backend diagnostics (raw judge replies, failed vote counts, ...); it is never
    needed to read the scores.
    """

    scores: dict[str, torch.Tensor | np.ndarray]  # sub-score name -> [N] floats in [0,1]; NaN where failed / n.a.
    overall: np.ndarray  # [N] in [0,1]; NaN where failed
    failures: list[str | None]  # per item: None, or why it failed
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = {k: _as_float_array(v) for k, v in self.scores.items()}
        self.overall = _as_float_array(self.overall)
        self.failures = list(self.failures)
        n = len(self.failures)
        for name, arr in {**self.scores, "overall": self.overall}.items():
            if arr.shape != (n,):
                raise ValueError(f"{name}: shape {arr.shape}, expected ({n},) (one value per failure slot)")
            finite = arr[np.isfinite(arr)]
            if np.isinf(arr).any() or (finite < 0).any() or (finite > 1).any():
                raise ValueError(f"{name}: values must lie in [0, 1] or be NaN")
        failed = np.array([f is not None for f in self.failures], dtype=bool)
        if (np.isnan(self.overall) != failed).any():
            raise ValueError("overall must be NaN exactly where a failure reason is given")

    @classmethod
    def from_scores(cls, scores: dict[str, np.ndarray], failures: Sequence[str | None], *,
                    rule: str = "mean", details: dict | None = None) -> RewardOutput:
        """Build an output whose ``overall`` is :func:`combine_overall` (``rule``) on items without a
        failure and NaN on failed ones; an item whose sub-scores are all NaN without a given reason
        is marked failed."""
        failures = list(failures)
        overall = combine_overall(scores, rule)
        for i, value in enumerate(overall):
            if failures[i] is None and np.isnan(value):
                failures[i] = "overall undefined: required sub-scores missing"
        overall = np.where([f is None for f in failures], overall, np.nan)
        return cls(scores=scores, overall=overall, failures=failures, details=details or {})

    @property
    def valid(self) -> np.ndarray:
        """``[N]`` bool: the item was scored (``overall`` is a number)."""
        return np.array([f is None for f in self.failures], dtype=bool)

    @property
    def n_failures(self) -> int:
        return sum(f is not None for f in self.failures)


def _as_float_array(values) -> np.ndarray:
    if hasattr(values, "detach"):   # a torch tensor (torch itself is not imported here: rewards stay light)
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


REWARDS = Registry("reward", "mteditlab.rewards", missing=ValueError)
register_reward = REWARDS.register


class RewardModel(abc.ABC):
    """A reward backend. ``sub_scores`` lists the keys of ``RewardOutput.scores`` it returns;
    ``name`` is set by ``register_reward``."""

    name: str = "reward"
    sub_scores: tuple[str, ...] = SUB_SCORES

    @classmethod
    def create(cls, **options) -> "RewardModel":
        """The registry's constructor (``get_reward(name, **options)``); default ``cls(**options)``."""
        return cls(**options)

    @abc.abstractmethod
    def score(self, samples: Sequence[EditSample], *, seed: int = 0) -> RewardOutput:
        """Score a batch; deterministic for a given ``seed``."""
