"""How many judgments does each label-queue rule need to separate models of known strength?

A simulation (numpy only, under a minute): M models with known Bradley–Terry strengths
(``--elo``, one or more scenarios); every model pair always has items waiting.  A rule picks the pair of the next
``--batch`` judgments (annotators work concurrently, so the weights are refreshed per batch):

* ``uniform``: every pair equally often;
* ``active``: Chatbot Arena's rule, P(a) ∝ √(Σ̂ₐₐ/nₐ) − √(Σ̂ₐₐ/(nₐ+1)) on the current BT fit
  (exactly what the label queue runs: :mod:`labeling.active`).

Each judgment is a tie with probability ``--tie-rate``, else a BT draw.  After each batch the
ratings are refitted; the models count as **separated** when every pair of models adjacent in
true strength has a 95% interval on its rating difference (fit covariance, ±1.96 sd) that
excludes 0 and the fitted order is the true one.  Reported per rule over ``--reps`` seeded
runs: the judgments needed (median, quartiles; runs that did not separate within
``--budget`` count at the budget, as a lower bound) and the mean 95% half-width of the
adjacent differences (Elo points) at fixed budgets.

    python -m bench.queue_selection        # markdown table; JSON in out/bench/queue_selection.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from labeling.active import SELECTIONS, choose_pair, pair_gain, rating_covariance
from labeling.ratings import ELO_SCALE, fit_ratings
from mteditlab.bench import standard_error

Z95 = 1.959964


def simulate(theta: np.ndarray, rule: str, rng: np.random.Generator, budget: int, batch: int,
             tie_rate: float, checkpoints: list[int]) -> dict:
    """One run: judgments until separation (or ``budget``) and the adjacent half-widths (Elo)
    at each checkpoint."""
    m = len(theta)
    i, j = np.triu_indices(m, 1)
    order = np.argsort(theta)
    lo, hi = order[:-1], order[1:]            # adjacent in true strength
    w = np.zeros((m, m))
    separated_at = None
    widths: dict[int, float] = {}
    n = 0
    while n < budget:
        n_pair = (w + w.T)[i, j]
        if rule == "active" and n_pair.any():
            fitted = fit_ratings(w)
            weights = pair_gain(fitted, rating_covariance(w, fitted), n_pair, i, j)
        else:
            weights = np.full(len(i), np.inf)    # nothing fitted yet: every pair unmet
        for _ in range(batch):
            k = choose_pair(weights, rng, rule)
            a, b = i[k], j[k]
            u = rng.random()
            if u < tie_rate:
                w[a, b] += 0.5
                w[b, a] += 0.5
            elif rng.random() < 1.0 / (1.0 + math.exp(theta[b] - theta[a])):
                w[a, b] += 1.0
            else:
                w[b, a] += 1.0
        n += batch
        fitted = fit_ratings(w)
        cov = rating_covariance(w, fitted)
        diff = fitted[hi] - fitted[lo]
        sd = np.sqrt(np.maximum(cov[hi, hi] + cov[lo, lo] - 2 * cov[hi, lo], 0.0))
        for c in checkpoints:
            if c not in widths and n >= c:
                widths[c] = float(np.mean(Z95 * sd) * ELO_SCALE)
        if separated_at is None and np.all(diff - Z95 * sd > 0):
            separated_at = n
        if separated_at is not None and len(widths) == len(checkpoints):
            break
    return {"separated_at": separated_at, "widths": widths}


SCENARIOS = ("1000,1040,1080,1140,1220,1320",      # evenly spread
             "1000,1050,1400,1450,1800,1850")      # three close pairs, far from each other


def run_scenario(elo: np.ndarray, args, checkpoints: list[int]) -> dict:
    theta = (elo - elo.mean()) / ELO_SCALE
    results = {}
    for rule in SELECTIONS[::-1]:             # uniform, then active
        runs = [simulate(theta, rule, np.random.default_rng([args.seed, r]), args.budget,
                         args.batch, args.tie_rate, checkpoints) for r in range(args.reps)]
        needed = np.array([r["separated_at"] or args.budget for r in runs], dtype=float)
        results[rule] = {
            "runs": runs,
            "separated": int(sum(r["separated_at"] is not None for r in runs)),
            "median": float(np.median(needed)),
            "q25": float(np.percentile(needed, 25)), "q75": float(np.percentile(needed, 75)),
            "half_width": {c: float(np.mean([r["widths"][c] for r in runs])) for c in checkpoints},
        }
    return results


def paired_differences(results: dict, budget: int, checkpoints: list[int]) -> dict[str, tuple[float, float]]:
    """Active − uniform per seed (run r of both rules shares its seed): mean and paired s.e. of the
    judgments to separate (a run that never separated counts as the budget) and of each half-width."""
    runs = {rule: results[rule]["runs"] for rule in SELECTIONS}
    needed = {rule: np.array([r["separated_at"] or budget for r in rs], dtype=float) for rule, rs in runs.items()}
    diffs = {"judgments": needed["active"] - needed["uniform"]}
    for c in checkpoints:
        diffs[f"half_width_{c}"] = np.array([a["widths"][c] - u["widths"][c]
                                             for a, u in zip(runs["active"], runs["uniform"])])
    return {key: (float(d.mean()), standard_error(d)) for key, d in diffs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elo", action="append",
                        help="true strengths of the models of one scenario, Elo scale "
                        "(comma-separated; repeat for more scenarios; default: "
                        + " and ".join(SCENARIOS) + ")")
    parser.add_argument("--reps", type=int, default=24, help="seeded runs per rule")
    parser.add_argument("--batch", type=int, default=10,
                        help="judgments per refresh of the pair weights")
    parser.add_argument("--budget", type=int, default=12000, help="most judgments per run")
    parser.add_argument("--tie-rate", type=float, default=0.1)
    parser.add_argument("--checkpoints", default="500,1000,2000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="out/bench/queue_selection.json")
    args = parser.parse_args(argv)

    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    start = time.perf_counter()
    scenarios = []
    for text in args.elo or SCENARIOS:
        elo = np.array([float(x) for x in text.split(",")])
        scenarios.append({"elo": elo.tolist(), "results": run_scenario(elo, args, checkpoints)})
    seconds = time.perf_counter() - start

    lines = [f"{args.reps} runs per rule and scenario · pair weights refreshed every "
             f"{args.batch} judgments · tie rate {args.tie_rate:g} · budget {args.budget} "
             "judgments", "",
             "| models (true Elo) | rule | runs separated | judgments to separate: median "
             "(IQR) | " + " | ".join(f"95% half-width at {c} (Elo)" for c in checkpoints)
             + " |", "|---|---|---|---|" + "---|" * len(checkpoints)]
    for sc in scenarios:
        label = ", ".join(f"{x:g}" for x in sc["elo"])
        for rule in SELECTIONS[::-1]:
            r = sc["results"][rule]
            lines.append(f"| {label} | {rule} | {r['separated']}/{args.reps} | "
                         f"{r['median']:.0f} ({r['q25']:.0f}–{r['q75']:.0f}) | "
                         + " | ".join(f"{r['half_width'][c]:.1f}" for c in checkpoints) + " |")
    lines += ["", "Active − uniform, paired over the same seeds (mean ± paired s.e.):", "",
              "| models (true Elo) | Δ judgments to separate | "
              + " | ".join(f"Δ half-width at {c} (Elo)" for c in checkpoints) + " |",
              "|---|---|" + "---|" * len(checkpoints)]
    for sc in scenarios:
        sc["paired"] = paired_differences(sc["results"], args.budget, checkpoints)
        label = ", ".join(f"{x:g}" for x in sc["elo"])
        lines.append(f"| {label} | " + " | ".join(f"{m:+.1f} ± {se:.1f}" for m, se in sc["paired"].values()) + " |")
    lines.append("")
    for sc in scenarios:
        ratio = sc["results"]["active"]["median"] / sc["results"]["uniform"]["median"]
        label = ", ".join(f"{x:g}" for x in sc["elo"])
        lines.append(f"- {label}: active selection needs {ratio:.2f}× the judgments of uniform "
                     "selection (medians) to separate every adjacent pair.")
    lines.append(f"\n({seconds:.1f} s)")
    print("\n".join(lines))

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "seconds": seconds,
                               "scenarios": scenarios}, indent=2, default=str))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
