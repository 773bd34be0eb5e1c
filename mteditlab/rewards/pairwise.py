"""Pairwise judging (Pref-GRPO): a rollout's reward is its win rate within its group.

A group is the rollouts of one session at one turn. Every ordered pair ``(a, b)``, ``a ≠ b``, of a
group is one chat (``prompts.build_pair_messages``: ``a`` shown FIRST) answered on ``0..2`` (0: the
SECOND is better, 1: tie, 2: the FIRST is better); its value ``q(a, b) ∈ [0, 1]`` is P(FIRST wins)
with a tie worth half — the digit expectation / 2 in direct mode, the parsed votes / 2 in thinking
mode. Both orders cancel the judge's position bias:

    P(a beats b) = mean of the available {q(a, b), 1 − q(b, a)},
    win(a)       = mean over b ≠ a of P(a beats b)   (pairs whose two chats both failed left out).

An item fails (NaN plus the reason) when none of its comparisons succeeded or its group has no
other member. A group of G rollouts costs G·(G − 1) chats.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Callable, Hashable, Sequence

import numpy as np

from mteditlab.rewards.base import EditSample, RewardModel, RewardOutput
from mteditlab.rewards.prompts import PAIR_SCALE, build_pair_messages

WIN = "win"


def group_indices(samples: Sequence[EditSample], group_size: int | None = None) -> list[list[int]]:
    """Items grouped for comparison, groups in first-seen order: by ``meta["group"]`` when every
    sample has one; else consecutive runs of ``group_size``; else by the world session
    (``meta["world"]``) and ``meta["turn"]``. ``ValueError`` when none applies."""
    if samples and all("group" in s.meta for s in samples):
        return _group_by([s.meta["group"] for s in samples])
    if group_size is not None:
        if group_size < 1 or len(samples) % group_size:
            raise ValueError(f"{len(samples)} samples do not split into groups of {group_size}")
        return [list(range(i, i + group_size)) for i in range(0, len(samples), group_size)]
    if samples and all("world" in s.meta for s in samples):
        return _group_by([(tuple(sorted(s.meta["world"].items())), s.meta.get("turn")) for s in samples])
    raise ValueError("pairwise judging needs groups: meta['group'] on every sample, or group_size")


def _group_by(keys: Sequence[Hashable]) -> list[list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def ordered_pairs(groups: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Every ``(a, b)`` with ``a ≠ b`` inside each group."""
    return [(a, b) for group in groups for a in group for b in group if a != b]


def win_rates(n: int, groups: Sequence[Sequence[int]],
              outcomes: dict[tuple[int, int], tuple[float, str | None]]) -> tuple[np.ndarray, list[str | None]]:
    """Per-item win rates (module docstring) from ``outcomes[(a, b)] = (q(a, b), error)``, ``q`` NaN
    where the chat failed; returns ``(rates [n], reasons)`` with ``rates[i]`` NaN iff ``reasons[i]``."""
    rates, reasons = np.full(n, np.nan), [None] * n
    for group in groups:
        for a in group:
            wins, errors = [], []
            for b in group:
                if b == a:
                    continue
                (q_ab, e_ab), (q_ba, e_ba) = outcomes[(a, b)], outcomes[(b, a)]
                both = [v for v in (q_ab, 1.0 - q_ba) if np.isfinite(v)]
                if both:
                    wins.append(float(np.mean(both)))
                errors += [e for e in (e_ab, e_ba) if e is not None]
            if wins:
                rates[a] = float(np.mean(wins))
            elif len(group) == 1:
                reasons[a] = "no other rollout in its group to compare with"
            else:
                counts = "; ".join(f"{e} ×{k}" if k > 1 else e for e, k in Counter(errors).items())
                reasons[a] = f"all {2 * (len(group) - 1)} comparisons failed: {counts}"
    return rates, reasons


class PairwiseJudge(RewardModel):
    """Win rates within groups from a chat judge (an
    :class:`~mteditlab.rewards.endpoint.EndpointJudge`: ``mode``, ``judge_chat``, ``run``, ``stats``).
    ``group_size``: see :func:`group_indices`."""

    name = "qwen-vl"
    sub_scores = (WIN,)

    def __init__(self, judge, *, group_size: int | None = None):
        self.judge, self.group_size = judge, group_size

    def score(self, samples: Sequence[EditSample], *, seed: int = 0) -> RewardOutput:
        """Win rates (``scores["win"]`` = ``overall``); chat ``j`` carries the seed ``seed · 1000003 + j``.
        ``details``: ``pairs`` (``(a, b, q, error)`` per chat) and the judge's ``endpoint`` counts."""
        groups = group_indices(samples, self.group_size)
        pairs = ordered_pairs(groups)
        before = dict(self.judge.stats)
        chats: list[Callable[[], tuple]] = [functools.partial(
            self.judge.judge_chat, build_pair_messages(samples[a], samples[b], mode=self.judge.mode),
            (samples[a].source, samples[a].edited, samples[b].source, samples[b].edited),
            scale=PAIR_SCALE, seed=seed * 1_000_003 + j) for j, (a, b) in enumerate(pairs)]
        judged = self.judge.run(chats)
        outcomes = {pair: (value, error) for pair, (value, error, _) in zip(pairs, judged, strict=True)}
        rates, reasons = win_rates(len(samples), groups, outcomes)
        details = {"pairs": [(a, b, v, e) for (a, b), (v, e) in outcomes.items()],
                   "endpoint": {k: v - before[k] for k, v in self.judge.stats.items()}}
        return RewardOutput(scores={WIN: rates}, overall=rates, failures=reasons, details=details)
