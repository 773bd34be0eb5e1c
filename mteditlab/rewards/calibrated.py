"""``calibrated``: the human-calibrated reward model (fit by ``python -m training.reward_model``).

A Bradley–Terry model over features of one editing turn (one candidate):

    φ(x) = [judge sub-scores (if, cc, quality, ga — whichever the judge returns), judge overall,
            image features (img_tint, img_sharpness; :mod:`mteditlab.rewards.features`)]
    z(x) = (fill(φ(x)) − mean) / std          (train statistics; a NaN sub-score, e.g. ``ga`` at
                                               turn 0, is filled with its train mean)
    s(x) = w·z(x) + b
    P(A ≻ B) = σ(s(A) − s(B))                 (pairwise preference; b cancels)
    overall(x) = σ(s(x)) ∈ [0, 1]             (probability the candidate is acceptable: b is minus
                                               the learned acceptability threshold, see the trainer)

The artifact is one JSON file, ``DIR/calibrated.json`` (:data:`ARTIFACT`): judge name and options,
feature names, fill values, standardisation, weights, bias, and the training report.

``score`` runs the artifact's judge (or the one passed in) on the samples, passes its sub-scores
through unchanged and replaces ``overall`` with σ(s(x)). Items the judge failed on are failures here
too (NaN, with the judge's reason) — never a number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mteditlab.rewards.base import REWARDS, EditSample, RewardModel, RewardOutput, register_reward

ARTIFACT = "calibrated.json"
FORMAT = "mteditlab-calibrated-reward"
VERSION = 1
IMAGE_FEATURES = ("img_tint", "img_sharpness")


def feature_names(judge_sub_scores: Sequence[str], image_features: bool = True) -> list[str]:
    """The feature vector's layout for a judge returning ``judge_sub_scores``."""
    return list(judge_sub_scores) + ["overall"] + (list(IMAGE_FEATURES) if image_features else [])


def raw_features(judge_output: RewardOutput, samples: Sequence[EditSample], names: Sequence[str]) -> np.ndarray:
    """``[N, F]`` features named ``names`` (NaN where the judge did not give that sub-score).
    Rows of items the judge failed on are all NaN."""
    n = len(samples)
    out = np.full((n, len(names)), np.nan)
    valid = judge_output.valid
    wants_image = any(name in IMAGE_FEATURES for name in names)
    if wants_image:
        from mteditlab.rewards.features import image_features
    for j, name in enumerate(names):
        if name == "overall":
            out[:, j] = judge_output.overall
        elif name in judge_output.scores:
            out[:, j] = judge_output.scores[name]
    if wants_image:
        for i, sample in enumerate(samples):
            if valid[i]:
                feats = image_features(sample.edited)
                for j, name in enumerate(names):
                    if name in IMAGE_FEATURES:
                        out[i, j] = feats[name.removeprefix("img_")]
    out[~valid] = np.nan
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


@register_reward("calibrated")
class CalibratedReward(RewardModel):
    """See the module docstring. Build with :meth:`from_pretrained` (or ``get_reward("calibrated",
    path=DIR)``)."""


    def __init__(self, spec: dict, judge: RewardModel):
        if spec.get("format") != FORMAT or spec.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} artifact (format={spec.get('format')!r}, "
                             f"version={spec.get('version')!r})")
        self.spec, self.judge = spec, judge
        self.features = list(spec["features"])
        self.fill = np.asarray(spec["fill"], dtype=np.float64)
        self.mean = np.asarray(spec["mean"], dtype=np.float64)
        self.std = np.asarray(spec["std"], dtype=np.float64)
        self.weights = np.asarray(spec["weights"], dtype=np.float64)
        self.bias = float(spec["bias"])
        if not (len(self.features) == len(self.fill) == len(self.mean) == len(self.std) == len(self.weights)):
            raise ValueError("artifact arrays disagree in length with its feature list")
        self.sub_scores = tuple(getattr(judge, "sub_scores", ()))

    @classmethod
    def create(cls, **options) -> CalibratedReward:
        return cls.from_pretrained(**options)

    @classmethod
    def from_pretrained(cls, path: str | Path, judge: RewardModel | None = None, **judge_kwargs) -> CalibratedReward:
        """Load ``path/calibrated.json`` (``path`` may also be the JSON file itself); build the judge
        it names (``judge_kwargs`` override its stored options) unless ``judge`` is given."""
        path = Path(path)
        file = path / ARTIFACT if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no calibrated reward artifact at {file}; fit one with "
                                    "`python -m training.reward_model --db DB --out DIR`")
        spec = json.loads(file.read_text())
        if judge is None:
            judge = REWARDS[spec["judge"]].create(**{**spec.get("judge_kwargs", {}), **judge_kwargs})
        elif judge.name != spec["judge"]:
            raise ValueError(f"the artifact was fit on judge {spec['judge']!r}, got {judge.name!r}")
        return cls(spec, judge)

    def standardized(self, raw: np.ndarray) -> np.ndarray:
        """Fill NaN sub-scores and standardise (rows that are all NaN stay NaN)."""
        failed = np.isnan(raw).all(axis=1)
        filled = np.where(np.isnan(raw), self.fill, raw)
        z = (filled - self.mean) / self.std
        z[failed] = np.nan
        return z

    def logits(self, raw: np.ndarray) -> np.ndarray:
        """``s(x)`` for raw feature rows (NaN for failed rows)."""
        return self.standardized(raw) @ self.weights + self.bias

    def score(self, samples: Sequence[EditSample], *, seed: int = 0) -> RewardOutput:
        judged = self.judge.score(samples, seed=seed)
        raw = raw_features(judged, samples, self.features)
        s = self.logits(raw)
        failures = list(judged.failures)
        for i, value in enumerate(s):
            if failures[i] is None and not np.isfinite(value):
                failures[i] = "calibrated: features not finite"
        overall = np.where([f is None for f in failures], sigmoid(np.nan_to_num(s)), np.nan)
        return RewardOutput(scores=dict(judged.scores), overall=overall, failures=failures,
                            details={"judge": self.judge.name, "judge_overall": judged.overall,
                                     "logits": s, "judge_details": judged.details})
