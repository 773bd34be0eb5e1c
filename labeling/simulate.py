"""Simulated comparisons and annotators on the editing world (always flagged ``simulated``).

    python -m labeling --db PATH simulate [--sessions N --turns T --annotators K --overlap k
                                           --noise p --bias NAME --seed S --split train|val]
    (``--db`` may also come after ``simulate``)

What it writes (through :class:`labeling.store.LabelStore`, nothing behind its back):

1. **Sessions.** For world session ``i`` of ``--split`` (``train`` or ``val``; ``test`` is for
   reporting only and refused), two *synthetic editors* — picked at random, without repetition,
   from :data:`PROFILES` — each roll the T turns out on their own previous outputs. A synthetic
   editor is the oracle (:class:`mteditlab.editors.reference.OracleEditor`, fed the reconstructed
   intent) with one controlled defect drawn per turn (:data:`DEFECTS`):

   * ``correct`` — the oracle's output;
   * ``wrong`` — a wrong edit: the input unchanged (half the time) or another applicable edit of
     the world applied to the scene the input shows;
   * ``tint`` — the correct output with its background shifted by a visible tint (≈24/255, one of
     :data:`TINTS`), objects intact: checked on every image — the verifier must read exactly the
     scene it reads from the correct output, so its verdict is unchanged; another tint is tried
     otherwise, and the defect is downgraded to ``correct`` if none qualifies;
   * ``blur`` — the correct output with a mild Gaussian blur (σ 0.6 px; checked the same way).

   Images, sessions (``editor`` = the profile name, ``meta`` = world split / index / turns, the
   per-turn defects, the profile) and one comparison per world session (sides in random order)
   go into the store.

2. **Judgments.** ``--annotators`` simulated annotators (``sim-<bias>-<seed>-<j>``, flagged
   ``simulated``); each comparison is judged by ``--overlap`` of them (distinct, at random), per
   turn (``turn`` = 0..T−1) and for the whole session (``turn`` = None), criterion ``overall``,
   with the left side drawn at random and recorded. An annotator's *perceived utility* of a turn:

       u = success + 0.3·(IF + CC + GA)/3 − w_tint·[tinted] − w_blur·[blurred] (+ w_left if on the left)

   from the exact verifier (success first, then the count of passed checks) and the annotator's
   biases; a session's utility is the mean over its turns. Decision, with ``p = --noise``:

   * both sides *bad* (u < 0.5): ``both_bad``, except with probability p (then as below);
   * |u_A − u_B| < 0.1: ``tie``, except with probability p (then A or B at random);
   * otherwise Bradley–Terry: A with probability σ(β·(u_A − u_B)), β = ln((1−p)/p), so a one-unit
     gap (a success against a failure) is judged the wrong way with probability p.

   Biases (:data:`BIASES`): the scenario's shared weights, then per annotator a tint-sensitivity
   factor U(0.75, 1.25), an extra blur dislike U(0, 0.1) and a position bias N(0, 0.05).
   **The default scenario is ``tint``**: every annotator penalises a background-tint shift by
   0.8 — a preference the verifier (and a judge trained on it) lacks, which the calibrated reward
   model has to learn from the labels. ``none`` has no shared bias; ``blur`` penalises blur;
   ``left`` prefers whatever is shown on the left.

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
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from labeling.store import LabelStore

DEFECTS = ("correct", "wrong", "tint", "blur")
SPLITS = ("train", "val")
TIE_BAND = 0.1
BAD_BELOW = 0.5
PARTIAL_WEIGHT = 0.3
BLUR_SIGMA = 0.6
# Tints (RGB shift in 0..255 units, norm ≈ 24) that keep the background nearest its own palette
# colour, per background: visible, but the verifier reads the scene unchanged.
TINTS = {
    "white": ((0, 0, -24), (-24, 0, 0), (-17, 0, -17), (0, -17, -17)),
    "gray": ((24, 0, 0), (0, 24, 0), (0, 0, 24), (17, 17, 0)),
    "black": ((24, 0, 0), (0, 24, 0), (0, 0, 24), (17, 0, 17)),
    "beige": ((0, 0, 24), (24, 0, 0), (0, 24, 0), (-17, 0, 17)),
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Per-turn defect probabilities of a synthetic editor (``wrong``, then ``tint``, then ``blur``
    are drawn in that order; the rest of the mass is ``correct``)."""

    wrong: float
    tint: float
    blur: float

    def draw(self, u: float) -> str:
        if u < self.wrong:
            return "wrong"
        if u < self.wrong + self.tint:
            return "tint"
        if u < self.wrong + self.tint + self.blur:
            return "blur"
        return "correct"


PROFILES = {
    "synth-clean": Profile(wrong=0.10, tint=0.00, blur=0.10),
    "synth-tinted": Profile(wrong=0.10, tint=0.50, blur=0.10),
    "synth-sloppy": Profile(wrong=0.40, tint=0.10, blur=0.10),
    "synth-blurry": Profile(wrong=0.15, tint=0.10, blur=0.50),
}
# Shared (scenario) bias weights: what every annotator adds to the verifier's preference.
BIASES = {
    "tint": {"tint": 0.8, "blur": 0.0, "left": 0.0},
    "none": {"tint": 0.0, "blur": 0.0, "left": 0.0},
    "blur": {"tint": 0.0, "blur": 0.8, "left": 0.0},
    "left": {"tint": 0.0, "blur": 0.0, "left": 0.3},
}
DEFAULT_BIAS = "tint"


# ------------------------------------------------------------------------ synthetic editors
def tint_image(image: Image.Image, shift: Sequence[int]) -> Image.Image:
    """Shift the background of a world image by ``shift`` (RGB, 0..255 units); objects keep their
    colour (each pixel moves by its background share, so anti-aliased edges stay consistent)."""
    from mteditlab.rewards.features import background_transmission, parse_cached
    from mteditlab.world.verifier import to_array

    array = to_array(image, image.width)
    share = background_transmission(parse_cached(array, image.width), image.width)[..., None]
    out = (array + share * np.asarray(shift, dtype=np.float32) / 255).clip(0, 1)
    return Image.fromarray(np.round(out * 255).astype(np.uint8), "RGB")


def blur_image(image: Image.Image, sigma: float = BLUR_SIGMA) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma))


class SyntheticEditor:
    """The oracle with one controlled defect per turn (see the module docstring).

    The correct output follows :class:`mteditlab.editors.reference.OracleEditor`'s rule — read the
    input's scene, parse the reconstructed intent with the world's grammar, render the result (the
    input unchanged when the intent does not apply) — without importing the editor stack."""

    def __init__(self, name: str, profile: Profile):
        self.name, self.profile = name, profile

    @staticmethod
    def oracle(image: Image.Image, intent: str) -> Image.Image:
        from mteditlab.rewards.features import parse_cached
        from mteditlab.world import parse_instruction, render

        scene = parse_cached(image)
        edit = parse_instruction(intent, scene)
        return render(edit.apply(scene), image.width) if edit else image.copy()

    def edit_turn(self, session, k: int, image: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
        """Turn ``k`` of ``session`` on ``image``: ``(output, defect actually applied)``."""
        from mteditlab.rewards.features import parse_cached
        from mteditlab.world import render
        from mteditlab.world.sessions import random_edit

        turn = session.turns[k]
        defect = self.profile.draw(rng.random())
        correct = self.oracle(image, turn.intent)
        if defect == "wrong":
            scene = parse_cached(image)
            if rng.random() < 0.5:
                return image.copy(), "wrong"
            target = parse_cached(correct)
            for _ in range(20):
                try:
                    other = random_edit(scene, rng).apply(scene)
                except (AttributeError, TypeError):  # a cell the verifier could not read
                    continue
                if other != target and other != scene:
                    return render(other), "wrong"
            return image.copy(), "wrong"
        if defect == "correct":
            return correct, "correct"
        # a cosmetic defect must leave the content intact: the verifier reads the same scene
        intended = parse_cached(correct)
        if defect == "blur":
            out = blur_image(correct)
            return (out, "blur") if parse_cached(out) == intended else (correct, "correct")
        tints = list(TINTS[intended.background])
        rng.shuffle(tints)
        for shift in tints:
            out = tint_image(correct, shift)
            if parse_cached(out) == intended:
                return out, "tint"
        return correct, "correct"

    def rollout(self, session, rng: random.Random) -> tuple[list[Image.Image], list[str]]:
        """All turns on the editor's own outputs: ``(outputs, defects)``."""
        from mteditlab.world import render
        image, outputs, defects = render(session.source), [], []
        for k in range(len(session.turns)):
            image, defect = self.edit_turn(session, k, image, rng)
            outputs.append(image)
            defects.append(defect)
        return outputs, defects


# ---------------------------------------------------------------------------- annotators
@dataclasses.dataclass(frozen=True)
class SimAnnotator:
    name: str
    tint: float
    blur: float
    left: float


def make_annotators(count: int, bias: str, seed: int, rng: np.random.Generator) -> list[SimAnnotator]:
    shared = BIASES[bias]
    return [SimAnnotator(f"sim-{bias}-s{seed}-{j:02d}",
                         tint=shared["tint"] * float(rng.uniform(0.75, 1.25)),
                         blur=shared["blur"] + float(rng.uniform(0.0, 0.1)),
                         left=shared["left"] + float(rng.normal(0.0, 0.05)))
            for j in range(count)]


def turn_utility(verdict, defect: str, annotator: SimAnnotator) -> float:
    """Perceived utility of one turn (before the position bias)."""
    checks = (verdict.if_ + verdict.cc + verdict.ga) / 3
    return (float(verdict.success) + PARTIAL_WEIGHT * checks
            - annotator.tint * (defect == "tint") - annotator.blur * (defect == "blur"))


def decide(u_a: float, u_b: float, noise: float, rng: np.random.Generator) -> str:
    """One judgment from two perceived utilities (see the module docstring)."""
    lapse = rng.random() < noise
    if u_a < BAD_BELOW and u_b < BAD_BELOW and not lapse:
        return "both_bad"
    if abs(u_a - u_b) < TIE_BAND:
        return "tie" if not lapse else ("A" if rng.random() < 0.5 else "B")
    beta = math.log((1 - noise) / noise) if noise > 0 else 50.0
    p_a = 1.0 / (1.0 + math.exp(-beta * (u_a - u_b)))
    return "A" if rng.random() < p_a else "B"


# --------------------------------------------------------------------------------- driver
def simulate(store: LabelStore, *, sessions: int = 200, turns: int = 3, annotators: int = 5,
             overlap: int = 3, noise: float = 0.1, bias: str = DEFAULT_BIAS, seed: int = 0,
             split: str = "train", start: int = 0, progress: bool = False) -> dict:
    """Write ``sessions`` simulated comparisons and their judgments into ``store``; returns a
    summary (counts of comparisons, judgments, choices, defects)."""
    from mteditlab.rewards.features import parse_cached
    from mteditlab.world import generate_session, render, score_turn

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
            outputs, defects = editor.rollout(world, random.Random(f"{seed}/{index}/{name}"))
            defects_seen.update(defects)
            inputs = [source] + outputs[:-1]
            verdicts = [score_turn(world, k, parse_cached(inputs[k]), parse_cached(outputs[k]))
                        for k in range(turns)]
            for image in outputs:
                images.setdefault(image.tobytes(), image)
            sides.append((editor, [o.tobytes() for o in outputs], verdicts, defects))
        votes = []
        for j in rng.choice(len(pool), size=overlap, replace=False):
            annotator = pool[int(j)]
            left = "A" if rng.random() < 0.5 else "B"
            per_turn = [[turn_utility(v, d, annotator) for v, d in zip(verdicts, defects)]
                        for _, _, verdicts, defects in sides]
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
                [{"instruction": t.instruction, "intent": t.intent, "output_sha": shas[key]}
                 for t, key in zip(world.turns, outputs)],
                meta={"world": {"split": split, "index": world.index, "turns": turns},
                      "defects": defects, "profile": dataclasses.asdict(editor.profile),
                      "simulated": True})
                for editor, outputs, _, defects in sides]
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
    from pathlib import Path

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
