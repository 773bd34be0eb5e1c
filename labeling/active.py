"""Which model pair to compare next: active (uncertainty-driven) or uniform pair selection.

Active selection follows Chatbot Arena's rule (Chiang et al., 2024, "Efficient approximate
ranking"): pick pair a with probability

    P(a) ∝ √(Σ̂ₐₐ / nₐ) − √(Σ̂ₐₐ / (nₐ + 1)),

the drop in the standard error of pair a's estimated win rate that one more battle of that
pair buys.  Here nₐ is the number of battles pair a (models i, j) already had, and Σ̂ₐₐ / nₐ is
the variance of the pair's win rate p̂ᵢⱼ = σ(θ̂ᵢ − θ̂ⱼ) under the Bradley–Terry fit: the delta
method on the fit's covariance,

    Σ̂ₐₐ / nₐ = (p̂ᵢⱼ(1 − p̂ᵢⱼ))² · Var(θ̂ᵢ − θ̂ⱼ),

with Var(θ̂ᵢ − θ̂ⱼ) from the inverse of the observed information Σ n·p(1−p) (so battles of
other pairs that link i and j count too; Chatbot Arena uses a sandwich estimate of the same
covariance).  So P(a) ∝ sd(p̂ᵢⱼ) · (1 − √(nₐ / (nₐ + 1))): close pairs, whose outcome is the
most uncertain, are asked most, and lopsided pairs little.

A pair that never met has no finite variance (nₐ = 0): such pairs are served first, uniformly
among themselves, which also joins the comparison graph as early as possible.

Uniform selection picks every candidate pair with the same probability.

Everything here is plain numpy on aggregated counts, shared by the labeling queue
(:mod:`labeling.queue`) and the simulation in ``bench/queue_selection.py``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

SELECTIONS = ("active", "uniform")


def rating_covariance(w: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Covariance of the BT ratings θ̂ (natural-log scale) fitted on win matrix ``w`` (M, M):
    the pseudo-inverse of the observed information Σ n·p(1−p) (a graph Laplacian; rating
    differences within a connected component are what it determines)."""
    n = w + w.T
    p = expit(theta[:, None] - theta[None, :])
    curv = n * p * (1.0 - p)
    info = np.diag(curv.sum(1)) - curv
    return np.linalg.pinv(info, hermitian=True)


def pair_weights(w: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Active-selection weight of each candidate pair (``i[k]``, ``j[k]``) given the battles so
    far as a win matrix ``w`` (M, M; ties as half a win each): the formula of the module
    docstring, ``+inf`` for a pair that never met."""
    from labeling.ratings import fit_ratings

    w = np.asarray(w, dtype=float)
    i, j = np.asarray(i, dtype=int), np.asarray(j, dtype=int)
    n_pair = (w + w.T)[i, j]
    out = np.full(len(i), np.inf)
    seen = n_pair > 0
    if not seen.any():
        return out
    theta = fit_ratings(w)
    return pair_gain(theta, rating_covariance(w, theta), n_pair, i, j)


def pair_gain(theta: np.ndarray, cov: np.ndarray, n_pair: np.ndarray, i: np.ndarray,
              j: np.ndarray) -> np.ndarray:
    """√(Σ̂ₐₐ/nₐ) − √(Σ̂ₐₐ/(nₐ+1)) per pair from the fitted ratings ``theta``, their covariance
    ``cov`` and the pairs' battle counts ``n_pair`` (``+inf`` where nₐ = 0)."""
    n_pair = np.asarray(n_pair, dtype=float)
    p = expit(theta[i] - theta[j])
    var_diff = np.maximum(cov[i, i] + cov[j, j] - 2.0 * cov[i, j], 0.0)
    var = (p * (1.0 - p)) ** 2 * var_diff        # Σ̂ₐₐ / nₐ: variance of the pair's win rate
    sigma_aa = n_pair * var                      # per-battle variance
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.sqrt(sigma_aa / n_pair) - np.sqrt(sigma_aa / (n_pair + 1.0))
    return np.where(n_pair > 0, gain, np.inf)


def choose_pair(weights: np.ndarray, rng, selection: str = "active") -> int:
    """Index of the chosen candidate pair: ``uniform``, or ``active`` with probability
    proportional to ``weights`` (pairs with weight +inf first, uniformly among them).

    ``rng``: a ``random.Random`` or a numpy ``Generator``."""
    weights = np.asarray(weights, dtype=float)
    k = len(weights)
    if k == 0:
        raise ValueError("no candidate pairs")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "uniform":
        return _uniform(rng, k)
    unseen = np.flatnonzero(np.isinf(weights))
    if len(unseen):
        return int(unseen[_uniform(rng, len(unseen))])
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    total = weights.sum()
    if total <= 0:
        return _uniform(rng, k)
    u = _random(rng) * total
    return int(min(np.searchsorted(np.cumsum(weights), u, side="right"), k - 1))


def _uniform(rng, k: int) -> int:
    return int(rng.integers(k)) if isinstance(rng, np.random.Generator) else rng.randrange(k)


def _random(rng) -> float:
    return float(rng.random())
