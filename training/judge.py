"""Train and evaluate the world's learned ``judge`` (:mod:`mteditlab.rewards.mini_judge`).

    python -m training.judge                               # train on synthetic rollouts, evaluate on test
    python -m training.judge --editor-outputs 300          # + the mini editor's own rollouts (needs its checkpoint)
    python -m training.judge --steps 3000 --max-cpu-minutes 11 --editor-outputs 300 --editor-path DIR
                                                           # how the committed judge was trained (see its card)
    python -m training.judge --eval-only [--eval-editor none]   # evaluate the committed judge: table + JSON

Caches (data, editor rollouts keyed by the checkpoint's fingerprint, MiniLM token states) live in
``--work`` (``runs/judge``); reruns reuse them.

**Data.** Every example is one turn: (image fed to the turn, image produced, the turn's instruction, its
reconstructed intent, the earlier instructions) with labels from the exact verifier
(:func:`~mteditlab.world.score_turn`): ``if``, ``cc``, ``ga`` (NaN at turn 0) and ``quality``.
Sessions are rolled out by a *defective oracle*: at each turn the chain goes on from one output (the
correct edit most of the time), and a few extra *branches* of the same turn are scored against the same
input. Outputs (``DEFECTS``; training draws them with ``TRAIN_DEFECTS``, which has more binding errors):

* ``correct`` — the render of what the verifier expects; ``perturbed`` — the same, mildly blurred /
  noised / JPEG-compressed; ``degraded`` — heavily so;
* ``identity`` — the input unchanged; ``other_edit`` — a different applicable edit;
  ``wrong_object`` — the right op on another object (or cell); ``wrong_value`` — the right object,
  another colour / destination / added object / background; ``extra_change`` — the edit plus an
  unrelated edit elsewhere; ``undo_earlier`` — the edit, but a cell set by an earlier turn reverts to
  its source value (breaks GA);
* ``blend`` — a mix of input and correct output; ``partial`` — the correct output with the edited
  cells (half the image for a background change) only partly drawn over the input.

Because later turns start from the chain's (possibly wrong) outputs, GA can fail while CC holds.
With ``--editor-outputs N``, N train sessions rolled out by the mini editor (own outputs, reconstructed
intents) are added, labelled the same way (``origin = mini``).

**Quality label** (a documented proxy, the same as the ``verifier`` reward's ``quality``):
``1 − min(1, RMS / 0.25)``, RMS between the edited image and the clean render of the scene the verifier
reads from it (unreadable cells rendered empty). A clean render scores 1; blur, noise, blends and
half-drawn objects lower it.

**Model / loss.** See the judge module. Binary cross-entropy on ``if``, ``cc``, ``ga`` (masked at turn 0)
and on the soft ``quality`` target; the intent is dropped for 40% of the samples of each batch, so the
judge also works on raw (possibly referential) instructions with history only. AdamW, warm-up, cosine
decay. ``val`` sessions monitor training; ``test`` sessions are only evaluated.

**Evaluation** (``--eval-only`` or after training): ``test`` sessions rolled out the same way (plus
forced ``correct`` and ``identity`` branches at each turn) and, when its checkpoint exists, by the mini
editor. Per sub-score: the verifier's positive rate, accuracy at threshold 0.5, AUC; quality: MAE and
Pearson r; errors sliced by op, referential vs explicit turns, defect type and origin; how often the
correct edit out-scores the identity, and how often, among outputs of the same turn, one the verifier
passes out-scores one it fails. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from mteditlab.editors.mini import MiniEditor
from mteditlab.rewards.features import QUALITY_RMS_SCALE
from mteditlab.rewards.mini_judge import (CELL_HEADS, DEFAULT_CHECKPOINT, HEADS, JudgeNet, MiniJudge, default_config,
                                          text_segments)
from mteditlab.world import Obj, Scene, generate_session, parse_image, render_array, score_turn
from mteditlab.world.edits import Edit
from mteditlab.world.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, cell_bounds
from mteditlab.world.sessions import Session, random_edit
from mteditlab.world.verifier import expected_after

RESOLUTION = 32
DEFECTS = {  # weights of a random branch's output kind in the evaluation mix (and the first judge's training)
    "correct": 0.14, "perturbed": 0.14, "degraded": 0.05, "identity": 0.08, "other_edit": 0.1,
    "wrong_object": 0.11, "wrong_value": 0.08, "extra_change": 0.09, "undo_earlier": 0.07, "blend": 0.07,
    "partial": 0.07,
}
TRAIN_DEFECTS = {  # training mix: more of the binding errors (wrong object / wrong value) the judge missed
    **DEFECTS, "correct": 0.12, "perturbed": 0.1, "wrong_object": 0.16, "wrong_value": 0.13,
}
CHAIN = {  # weights of the output the rollout goes on from (mostly right: like a decent editor)
    "correct": 0.55, "perturbed": 0.2, "identity": 0.04, "other_edit": 0.03, "wrong_object": 0.04,
    "wrong_value": 0.03, "extra_change": 0.04, "undo_earlier": 0.03, "blend": 0.02, "partial": 0.02,
}
DATA_VERSION = 2  # bumped whenever the cached example format changes
MINI_EDITOR_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mini" / "base"


# ---- examples -----------------------------------------------------------------------------------
@dataclass
class Examples:
    """Labelled turns. ``labels``: ``[N, 4]`` in ``HEADS`` order (``ga`` NaN without history)."""

    source: np.ndarray  # uint8 [N, r, r, 3]
    edited: np.ndarray  # uint8 [N, r, r, 3]
    labels: np.ndarray  # float32 [N, 4]
    cells: np.ndarray  # float32 [N, 9, 4] per-cell auxiliary targets (CELL_HEADS order)
    instruction: list[str] = field(default_factory=list)
    intent: list[str | None] = field(default_factory=list)
    history: list[list[str]] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)  # split, session, turn, op, referential, defect, origin

    def __len__(self) -> int:
        return len(self.instruction)

    @classmethod
    def empty(cls, resolution: int = RESOLUTION) -> Examples:
        z = np.zeros((0, resolution, resolution, 3), np.uint8)
        return cls(z, z.copy(), np.zeros((0, len(HEADS)), np.float32), np.zeros((0, 9, len(CELL_HEADS)), np.float32))

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(np.concatenate([p.source for p in parts]), np.concatenate([p.edited for p in parts]),
                   np.concatenate([p.labels for p in parts]), np.concatenate([p.cells for p in parts]),
                   sum((p.instruction for p in parts), []),
                   sum((p.intent for p in parts), []), sum((p.history for p in parts), []),
                   sum((p.meta for p in parts), []))

    def segments(self, i: int, with_intent: bool = True) -> list[tuple[int, str]]:
        return text_segments(self.instruction[i], self.history[i], self.intent[i] if with_intent else None)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"instruction": self.instruction, "intent": self.intent, "history": self.history,
                           "meta": self.meta})
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, source=self.source, edited=self.edited, labels=self.labels, cells=self.cells,
                            text=np.array(text))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Examples:
        with np.load(path) as data:
            text = json.loads(str(data["text"]))
            return cls(data["source"], data["edited"], data["labels"], data["cells"], text["instruction"], text["intent"],
                       text["history"], text["meta"])


def to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.round(array * 255), 0, 255).astype(np.uint8)


def render_u8(scene: Scene) -> np.ndarray:
    return to_uint8(render_array(scene, RESOLUTION))


def clean_scene(parsed: Scene, fill: Scene | None = None) -> Scene:
    """``parsed`` with unreadable cells replaced by ``fill``'s cells (or empty)."""
    cells = tuple(c if c is None or isinstance(c, Obj) else (fill.cells[i] if fill else None)
                  for i, c in enumerate(parsed.cells))
    return Scene(parsed.background, cells)


def quality_label(edited: np.ndarray, parsed: Scene) -> float:
    """``1 − min(1, RMS / 0.25)`` between ``edited`` (uint8) and the render of its parsed scene (unreadable
    cells empty): the ``verifier`` reward's quality (:mod:`mteditlab.rewards.features`)."""
    rms = float(np.sqrt(((edited.astype(np.float32) / 255 - render_array(clean_scene(parsed), RESOLUTION)) ** 2).mean()))
    return 1.0 - min(1.0, rms / QUALITY_RMS_SCALE)


def perturb(image: np.ndarray, rng: random.Random, heavy: bool = False) -> np.ndarray:
    """Blur, pixel noise or JPEG at mild (default) or heavy strength."""
    kind = rng.choice(("blur", "noise", "jpeg"))
    if kind == "blur":
        sigma = rng.uniform(1.0, 2.0) if heavy else rng.uniform(0.3, 0.8)
        return to_uint8(gaussian_filter(image.astype(np.float32) / 255, sigma=(sigma, sigma, 0), mode="nearest"))
    if kind == "noise":
        std = rng.uniform(0.07, 0.15) if heavy else rng.uniform(0.01, 0.045)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, std, image.shape)
        return to_uint8(image.astype(np.float32) / 255 + noise)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=rng.randint(5, 20) if heavy else rng.randint(40, 90))
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)


def _differs(edit: Edit, scene: Scene, target: Scene) -> bool:
    return edit.applicable(scene) and edit.apply(scene) != target


def _wrong_object(edit: Edit, state: Scene, target: Scene, rng: random.Random) -> Edit | None:
    objects, empty = [c for c, _ in state.objects()], state.empty_cells()
    if edit.op == "add":
        options = [Edit("add", cell=c, obj=edit.obj) for c in empty if c != edit.cell]
    elif edit.op in ("remove", "recolour", "resize"):
        options = [Edit(edit.op, cell=c, value=edit.value) for c in objects if c != edit.cell]
    elif edit.op == "move":
        options = [Edit("move", cell=c, to=edit.to) for c in objects if c != edit.cell]
    elif edit.op == "swap":
        options = [Edit("swap", cell=a, to=b) for a in objects for b in objects if a < b and {a, b} != {edit.cell, edit.to}]
    else:
        return None
    options = [e for e in options if _differs(e, state, target)]
    return rng.choice(options) if options else None


def _wrong_value(edit: Edit, state: Scene, target: Scene, rng: random.Random) -> Edit | None:
    if edit.op == "add":
        o = edit.obj
        options = ([Edit("add", cell=edit.cell, obj=Obj(s, o.colour, o.size)) for s in SHAPES if s != o.shape]
                   + [Edit("add", cell=edit.cell, obj=Obj(o.shape, c, o.size)) for c in COLOURS if c != o.colour]
                   + [Edit("add", cell=edit.cell, obj=Obj(o.shape, o.colour, z)) for z in SIZES if z != o.size])
    elif edit.op == "recolour":
        options = [Edit("recolour", cell=edit.cell, value=c) for c in COLOURS if c != edit.value]
    elif edit.op == "move":
        options = [Edit("move", cell=edit.cell, to=c) for c in state.empty_cells() if c != edit.to]
    elif edit.op == "background":
        options = [Edit("background", value=b) for b in BACKGROUNDS if b != edit.value]
    else:
        return None
    options = [e for e in options if _differs(e, state, target)]
    return rng.choice(options) if options else None


def _other_edit(state: Scene, target: Scene, rng: random.Random, avoid: set[int] = frozenset(),
                no_background: bool = False) -> Edit | None:
    for _ in range(20):
        e = random_edit(state, rng)
        if (not set(e.cells()) & avoid and not (no_background and e.op == "background")
                and _differs(e, state, target)):
            return e
    return None


def make_output(defect: str, session: Session, k: int, before: np.ndarray, state: Scene,
                rng: random.Random) -> tuple[np.ndarray, Scene | None, str]:
    """One output of turn ``k``: ``(uint8 image, its exact scene when it is a clean render else None,
    the defect actually produced)`` — a defect that cannot apply falls back to a related one."""
    turn = session.turns[k]
    edit = turn.edit
    target = expected_after(edit, state, turn.before)
    if defect == "correct":
        return render_u8(target), target, defect
    if defect in ("perturbed", "degraded"):
        return perturb(render_u8(target), rng, heavy=defect == "degraded"), None, defect
    if defect == "identity":
        return before.copy(), None, defect
    if defect == "blend":
        alpha = rng.uniform(0.25, 0.75)
        mixed = alpha * render_u8(target).astype(np.float32) + (1 - alpha) * before.astype(np.float32)
        return np.round(mixed).astype(np.uint8), None, defect
    if defect == "partial":
        mask = np.zeros((RESOLUTION, RESOLUTION, 1), np.float32)
        if edit.op == "background":
            half = RESOLUTION // 2
            mask[[slice(0, half), slice(half, None)][rng.randrange(2)]] = 1
            if rng.random() < 0.5:
                mask = mask.transpose(1, 0, 2).copy()
        else:
            for cell in edit.cells():
                y0, y1, x0, x1 = cell_bounds(cell, RESOLUTION)
                mask[y0:y1, x0:x1] = 1
        beta = rng.uniform(0.0, 0.6)  # how much of the correct output shows in the masked region
        out = render_u8(target).astype(np.float32)
        partial = mask * (beta * out + (1 - beta) * before.astype(np.float32)) + (1 - mask) * out
        return np.round(partial).astype(np.uint8), None, defect
    if defect == "undo_earlier":
        earlier = {c for t in session.turns[:k] for c in t.edit.cells()} - set(edit.cells())
        cells = [c for c in sorted(earlier) if target.cells[c] != session.source.cells[c]]
        if cells:
            cell = rng.choice(cells)
            scene = target.with_cell(cell, session.source.cells[cell])
            return render_u8(scene), scene, defect
        defect = "extra_change"
    if defect == "extra_change":
        extra = _other_edit(target, target, rng, avoid=set(edit.cells()), no_background=edit.op == "background")
        if extra is not None:
            scene = extra.apply(target)
            return render_u8(scene), scene, defect
        defect = "other_edit"
    if defect == "wrong_value":
        wrong = _wrong_value(edit, state, target, rng)
        if wrong is not None:
            scene = wrong.apply(state)
            return render_u8(scene), scene, defect
        defect = "wrong_object"
    if defect == "wrong_object":
        wrong = _wrong_object(edit, state, target, rng)
        if wrong is not None:
            scene = wrong.apply(state)
            return render_u8(scene), scene, defect
        defect = "other_edit"
    if defect == "other_edit":
        other = _other_edit(state, target, rng)
        if other is not None:
            scene = other.apply(state)
            return render_u8(scene), scene, defect
        return before.copy(), None, "identity"
    raise ValueError(f"unknown defect {defect!r}; known: {list(DEFECTS)}")


def _choose(weights: dict[str, float], rng: random.Random) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _record(out: Examples, session: Session, k: int, before: np.ndarray, before_scene: Scene, edited: np.ndarray,
            after_scene: Scene, defect: str, origin: str, forced: bool = False) -> None:
    score = score_turn(session, k, before_scene, after_scene)
    turn = session.turns[k]
    labels = [float(score.if_), float(score.cc), float(score.ga) if k else math.nan,
              quality_label(edited, after_scene)]
    touched = set(turn.edit.cells())
    earlier = {c for t in session.turns[:k] for c in t.edit.cells()} - touched
    out.cells.append([[c in touched, not _same(score.parsed.cells[c], before_scene.cells[c]), c in earlier,
                       c in earlier and not _same(score.parsed.cells[c], turn.after.cells[c])] for c in range(9)])
    out.source.append(before)
    out.edited.append(edited)
    out.labels.append(labels)
    out.instruction.append(turn.instruction)
    out.intent.append(turn.intent)
    out.history.append([t.instruction for t in session.turns[:k]])
    out.meta.append({"split": session.split, "session": session.index, "turn": k, "op": turn.edit.op,
                     "referential": turn.referential, "defect": defect, "origin": origin, "forced": forced,
                     "success": bool(score.if_ and score.cc and (score.ga or not k))})


def _same(a, b) -> bool:
    return a is b or a == b  # an unreadable cell read twice counts as unchanged


def _builder() -> Examples:
    return Examples([], [], [], [], [], [], [], [])


def _finish(out: Examples) -> Examples:
    if not out.instruction:
        return Examples.empty()
    return Examples(np.stack(out.source), np.stack(out.edited), np.asarray(out.labels, np.float32),
                    np.asarray(out.cells, np.float32), out.instruction, out.intent, out.history, out.meta)


def synthetic_examples(split: str, count: int, *, start: int = 0, turns: int = 5, branches: int = 4,
                       forced: Sequence[str] = (), seed: int = 0, weights: dict[str, float] = DEFECTS) -> Examples:
    """Defective-oracle rollouts of sessions ``start .. start+count`` of ``split`` (see module docstring).
    Per turn: the chain's output, the ``forced`` kinds (flagged ``meta["forced"]``: they are not part of
    the rollout mix), then random kinds (drawn by ``weights``) up to ``branches`` outputs."""
    out = _builder()
    for index in range(start, start + count):
        rng = random.Random(f"judge/{seed}/{split}/{index}")
        session = generate_session(split, index, turns)
        before, before_scene, state = render_u8(session.source), session.source, session.source
        for k in range(turns):
            kinds = [_choose(CHAIN, rng), *forced]
            kinds += [_choose(weights, rng) for _ in range(max(0, branches - len(kinds)))]
            chain = None
            for j, kind in enumerate(kinds):
                edited, scene, kind = make_output(kind, session, k, before, state, rng)
                if scene is None:  # not a clean render: read it like the verifier does
                    scene = before_scene if kind == "identity" else parse_image(edited.astype(np.float32) / 255)
                _record(out, session, k, before, before_scene, edited, scene, kind, "synthetic",
                        forced=1 <= j <= len(forced))
                chain = chain or (edited, scene)
            target = expected_after(session.turns[k].edit, state, session.turns[k].before)
            before, before_scene = chain
            state = clean_scene(before_scene, fill=target)
    return _finish(out)


def editor_examples(editor, split: str, count: int, *, start: int = 0, turns: int = 5, seed: int = 0,
                    batch_size: int = 64, progress: bool = True) -> Examples:
    """Rollouts of ``editor`` (each turn fed its own previous output, conditioned on the reconstructed
    intent) over ``count`` sessions of ``split``, labelled by the verifier (``origin = editor.name``)."""
    from tqdm import tqdm

    from mteditlab.intent import turn_seed, turn_text

    out = _builder()
    sessions = [generate_session(split, i, turns) for i in range(start, start + count)]
    current = [Image.fromarray(render_u8(s.source)) for s in sessions]
    current_scene = [s.source for s in sessions]
    for k in tqdm(range(turns), desc=f"{editor.name} rollouts ({split})", disable=not progress):
        outputs = []
        for b in range(0, len(sessions), batch_size):
            chunk = sessions[b:b + batch_size]
            texts = [turn_text(s, k, "reconstruct") for s in chunk]
            outputs += editor.edit_batch(current[b:b + batch_size], [t[0] for t in texts],
                                         intents=[t[1] for t in texts],
                                         seeds=[turn_seed(seed, s.index, k) for s in chunk])
        for i, (s, image) in enumerate(zip(sessions, outputs)):
            edited = np.asarray(image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX), np.uint8)
            scene = parse_image(edited.astype(np.float32) / 255)
            _record(out, s, k, np.asarray(current[i].convert("RGB"), np.uint8), current_scene[i], edited, scene,
                    "editor", editor.name)
            current[i], current_scene[i] = Image.fromarray(edited), scene
    return _finish(out)


def cached(path: Path, build) -> Examples:
    if path.is_file():
        return Examples.load(path)
    examples = build()
    examples.save(path)
    return examples


# ---- text cache ---------------------------------------------------------------------------------
def load_text_cache(encoder, path: Path) -> None:
    if path.is_file():
        encoder.cache.update({k: v.float() for k, v in torch.load(path).items()})


def save_text_cache(encoder, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in encoder.cache.items()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def all_strings(examples: Examples) -> list[str]:
    strings = set(examples.instruction) | {t for t in examples.intent if t} | {h for hs in examples.history for h in hs}
    return sorted(strings)


# ---- metrics ------------------------------------------------------------------------------------
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
    examples, probs = _subset(examples, mix), probs[mix]
    report["overall"] = evaluate_probs(examples, probs)
    for key in ("origin", "op", "referential", "defect", "turn"):
        report[f"by_{key}"] = sliced(examples, probs, key)
    for origin, mask in _slices(examples, "origin").items():
        idx = np.flatnonzero(mask)
        report.setdefault("by_origin_full", {})[origin] = evaluate_probs(_subset(examples, idx), probs[idx])
    if probs_no_intent is not None:
        probs_no_intent = probs_no_intent[mix]
        report["no_intent"] = {"overall": evaluate_probs(examples, probs_no_intent),
                               "by_referential": sliced(examples, probs_no_intent, "referential")}
    return report


def _subset(examples: Examples, idx: np.ndarray) -> Examples:
    return Examples(examples.source[idx], examples.edited[idx], examples.labels[idx], examples.cells[idx],
                    [examples.instruction[i] for i in idx], [examples.intent[i] for i in idx],
                    [examples.history[i] for i in idx], [examples.meta[i] for i in idx])


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


def predict_examples(judge: MiniJudge, examples: Examples, with_intent: bool = True) -> np.ndarray:
    segs = [examples.segments(i, with_intent) for i in range(len(examples))]
    return judge.predict(examples.source, examples.edited, segs)


# ---- training -----------------------------------------------------------------------------------
def loss_fn(logits: torch.Tensor, labels: torch.Tensor, cell_logits: torch.Tensor | None = None,
            cell_labels: torch.Tensor | None = None, quality_weight: float = 1.0, cell_weight: float = 0.5) -> torch.Tensor:
    """Mean BCE over the available sub-scores (``ga`` masked where NaN; soft ``quality`` target weighted
    ``quality_weight``) plus ``cell_weight`` × the mean BCE of the per-cell auxiliary targets."""
    target = torch.nan_to_num(labels, nan=0.0)
    weight = torch.isfinite(labels).float()
    weight[:, 3] *= quality_weight
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    loss = per.sum() / weight[:, :3].sum().clamp(min=1)
    if cell_logits is not None and cell_weight:
        loss = loss + cell_weight * F.binary_cross_entropy_with_logits(cell_logits, cell_labels) * len(CELL_HEADS)
    return loss


def train(judge: MiniJudge, data: Examples, *, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
          intent_dropout: float = 0.4, cell_weight: float = 0.5, editor_weight: float = 1.0,
          val: Examples | None = None, eval_every: int = 500,
          max_minutes: float | None = None, max_cpu_minutes: float | None = None, log_path: Path | None = None,
          progress: bool = True) -> dict:
    from tqdm import tqdm

    net = judge.net.train()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    labels, cell_labels = torch.from_numpy(data.labels), torch.from_numpy(data.cells)
    # sampling weights: editor rollouts (origin other than "synthetic") count ``editor_weight`` times
    weights = torch.tensor([1.0 if m["origin"] == "synthetic" else editor_weight for m in data.meta], dtype=torch.double)
    started, cpu_started, history = time.time(), time.process_time(), []
    bar = tqdm(range(steps), desc="train judge", disable=not progress)
    for step in bar:
        # schedule progress: steps done, or the share of the CPU / wall budget spent, whichever is ahead,
        # so a budget-capped run still anneals its learning rate before it stops
        done = max(step / max(1, steps),
                   (time.process_time() - cpu_started) / (60 * max_cpu_minutes) if max_cpu_minutes else 0.0,
                   (time.time() - started) / (60 * max_minutes) if max_minutes else 0.0)
        scale = min(1.0, (step + 1) / max(1, warmup)) * (0.5 * (1 + math.cos(math.pi * min(1.0, done))) * 0.95 + 0.05)
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen).numpy()
        segs = [data.segments(int(i), with_intent=rng.random() >= intent_dropout) for i in idx]
        logits, cell_logits = judge.logits(data.source[idx], data.edited[idx], segs, cells=True)
        loss = loss_fn(logits, labels[idx].to(judge.device), cell_logits, cell_labels[idx].to(judge.device),
                       cell_weight=cell_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {"step": step + 1, "loss": loss.item(), "lr": lr * scale, "seconds": round(time.time() - started, 1)}
        last = step + 1 == steps or done >= 1.0
        if val is not None and len(val) and ((step + 1) % eval_every == 0 or last):
            metrics = evaluate_probs(val, predict_examples(judge, val))
            net.train()
            row["val"] = {h: {"acc": metrics[h].get("accuracy"), "auc": metrics[h].get("auc")} for h in ("if", "cc", "ga")}
            row["val"]["quality_mae"] = metrics["quality"]["mae"]
            print(json.dumps(row["val"]), flush=True)
        history.append(row)
        if log_path:
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if last:
            break
    net.eval()
    return {"steps": len(history), "seconds": round(time.time() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "final_loss": float(np.mean([r["loss"] for r in history[-50:]]))}


# ---- CLI ----------------------------------------------------------------------------------------
def editor_fingerprint(path: Path) -> str:
    """Short content hash of a mini editor checkpoint (its config and weight files), so cached rollouts of
    one checkpoint are never reused for another."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:10]


def evaluation_set(args, work: Path, editor_available: bool) -> Examples:
    parts = [cached(work / f"v{DATA_VERSION}-test-synthetic-{args.eval_sessions}-s{args.seed}.npz",
                    lambda: synthetic_examples("test", args.eval_sessions, branches=6,
                                               forced=("correct", "identity"), seed=args.seed + 1))]
    if editor_available:
        from mteditlab.editors import get_editor
        path = Path(args.editor_path or MINI_EDITOR_CHECKPOINT)
        tag = editor_fingerprint(path) + (f"-lora{editor_fingerprint(args.eval_editor_lora)}" if args.eval_editor_lora else "")
        parts.append(cached(work / f"v{DATA_VERSION}-test-mini-{tag}-{args.eval_editor_sessions}-s{args.seed}.npz",
                            lambda: editor_examples(get_editor("mini", path=path, lora=args.eval_editor_lora), "test",
                                                    args.eval_editor_sessions, seed=args.seed)))
    return Examples.concat(parts)


def run_eval(judge: MiniJudge, examples: Examples, json_path: Path | None, extra: dict | None = None) -> dict:
    probs = predict_examples(judge, examples, with_intent=True)
    report = full_report(examples, probs, predict_examples(judge, examples, with_intent=False))
    report.update(extra or {})
    print(table(report))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1500, help="train sessions of synthetic rollouts")
    parser.add_argument("--branches", type=int, default=4, help="outputs scored per turn")
    parser.add_argument("--train-mix", choices=("binding", "eval"), default="binding",
                        help="output kinds of training branches: TRAIN_DEFECTS (more wrong-object / wrong-value "
                             "outputs) or the evaluation mix DEFECTS")
    parser.add_argument("--editor-outputs", type=int, default=0,
                        help="also roll out the mini editor over this many train sessions (needs its checkpoint)")
    parser.add_argument("--extra-examples", type=Path, nargs="*", default=[],
                        help="more training examples: .npz files written by this script (e.g. cached rollouts of "
                             "an earlier editor checkpoint from <work>/v2-train-mini-<fingerprint>-*.npz)")
    parser.add_argument("--editor-weight", type=float, default=4.0,
                        help="sampling weight of an editor-rollout example relative to a synthetic one")
    parser.add_argument("--editor-path", type=Path, default=None, help="mini editor checkpoint (default checkpoints/mini/base)")
    parser.add_argument("--val-sessions", type=int, default=100)
    parser.add_argument("--eval-sessions", type=int, default=300, help="test sessions of synthetic rollouts")
    parser.add_argument("--eval-editor", choices=("auto", "mini", "none"), default="auto",
                        help="add mini-editor rollouts to the test set (auto: when its checkpoint exists)")
    parser.add_argument("--eval-editor-sessions", type=int, default=200)
    parser.add_argument("--eval-editor-lora", type=Path, default=None,
                        help="evaluate on rollouts of the mini editor with this LoRA adapter (e.g. checkpoints/mini/grpo)")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--cell-weight", type=float, default=0.5, help="weight of the per-cell auxiliary loss")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--max-minutes", type=float, default=None, help="training wall-time budget (minutes)")
    parser.add_argument("--max-cpu-minutes", type=float, default=None,
                        help="training CPU-time budget (minutes of this process's CPU time); the learning-rate "
                             "schedule follows whichever of steps / CPU / wall budget runs out first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=Path("runs/judge"), help="data / text caches and logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="where the trained judge is saved")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the judge at --judge (default --out)")
    parser.add_argument("--judge", type=Path, default=None, help="judge checkpoint to evaluate with --eval-only")
    parser.add_argument("--json", type=Path, default=None, help="evaluation JSON (default <work>/eval.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, progress = args.work, not args.no_progress
    work.mkdir(parents=True, exist_ok=True)
    text_cache = work / "text_cache.pt"
    editor_path = Path(args.editor_path or MINI_EDITOR_CHECKPOINT)
    editor_available = args.eval_editor == "mini" or (args.eval_editor == "auto" and MiniEditor.available(editor_path))
    json_path = args.json or work / "eval.json"
    started = time.time()

    if args.editor_outputs and not args.eval_only and not (editor_path / "config.json").is_file():
        raise SystemExit(f"--editor-outputs needs the mini editor checkpoint at {editor_path}; "
                         "train it with `python -m training.pretrain` first (or pass --editor-path).")
    if args.eval_only:
        judge = MiniJudge.from_pretrained(args.judge or args.out)
        load_text_cache(judge.text_encoder, text_cache)
        examples = evaluation_set(args, work, editor_available)
        report = run_eval(judge, examples, json_path, {
            "judge": str(args.judge or args.out), "command": " ".join(["python -m training.judge", *(sys.argv[1:] if argv is None else argv)]),
            "editor": {"path": str(editor_path), "fingerprint": editor_fingerprint(editor_path),
                       "lora": str(args.eval_editor_lora) if args.eval_editor_lora else None} if editor_available else None})
        save_text_cache(judge.text_encoder, text_cache)
        return report

    from mteditlab.editors.mini import TextEncoder

    encoder = TextEncoder()
    load_text_cache(encoder, text_cache)
    weights = TRAIN_DEFECTS if args.train_mix == "binding" else DEFECTS
    tag = "" if args.train_mix == "eval" else f"-{args.train_mix}"
    parts = [cached(work / f"v{DATA_VERSION}-train-synthetic-{args.sessions}-b{args.branches}-s{args.seed}{tag}.npz",
                    lambda: synthetic_examples("train", args.sessions, branches=args.branches, seed=args.seed,
                                               weights=weights))]
    if args.editor_outputs:
        from mteditlab.editors import get_editor
        parts.append(cached(work / f"v{DATA_VERSION}-train-mini-{editor_fingerprint(editor_path)}-{args.editor_outputs}"
                                   f"-s{args.seed}.npz",
                            lambda: editor_examples(get_editor("mini", path=editor_path), "train",
                                                    args.editor_outputs, seed=args.seed, progress=progress)))
    for path in args.extra_examples:
        parts.append(Examples.load(path))
    data = Examples.concat(parts)
    val = cached(work / f"v{DATA_VERSION}-val-synthetic-{args.val_sessions}-s{args.seed}.npz",
                 lambda: synthetic_examples("val", args.val_sessions, branches=args.branches, seed=args.seed + 2))
    data_seconds = time.time() - started
    print(f"{len(data)} training examples, {len(val)} val examples ({data_seconds:.0f} s)", flush=True)
    strings = all_strings(Examples.concat([data, val]))
    encoder(strings)  # fills the cache (already-cached strings are skipped)
    save_text_cache(encoder, text_cache)
    text_seconds = time.time() - started - data_seconds
    print(f"{len(strings)} strings encoded ({text_seconds:.0f} s)", flush=True)

    torch.manual_seed(args.seed)
    judge = MiniJudge(JudgeNet(**default_config()), encoder)
    log_path = work / "train_log.jsonl"
    log_path.write_text("")
    stats = train(judge, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                  seed=args.seed, cell_weight=args.cell_weight, editor_weight=args.editor_weight, val=val, eval_every=args.eval_every, max_minutes=args.max_minutes,
                  max_cpu_minutes=args.max_cpu_minutes,
                  log_path=log_path, progress=progress)
    origins = sorted({m["origin"] for m in data.meta})
    info = {"trained_with": " ".join(["python -m training.judge", *(sys.argv[1:] if argv is None else argv)]),
            "train_examples": len(data), "origins": origins, "sessions": args.sessions,
            "editor_outputs": args.editor_outputs, "editor_weight": args.editor_weight,
            "extra_examples": [p.name for p in args.extra_examples],
            "editor": ({"path": str(editor_path), "fingerprint": editor_fingerprint(editor_path)}
                       if args.editor_outputs else None), "parameters": sum(p.numel() for p in judge.net.parameters()),
            **stats, "data_seconds": round(data_seconds, 1), "text_seconds": round(text_seconds, 1)}
    judge.save_pretrained(args.out, info)
    print(f"saved judge to {args.out}: {json.dumps(info)}", flush=True)
    examples = evaluation_set(args, work, editor_available)
    save_text_cache(encoder, text_cache)
    report = run_eval(judge, examples, json_path, {"judge": str(args.out), "train": info})
    save_text_cache(encoder, text_cache)
    report["wall_seconds"] = round(time.time() - started, 1)
    return report


if __name__ == "__main__":
    main()
