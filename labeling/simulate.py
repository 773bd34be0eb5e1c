"""Simulated comparisons and judgments written into the label store (always flagged ``simulated``).

    python -m labeling --db PATH simulate [--sessions N --turns T --annotators K --overlap k
                                           --noise p --bias NAME --seed S --split train|val]
    (``--db`` may also come after ``simulate``)

The editors with defects and the annotators are the world's simulation
(:mod:`mteditlab.simulation`); this module writes what they produce through
:class:`labeling.store.LabelStore`, nothing behind its back:

1. **Sessions.** For world session ``i`` of ``--split`` (``train`` or ``val``; ``test`` is for
   reporting only and refused), two synthetic editors — picked at random, without repetition,
   from :data:`~mteditlab.simulation.PROFILES` — each roll the T turns out on their own previous
   outputs. Images, sessions (``editor`` = the profile name, ``meta`` = world split / index /
   turns, the per-turn defects, the profile) and one comparison per world session (sides in
   random order) go into the store.

2. **Judgments.** ``--annotators`` simulated annotators (``sim-<bias>-<seed>-<j>``, flagged
   ``simulated``); each comparison is judged by ``--overlap`` of them (distinct, at random), per
   turn (``turn`` = 0..T−1) and for the whole session (``turn`` = None), criterion ``overall``,
   with the left side drawn at random and recorded, by the simulation's utility and decision model
   with ``p = --noise``. **The default scenario is ``tint``**: every annotator penalises a
   background-tint shift — a preference the verifier (and a judge trained on it) lacks, which the
   calibrated reward model has to learn from the labels.

Deterministic for a given ``--seed``; write throughput comes from the store's group commit
(judgments are submitted from a small thread pool).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from labeling.store import LabelStore
from mteditlab.rewards.features import parse_cached
from mteditlab.simulation import BIASES, DEFAULT_BIAS, PROFILES, SyntheticEditor, decide, make_annotators, turn_utility
from mteditlab.world import generate_session, render, score_turn

SPLITS = ("train", "val")


# --------------------------------------------------------------------------------- driver
def simulate(store: LabelStore, *, sessions: int = 200, turns: int = 3, annotators: int = 5,
             overlap: int = 3, noise: float = 0.1, bias: str = DEFAULT_BIAS, seed: int = 0,
             split: str = "train", start: int = 0, progress: bool = False) -> dict:
    """Write ``sessions`` simulated comparisons and their judgments into ``store``; returns a
    summary (counts of comparisons, judgments, choices, defects)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (test is for reporting only), got {split!r}")
    if bias not in BIASES:
        raise ValueError(f"unknown bias {bias!r}; choose one of {', '.join(BIASES)}")
    if not 0 <= noise < 0.5:
        raise ValueError(f"noise must lie in [0, 0.5), got {noise}")
    if sessions < 1 or turns < 1:
        raise ValueError("sessions and turns must be >= 1")
    if not 1 <= overlap <= annotators:
        raise ValueError(f"overlap must lie in [1, annotators={annotators}], got {overlap}")

    rng = np.random.default_rng([seed, start])
    pool = make_annotators(annotators, bias, seed, rng)
    editors = {name: SyntheticEditor(name, profile) for name, profile in PROFILES.items()}
    names = list(PROFILES)
    defects_seen: Counter = Counter()
    choices: Counter = Counter()
    images: dict[bytes, Image.Image] = {}  # pixels -> image: each distinct image is stored once
    plan = []  # per world session: (world, source key, sides, votes)
    for index in range(start, start + sessions):  # 1. compute everything (CPU only)
        world = generate_session(split, index, turns)
        source = render(world.source)
        images.setdefault(source.tobytes(), source)
        sides = []
        for name in rng.choice(names, size=2, replace=False):
            editor = editors[str(name)]
            outputs, defects, intents = editor.run_session(world, random.Random(f"{seed}/{index}/{name}"))
            defects_seen.update(defects)
            inputs = [source] + outputs[:-1]
            verdicts = [score_turn(world, k, parse_cached(inputs[k]), parse_cached(outputs[k]))
                        for k in range(turns)]
            for image in outputs:
                images.setdefault(image.tobytes(), image)
            sides.append((editor, [o.tobytes() for o in outputs], verdicts, defects, intents))
        votes = []
        for j in rng.choice(len(pool), size=overlap, replace=False):
            annotator = pool[int(j)]
            left = "A" if rng.random() < 0.5 else "B"
            per_turn = [[turn_utility(v, d, annotator) for v, d in zip(verdicts, defects)]
                        for _, _, verdicts, defects, _ in sides]
            units = [(k, per_turn[0][k], per_turn[1][k]) for k in range(turns)]
            units.append((None, float(np.mean(per_turn[0])), float(np.mean(per_turn[1]))))
            for turn, u_a, u_b in units:
                u_a += annotator.left * (left == "A")
                u_b += annotator.left * (left == "B")
                choice = decide(u_a, u_b, noise, rng)
                choices[choice] += 1
                votes.append((annotator.name, turn, choice, left,
                              float(rng.lognormal(math.log(4000), 0.5))))
        plan.append((world, source.tobytes(), sides, votes))
        if progress and (index - start + 1) % 50 == 0:
            print(f"  rolled out {index - start + 1}/{sessions} sessions", flush=True)

    # 2. write through the store: images concurrently (each put is its own transaction, the
    # file writes overlap), sessions and comparisons in order, judgments concurrently (the
    # writer group-commits them).
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
        keys = list(images)
        shas = dict(zip(keys, executor.map(store.put_image, [images[k] for k in keys])))
        for annotator in pool:
            store.add_annotator(annotator.name, simulated=True)
        comparisons, pending = [], []
        for world, source_key, sides, votes in plan:
            ids = [store.add_session(
                editor.name, None, seed, shas[source_key],
                [{"instruction": t.instruction, "intent": intent, "output_sha": shas[key]}
                 for t, key, intent in zip(world.turns, outputs, intents)],
                meta={"world": {"split": split, "index": world.index, "turns": turns},
                      "defects": defects, "profile": dataclasses.asdict(editor.profile),
                      "simulated": True})
                for editor, outputs, _, defects, intents in sides]
            cid = store.add_comparison(*ids)
            comparisons.append(cid)
            pending += [executor.submit(store.record_judgment, cid, name, turn, "overall", choice,
                                        left, latency, True, blind=True)
                        for name, turn, choice, left, latency in votes]
        for future in pending:
            future.result()
    return {"comparisons": len(comparisons), "judgments": len(pending), "choices": dict(choices),
            "defects": dict(defects_seen), "annotators": [a.name for a in pool], "bias": bias,
            "noise": noise, "split": split, "seed": seed, "images": len(images)}


# ------------------------------------------------------------------------------------ CLI
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", dest="sim_db", help="database file (same as the global --db)")
    p.add_argument("--sessions", type=int, default=200, help="world sessions = comparisons")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--annotators", type=int, default=5, help="simulated annotator pool")
    p.add_argument("--overlap", type=int, default=3, help="annotators per comparison")
    p.add_argument("--noise", type=float, default=0.1,
                   help="error rate at a one-unit utility gap, and lapse rate of tie/both_bad")
    p.add_argument("--bias", choices=tuple(BIASES), default=DEFAULT_BIAS,
                   help="shared annotator bias (default: tint, which the verifier lacks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--start", type=int, default=0, help="first world session index")


def cmd_simulate(args) -> int:
    from labeling.cli import open_store

    if args.sim_db:
        args.db = Path(args.sim_db)
    with open_store(args, writable=True) as store:
        try:
            summary = simulate(store, sessions=args.sessions, turns=args.turns,
                               annotators=args.annotators, overlap=args.overlap, noise=args.noise,
                               bias=args.bias, seed=args.seed, split=args.split, start=args.start,
                               progress=True)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"{store.path}: {summary['comparisons']} simulated comparisons ({args.split} split, "
          f"{args.turns} turns), {summary['judgments']} judgments flagged simulated, "
          f"bias={summary['bias']}, noise={summary['noise']}")
    print("choices: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["choices"].items())))
    print("defects per turn: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["defects"].items())))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="simulated comparisons and annotators on the world "
                              "(flagged simulated)")
    _add_arguments(p)
    p.set_defaults(handler=cmd_simulate)
