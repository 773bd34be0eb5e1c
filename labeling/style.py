"""Style (appearance) control for the leaderboard: a contextual Bradley–Terry model.

People judging edits are swayed by how clean a picture looks, not only by whether the edit did
what was asked.  A model can then climb the plain leaderboard by producing cleaner-looking
images while following instructions worse.  As Chatbot Arena's style control does for answer
length and markdown, the battle's appearance difference enters the model as covariates:

    P(A beats B) = σ(θ_A − θ_B + γᵀ x),   x = (f(A) − f(B)) / s

where f are the verifier-free image features of each side's judged output
(:mod:`mteditlab.rewards.features`: ``quality``, ``tint``), averaged over the turns for a
whole-session vote, and s the standard deviation of each feature difference over the battles
(so γ is per standard deviation).  θ, fitted jointly with γ, is each model's strength **with
appearance held equal**; γ says how much appearance sways the votes.  Ties (and both-bad) count
as half a win, as in :mod:`labeling.ratings`; the same tiny ridge keeps the fit finite.
Intervals: seeded bootstrap over battles (2.5–97.5 percentiles).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit, log_expit

from labeling.ratings import ELO_SCALE, L2, battles, rank_by_intervals, to_elo
from labeling.schema import SCORES

STYLE_FEATURES = ("quality", "tint")


def fit_contextual_bt(i: np.ndarray, j: np.ndarray, y: np.ndarray, x: np.ndarray, n_models: int,
                      weights: np.ndarray | None = None, l2: float = L2, max_iter: int = 100,
                      tol: float = 1e-9, max_step: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Maximise Σ wₙ[yₙ log σ(zₙ) + (1 − yₙ) log σ(−zₙ)] − (λ/2)‖(θ, γ)‖² with
    zₙ = θ[iₙ] − θ[jₙ] + γ·xₙ (y ∈ [0, 1]: 1 = i won, ½ = tie); returns (θ centred, γ)."""
    i, j = np.asarray(i, dtype=int), np.asarray(j, dtype=int)
    y = np.asarray(y, dtype=float)
    x = np.asarray(x, dtype=float).reshape(len(y), -1)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    k = x.shape[1]
    design = np.zeros((len(y), n_models + k))
    rows = np.arange(len(y))
    design[rows, i] += 1.0
    design[rows, j] -= 1.0
    design[:, n_models:] = x
    phi = np.zeros(n_models + k)
    for _ in range(max_iter):
        p = expit(design @ phi)
        grad = design.T @ (w * (y - p)) - l2 * phi
        hessian = (design * (w * p * (1.0 - p))[:, None]).T @ design + l2 * np.eye(len(phi))
        step = np.linalg.solve(hessian, grad)
        step[:n_models] -= step[:n_models].mean()
        biggest = np.abs(step).max()
        phi = phi + step * min(1.0, max_step / max(biggest, 1e-300))
        if biggest < tol:
            break
    theta = phi[:n_models] - phi[:n_models].mean()
    return theta, phi[n_models:]


def log_likelihood(i, j, y, x, theta, gamma) -> float:
    z = theta[np.asarray(i)] - theta[np.asarray(j)] + np.asarray(x) @ gamma
    return float(np.sum(y * log_expit(z) + (1 - y) * log_expit(-z)))


def battle_features(store, frame: pd.DataFrame, features=STYLE_FEATURES,
                    cache: dict | None = None) -> pd.DataFrame:
    """Per judgment row of ``frame``: ``<feature>_a`` and ``<feature>_b``, the image features
    of each side's output at the judged turn (the mean over its turns for a whole-session
    vote).  ``cache`` maps image sha → features (they never change), filled as it goes."""
    from mteditlab.rewards.features import image_features

    cache = {} if cache is None else cache
    turns = store.table("turns")[["session_id", "turn_index", "output_sha"]]
    needed = set(frame["session_a"]) | set(frame["session_b"])
    turns = turns[turns["session_id"].isin(needed)]
    for sha in set(turns["output_sha"]) - set(cache):
        cache[sha] = image_features(store.get_image(sha))
    per_turn = turns.assign(**{f: [cache[s][f] for s in turns["output_sha"]] for f in features})
    by_turn = per_turn.set_index(["session_id", "turn_index"])[list(features)]
    by_session = per_turn.groupby("session_id")[list(features)].mean()
    out = {}
    for side in ("a", "b"):
        sessions = frame[f"session_{side}"].to_numpy()
        turn = frame["turn"]
        values = np.full((len(frame), len(features)), np.nan)
        whole = turn.isna().to_numpy()
        if whole.any():
            values[whole] = by_session.reindex(sessions[whole]).to_numpy()
        if (~whole).any():
            keys = pd.MultiIndex.from_arrays([sessions[~whole],
                                              turn[~whole].astype(int).to_numpy()])
            values[~whole] = by_turn.reindex(keys).to_numpy()
        for k, f in enumerate(features):
            out[f"{f}_{side}"] = values[:, k]
    return pd.DataFrame(out, index=frame.index)


COLUMNS = ["model", "rating", "controlled", "lower", "upper", "rank", "change", "battles"]


def style_controlled(frame: pd.DataFrame, feats: pd.DataFrame, features=STYLE_FEATURES,
                     n_boot: int = 200, seed: int = 0, l2: float = L2
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ratings, coefficients) of the contextual BT on the battles of ``frame`` (judgment rows
    with model_a/model_b/choice) and their features ``feats`` (:func:`battle_features`).

    ratings: model, plain ``rating`` (the same fit without covariates), ``controlled`` rating
    with its 95% bootstrap interval and rank, ``change`` = controlled − plain, battles; all on
    the Elo scale.  coefficients: feature, ``elo_per_sd`` (γ in Elo points per standard
    deviation of the feature difference) with its interval, ``sd``."""
    frame = battles(frame)
    feats = feats.loc[frame.index]
    ok = np.isfinite(feats.to_numpy(dtype=float)).all(axis=1)
    frame, feats = frame[ok], feats[ok]
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS), pd.DataFrame(columns=["feature", "elo_per_sd"])
    models = sorted(set(frame["model_a"]) | set(frame["model_b"]))
    index = {m: k for k, m in enumerate(models)}
    i = frame["model_a"].map(index).to_numpy()
    j = frame["model_b"].map(index).to_numpy()
    y = frame["choice"].map(SCORES).to_numpy(dtype=float)
    diff = np.stack([feats[f"{f}_a"].to_numpy(float) - feats[f"{f}_b"].to_numpy(float)
                     for f in features], axis=1)
    sd = diff.std(axis=0)
    x = diff / np.where(sd > 1e-12, sd, 1.0)
    m = len(models)
    plain, _ = fit_contextual_bt(i, j, y, np.zeros((len(y), 0)), m, l2=l2)
    theta, gamma = fit_contextual_bt(i, j, y, x, m, l2=l2)
    rng = np.random.default_rng(seed)
    boot_theta, boot_gamma = [], []
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(len(y), size=len(y)), minlength=len(y))
        t, g = fit_contextual_bt(i, j, y, x, m, weights=counts.astype(float), l2=l2)
        boot_theta.append(t)
        boot_gamma.append(g)
    lower, upper = np.percentile(np.array(boot_theta), [2.5, 97.5], axis=0)
    g_lower, g_upper = np.percentile(np.array(boot_gamma), [2.5, 97.5], axis=0)
    n = np.bincount(np.concatenate([i, j]), minlength=m)
    table = pd.DataFrame({
        "model": models, "rating": to_elo(plain), "controlled": to_elo(theta), "lower": to_elo(lower),
        "upper": to_elo(upper), "rank": rank_by_intervals(to_elo(lower), to_elo(upper)),
        "change": ELO_SCALE * (theta - plain), "battles": n})
    table = table.sort_values(["controlled", "model"], ascending=[False, True],
                              ignore_index=True)
    coefficients = pd.DataFrame({"feature": list(features), "elo_per_sd": ELO_SCALE * gamma,
                                 "lower": ELO_SCALE * g_lower, "upper": ELO_SCALE * g_upper,
                                 "sd": sd})
    return table[COLUMNS], coefficients
