"""Automatic raters: a reward model answers the label store's comparisons, turn by turn, as the
annotator ``judge:<name>``, so the leaderboard can say how often it agrees with people.

    python -m labeling rate --reward qwen-vl --reward-path "http://HOST:8000/v1?pairwise=1"
    python -m labeling rate --reward judge                  # the world's small learned judge

Turn k of a comparison is scored on each side from the image that side's turn k started from
(its ``input_sha``), with the instruction and the earlier instructions as history. Both sides
form one group (``meta["group"] = (comparison, turn)``), so a pairwise judge compares the two
edits in both orders and returns win rates w_A + w_B = 1; any other reward scores each side
alone. Either way the verdict comes from the difference of the two overall scores:

    d = s_A − s_B;   choice = 'A' if d > margin, 'B' if d < −margin, else 'tie'

recorded as a blind, non-simulated judgment on the ``overall`` criterion. A turn the reward
failed on (NaN on either side) gets no judgment and is counted. Comparisons this rater already
judged are skipped, so a rerun only rates what is new.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

from labeling.cli import open_store
from mteditlab.registry import registered_names
from mteditlab.rewards import EditSample, RewardModel, get_reward

PREFIX = "judge:"
MACHINE_PREFIXES = (PREFIX, "reward:")  # annotator names of automatic raters, never people
CRITERION = "overall"


@dataclass
class RatingReport:
    rater: str
    comparisons: int = 0
    judgments: int = 0
    failed_turns: int = 0


def verdict(score_a: float, score_b: float, margin: float) -> str | None:
    """'A', 'B' or 'tie' from two overall scores (module docstring); None when either failed."""
    if not (np.isfinite(score_a) and np.isfinite(score_b)):
        return None
    d = score_a - score_b
    return "A" if d > margin else "B" if d < -margin else "tie"


def turn_samples(store, comparison_id: int) -> list[tuple[EditSample, EditSample]]:
    """Per turn, the (A, B) samples of one comparison: each side's input, output and the text."""
    rows = store.query(
        """SELECT c.session_a = t.session_id AS is_a, t.turn_index, t.instruction, t.input_sha, t.output_sha
           FROM comparisons c JOIN turns t ON t.session_id IN (c.session_a, c.session_b)
           WHERE c.comparison_id = ? ORDER BY t.turn_index""", [int(comparison_id)])
    images: dict = {}  # sha -> image, loaded once: turn k's input is turn k−1's output, the source is shared

    def image(sha: str):
        if sha not in images:
            images[sha] = store.get_image(sha)
        return images[sha]

    pairs = []
    for k, turn in rows.groupby("turn_index", sort=True):
        history = rows[rows.is_a & (rows.turn_index < k)].instruction.tolist()
        sides = {bool(r.is_a): EditSample(source=image(r.input_sha), edited=image(r.output_sha),
                                          instruction=r.instruction, history=history,
                                          meta={"group": (comparison_id, int(k))})
                 for r in turn.itertuples()}
        pairs.append((sides[True], sides[False]))
    return pairs


def rate_comparisons(store, reward: RewardModel, *, name: str | None = None, comparison_ids: Sequence[int] | None = None,
                     margin: float = 0.05, batch_turns: int = 32, seed: int = 0,
                     progress: bool = True) -> RatingReport:
    """Record ``reward``'s verdict on every turn of ``comparison_ids`` (default: the comparisons people
    judged, gold items excluded) as judgments of ``judge:<name>``; returns what was done."""
    rater = PREFIX + (name or reward.name)
    report = RatingReport(rater)
    store.add_annotator(rater)
    if comparison_ids is None:
        people = " AND ".join("NOT starts_with(a.name, ?)" for _ in MACHINE_PREFIXES)
        comparison_ids = store.query(
            f"""SELECT DISTINCT j.comparison_id FROM judgments j JOIN annotators a USING (annotator_id)
                JOIN comparisons c USING (comparison_id)
                WHERE NOT j.simulated AND c.kind <> 'gold' AND {people}
                ORDER BY 1""", list(MACHINE_PREFIXES)).comparison_id.tolist()
    done = set(store.query(
        """SELECT DISTINCT comparison_id FROM judgments JOIN annotators USING (annotator_id) WHERE name = ?""",
        [rater]).comparison_id.tolist())
    todo = [int(c) for c in comparison_ids if int(c) not in done]
    pending: list[tuple[int, int, EditSample, EditSample]] = []

    def flush() -> None:
        if not pending:
            return
        samples = [s for _, _, a, b in pending for s in (a, b)]
        overall = np.asarray(reward.score(samples, seed=seed).overall, dtype=float)
        for j, (cid, k, _, _) in enumerate(pending):
            choice = verdict(overall[2 * j], overall[2 * j + 1], margin)
            if choice is None:
                report.failed_turns += 1
                continue
            store.record_judgment(cid, rater, k, CRITERION, choice, "A", simulated=False, blind=True)
            report.judgments += 1
        pending.clear()

    for cid in tqdm(todo, desc=f"rating as {rater}", unit="comparison", disable=not progress):
        for k, (a, b) in enumerate(turn_samples(store, cid)):
            pending.append((cid, k, a, b))
        report.comparisons += 1
        if len(pending) >= batch_turns:
            flush()
    flush()
    return report


def register(subparsers) -> None:
    parser = subparsers.add_parser("rate", help="an automatic rater (a judge or reward) answers the comparisons",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", required=True, choices=registered_names("mteditlab.rewards", "register_reward"))   # read from the sources: the parser
    # must not import every reward backend
    parser.add_argument("--reward-path", help="checkpoint directory, model id or judge URL (?pairwise=1: Pref-GRPO)")
    parser.add_argument("--name", help="rater name after 'judge:' (default: the reward's name)")
    parser.add_argument("--margin", type=float, default=0.05, help="|s_A − s_B| at or below which it is a tie")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_cmd_rate)


def _cmd_rate(args) -> int:
    reward = get_reward(args.reward, **({"path": args.reward_path} if args.reward_path else {}))
    store = open_store(args, writable=True)
    try:
        report = rate_comparisons(store, reward, name=args.name, margin=args.margin, seed=args.seed)
    finally:
        store.close()
    print(f"{report.rater}: {report.judgments} judgments on {report.comparisons} comparisons"
          + (f"; {report.failed_turns} turns failed (no judgment)" if report.failed_turns else ""))
    return 0
