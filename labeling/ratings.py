"""Bradley–Terry leaderboard with bootstrap intervals, win-rate tables and plots.

Model
    P(i beats j) = σ(θ_i − θ_j).  A tie counts as half a win for each side; ``both_bad`` is
    scored as a tie (as public arenas do).  θ maximises

        Σ_{i≠j} W_ij · log σ(θ_i − θ_j)  −  (λ/2) Σ_i θ_i²

    where W_ij = wins of i over j + ½ ties.  The tiny ridge λ (default 1e-4) fixes the
    translation freedom (its optimum has Σθ = 0) and keeps θ finite when a model never loses;
    on real data it moves ratings by far less than their uncertainty.  Ratings are reported on
    the Elo scale: 1000 + 400·θ/ln 10 (so the mean model is at 1000 and +400 means 10:1 odds).

Fit
    Battles are aggregated to per-pair counts of (i wins, j wins, ties), and θ found by damped
    Newton steps on the concave objective, batched over any leading axes.

Bootstrap
    Seeded resampling of battles with replacement, done on the aggregated counts: each round
    draws the (pair, outcome) counts from a multinomial with the observed frequencies, which
    is the same distribution as resampling the battle rows.  All rounds are fitted at once.
    The 95% interval is the 2.5–97.5 percentile range; rank = 1 + number of models whose lower
    bound is above this model's upper bound.  Battles are treated as independent (several
    votes on one comparison — turns, criteria, annotators — are correlated, so slice with
    ``by=`` or filters when that matters).

Planted gold comparisons (``gold`` column true) are not model battles and are dropped.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from scipy.special import expit

from labeling.schema import SCORES
from labeling.selection import without_gold

ELO_BASE = 1000.0
ELO_SCALE = 400.0 / math.log(10.0)
L2 = 1e-4
GROUPINGS = ("turn", "criterion")


@dataclasses.dataclass(frozen=True)
class PairCounts:
    """Battles aggregated per model pair: ``counts[k] = (i wins, j wins, ties)`` for
    ``(i[k], j[k])`` with i < j indexing ``models``; ``both_bad[k]`` of the ties were both-bad."""

    models: tuple[str, ...]
    i: np.ndarray
    j: np.ndarray
    counts: np.ndarray
    both_bad: np.ndarray

    @property
    def n_battles(self) -> int:
        return int(self.counts.sum())

    def win_matrix(self, counts: np.ndarray | None = None) -> np.ndarray:
        """W (…, M, M) with W[i, j] = wins of i over j + ½ ties, for ``counts`` (…, K, 3)."""
        counts = self.counts if counts is None else counts
        m = len(self.models)
        w = np.zeros(counts.shape[:-2] + (m, m))
        w[..., self.i, self.j] = counts[..., 0] + 0.5 * counts[..., 2]
        w[..., self.j, self.i] = counts[..., 1] + 0.5 * counts[..., 2]
        return w


def battles(frame: pd.DataFrame) -> pd.DataFrame:
    """The model battles in a judgments frame: gold rows dropped, columns checked."""
    missing = {"model_a", "model_b", "choice"} - set(frame.columns)
    if missing:
        raise ValueError(f"judgments frame lacks columns {sorted(missing)}")
    frame = without_gold(frame)
    if (frame["model_a"] == frame["model_b"]).any():
        raise ValueError("a battle pits a model against itself; ordinary comparisons need two")
    return frame


def pair_counts(frame: pd.DataFrame) -> PairCounts:
    """Aggregate a judgments frame (see :func:`battles`) into :class:`PairCounts`."""
    frame = battles(frame)
    models = tuple(sorted(set(frame["model_a"]) | set(frame["model_b"])))
    index = {m: k for k, m in enumerate(models)}
    a = frame["model_a"].map(index).to_numpy(dtype=np.int64)
    b = frame["model_b"].map(index).to_numpy(dtype=np.int64)
    choice = frame["choice"].to_numpy()
    swap = a > b
    lo, hi = np.where(swap, b, a), np.where(swap, a, b)
    a_won, b_won = choice == "A", choice == "B"
    lo_won, hi_won = np.where(swap, b_won, a_won), np.where(swap, a_won, b_won)
    outcome = np.select([lo_won, hi_won], [0, 1], default=2)
    m = len(models)
    flat = (lo * m + hi) * 3 + outcome
    table = np.bincount(flat, minlength=m * m * 3).reshape(m * m, 3)
    bad = np.bincount(lo * m + hi, weights=choice == "both_bad", minlength=m * m)
    pairs = np.flatnonzero(table.sum(1))
    return PairCounts(models, pairs // m, pairs % m, table[pairs].astype(float), bad[pairs])


def fit_ratings(w: np.ndarray, l2: float = L2, max_iter: int = 100, tol: float = 1e-9,
                max_step: float = 2.0) -> np.ndarray:
    """Maximise the penalised BT log-likelihood for win matrices ``w`` (…, M, M); returns θ.

    Newton's method; each step is scaled so that no θ moves by more than ``max_step`` and
    kept centred (centring never lowers the objective, and its optimum has Σθ = 0).
    """
    w = np.asarray(w, dtype=float)
    m = w.shape[-1]
    n = w + np.swapaxes(w, -1, -2)
    wins = w.sum(-1)
    theta = np.zeros(w.shape[:-1])
    eye = np.eye(m)
    for _ in range(max_iter):
        p = expit(theta[..., :, None] - theta[..., None, :])
        grad = wins - (n * p).sum(-1) - l2 * theta
        curv = n * p * (1.0 - p)
        neg_hessian = eye * (curv.sum(-1)[..., None] + l2) - curv
        step = np.linalg.solve(neg_hessian, grad[..., None])[..., 0]
        step -= step.mean(-1, keepdims=True)  # the optimum is centred: drop rounding drift
        biggest = np.abs(step).max(-1, keepdims=True)
        theta = theta + step * np.minimum(1.0, max_step / np.maximum(biggest, 1e-300))
        if biggest.max() < tol:
            break
    return theta


def to_elo(theta: np.ndarray) -> np.ndarray:
    """Elo-scale ratings, 1000 + 400·θ/ln 10 (θ centred, as :func:`fit_ratings` returns it)."""
    return ELO_BASE + ELO_SCALE * theta


def bootstrap_ratings(pc: PairCounts, n_boot: int, seed: int, l2: float = L2) -> np.ndarray:
    """Elo ratings (n_boot, M) from ``n_boot`` seeded resamplings of the battles."""
    rng = np.random.default_rng(seed)
    total = pc.counts.sum()
    draws = rng.multinomial(int(total), (pc.counts / total).ravel(), size=n_boot)
    return to_elo(fit_ratings(pc.win_matrix(draws.reshape(n_boot, *pc.counts.shape)), l2=l2))


def rank_by_intervals(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """rank_i = 1 + #{j : lower_j > upper_i}."""
    return 1 + (lower[None, :] > upper[:, None]).sum(1)


COLUMNS = ["model", "rating", "lower", "upper", "rank", "battles", "wins", "losses", "ties",
           "both_bad", "win_rate", "provisional", "note"]
UNDEFEATED = "never lost: the rating is a lower bound (upper end ∞)"
WINLESS = "never won: the rating is an upper bound (lower end −∞)"


def _record(pc: PairCounts) -> tuple[np.ndarray, ...]:
    """Per model of ``pc``: wins, losses, ties (both-bad excluded) and both-bad counts."""
    m = len(pc.models)
    wins, losses, ties, bad = (np.zeros(m) for _ in range(4))
    for side, win_col, loss_col in ((pc.i, 0, 1), (pc.j, 1, 0)):
        np.add.at(wins, side, pc.counts[:, win_col])
        np.add.at(losses, side, pc.counts[:, loss_col])
        np.add.at(ties, side, pc.counts[:, 2] - pc.both_bad)
        np.add.at(bad, side, pc.both_bad)
    return wins, losses, ties, bad


def established_models(frame: pd.DataFrame, min_battles: int) -> set[str]:
    """The models with at least ``min_battles`` battles against other such models (found by
    repeatedly setting aside the models below the bar and recounting)."""
    frame = battles(frame)
    keep = set(frame["model_a"]) | set(frame["model_b"])
    while True:
        inside = frame[frame["model_a"].isin(keep) & frame["model_b"].isin(keep)]
        counts = pd.concat([inside["model_a"], inside["model_b"]]).value_counts()
        now = {m for m in keep if counts.get(m, 0) >= min_battles}
        if now == keep:
            return keep
        keep = now


def ratings_table(frame: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                  l2: float = L2, min_battles: int = 0) -> pd.DataFrame:
    """One leaderboard (columns :data:`COLUMNS`): ranked models by rating, then the
    provisional ones.

    A model with fewer than ``min_battles`` battles against ranked models (see
    :func:`established_models`) is *provisional*: listed with its counts over all its battles,
    but not fitted, rated or ranked, so that a model with a handful of votes neither tops the
    board nor shifts the others.  The ranked models are fitted on their battles among
    themselves.  A ranked model that never lost (no loss, tie or both-bad) has no finite
    maximum-likelihood rating: its shown rating is set by the tiny ridge and every bootstrap
    round is undefeated too, so its interval's upper end is reported as +∞ (and a never-winning
    model's lower end as −∞), with a ``note``.
    """
    pc_all = pair_counts(frame)
    if pc_all.n_battles == 0:
        return pd.DataFrame(columns=COLUMNS)
    keep = established_models(frame, min_battles) if min_battles > 0 else set(pc_all.models)
    frame = battles(frame)
    ranked = _ranked(frame[frame["model_a"].isin(keep) & frame["model_b"].isin(keep)],
                     n_boot, seed, l2)
    wins, losses, ties, bad = _record(pc_all)
    n = wins + losses + ties + bad
    counts = pd.DataFrame({
        "model": pc_all.models, "battles": n.astype(int), "wins": wins.astype(int),
        "losses": losses.astype(int), "ties": ties.astype(int), "both_bad": bad.astype(int),
        "win_rate": (wins + 0.5 * (ties + bad)) / n})
    table = counts.merge(ranked, on="model", how="left")
    table["provisional"] = ~table["model"].isin(keep)
    table["rank"] = table["rank"].astype("Int64")
    table["note"] = table["note"].fillna("").where(
        ~table["provisional"], f"provisional: fewer than {min_battles} battles, not ranked")
    table = table.sort_values(["provisional", "rating", "battles", "model"],
                              ascending=[True, False, False, True], ignore_index=True)
    return table[COLUMNS]


def _ranked(frame: pd.DataFrame, n_boot: int, seed: int, l2: float) -> pd.DataFrame:
    """model, rating, lower, upper, rank, note of a BT fit on ``frame`` (see ratings_table)."""
    pc = pair_counts(frame)
    if pc.n_battles == 0:
        return pd.DataFrame(columns=["model", "rating", "lower", "upper", "rank", "note"])
    m = len(pc.models)
    played = np.zeros((m, m), dtype=bool)
    played[pc.i, pc.j] = True
    if connected_components(played, directed=False)[0] > 1:
        warnings.warn("the models do not form one connected comparison graph; ratings of "
                      "different components are not comparable", stacklevel=3)
    rating = to_elo(fit_ratings(pc.win_matrix(), l2=l2))
    boots = bootstrap_ratings(pc, n_boot, seed, l2=l2)
    lower, upper = np.percentile(boots, [2.5, 97.5], axis=0)
    wins, losses, ties, bad = _record(pc)
    undefeated = (losses + ties + bad == 0) & (wins > 0)
    winless = (wins + ties + bad == 0) & (losses > 0)
    upper = np.where(undefeated, np.inf, upper)
    lower = np.where(winless, -np.inf, lower)
    note = np.where(undefeated, UNDEFEATED, np.where(winless, WINLESS, ""))
    return pd.DataFrame({"model": pc.models, "rating": rating, "lower": lower, "upper": upper,
                         "rank": rank_by_intervals(lower, upper), "note": note})


def _group_labels(frame: pd.DataFrame, by: str) -> pd.Series:
    if by == "turn":
        return frame["turn"].astype("string").fillna("overall")
    return frame[by].astype("string")


def leaderboard(frame: pd.DataFrame, by: str | None = None, n_boot: int = 1000,
                seed: int = 0, l2: float = L2, min_battles: int = 0) -> pd.DataFrame:
    """Leaderboard(s) from a judgments frame: one over all battles, or one per ``by`` value
    ('turn': each turn index plus 'overall' for whole-session votes; 'criterion').  The
    grouping becomes the first column.  Every group uses the same bootstrap seed."""
    if by is None:
        return ratings_table(frame, n_boot, seed, l2, min_battles)
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {GROUPINGS} or None, got {by!r}")
    frame = battles(frame)
    labels = _group_labels(frame, by)
    tables = [ratings_table(part, n_boot, seed, l2, min_battles).assign(**{by: label})
              for label, part in frame.groupby(labels, sort=False)]
    if not tables:
        empty = ratings_table(frame, n_boot, seed, l2, min_battles)
        empty.insert(0, by, pd.Series(dtype="string"))
        return empty
    order = sorted({t[by].iloc[0] for t in tables}, key=_group_order)
    out = pd.concat(tables, ignore_index=True)
    out[by] = pd.Categorical(out[by], categories=order, ordered=True)
    out = out.sort_values([by, "provisional", "rating"], ascending=[True, True, False],
                          ignore_index=True)
    return out[[by] + [c for c in out.columns if c != by]]


def _group_order(label: str) -> tuple:
    """'overall' first, then turn indices numerically, then other labels alphabetically."""
    if label == "overall":
        return (0, 0, "")
    if label.isdigit():
        return (1, int(label), "")
    return (2, 0, label)


def win_rate_matrix(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rates, battles): rates[r, c] = share of r's battles against c that r won (ties half),
    NaN where they never met; battles[r, c] = number of those battles."""
    pc = pair_counts(frame)
    w = pc.win_matrix()
    n = w + w.T
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(n > 0, w / n, np.nan)
    return (pd.DataFrame(rates, index=pc.models, columns=pc.models),
            pd.DataFrame(n.astype(int), index=pc.models, columns=pc.models))


def win_rate_by_turn(frame: pd.DataFrame) -> pd.DataFrame:
    """Per turn index and model: battles and win rate (ties half) over per-turn votes."""
    frame = battles(frame)
    frame = frame[frame["turn"].notna()]
    score_a = frame["choice"].map(SCORES).astype(float)
    long = pd.concat([
        pd.DataFrame({"turn": frame["turn"].astype(int), "model": frame["model_a"],
                      "score": score_a}),
        pd.DataFrame({"turn": frame["turn"].astype(int), "model": frame["model_b"],
                      "score": 1.0 - score_a}),
    ])
    return (long.groupby(["turn", "model"]).score.agg(battles="size", win_rate="mean")
            .reset_index())


def plot_ratings(table: pd.DataFrame, path: str | Path, title: str = "Bradley–Terry ratings"):
    """PNG: each ranked model's rating with its 95% interval (an arrow where it is open) and
    battle count (one ratings_table; provisional models are left out)."""
    from matplotlib.figure import Figure

    if "provisional" in table.columns:
        table = table[~table["provisional"].astype(bool)]
    table = table.sort_values("rating")
    fig = Figure(figsize=(7, 0.45 * len(table) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(table))
    rating = table["rating"].to_numpy(float)
    lower, upper = table["lower"].to_numpy(float), table["upper"].to_numpy(float)
    finite = np.concatenate([rating, lower[np.isfinite(lower)], upper[np.isfinite(upper)]])
    reach = 0.1 * max(np.ptp(finite), 50.0)   # open ends (±∞) drawn to past the data
    lo = np.where(np.isfinite(lower), lower, finite.min() - reach)
    hi = np.where(np.isfinite(upper), upper, finite.max() + reach)
    ax.errorbar(rating, y, xerr=[rating - lo, hi - rating], fmt="o", capsize=4)
    for k in np.flatnonzero(~np.isfinite(upper)):
        ax.plot(hi[k], y[k], ">", color="C0")
    for k in np.flatnonzero(~np.isfinite(lower)):
        ax.plot(lo[k], y[k], "<", color="C0")
    ax.set_yticks(y, [f"{m}  (n={n})" for m, n in zip(table["model"], table["battles"])])
    ax.axvline(ELO_BASE, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("rating (Elo scale; 95% bootstrap interval)")
    ax.set_title(title)
    fig.savefig(path, dpi=120)


def plot_win_rate_by_turn(frame: pd.DataFrame, path: str | Path,
                          title: str = "Win rate by turn index"):
    """PNG: each model's win rate (ties half, ±1 s.e.) at each turn index."""
    from matplotlib.figure import Figure

    data = win_rate_by_turn(frame)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for model, part in data.groupby("model"):
        se = np.sqrt(part["win_rate"] * (1 - part["win_rate"]) / part["battles"])
        ax.errorbar(part["turn"], part["win_rate"], yerr=se, marker="o", capsize=3,
                    label=model)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("turn index (0 = first edit)")
    ax.set_ylabel("win rate (ties = ½)")
    ax.set_ylim(0, 1)
    if not data.empty:
        ax.set_xticks(sorted(data["turn"].unique()))
        ax.legend(fontsize="small")
    ax.set_title(title)
    fig.savefig(path, dpi=120)
