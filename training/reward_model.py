"""Fit the human-calibrated reward model on the pairwise judgments in the label store.

    python -m training.reward_model --db PATH --out DIR [--report PATH.json] [--judge NAME]
        [--judge-path P] [--include-simulated/--no-include-simulated] [--test-fraction 0.25]
        [--seed 0] [--no-image-features]

Data
    Per-turn judgments (``turn`` not null; whole-session judgments are counted, not fit: a
    candidate is one editing turn, the unit a :class:`~mteditlab.rewards.base.RewardModel`
    scores), gold items excluded, human labels only unless the store has none or
    ``--include-simulated`` (:class:`labeling.selection.LabelSelection`; the report says which).
    A candidate = (session, turn): its input and output images, instruction, history and intent
    from the store, and — for sessions written by ``python -m labeling simulate`` (or any session
    whose ``meta`` names its ``world`` split / index / turns) — the world session, which the
    ``verifier`` judge needs. Candidates the judge fails on are dropped with their judgments
    (counted in the report).

Model (:mod:`mteditlab.rewards.calibrated`)
    s(x) = w·z(x) + b over standardised features z (judge sub-scores, judge overall, image
    features). The objective (minimised with L-BFGS) is the mean of

    * pairwise Bradley–Terry terms, for ``A`` / ``B`` / ``tie`` judgments: binary cross-entropy of
      σ(s(A) − s(B)) against y = 1 / 0 / ½ (a tie is half a win for each side);
    * absolute terms, weight ``ABS_WEIGHT`` per candidate: a ``both_bad`` judgment says each side
      is unacceptable, −log σ(−s(x)) for both; a decisive judgment says the winner was acceptable
      (the annotator had "both bad" available and did not use it), −log σ(s(winner)). ``both_bad``
      is *not* a pairwise tie. With b free this learns an acceptability threshold (−b), so
      ``overall = σ(s(x))`` reads as P(acceptable);

    plus a ridge ``L2``·‖w‖²/2.

Held-out evaluation
    Split **by session source** (the comparison's source image): a source goes to test when a
    seeded hash of it falls below ``--test-fraction``, so no session — nor any other session on
    the same source — is in both. Metrics on the test judgments:

    * ``heldout_accuracy``: on decisive (A/B) judgments, the fraction where the predicted
      P(A ≻ B) is on the chosen side; a prediction of exactly ½ counts ½ (a coin flip);
    * ``log_loss``: mean binary cross-entropy on A/B/tie judgments (tie target ½);
    * ``ece``: expected calibration error of P(A ≻ B) on A/B/tie judgments, 10 equal-width bins,
      |mean target − mean prediction| weighted by bin size;
    * the same for the raw judge (``judge_*``): P(A ≻ B) = σ((o_A − o_B)/T) from its overall score
      difference, the temperature T fit on the train judgments only.

    ``n_train`` / ``n_test``: per-turn judgments used in each part (both_bad included).

Refusals (exit code 2, nothing written)
    a missing database; no per-turn judgments; fewer than ``MIN_TRAIN`` usable (A/B/tie)
    judgments to fit or ``MIN_TEST`` to test; one-sided data (fewer than ``MIN_PER_SIDE``
    decisive judgments for A *or* for B in the training part — all one answer, or all ties /
    both bad — so there is no contrast to learn from).

Output
    ``DIR/calibrated.json`` (load with ``get_reward("calibrated", path=DIR)``), the report JSON
    (``--report``, default ``DIR/report.json``), and a small table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize, minimize_scalar

MIN_TRAIN = 40
MIN_TEST = 10
MIN_PER_SIDE = 5
ABS_WEIGHT = 0.5
L2 = 1e-3
ECE_BINS = 10
JUDGES = ("verifier", "judge", "qwen-vl")


class DataError(Exception):
    """The judgments cannot support a fit; the message says why."""


@dataclass
class Dataset:
    """Per-turn judgments resolved to candidate rows of ``raw``."""

    raw: np.ndarray  # [C, F] raw features per candidate
    judge_overall: np.ndarray  # [C]
    a: np.ndarray  # [J] candidate row of side A
    b: np.ndarray  # [J] candidate row of side B
    choice: np.ndarray  # [J] 'A' | 'B' | 'tie' | 'both_bad'
    group: np.ndarray  # [J] source sha of the comparison
    info: dict


# ------------------------------------------------------------------------------ loading
def _world_session(meta: dict, instructions: list[str]):
    """The world session a stored session's meta names, when the stored one follows it; else None."""
    from mteditlab.rewards.verifier import world_session

    session = world_session(meta) if isinstance(meta, dict) else "no meta"
    if isinstance(session, str) or [t.instruction for t in session.turns] != instructions:
        return None
    return session


def load_dataset(db: Path, judge, *, include_simulated: bool | None, image_features: bool,
                 log=print) -> tuple[Dataset, list[str]]:
    from labeling.cli import describe_selection
    from labeling.selection import without_gold
    from labeling.store import LabelStore
    from mteditlab.rewards.base import EditSample
    from mteditlab.rewards.calibrated import feature_names, raw_features
    from mteditlab.rewards.verifier import world_meta

    if not Path(db).exists():
        raise DataError(f"no label database at {db}")
    with LabelStore.open(db, read_only=True) as store:
        selection = store.label_selection(include_simulated)
        described = describe_selection(selection)
        log(described)
        frame = without_gold(store.judgments_frame(selection.include_simulated))
        n_overall = int(frame["turn"].isna().sum())
        frame = frame[frame["turn"].notna()].copy()
        if frame.empty:
            raise DataError(f"{db} has no per-turn judgments to fit on ({selection.human} human, "
                            f"{selection.simulated} simulated judgments in all, {n_overall} of the "
                            "selected whole-session); label some, or simulate: "
                            f"python -m labeling simulate --db {db}")
        frame["turn"] = frame["turn"].astype(int)
        sids = sorted(set(frame["session_a"].astype(int)) | set(frame["session_b"].astype(int)))
        sessions = store.query("SELECT session_id, source_sha, meta FROM sessions WHERE "
                               "list_contains(?, session_id)", [sids]).set_index("session_id")
        turns = store.query("SELECT * FROM turns WHERE list_contains(?, session_id) "
                            "ORDER BY session_id, turn_index", [sids])
        comparisons = store.query("SELECT comparison_id, source_sha FROM comparisons")
        images: dict[str, object] = {}

        def image(sha):
            if sha not in images:
                images[sha] = store.get_image(sha).convert("RGB")
            return images[sha]

        keys, samples = [], []
        for sid, rows in turns.groupby("session_id"):
            rows = rows.sort_values("turn_index")
            instructions = rows["instruction"].tolist()
            session = _world_session(json.loads(sessions.loc[sid, "meta"]), instructions)
            for k, row in enumerate(rows.itertuples()):
                keys.append((int(sid), k))
                samples.append(EditSample(
                    source=image(row.input_sha), edited=image(row.output_sha),
                    instruction=row.instruction, history=instructions[:k],
                    intent=row.intent if isinstance(row.intent, str) else None,
                    meta=world_meta(session, k) if session is not None else {}))
    judged = judge.score(samples)
    names = feature_names(judge.sub_scores, image_features)
    raw = raw_features(judged, samples, names)
    index = {key: i for i, key in enumerate(keys)}
    a = np.array([index[(int(s), t)] for s, t in zip(frame["session_a"], frame["turn"])])
    b = np.array([index[(int(s), t)] for s, t in zip(frame["session_b"], frame["turn"])])
    ok = judged.valid[a] & judged.valid[b]
    source = dict(zip(comparisons["comparison_id"].astype(int), comparisons["source_sha"]))
    group = np.array([source[int(c)] for c in frame["comparison_id"]])
    info = {"selection": described, "simulated": bool(selection.include_simulated),
            "n_human_available": selection.human, "n_simulated_available": selection.simulated,
            "n_overall_not_fit": n_overall, "n_candidates": len(keys),
            "n_candidates_judge_failed": int((~judged.valid).sum()),
            "n_judgments_dropped_judge_failed": int((~ok).sum()),
            "judge_failure_examples": sorted({f for f in judged.failures if f})[:3]}
    return Dataset(raw, judged.overall, a[ok], b[ok], frame["choice"].to_numpy()[ok], group[ok],
                   info), names


def split_by_source(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: a source is in test when its seeded hash falls below ``fraction``."""
    def u(sha):
        return int(hashlib.sha256(f"{seed}/{sha}".encode()).hexdigest()[:12], 16) / 16**12
    test_sources = {g for g in set(groups) if u(g) < fraction}
    return np.array([g in test_sources for g in groups], dtype=bool)


# --------------------------------------------------------------------------------- model
def _softplus(x):
    return np.logaddexp(0.0, x)


def _targets(choice: np.ndarray) -> np.ndarray:
    return np.select([choice == "A", choice == "B"], [1.0, 0.0], 0.5)


def fit_reward_model(z: np.ndarray, a, b, choice, *, abs_weight: float | None = None,
                     l2: float | None = None) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the objective in the module docstring."""
    abs_weight = ABS_WEIGHT if abs_weight is None else abs_weight
    l2 = L2 if l2 is None else l2
    pair = choice != "both_bad"
    y = _targets(choice[pair])
    diff = z[a[pair]] - z[b[pair]]
    win = np.isin(choice, ("A", "B"))
    winners = np.where(choice[win] == "A", a[win], b[win])
    bad = choice == "both_bad"
    absolute_rows = np.concatenate([winners, a[bad], b[bad]])
    absolute_t = np.concatenate([np.ones(len(winners)), np.zeros(2 * bad.sum())])
    za = z[absolute_rows]
    n_terms = max(1, len(y) + abs_weight * len(absolute_t))
    f = z.shape[1]

    def objective(theta):
        w, bias = theta[:f], theta[f]
        d = diff @ w
        loss = np.sum(y * _softplus(-d) + (1 - y) * _softplus(d))
        grad_d = sigmoid(d) - y
        grad_w = diff.T @ grad_d
        s = za @ w + bias
        loss += abs_weight * np.sum(absolute_t * _softplus(-s) + (1 - absolute_t) * _softplus(s))
        grad_s = abs_weight * (sigmoid(s) - absolute_t)
        grad_w = grad_w + za.T @ grad_s
        grad_b = grad_s.sum()
        loss = loss / n_terms + 0.5 * l2 * w @ w
        grad = np.concatenate([grad_w / n_terms + l2 * w, [grad_b / n_terms]])
        return loss, grad

    result = minimize(objective, np.zeros(f + 1), jac=True, method="L-BFGS-B")
    return result.x[:f], float(result.x[f])


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def fit_temperature(delta: np.ndarray, y: np.ndarray) -> float:
    """Inverse temperature a ≥ 0 minimising the log-loss of σ(a·Δ) (train only)."""
    if not np.any(delta):
        return 1.0
    res = minimize_scalar(lambda a: np.mean(y * _softplus(-a * delta) + (1 - y) * _softplus(a * delta)),
                          bounds=(0.0, 50.0), method="bounded")
    return float(res.x)


def metrics(p: np.ndarray, choice: np.ndarray) -> dict:
    """Accuracy (decisive), log-loss and ECE (A/B/tie) of predictions ``p`` = P(A ≻ B)."""
    decisive = np.isin(choice, ("A", "B"))
    pair = choice != "both_bad"
    won_a = choice[decisive] == "A"
    pd_ = p[decisive]
    hits = np.where(pd_ == 0.5, 0.5, ((pd_ > 0.5) == won_a).astype(float))
    y, pp = _targets(choice[pair]), np.clip(p[pair], 1e-6, 1 - 1e-6)
    log_loss = float(np.mean(-(y * np.log(pp) + (1 - y) * np.log(1 - pp)))) if len(y) else float("nan")
    bins = np.minimum((pp * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = sum(abs(y[bins == k].mean() - pp[bins == k].mean()) * (bins == k).sum()
              for k in range(ECE_BINS) if (bins == k).any()) / max(1, len(y))
    return {"accuracy": float(hits.mean()) if len(hits) else float("nan"), "log_loss": log_loss,
            "ece": float(ece), "n_decisive": int(decisive.sum()), "n_pairwise": int(pair.sum())}


# ------------------------------------------------------------------------------------ CLI
def check_data(data: Dataset, test: np.ndarray) -> None:
    train = ~test
    usable_train = int((data.choice[train] != "both_bad").sum())
    usable_test = int((data.choice[test] != "both_bad").sum())
    if usable_train < MIN_TRAIN or usable_test < MIN_TEST:
        raise DataError(
            f"too few judgments: {usable_train} usable (A/B/tie) per-turn judgments to fit and "
            f"{usable_test} to test after the split by source; need at least {MIN_TRAIN} and "
            f"{MIN_TEST} ({len(data.choice)} per-turn judgments in all, "
            f"{len(set(data.group))} sources)")
    n_a = int((data.choice[train] == "A").sum())
    n_b = int((data.choice[train] == "B").sum())
    if min(n_a, n_b) < MIN_PER_SIDE:
        raise DataError(
            f"one-sided data: the training judgments prefer A {n_a} times and B {n_b} times "
            f"(ties and both_bad: {int(train.sum()) - n_a - n_b}); need at least {MIN_PER_SIDE} "
            "of each to learn what separates the candidates")


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def run(args) -> dict:
    from mteditlab.rewards import get_reward
    from mteditlab.rewards.calibrated import ARTIFACT, FORMAT, VERSION, CalibratedReward

    judge_kwargs = {"path": str(args.judge_path)} if args.judge_path else {}
    try:
        judge = get_reward(args.judge, **judge_kwargs)
    except (FileNotFoundError, ImportError, OSError, RuntimeError) as exc:
        raise DataError(f"cannot load the {args.judge!r} judge: {exc}") from None
    data, names = load_dataset(args.db, judge, include_simulated=args.include_simulated,
                               image_features=args.image_features)
    if len(data.choice) == 0:
        raise DataError(f"no usable per-turn judgments: the {args.judge} judge failed on every "
                        f"candidate (e.g. {data.info['judge_failure_examples']})")
    test = split_by_source(data.group, args.test_fraction, args.seed)
    check_data(data, test)
    train = ~test

    # standardisation and NaN fill from the training candidates
    rows = np.unique(np.concatenate([data.a[train], data.b[train]]))
    fill = np.array([np.nanmean(c) if np.isfinite(c).any() else 0.0 for c in data.raw[rows].T])
    filled = np.where(np.isnan(data.raw), fill, data.raw)
    mean, std = filled[rows].mean(0), filled[rows].std(0)
    std = np.where(std > 1e-8, std, 1.0)
    spec = {"format": FORMAT, "version": VERSION, "judge": args.judge, "judge_kwargs": judge_kwargs,
            "features": names, "fill": fill.tolist(), "mean": mean.tolist(), "std": std.tolist(),
            "weights": [0.0] * len(names), "bias": 0.0}
    model = CalibratedReward(spec, judge)
    z = model.standardized(data.raw)
    w, bias = fit_reward_model(z, data.a[train], data.b[train], data.choice[train])
    spec["weights"], spec["bias"] = w.tolist(), bias
    model = CalibratedReward(spec, judge)

    s = model.logits(data.raw)
    p_model = sigmoid(s[data.a] - s[data.b])
    delta = data.judge_overall[data.a] - data.judge_overall[data.b]
    pair_train = train & (data.choice != "both_bad")
    inv_t = fit_temperature(delta[pair_train], _targets(data.choice[pair_train]))
    p_judge = sigmoid(inv_t * delta)
    mine, theirs = metrics(p_model[test], data.choice[test]), metrics(p_judge[test], data.choice[test])
    mine_train = metrics(p_model[train], data.choice[train])
    counts = {c: int((data.choice == c).sum()) for c in ("A", "B", "tie", "both_bad")}
    report = {
        "heldout_accuracy": mine["accuracy"], "judge_heldout_accuracy": theirs["accuracy"],
        "log_loss": mine["log_loss"], "judge_log_loss": theirs["log_loss"], "ece": mine["ece"],
        "n_train": int(train.sum()), "n_test": int(test.sum()), "simulated": data.info["simulated"],
        "judge": args.judge, "judge_ece": theirs["ece"], "judge_temperature": 1.0 / inv_t if inv_t else None,
        "train_accuracy": mine_train["accuracy"], "n_test_decisive": mine["n_decisive"],
        "n_test_pairwise": mine["n_pairwise"], "n_sources_train": len(set(data.group[train])),
        "n_sources_test": len(set(data.group[test])), "choices": counts,
        "features": names, "weights": dict(zip(names, w.tolist())), "bias": bias,
        "test_fraction": args.test_fraction, "seed": args.seed, **data.info,
    }
    spec["report"] = report
    _write_json_atomic(args.out / ARTIFACT, spec)
    _write_json_atomic(args.report or args.out / "report.json", report)
    return report


def table(report: dict) -> str:
    rows = [(f"judge ({report['judge']}, raw)", report["judge_heldout_accuracy"], report["judge_log_loss"],
             report["judge_ece"]),
            ("calibrated (Bradley-Terry)", report["heldout_accuracy"], report["log_loss"], report["ece"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{width}}  held-out acc  log-loss    ECE",
             f"{'-' * width}  ------------  --------  -----"]
    lines += [f"{name:<{width}}  {acc:>12.3f}  {ll:>8.3f}  {ece:>5.3f}" for name, acc, ll, ece in rows]
    lines.append(f"train {report['n_train']} / test {report['n_test']} per-turn judgments "
                 f"({report['n_sources_train']} / {report['n_sources_test']} sources; "
                 f"{report['n_test_decisive']} decisive in test); "
                 f"{'simulated' if report['simulated'] else 'human'} labels")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.reward_model",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, required=True, help="label database (read-only)")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory")
    parser.add_argument("--report", type=Path, help="report JSON (default OUT/report.json)")
    parser.add_argument("--judge", choices=JUDGES, default="verifier",
                        help="judge whose sub-scores are the features (default: verifier)")
    parser.add_argument("--judge-path", type=Path, help="judge checkpoint / model id")
    parser.add_argument("--include-simulated", action=argparse.BooleanOptionalAction, default=None,
                        help="mix simulated labels in (default: human only, or simulated when "
                             "there are no human labels)")
    parser.add_argument("--image-features", action=argparse.BooleanOptionalAction, default=True,
                        help="add the world image features (tint, sharpness)")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must lie in (0, 1)")
    from labeling.errors import StoreError
    try:
        report = run(args)
    except (DataError, StoreError) as exc:
        print(f"error: {exc}\nnothing written (no artifact, no report)", file=sys.stderr)
        return 2
    print(table(report))
    weights = ", ".join(f"{k} {v:+.2f}" for k, v in report["weights"].items())
    print(f"weights (standardised features): {weights}; bias {report['bias']:+.2f}")
    print(f"artifact: {args.out / 'calibrated.json'}; report: {args.report or args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
