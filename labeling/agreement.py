"""Inter-annotator agreement, gold accuracy and improbable-voter detection.

A *unit* is one question asked of annotators: (comparison, turn, criterion).  Its *value* is
the nominal choice ('A', 'B', 'tie', 'both_bad', naming sessions, not screen sides).  All
coefficients are computed from the units × categories count matrix n[u, c] (how many
annotators gave unit u value c); units with fewer than two values carry no agreement
information and are dropped.

* Krippendorff's α (nominal), Krippendorff (2011): with coincidences
  o_cc = Σ_u n_uc (n_uc − 1)/(m_u − 1), n_c = Σ_u n_uc, n = Σ_c n_c,
  α = 1 − (n − 1)(n − Σ_c o_cc) / (n² − Σ_c n_c²).  Handles missing values.
* Fleiss' κ (Fleiss 1971), in the usual generalisation to a varying number of raters:
  P_u = (Σ_c n_uc² − m_u)/(m_u(m_u − 1)), P̄ = mean_u P_u, p_c = n_c/n, P_e = Σ_c p_c²,
  κ = (P̄ − P_e)/(1 − P_e).  Equals Fleiss' κ when every unit has the same number of raters.
* Cohen's κ for two annotators from their confusion matrix: (p_o − p_e)/(1 − p_e); for many
  annotators the mean over annotator pairs sharing enough units (Light's κ).

Improbable voters (:func:`flag_annotators`) follow the arena practice: each vote gets a
p-value under the outcome distribution of *everyone else's* votes on the same model pair and
criterion (add-one smoothed; p = total probability of outcomes no likelier than the one
cast), and the p-values are combined sequentially with Fisher's method,
X_j = −2 Σ_{i≤j} ln p_i ~ χ²(2j).  Looks at j = n₀, 2n₀, 4n₀, … spend α/2, α/4, α/8, …, so the
chance of flagging an annotator who votes like the crowd stays below α however long they vote.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.special import chdtrc

from labeling.selection import without_gold
from labeling.schema import CHOICES

UNIT = ["comparison_id", "turn", "criterion"]


def category_counts(frame: pd.DataFrame, unit_cols: Sequence[str] = UNIT,
                    value_col: str = "choice",
                    categories: Sequence = CHOICES) -> np.ndarray:
    """The units × categories count matrix of a long frame (one row per rating)."""
    if frame.empty:
        return np.zeros((0, len(categories)))
    if not frame[value_col].isin(list(categories)).all():
        raise ValueError(f"values outside {list(categories)} in column {value_col!r}")
    unit = frame.groupby(list(unit_cols), dropna=False, sort=False).ngroup().to_numpy()
    code = pd.Categorical(frame[value_col], categories=list(categories)).codes
    counts = np.zeros((unit.max() + 1, len(categories)))
    np.add.at(counts, (unit, code), 1)
    return counts


def _pairable(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    return counts[counts.sum(1) >= 2]


def krippendorff_alpha_nominal(counts: np.ndarray) -> float:
    """Krippendorff's α for nominal data from a units × categories count matrix (NaN when
    undefined: fewer than two pairable values, or a single category used throughout)."""
    counts = _pairable(counts)
    m = counts.sum(1)
    n_c = counts.sum(0)
    n = n_c.sum()
    expected = n * n - (n_c ** 2).sum()
    if n < 2 or expected == 0:
        return float("nan")
    agree = (counts * (counts - 1) / (m - 1)[:, None]).sum()
    return float(1.0 - (n - 1) * (n - agree) / expected)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' κ (varying-raters generalisation) from a units × categories count matrix."""
    counts = _pairable(counts)
    if counts.shape[0] == 0:
        return float("nan")
    m = counts.sum(1)
    p_unit = ((counts ** 2).sum(1) - m) / (m * (m - 1))
    p_cat = counts.sum(0) / m.sum()
    p_e = (p_cat ** 2).sum()
    if p_e == 1:
        return float("nan")
    return float((p_unit.mean() - p_e) / (1 - p_e))


def cohen_kappa(confusion: np.ndarray) -> float:
    """Cohen's κ from a C × C confusion matrix of two annotators' labels."""
    confusion = np.asarray(confusion, dtype=float)
    total = confusion.sum()
    p_o = np.trace(confusion) / total
    p_e = (confusion.sum(0) * confusion.sum(1)).sum() / total ** 2
    if p_e == 1:
        return float("nan")
    return float((p_o - p_e) / (1 - p_e))


def mean_pairwise_cohen(frame: pd.DataFrame, unit_cols: Sequence[str] = UNIT,
                        min_common: int = 5) -> tuple[float, int]:
    """(mean Cohen's κ over annotator pairs with >= ``min_common`` shared units, pairs used)."""
    wide = frame.assign(_unit=frame.groupby(list(unit_cols), dropna=False).ngroup()).pivot(
        index="_unit", columns="annotator", values="choice")
    codes = {c: k for k, c in enumerate(CHOICES)}
    kappas = []
    for first, second in itertools.combinations(wide.columns, 2):
        both = wide[[first, second]].dropna()
        if len(both) < min_common:
            continue
        confusion = np.zeros((len(CHOICES), len(CHOICES)))
        np.add.at(confusion, (both[first].map(codes).to_numpy(dtype=int),
                              both[second].map(codes).to_numpy(dtype=int)), 1)
        kappa = cohen_kappa(confusion)
        if not np.isnan(kappa):
            kappas.append(kappa)
    return (float(np.mean(kappas)) if kappas else float("nan")), len(kappas)


def agreement_table(frame: pd.DataFrame, min_common: int = 5) -> pd.DataFrame:
    """Per criterion: units with >= 2 ratings, their ratings, annotators, Krippendorff's α,
    Fleiss' κ and mean pairwise Cohen's κ.  Gold items are left out (their answers are
    planted, which would inflate agreement)."""
    frame = without_gold(frame)
    rows = []
    for criterion, part in frame.groupby("criterion", sort=True):
        counts = category_counts(part)
        pairable = _pairable(counts)
        cohen, pairs = mean_pairwise_cohen(part, min_common=min_common)
        rows.append({"criterion": criterion, "units": len(pairable),
                     "ratings": int(pairable.sum()), "annotators": part["annotator"].nunique(),
                     "alpha": krippendorff_alpha_nominal(counts),
                     "fleiss_kappa": fleiss_kappa(counts), "cohen_kappa": cohen,
                     "cohen_pairs": pairs})
    return pd.DataFrame(rows, columns=["criterion", "units", "ratings", "annotators", "alpha",
                                       "fleiss_kappa", "cohen_kappa", "cohen_pairs"])


def gold_accuracy(frame: pd.DataFrame, gold: pd.DataFrame) -> pd.DataFrame:
    """Per annotator: gold votes, correct ones and accuracy.  ``gold`` has comparison_id,
    criterion ('*' = any criterion) and answer; a criterion-specific answer wins over '*'."""
    votes = frame[["annotator", "comparison_id", "criterion", "choice"]]
    exact = gold[gold["criterion"] != "*"]
    wildcard = gold[gold["criterion"] == "*"].drop(columns="criterion")
    merged = votes.merge(exact, on=["comparison_id", "criterion"], how="left").merge(
        wildcard, on="comparison_id", how="left", suffixes=("", "_any"))
    answer = merged["answer"].fillna(merged["answer_any"])
    merged = merged.assign(correct=merged["choice"] == answer)[answer.notna()]
    out = merged.groupby("annotator").correct.agg(gold_votes="size", correct="sum").reset_index()
    out["accuracy"] = out["correct"] / out["gold_votes"]
    return out.sort_values(["accuracy", "annotator"], ignore_index=True)


def vote_p_values(frame: pd.DataFrame) -> pd.Series:
    """Each vote's p-value under everyone else's votes on the same model pair and criterion."""
    swap = frame["model_a"] > frame["model_b"]
    first = frame["model_a"].where(~swap, frame["model_b"])
    second = frame["model_b"].where(~swap, frame["model_a"])
    outcome = frame["choice"].where(~swap, frame["choice"].replace({"A": "B", "B": "A"}))
    key = first + "\x00" + second + "\x00" + frame["criterion"]
    code = pd.Categorical(outcome, categories=list(CHOICES)).codes
    onehot = np.eye(len(CHOICES))[code]
    everyone = pd.DataFrame(onehot, index=frame.index).groupby(key.to_numpy()).transform("sum")
    own = pd.DataFrame(onehot, index=frame.index).groupby(
        [key.to_numpy(), frame["annotator"].to_numpy()]).transform("sum")
    others = everyone.to_numpy() - own.to_numpy()
    q = (others + 1.0) / (others.sum(1, keepdims=True) + len(CHOICES))
    q_cast = q[np.arange(len(q)), code]
    return pd.Series((q * (q <= q_cast[:, None] + 1e-12)).sum(1), index=frame.index)


def flag_annotators(frame: pd.DataFrame, alpha: float = 0.01, first_look: int = 10
                    ) -> pd.DataFrame:
    """Sequential Fisher test of each annotator's votes against everyone else's (see module
    docstring).  Returns annotator, votes, p_value (Fisher over all votes), flagged and
    flagged_at (the number of votes at the first rejecting look)."""
    frame = without_gold(frame)
    order = [c for c in ("created_at", "judgment_id") if c in frame.columns]
    frame = frame.sort_values(order) if order else frame
    p = vote_p_values(frame).clip(lower=1e-300)
    rows = []
    for annotator, part in p.groupby(frame["annotator"], sort=True):
        statistic = np.cumsum(-2.0 * np.log(part.to_numpy()))
        j = np.arange(1, len(statistic) + 1)
        looks = first_look * 2 ** np.arange(int(np.log2(max(len(j) / first_look, 1))) + 1)
        looks = looks[looks <= len(j)]
        level = alpha / 2.0 ** np.arange(1, len(looks) + 1)
        p_look = chdtrc(2 * looks, statistic[looks - 1])
        rejected = looks[p_look < level]
        rows.append({"annotator": annotator, "votes": len(j),
                     "p_value": float(chdtrc(2 * len(j), statistic[-1])),
                     "flagged": bool(len(rejected)),
                     "flagged_at": int(rejected[0]) if len(rejected) else pd.NA})
    out = pd.DataFrame(rows, columns=["annotator", "votes", "p_value", "flagged", "flagged_at"])
    return out.sort_values(["p_value", "annotator"], ignore_index=True)
