"""How well the judge agrees with the verifier: metrics over :class:`~training.judge_data.Examples` and
the judge's probabilities ``[N, 4]`` (``HEADS`` order), and the report's tables.

Per sub-score: the verifier's positive rate, accuracy at threshold 0.5, AUC; quality: MAE and
Pearson r; errors sliced by op, referential vs explicit turns, defect type and origin; how often the
correct edit out-scores the identity, and how often, among outputs of the same turn, one the verifier
passes out-scores one it fails.
"""

from __future__ import annotations

import math

import numpy as np

from mteditlab.rewards.mini_judge import HEADS
from training.judge_data import Examples


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann–Whitney, ties count half); NaN when a class is missing."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return math.nan
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    ranks_sorted = np.arange(1, len(allv) + 1, dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(allv, return_index=True, return_counts=True)
    for f, c in zip(first, counts):
        if c > 1:
            ranks_sorted[f:f + c] = ranks_sorted[f:f + c].mean()
    ranks[order] = ranks_sorted
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    keep = np.isfinite(labels) & np.isfinite(probs)
    y, p = labels[keep] > 0.5, probs[keep]
    if not len(y):
        return {"n": 0}
    return {"n": int(len(y)), "positive_rate": float(y.mean()), "judge_mean": float(p.mean()),
            "accuracy": float(((p > 0.5) == y).mean()), "auc": auc(y, p),
            "false_pos": float(((p > 0.5) & ~y).mean()), "false_neg": float(((p <= 0.5) & y).mean())}


def evaluate_probs(examples: Examples, probs: np.ndarray) -> dict:
    """Agreement of judge probabilities ``[N, 4]`` (``HEADS`` order) with the verifier's labels."""
    labels = examples.labels
    result = {"n": len(examples)}
    for j, name in enumerate(HEADS):
        if name == "quality":
            y, p = labels[:, j], probs[:, j]
            keep = np.isfinite(p)
            result[name] = {"n": int(keep.sum()), "label_mean": float(y[keep].mean()),
                            "judge_mean": float(p[keep].mean()), "mae": float(np.abs(y[keep] - p[keep]).mean()),
                            "pearson": float(np.corrcoef(y[keep], p[keep])[0, 1]),
                            "auc_clean": auc(y[keep] >= 0.9, p[keep])}
        else:
            result[name] = binary_metrics(labels[:, j], probs[:, j])
    success = np.array([m["success"] for m in examples.meta], np.float64)
    semantic = np.where(np.isnan(probs[:, 2:3]) | np.isnan(labels[:, 2:3]), 1.0, probs[:, 2:3])
    result["success"] = binary_metrics(success, np.minimum(np.minimum(probs[:, 0], probs[:, 1]), semantic[:, 0]))
    return result


def _slices(examples: Examples, key: str) -> dict[str, np.ndarray]:
    values = [str(m[key]) if key != "referential" else ("referential" if m[key] else "explicit") for m in examples.meta]
    return {v: np.array([x == v for x in values]) for v in sorted(set(values))}


def sliced(examples: Examples, probs: np.ndarray, key: str) -> dict:
    out = {}
    for value, mask in _slices(examples, key).items():
        idx = np.flatnonzero(mask)
        row = {"n": int(len(idx))}
        for j, name in enumerate(HEADS[:3]):
            m = binary_metrics(examples.labels[idx, j], probs[idx, j])
            row[name] = {k: m.get(k) for k in ("accuracy", "auc", "positive_rate")}
        row["quality_mae"] = float(np.nanmean(np.abs(examples.labels[idx, 3] - probs[idx, 3])))
        out[value] = row
    return out


def judge_overall(examples: Examples, probs: np.ndarray) -> np.ndarray:
    """The judge's ``overall`` (protocol rule ``mean``; ``ga`` left out at turn 0)."""
    probs = probs.copy()
    probs[np.isnan(examples.labels[:, 2]), 2] = np.nan
    return np.nanmean(probs, axis=1)


def ranking(examples: Examples, probs: np.ndarray) -> dict:
    """Within-turn ranking, what GRPO uses: ``correct_above_identity`` = how often the judge's overall
    puts the forced ``correct`` branch above the forced ``identity`` branch of the same turn (when the
    verifier passes the first and fails the second); ``pairwise`` = over all pairs of outputs of the same
    turn whose verifier success differs, how often the successful one scores higher. Ties count half."""
    overall = judge_overall(examples, probs)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(examples.meta):
        groups.setdefault((m["origin"], m["session"], m["turn"]), []).append(i)
    wins, pairs = [], []
    for members in groups.values():
        forced = {examples.meta[i]["defect"]: i for i in members if examples.meta[i].get("forced")}
        if {"correct", "identity"} <= set(forced) and examples.meta[forced["correct"]]["success"] \
                and not examples.meta[forced["identity"]]["success"]:
            a, b = overall[forced["correct"]], overall[forced["identity"]]
            wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
        good = [i for i in members if examples.meta[i]["success"]]
        bad = [i for i in members if not examples.meta[i]["success"]]
        pairs += [1.0 if overall[g] > overall[b] else 0.5 if overall[g] == overall[b] else 0.0 for g in good for b in bad]
    return {"pairs": len(wins), "correct_above_identity": float(np.mean(wins)) if wins else math.nan,
            "mixed_pairs": len(pairs), "pairwise": float(np.mean(pairs)) if pairs else math.nan}


def full_report(examples: Examples, probs: np.ndarray, probs_no_intent: np.ndarray | None = None) -> dict:
    """Agreement on the rollout mix (forced branches left out), slices of it, and within-turn ranking
    over every output."""
    mix = np.flatnonzero([not m.get("forced") for m in examples.meta])
    report = {"ranking": ranking(examples, probs)}
    examples, probs = examples.subset(mix), probs[mix]
    report["overall"] = evaluate_probs(examples, probs)
    for key in ("origin", "op", "referential", "defect", "turn"):
        report[f"by_{key}"] = sliced(examples, probs, key)
    for origin, mask in _slices(examples, "origin").items():
        idx = np.flatnonzero(mask)
        report.setdefault("by_origin_full", {})[origin] = evaluate_probs(examples.subset(idx), probs[idx])
    if probs_no_intent is not None:
        probs_no_intent = probs_no_intent[mix]
        report["no_intent"] = {"overall": evaluate_probs(examples, probs_no_intent),
                               "by_referential": sliced(examples, probs_no_intent, "referential")}
    return report


def _fmt(x) -> str:
    return "  —  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table(report: dict) -> str:
    """Markdown tables: agreement per sub-score, then error slices."""
    o = report["overall"]
    lines = [f"Agreement with the verifier ({o['n']} test outputs, rollout mix)", "",
             "| sub-score | n | verifier positive | judge mean | accuracy@0.5 | AUC |", "|---|---|---|---|---|---|"]
    for name in ("if", "cc", "ga", "success"):
        m = o[name]
        lines.append(f"| {name} | {m['n']} | {_fmt(m['positive_rate'])} | {_fmt(m['judge_mean'])} | "
                     f"{_fmt(m['accuracy'])} | {_fmt(m['auc'])} |")
    q = o["quality"]
    lines += ["", f"quality: label mean {_fmt(q['label_mean'])}, judge mean {_fmt(q['judge_mean'])}, "
              f"MAE {_fmt(q['mae'])}, Pearson r {_fmt(q['pearson'])}, AUC(label ≥ 0.9) {_fmt(q['auc_clean'])}"]
    r = report["ranking"]
    lines += [f"correct edit scored above the identity: {_fmt(r['correct_above_identity'])} of {r['pairs']} turns; "
              f"within-turn pairs (verifier success vs failure) ranked right: {_fmt(r['pairwise'])} of {r['mixed_pairs']}"]
    if "no_intent" in report:
        ni = report["no_intent"]["overall"]
        lines += ["without the intent (instruction + history only): "
                  + ", ".join(f"{k} acc {_fmt(ni[k]['accuracy'])} / AUC {_fmt(ni[k]['auc'])}" for k in ("if", "cc", "ga"))]
    for key in ("origin", "op", "referential", "defect", "turn"):
        lines += ["", f"| {key} | n | if acc | if AUC | cc acc | cc AUC | ga acc | ga AUC | quality MAE |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for value, row in report[f"by_{key}"].items():
            cells = [f"{_fmt(row[h]['accuracy'])} | {_fmt(row[h]['auc'])}" for h in ("if", "cc", "ga")]
            lines.append(f"| {value} | {row['n']} | " + " | ".join(cells) + f" | {_fmt(row['quality_mae'])} |")
    if "no_intent" in report:
        lines += ["", "| without intent | n | if acc | if AUC | cc acc | cc AUC | ga acc | ga AUC | quality MAE |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for value, row in report["no_intent"]["by_referential"].items():
            cells = [f"{_fmt(row[h]['accuracy'])} | {_fmt(row[h]['auc'])}" for h in ("if", "cc", "ga")]
            lines.append(f"| {value} | {row['n']} | " + " | ".join(cells) + f" | {_fmt(row['quality_mae'])} |")
    return "\n".join(lines)
