"""The rewards a run trains on, the term it holds out and the gold it is checked against.

A *term* is a reward model's overall (``NAME``) or one of its sub-scores (``NAME.SUB``);
``reward_weights`` maps the trained terms to their weights (``--reward NAME=W,NAME.SUB=W``). Rewards
see rollouts only as :class:`~mteditlab.rewards.base.EditSample` (plain data: images, texts, the
session source's ``meta`` and ``meta["group"]`` = (session index, turn), the group a pairwise judge
compares within).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mteditlab.rewards import RewardModel, get_reward
from mteditlab.rewards.base import EditSample
from training.credit import missing
from training.sampling import TurnSamples

GOLD = "gold_success"   # the metrics column of the gold reward's success


@dataclass
class Scores:
    """One batch's scores, ``[S, G, T]`` arrays: trained terms, held-out terms, gold success (or None),
    the IF-passed mask for trajectory filtering (or None), and sub-score means per ``NAME/SUB``."""

    trained: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    gold: np.ndarray | None
    if_passed: np.ndarray | None
    sub_means: dict[str, float]


class RewardTerms:
    """Reward models by name, the trained terms' weights, an optional held-out term
    (``--hacking-reference``) and an optional gold reward (the world's verifier)."""

    def __init__(self, weights: dict[str, float], models: dict[str, RewardModel], gold: RewardModel | None = None,
                 held_out: str = ""):
        self.weights, self.models, self.gold, self.held_out = dict(weights), models, gold, held_out
        self.terms = [*self.weights, *([held_out] if held_out else [])]

    @classmethod
    def build(cls, weights: dict[str, float], paths: dict[str, str], *, held_out: str = "",
              gold: str | None = None) -> RewardTerms:
        """Each reward model the terms name, from its artifact ``paths[NAME]`` when given; ``gold``:
        the gold reward's name (reused when it is also trained)."""
        terms = [*weights, *([held_out] if held_out else [])]
        models = {name: get_reward(name, **({"path": paths[name]} if name in paths else {}))
                  for name in dict.fromkeys(t.partition(".")[0] for t in terms)}
        return cls(weights, models, gold and (models.get(gold) or get_reward(gold)), held_out)

    @property
    def filter_source(self) -> str | None:
        """Name of the trained reward whose IF sub-score drives trajectory filtering: the first, in
        ``weights`` order, with an ``if`` sub-score (None: no filter)."""
        for name in dict.fromkeys(t.partition(".")[0] for t in self.weights):
            if "if" in getattr(self.models[name], "sub_scores", ()):
                return name
        return None

    @property
    def reference(self) -> str | None:
        """The metrics column the reward-hacking monitor compares proxies against."""
        return f"reference/{self.held_out}" if self.held_out else GOLD if self.gold is not None else None

    @property
    def proxies(self) -> list[str]:
        """Trained terms not computed by the gold reward."""
        gold = self.gold.name if self.gold is not None else None
        return [t for t in self.weights if t.partition(".")[0] != gold]

    def batch(self, sessions: list, generations: int, meta: Callable[[object, int], dict], seed: int,
              tally: dict | None = None, overlap: bool = False) -> BatchScoring:
        """Scoring of one batch of rollouts (items session-major, ``generations`` per session), fed
        turn by turn: see :class:`BatchScoring`."""
        return BatchScoring(self, sessions, generations, meta, seed, tally, overlap)

    def score(self, turns: list[TurnSamples], sessions: list, generations: int, meta: Callable[[object, int], dict],
              seed: int, tally: dict | None = None) -> Scores:
        """The scores of rollouts already sampled (:meth:`batch` fed every turn, serially)."""
        scoring = self.batch(sessions, generations, meta, seed, tally)
        for k, turn in enumerate(turns):
            scoring.add(k, turn)
        return scoring.result()

    def metrics(self, scores: Scores, trajectory_filter: bool) -> dict[str, float]:
        """The batch's metrics: ``reward/TERM``, ``reference/TERM``, ``sub/NAME/SUB``, the gold's success
        (per turn, and of whole rollouts), whether the trajectory filter applied and
        ``reward_failed_frac``, the fraction of rollout turns a trained term failed on."""
        return {**{f"reward/{n}": float(np.nanmean(r)) for n, r in scores.trained.items()},
                "reward_failed_frac": float(missing(scores.trained).mean()),
                **{f"reference/{n}": float(np.nanmean(r)) for n, r in scores.held_out.items()},
                **{f"sub/{k}": v for k, v in scores.sub_means.items()},
                **({GOLD: float(scores.gold.mean()), "gold_overall_last": float(scores.gold.all(-1).mean())}
                   if scores.gold is not None else {}),
                "filtered": float(trajectory_filter and scores.if_passed is not None)}


class BatchScoring:
    """Scores one batch of rollouts as its turns come: :meth:`add` each turn when it is sampled
    (the rollout's ``on_turn``), :meth:`result` once sampling is done.

    With ``overlap`` each turn is scored on a background thread while the next turn samples, so a
    judge served by an inference engine costs no rollout time; without it every turn is scored in
    :meth:`result`. Either way turns are scored one after another in turn order, so scores, the
    models' seeds and the tallies are the same. ``busy_s`` is the time spent scoring.

    Per turn k, every reward model scores the batch's samples (seed ``seed + k``). A sub-score that
    does not apply to an item (NaN, e.g. ``ga`` at turn 1) counts as satisfied (1.0); items the model
    failed on stay NaN. The gold reward scores each turn once, also when it is trained. The
    IF-passed mask: IF ≥ ½ of ``filter_source`` (a failed score does not filter). ``tally``
    accumulates per model ``failures/NAME`` and ``endpoint/NAME/KEY`` (a served judge's request counts)."""

    def __init__(self, terms: RewardTerms, sessions: list, generations: int, meta: Callable[[object, int], dict],
                 seed: int, tally: dict | None, overlap: bool):
        self.terms, self.meta, self.seed, self.tally = terms, meta, seed, tally
        self.items = [s for s in sessions for _ in range(generations)]
        self.shape = (len(sessions), generations)
        self.filter_source = terms.filter_source
        self.turns: list[tuple[np.ndarray, ...]] = []
        self.sub_means: dict[str, list[float]] = {}
        self.busy_s = 0.0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring") if overlap else None
        self.pending: list = []   # futures (overlap) or turns waiting for result()

    def add(self, k: int, turn: TurnSamples) -> None:
        self.pending.append(self.pool.submit(self._score_turn, k, turn) if self.pool else (k, turn))

    def result(self) -> Scores:
        try:
            for job in self.pending:
                job.result() if self.pool else self._score_turn(*job)
        finally:
            if self.pool:
                self.pool.shutdown(wait=True, cancel_futures=True)
        terms, (S, G) = self.terms, self.shape
        columns = {name: np.stack([t[i] for t in self.turns], axis=1).reshape(S, G, -1)
                   for i, name in enumerate([*terms.terms, GOLD, "if"])}
        return Scores({t: columns[t] for t in terms.weights}, {t: columns[t] for t in terms.terms if t not in terms.weights},
                      columns[GOLD].astype(bool) if terms.gold is not None else None,
                      columns["if"].astype(bool) if self.filter_source else None,
                      {k: float(np.mean(v)) for k, v in self.sub_means.items()})

    def _score_turn(self, k: int, turn: TurnSamples) -> None:
        started, terms = time.perf_counter(), self.terms
        samples = [EditSample(b, a, t[0], [x.instruction for x in s.turns[:k]], t[1],
                              {**self.meta(s, k), "group": (s.index, k)})
                   for s, b, a, t in zip(self.items, turn.before, turn.after, turn.texts)]
        gold_out = terms.gold.score(samples) if terms.gold is not None else None
        outputs = {name: gold_out if model is terms.gold else model.score(samples, seed=self.seed + k)
                   for name, model in terms.models.items()}
        if self.tally is not None:
            count_failures(outputs, self.tally)
        columns = []
        for term in terms.terms:
            name, _, sub = term.partition(".")
            out = outputs[name]
            if not sub:
                columns.append(np.asarray(out.overall, dtype=float))
            elif sub in out.scores:
                columns.append(np.where(out.valid & np.isnan(out.scores[sub]), 1.0, out.scores[sub]))
            else:
                raise ValueError(f"reward term {term!r}: {name} has no sub-score {sub!r} (it has {sorted(out.scores)})")
        n = len(samples)
        columns.append(gold_out.overall == 1 if gold_out is not None else np.zeros(n, dtype=bool))
        columns.append(~(outputs[self.filter_source].scores["if"] < 0.5) if self.filter_source   # NaN (failed) passes
                       else np.ones(n, dtype=bool))
        self.turns.append(tuple(columns))
        for name, out in outputs.items():
            for sub, values in out.scores.items():
                if np.isfinite(values).any():
                    self.sub_means.setdefault(f"{name}/{sub}", []).append(float(np.nanmean(values)))
        self.busy_s += time.perf_counter() - started


def count_failures(outputs: dict, tally: dict) -> None:
    """Add each reward model's failed items and its endpoint's request counts to ``tally``."""
    for name, out in outputs.items():
        tally[f"failures/{name}"] = tally.get(f"failures/{name}", 0) + out.n_failures
        for key, value in (out.details.get("endpoint") or {}).items():
            tally[f"endpoint/{name}/{key}"] = tally.get(f"endpoint/{name}/{key}", 0) + value


def turn_passed(rewards: dict[str, np.ndarray], weights: dict[str, float], threshold: float) -> np.ndarray:
    """``[S, G, T]`` bool: the turn's fused reward Σ_m w_m·r_m / Σ_m w_m is ≥ ``threshold`` (failed = 0)."""
    fused = sum(w * np.nan_to_num(rewards[m], nan=0.0) for m, w in weights.items()) / sum(weights.values())
    return fused >= threshold


def hacking_alarm(history: list[dict], window: int, proxy_names: list[str], reference: str | None = GOLD) -> bool:
    """True when, over the last ``window`` iterations, a proxy reward rose while the reference (the
    gold, or a held-out reward's metrics column) fell (least-squares slopes of opposite sign, each
    moving by more than 0.02 across the window); never without a reference. Each column's slope is
    fit to the rows that have it (rows where its rewards all failed, NaN, are skipped)."""
    if len(history) < window or not proxy_names or reference is None:
        return False
    recent = history[-window:]

    def trend(key):
        points = [(i, h[key]) for i, h in enumerate(recent) if np.isfinite(h.get(key, np.nan))]
        return np.polyfit(*zip(*points), 1)[0] * window if len(points) >= 2 else np.nan

    return bool(trend(reference) < -0.02 and any(trend(f"reward/{n}") > 0.02 for n in proxy_names))
