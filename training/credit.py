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

**Failed rewards** (NaN) are missing, never 0. A score with a failed turn in it is missing (NaN
goes through the turn aggregation and the weighted sum), and norm() leaves missing scores out of the
group: they enter neither mean_G nor std_G and are normalised to 0. So whatever lacks a score at the
level that is normalised is dropped from its group: with ``reward`` fusion the trajectory (per turn:
the rollout's turn) gets advantage 0; with ``advantage`` fusion it loses that reward's term only.
The rule is the same for every turn aggregation (scoring only the turns that were judged would
favour the failed ones under min, product and last). The variance filter reads the scored fused
rewards: a group with fewer than two has no spread and is skipped.
"""

from __future__ import annotations

import numpy as np

TURN_AGGREGATIONS = ("mean", "min", "product", "last", "discounted", "success_rate")
FUSIONS = ("reward", "advantage")
EPS = 1e-4


def aggregate_turns(r: np.ndarray, how: str, gamma: float = 0.8) -> np.ndarray:
    """Aggregate the last axis (turns) of ``r`` into one score per trajectory (NaN if a turn is NaN)."""
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
        return np.where(np.isnan(r), np.nan, r >= 0.5).mean(-1)
    raise ValueError(f"unknown turn aggregation {how!r}; choose one of {TURN_AGGREGATIONS}")


def group_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (keepdims) over the rollout axis (axis 1) of the scored (non-NaN) entries; 0 for
    a group with none."""
    scored = ~np.isnan(x)
    n = np.maximum(scored.sum(1, keepdims=True), 1)
    mean = np.where(scored, x, 0.0).sum(1, keepdims=True) / n
    std = np.sqrt(np.where(scored, (x - mean) ** 2, 0.0).sum(1, keepdims=True) / n)
    return mean, std


def group_normalize(x: np.ndarray) -> np.ndarray:
    """(x − group mean) / (group std + 1e-4) over the rollout axis, on scored entries; 0 where x is NaN."""
    mean, std = group_stats(x)
    return np.where(np.isnan(x), 0.0, (x - mean) / (std + EPS))


def _fuse(scores: dict[str, np.ndarray], weights: dict[str, float], fusion: str) -> tuple[np.ndarray, np.ndarray]:
    """Fused advantage and fused raw reward (for the variance filter; NaN where a reward is missing),
    from per-reward ``[S, G, ...]`` scores."""
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
    """Advantages ``[S, G, T]`` and statistics; failed rewards (NaN) are left out of their groups
    (see the module docstring). ``if_passed`` (``[S, G, T]`` bool) drives the trajectory filter."""
    failed = missing(rewards)
    T = failed.shape[-1]
    if broadcast:
        adv, raw = _fuse({m: aggregate_turns(rewards[m], turn_aggregation, gamma) for m in weights}, weights, fusion)
        skip = group_stats(raw)[1][:, 0] < min_group_std      # [S]
        adv = np.where(skip[:, None], 0.0, adv)[..., None].repeat(T, axis=-1)
    else:
        adv, raw = _fuse(rewards, weights, fusion)            # per turn: [S, G, T]
        skip = group_stats(raw)[1][:, 0] < min_group_std      # [S, T]
        adv = np.where(skip[:, None, :], 0.0, adv)
    if trajectory_filter and if_passed is not None:
        failed_before = np.cumsum(~if_passed, axis=-1) - (~if_passed)  # IF failures strictly before turn k
        adv = np.where(failed_before > 0, 0.0, adv)
    adv = np.clip(adv, -clip_max, clip_max)
    stats = {"skipped_groups": float(skip.mean()), "zero_advantage": float((adv == 0).mean()),
             "reward_failures": int(failed.sum())}
    return adv, stats


def missing(rewards: dict[str, np.ndarray]) -> np.ndarray:
    """``[S, G, T]`` bool: some reward failed (NaN) on the rollout's turn."""
    return np.logical_or.reduce([np.isnan(r) for r in rewards.values()])
