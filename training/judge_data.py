"""The judge's labelled examples: every example is one turn (image fed to the turn, image produced,
the turn's instruction, its reconstructed intent, the earlier instructions) with labels from the
exact verifier (:func:`~mteditlab.world.score_turn`): ``if``, ``cc``, ``ga`` (NaN at turn 0) and
``quality``, plus per-cell auxiliary targets.

* :func:`synthetic_examples` — sessions rolled out by a *defective oracle*: at each turn the chain goes
  on from one output (the correct edit most of the time), and a few extra *branches* of the same turn
  are scored against the same input (output kinds: :mod:`training.judge_defects`). Because later turns
  start from the chain's (possibly wrong) outputs, GA can fail while CC holds.
* :func:`editor_examples` — an editor's own rollouts (``origin`` = the editor's name).

**Quality label** (a documented proxy, the same as the ``verifier`` reward's ``quality``):
``1 − min(1, RMS / 0.25)``, RMS between the edited image and the clean render of the scene the verifier
reads from it (unreadable cells rendered empty). A clean render scores 1; blur, noise, blends and
half-drawn objects lower it.

Examples and MiniLM token states are cached on disk (:func:`cached`, :func:`load_text_cache`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from mteditlab.rewards.features import QUALITY_RMS_SCALE
from mteditlab.rewards.mini_judge import CELL_HEADS, HEADS, text_segments
from mteditlab.rollout import EditStep, rollout
from mteditlab.world import Obj, Scene, generate_session, parse_image, render_array, score_turn
from mteditlab.world.sessions import Session
from mteditlab.world.verifier import expected_after
from training.judge_defects import CHAIN, DEFECTS, RESOLUTION, choose, make_output, render_u8

DATA_VERSION = 2  # bumped whenever the cached example format changes


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

    def subset(self, idx: np.ndarray) -> Examples:
        return Examples(self.source[idx], self.edited[idx], self.labels[idx], self.cells[idx],
                        [self.instruction[i] for i in idx], [self.intent[i] for i in idx],
                        [self.history[i] for i in idx], [self.meta[i] for i in idx])

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
            kinds = [choose(CHAIN, rng), *forced]
            kinds += [choose(weights, rng) for _ in range(max(0, branches - len(kinds)))]
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
    """Rollouts of ``editor`` (each turn fed its own previous output, brought to :data:`RESOLUTION`,
    conditioned on the reconstructed intent) over ``count`` sessions of ``split``, labelled by the
    verifier (``origin = editor.name``)."""
    out = _builder()
    sessions = [generate_session(split, i, turns) for i in range(start, start + count)]
    scenes = [s.source for s in sessions]  # the scene the verifier reads from each session's current input
    edit = EditStep(editor.edit_batch, seed=seed, batch_size=batch_size)

    def step(k: int, inputs: list[Image.Image], items: Sequence[Session]) -> list[Image.Image]:
        return [image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)
                for image in edit(k, inputs, items)]

    def record(k: int, inputs: list[Image.Image], outputs: list[Image.Image]) -> None:
        for i, (session, before, after) in enumerate(zip(sessions, inputs, outputs)):
            edited = np.asarray(after, np.uint8)
            scene = parse_image(edited.astype(np.float32) / 255)
            _record(out, session, k, np.asarray(before.convert("RGB"), np.uint8), scenes[i], edited, scene,
                    "editor", editor.name)
            scenes[i] = scene

    rollout(sessions, step, turns=turns, sources=[Image.fromarray(render_u8(s.source)) for s in sessions],
            on_turn=record, progress=progress, desc=f"{editor.name} rollouts ({split})")
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
