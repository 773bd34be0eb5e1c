"""Simulated editors with controlled defects and simulated annotators on the editing world.

**Synthetic editors.** A synthetic editor is the oracle (:class:`~mteditlab.editors.reference.OracleEditor`,
fed the intent its reconstructor gives, by default the gold one) with one controlled defect drawn per turn
(:data:`DEFECTS`, with the probabilities of its :class:`Profile`; :data:`PROFILES` are the named ones):

* ``correct`` — the oracle's output;
* ``wrong`` — a wrong edit: the input unchanged (half the time) or another applicable edit of the
  world applied to the scene the input shows;
* ``tint`` — the correct output with its background shifted by a visible tint (≈24/255, one of
  :data:`TINTS`), objects intact: checked on every image — the verifier must read exactly the scene it
  reads from the correct output, so its verdict is unchanged; another tint is tried otherwise, and the
  defect is downgraded to ``correct`` if none qualifies;
* ``blur`` — the correct output with a mild Gaussian blur (σ 0.6 px; checked the same way).

**Annotators.** An annotator's *perceived utility* of a turn:

    u = success + 0.3·(IF + CC + GA)/3 − w_tint·[tinted] − w_blur·[blurred] (+ w_left if on the left)

from the exact verifier (success first, then the count of passed checks) and the annotator's biases;
a session's utility is the mean over its turns. Decision (:func:`decide`), with noise ``p``:

* both sides *bad* (u < 0.5): ``both_bad``, except with probability p (then as below);
* |u_A − u_B| < 0.1: ``tie``, except with probability p (then A or B at random);
* otherwise Bradley–Terry: A with probability σ(β·(u_A − u_B)), β = ln((1−p)/p), so a one-unit gap
  (a success against a failure) is judged the wrong way with probability p.

Biases (:data:`BIASES`): the scenario's shared weights, then per annotator a tint-sensitivity factor
U(0.75, 1.25), an extra blur dislike U(0, 0.1) and a position bias N(0, 0.05). The ``tint`` scenario
(:data:`DEFAULT_BIAS`) penalises a background-tint shift by 0.8 — a preference the verifier lacks;
``none`` has no shared bias; ``blur`` penalises blur; ``left`` prefers whatever is shown on the left.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from mteditlab.editors.reference import OracleEditor
from mteditlab.rewards.features import background_transmission, parse_cached
from mteditlab.intent import TurnIntents
from mteditlab.rollout import rollout
from mteditlab.world import Session, TurnScore, render
from mteditlab.world.sessions import random_edit
from mteditlab.world.verifier import to_array

DEFECTS = ("correct", "wrong", "tint", "blur")
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
    array = to_array(image, image.width)
    share = background_transmission(parse_cached(array, image.width), image.width)[..., None]
    out = (array + share * np.asarray(shift, dtype=np.float32) / 255).clip(0, 1)
    return Image.fromarray(np.round(out * 255).astype(np.uint8), "RGB")


def blur_image(image: Image.Image, sigma: float = BLUR_SIGMA) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma))


class SyntheticEditor:
    """The oracle with one controlled defect per turn (see the module docstring), told the intents the
    reconstructor ``intent`` gives (a spec, :mod:`mteditlab.reconstructors`; ``oracle``: the gold)."""

    oracle = OracleEditor()

    def __init__(self, name: str, profile: Profile, intent: str = "oracle"):
        self.name, self.profile, self.intent = name, profile, intent

    def edit_turn(self, session: Session, k: int, image: Image.Image, rng: random.Random,
                  intent: str | None) -> tuple[Image.Image, str]:
        """Turn ``k`` of ``session`` on ``image``, told ``intent`` (None: the instruction alone):
        ``(output, defect actually applied)``."""
        turn = session.turns[k]
        defect = self.profile.draw(rng.random())
        correct = self.oracle.edit_batch([image], [turn.instruction], intents=[intent])[0]
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

    def run_session(self, session: Session, rng: random.Random) -> tuple[list[Image.Image], list[str], list]:
        """All turns on the editor's own outputs, defects drawn from ``rng``: ``(outputs, defects, intents
        told)``."""
        defects, intents = [], TurnIntents(self.intent)

        def step(k: int, inputs: list[Image.Image], items: Sequence[Session]) -> list[Image.Image]:
            [(_, intent)] = intents(k, inputs, items)
            output, defect = self.edit_turn(items[0], k, inputs[0], rng, intent)
            defects.append(defect)
            return [output]

        per_turn = rollout([session], step, turns=len(session.turns), sources=[render(session.source)])
        return [outputs[0] for outputs in per_turn], defects, intents.told(0)


# ---------------------------------------------------------------------------- annotators
@dataclasses.dataclass(frozen=True)
class SimAnnotator:
    name: str
    tint: float
    blur: float
    left: float


def make_annotators(count: int, bias: str, seed: int, rng: np.random.Generator) -> list[SimAnnotator]:
    """``count`` annotators of scenario ``bias``, their own factors drawn from ``rng``."""
    shared = BIASES[bias]
    return [SimAnnotator(f"sim-{bias}-s{seed}-{j:02d}",
                         tint=shared["tint"] * float(rng.uniform(0.75, 1.25)),
                         blur=shared["blur"] + float(rng.uniform(0.0, 0.1)),
                         left=shared["left"] + float(rng.normal(0.0, 0.05)))
            for j in range(count)]


def turn_utility(verdict: TurnScore, defect: str, annotator: SimAnnotator) -> float:
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
