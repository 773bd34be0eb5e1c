"""Multi-turn credit assignment: from per-turn rewards of G rollouts per session to advantages.

Shapes: ``rewards[name]`` is ``[S, G, T]`` (sessions × rollouts × turns, NaN where a reward
failed); the result is ``[S, G, T]`` advantages applied to every denoising step of the turn.

1. **Turn aggregation** (trajectory score from per-turn scores r_1..r_T):
   mean, min (all-or-nothing), product, last, discounted (Σ γ^(k−1)·r_k / Σ γ^(k−1), earlier
   turns weigh more since later turns build on them), success_rate (fraction of turns with r_k ≥ ½).
2. **Fusion** of several rewards with weights w_m:
   ``reward``: A = norm(Σ_m w_m·R_m); ``advantage``: A = Σ_m w_m·norm(R_m),
   where norm(R) = (R − mean_G R) / (std_G R + 1e-4) within each session's group.
3. **Broadcast** (MT-EditFlow): the trajectory advantage on every turn; ``per-turn``: each turn k is
   normalised on its own group of per-turn rewards instead.
4. **Trajectory filtering** (Edit-R2): turns after the first turn whose IF failed get advantage 0;
   groups whose fused reward has (almost) no spread are skipped (advantage 0).
Advantages are finally clamped to ±``clip_max``.
"""

from __future__ import annotations

import numpy as np

TURN_AGGREGATIONS = ("mean", "min", "product", "last", "discounted", "success_rate")
FUSIONS = ("reward", "advantage")
EPS = 1e-4


def aggregate_turns(r: np.ndarray, how: str, gamma: float = 0.8) -> np.ndarray:
    """Aggregate the last axis (turns) of ``r`` into one score per trajectory."""
    if how == "mean":
        return r.mean(-1)
    if how == "min":
        return r.min(-1)
    if how == "product":
        return r.prod(-1)
    if how == "last":
        return r[..., -1]
    if how == "discounted":
        weights = gamma ** np.arange(r.shape[-1])
        return (r * weights).sum(-1) / weights.sum()
    if how == "success_rate":
        return (r >= 0.5).mean(-1)
    raise ValueError(f"unknown turn aggregation {how!r}; choose one of {TURN_AGGREGATIONS}")


def group_normalize(x: np.ndarray) -> np.ndarray:
    """(x − group mean) / (group std + 1e-4) over the rollout axis (axis 1)."""
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + EPS)


def _fuse(scores: dict[str, np.ndarray], weights: dict[str, float], fusion: str) -> tuple[np.ndarray, np.ndarray]:
    """Fused advantage and fused raw reward (for the variance filter), from per-reward ``[S, G, ...]`` scores."""
    raw = sum(weights[m] * scores[m] for m in weights)
    if fusion == "reward":
        return group_normalize(raw), raw
    if fusion == "advantage":
        return sum(weights[m] * group_normalize(scores[m]) for m in weights), raw
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")


def compute_advantages(rewards: dict[str, np.ndarray], weights: dict[str, float], *, turn_aggregation: str = "mean",
                       fusion: str = "advantage", broadcast: bool = True, trajectory_filter: bool = True,
                       if_passed: np.ndarray | None = None, clip_max: float = 5.0, gamma: float = 0.8,
                       min_group_std: float = 1e-6) -> tuple[np.ndarray, dict]:
    """Advantages ``[S, G, T]`` and statistics. Failed rewards (NaN) count as 0 for the aggregate and
    the failed rollout turn gets advantage 0. ``if_passed`` (``[S, G, T]`` bool) drives the filter."""
    failed = np.zeros(next(iter(rewards.values())).shape, dtype=bool)
    for r in rewards.values():
        failed |= np.isnan(r)
    clean = {m: np.nan_to_num(rewards[m], nan=0.0) for m in weights}
    S, G, T = failed.shape
    if broadcast:
        adv, raw = _fuse({m: aggregate_turns(r, turn_aggregation, gamma) for m, r in clean.items()}, weights, fusion)
        skip = raw.std(1) < min_group_std                     # [S]
        adv = np.where(skip[:, None], 0.0, adv)[..., None].repeat(T, axis=-1)
    else:
        adv, raw = _fuse(clean, weights, fusion)              # per turn: [S, G, T]
        skip = raw.std(1) < min_group_std                     # [S, T]
        adv = np.where(skip[:, None, :], 0.0, adv)
    if trajectory_filter and if_passed is not None:
        failed_before = np.cumsum(~if_passed, axis=-1) - (~if_passed)  # IF failures strictly before turn k
        adv = np.where(failed_before > 0, 0.0, adv)
    adv = np.where(failed, 0.0, np.clip(adv, -clip_max, clip_max))
    stats = {"skipped_groups": float(skip.mean()), "zero_advantage": float((adv == 0).mean()),
             "reward_failures": int(failed.sum())}
    return adv, stats
