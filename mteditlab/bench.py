"""The multi-turn benchmark: run an editor over sessions, each turn fed its own previous output.

    python -m mteditlab.bench --editor mini [--adapter DIR] [--split test] [--sessions 200] [--turns 5]

Per turn k it reports IF, CC, GA and success; ``overall_k`` = fraction of sessions whose turns 1..k
all succeeded; ``marginal_k`` = P(turn k succeeds | turns 1..k−1 succeeded); ``exposure_gap_k`` =
success of turn k fed the *true* previous scene minus success fed the editor's own output.
It also reports how the outputs look, whatever their content (:mod:`mteditlab.rewards.features`):
``quality`` (1 = a pixel-exact render of the scene the image shows) and ``tint_255`` (the distance of
the background from the nearest palette colour, in 0–255 units: what tint-averse people notice).
Every per-turn rate comes with its standard error over sessions (``KEY_se``).

    python -m mteditlab.bench --editor mini --intent rule     # or mini[:DIR], served:URL, none, concat

``--intent SPEC`` picks the reconstructor that gives the editor each turn's intent
(:mod:`mteditlab.reconstructors`; default ``oracle``, the gold). On the world the result also says, per
turn, how the text the editor read (the intent, else the instruction) agrees with the gold intent:
``intent_exact`` and ``intent_equivalent`` (parses to the same edit), on all turns and on the
``_referential`` / ``_explicit`` ones; and ``intent_failures``, the turns the reconstructor failed on
(the editor then reads the instruction alone).

    python -m mteditlab.bench --editor mini --adapter DIR --against base   # paired: Δ ± paired s.e. per turn
    python -m mteditlab.bench --editor mini --pass-at 8 --split val        # headroom: pass@1 vs pass@K
    python -m mteditlab.bench --editor mini --turns 10 --no-teacher-forced  # own outputs only: about half the cost

``--against`` runs a second editor (``base`` = the same backend without the adapter, or another adapter
directory) on the same sessions and seeds and reports Δ = this − that per turn with the paired standard
error s.e.(Δ) = std(d_i) / √n over the per-session differences d_i; ``--against-result R.json`` pairs
with a result saved earlier by ``--json`` (same split, sessions and seed) instead of running it again.
``--pass-at K`` samples every turn K times from the true previous scene (teacher-forced, seeds
``seed..seed+K−1``) and reports pass@1 (mean success) and pass@K (any success) per turn and per operation.
``--start N`` takes sessions N, N+1, ...

On data (``--sessions-from``: what the trainer reads, e.g. MagicBrush's one row per turn) a reward
named as in training judges every turn instead of the verifier:

    python -m mteditlab.bench --editor kontext --adapter DIR --sessions-from DATA --split dev \
        --reward qwen-vl --reward-paths qwen-vl=http://HOST:PORT/v1 --against base [--teacher-forced]

Each editor edits its own previous output until the session's last turn. Per turn: the reward's
sub-scores (``if``, ``cc``, ``ga``, ``quality``: those it judges) and its overall ``score``;
``success`` = score ≥ ``--pass-threshold``; ``overall`` and ``marginal`` as on the world; with
references ``l1`` = mean |output − reference| and ``psnr`` = 10·log10(1 / MSE) in [0, 1] RGB pixels,
and with ``--similarity-model DIR`` the cosine ``similarity`` of the two images' DINO / CLIP embeddings
(:mod:`mteditlab.similarity`); with ``--teacher-forced`` the success fed the data's own input of each turn and the exposure gap.
Every mean is over the sessions that have a value: a judgment that failed is no score (listed in
``failures`` with its session and turn, counted per turn), and a session's ``overall`` is left out
from its first failed turn on. ``sessions`` counts the sessions evaluated, ``skipped`` lists the
records that do not form one, with the reason. ``python -m labeling queue-bench`` runs a paired
benchmark on data sessions and puts both sides' sessions into the label queue as labeling items.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mteditlab.editors import EDITORS, Editor, get_editor
from mteditlab.intent import TurnIntents
from mteditlab.reconstructors import Reconstructor, ReconstructorError, build_reconstructor
from mteditlab.reconstructors.metrics import intent_agreement
from mteditlab.registry import mapping
from mteditlab.rewards import RewardModel, get_reward
from mteditlab.rewards.base import SUB_SCORES, EditSample
from mteditlab.rewards.features import TINT_SCALE, image_features, parse_cached
from mteditlab.rollout import EditStep, Step, rollout
from mteditlab.sessions_data import (DataSession, add_column_arguments, columns_from, data_resolution,
                                     describe_skipped, read_sessions)
from mteditlab.similarity import ImageSimilarity
from mteditlab.world import Session, render, score_turn, sessions as make_sessions

WORLD_SPLITS = ("train", "val", "test")


def run_benchmark(editor: Editor, sessions: Sequence[Session], *, seed: int = 0, steps: int | None = None,
                  intent: Reconstructor | str = "oracle", batch_size: int = 64, progress: bool = True,
                  teacher_forced: bool = True) -> dict:
    """Roll ``editor`` over ``sessions`` (own outputs), each turn's intent from the reconstructor
    ``intent``, and, from turn 2 on and unless ``teacher_forced`` is False (about half the cost), also
    from the true previous scene (with the same intents); return the metrics dictionary (see module
    docstring; without the teacher-forced pass it has no ``teacher_forced_success`` and
    ``exposure_gap``)."""
    turns = len(sessions[0].turns)
    step = EditStep(editor.edit_batch, seed=seed, steps=steps, intent=intent, batch_size=batch_size)
    own = np.zeros((len(sessions), turns, 4))  # if, cc, ga, success
    looks = np.zeros((len(sessions), turns, 2))  # quality, tint
    forced = np.zeros((len(sessions), turns))

    def score(k: int, inputs: list[Image.Image], outputs: list[Image.Image]) -> None:
        for i, (s, before, after) in enumerate(zip(sessions, inputs, outputs)):
            scene = parse_cached(after, after.width)  # parsed once: the verdict, the looks, the next turn
            own[i, k] = list(score_turn(s, k, parse_cached(before, before.width), scene).as_dict().values())
            features = image_features(after, after.width, scene=scene)
            looks[i, k] = features["quality"], features["tint"] * TINT_SCALE * 255
        if teacher_forced:
            forced[:, k] = teacher_forced_success(step, sessions, k) if k else own[:, 0, 3]

    rollout(sessions, step, turns=turns, sources=[render(s.source) for s in sessions], on_turn=score,
            progress=progress, desc=f"bench {editor.name}")
    per_session = {"if": own[:, :, 0], "cc": own[:, :, 1], "ga": own[:, :, 2], "success": own[:, :, 3],
                   "overall": np.cumprod(own[:, :, 3], axis=1), "teacher_forced_success": forced,
                   "exposure_gap": forced - own[:, :, 3], "quality": looks[:, :, 0], "tint_255": looks[:, :, 1],
                   **intent_cells(sessions, step.intents)}
    if not teacher_forced:
        del per_session["teacher_forced_success"], per_session["exposure_gap"]
    return world_result(editor.name, sessions, seed, steps or editor.default_steps, spec_of(step.intents),
                        per_session, [step.intents.failures(k) for k in range(turns)])


def world_result(editor: str, sessions: Sequence[Session], seed: int, steps: int, intent: str,
                 per_session: dict[str, np.ndarray], intent_failures: Sequence[int]) -> dict:
    """The world benchmark's metrics dictionary from its per-session arrays ``[sessions, turns]``."""
    per_turn = summarize(per_session)
    for row, failures in zip(per_turn, intent_failures):
        row["intent_failures"] = failures
    return {"editor": editor, "split": sessions[0].split, "start": sessions[0].index, "sessions": len(sessions),
            "turns": len(sessions[0].turns), "seed": seed, "steps": steps, "intent": intent,
            "per_turn": per_turn, "per_session": {k: to_json(v) for k, v in per_session.items()}}


def run_sharded(sides: Sequence[tuple[str, str | None, str | None]], sessions: Sequence[Session], workers: int, *,
                seed: int = 0, steps: int | None = None, intent: str = "oracle", batch_size: int = 64,
                teacher_forced: bool = True) -> list[dict]:
    """:func:`run_benchmark` for each side ``(editor, adapter, editor_path)`` on ``sessions``, split into
    ``workers`` contiguous shards per side and run by ``workers`` processes of one torch thread each
    (both sides of a comparison at once). An output depends only on its session, turn and input
    (:func:`~mteditlab.intent.turn_seed`), so the merged result equals the one-process result."""
    shards = [list(chunk) for chunk in np.array_split(np.arange(len(sessions)), workers) if len(chunk)]
    jobs = [(side, shard) for side in range(len(sides)) for shard in range(len(shards))]
    options = dict(seed=seed, steps=steps, intent=intent, batch_size=batch_size, teacher_forced=teacher_forced)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(bench_shard, *sides[side], [sessions[i] for i in shards[shard]], options): (side, shard)
                   for side, shard in jobs}
        parts: dict[tuple[int, int], dict] = {}
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"bench ({workers} processes)"):
            parts[futures[future]] = future.result()
    results = []
    for side, (editor, _, _) in enumerate(sides):
        pieces = [parts[side, shard] for shard in range(len(shards))]
        per_session = {key: np.concatenate([np.array(p["per_session"][key], dtype=float) for p in pieces])
                       for key in pieces[0]["per_session"]}
        failures = [sum(p["per_turn"][k]["intent_failures"] for p in pieces) for k in range(len(sessions[0].turns))]
        results.append(world_result(pieces[0]["editor"], sessions, seed, pieces[0]["steps"], pieces[0]["intent"],
                                    per_session, failures))
    return results


def bench_shard(editor: str, adapter: str | None, path: str | None, sessions: Sequence[Session], options: dict) -> dict:
    """One process's part of :func:`run_sharded`."""
    return run_benchmark(get_editor(editor, lora=adapter, path=path), sessions, progress=False, **options)


AGREEMENT = ("intent_exact", "intent_equivalent")
TURN_KINDS = ("", "_referential", "_explicit")


def intent_cells(sessions: Sequence[Session], intents: TurnIntents) -> dict[str, np.ndarray]:
    """Per session and turn, 1 or 0: whether the text the editor read (the intent, else the instruction)
    is the gold intent (``intent_exact``) or parses to the same edit of the true scene
    (``intent_equivalent``; :func:`~mteditlab.reconstructors.metrics.intent_agreement`); with
    ``_referential`` / ``_explicit`` the same on those turns only (NaN on the others)."""
    shape = (len(sessions), len(sessions[0].turns))
    cells = {key + kind: np.full(shape, np.nan) for key in AGREEMENT for kind in TURN_KINDS}
    for i, session in enumerate(sessions):
        for k, told in enumerate(intents.told(i)):
            kind = "_referential" if session.turns[k].referential else "_explicit"
            for key, agrees in zip(AGREEMENT, intent_agreement(told or session.turns[k].instruction, session, k)):
                cells[key][i, k] = cells[key + kind][i, k] = agrees
    return cells


def spec_of(intents: TurnIntents) -> str:
    """What the result's ``intent`` names: the reconstructor's spec (``oracle``, ``mini:DIR``, ...)."""
    return intents.reconstructor.spec or intents.reconstructor.name


def run_data_benchmark(editor: Editor, sessions: Sequence[DataSession], reward: RewardModel, *, seed: int = 0,
                       steps: int | None = None, intent: Reconstructor | str = "oracle", batch_size: int = 64,
                       threshold: float = 0.5, teacher_forced: bool = False, progress: bool = True,
                       outputs: dict | None = None, similarity=None) -> dict:
    """Roll ``editor`` over data ``sessions`` (own outputs, each up to its last turn), ``reward`` judging
    every turn (seed ``seed + k`` at turn k); return the metrics dictionary (module docstring). Per
    session and turn, NaN where there is no value: a turn the session lacks, a sub-score that does not
    apply, a failed judgment. Each turn's intent comes from the reconstructor ``intent`` (``oracle``: the
    data's ``intents`` column, None where it has none), and the judge reads the one the editor was told.
    ``outputs``, when given, receives each session's ``(output, intent told)`` per turn by id;
    ``similarity`` (an :class:`~mteditlab.similarity.ImageSimilarity`), when given, adds the embedding
    similarity of each output to its reference."""
    turns = max(len(s.turns) for s in sessions)
    edit = EditStep(editor.edit_batch, seed=seed, steps=steps, intent=intent, batch_size=batch_size)
    step = by_size(edit)
    subs = [sub for sub in SUB_SCORES if sub in reward.sub_scores]
    keys = [*subs, "score", "success", *(["teacher_forced_success"] * teacher_forced),
            *(["l1", "psnr", *["similarity"] * (similarity is not None)]
              * any(t.reference is not None for s in sessions for t in s.turns))]
    cells = {key: np.full((len(sessions), turns), np.nan) for key in keys}
    failures: list[dict] = []

    def judge(k: int, rows: list[int], inputs: list[Image.Image], edited: list[Image.Image], fed: str):
        samples = [EditSample(before, after, sessions[i].turns[k].instruction,
                              [t.instruction for t in sessions[i].turns[:k]], edit.intents.results[i][k].intent,
                              {"turn": k}) for i, before, after in zip(rows, inputs, edited)]
        out = reward.score(samples, seed=seed + k)
        failures.extend({"session": sessions[i].id, "turn": k + 1, "fed": fed, "reason": reason}
                        for i, reason in zip(rows, out.failures) if reason is not None)
        return out, np.where(out.valid, out.overall >= threshold, np.nan)

    def score(k: int, inputs: list[Image.Image], edited: list[Image.Image]) -> None:
        rows = [i for i, s in enumerate(sessions) if k < len(s.turns)]
        out, passed = judge(k, rows, [inputs[i] for i in rows], [edited[i] for i in rows], "own")
        for sub in subs:
            cells[sub][rows, k] = out.scores[sub]
        cells["score"][rows, k], cells["success"][rows, k] = out.overall, passed
        referenced = [i for i in rows if sessions[i].turns[k].reference is not None]
        for i in referenced:
            cells["l1"][i, k], cells["psnr"][i, k] = pixel_distance(edited[i], sessions[i].turns[k].reference)
        if similarity is not None and referenced:
            cells["similarity"][referenced, k] = similarity([edited[i] for i in referenced],
                                                            [sessions[i].turns[k].reference for i in referenced])
        if outputs is not None:
            for i in rows:
                outputs.setdefault(sessions[i].id, []).append((edited[i], edit.intents.results[i][k].intent))
        if teacher_forced and k == 0:
            cells["teacher_forced_success"][rows, 0] = passed   # turn 1 is fed the data's source either way
        elif teacher_forced and (fed := [i for i in rows if sessions[i].turns[k].source is not None]):
            given = [sessions[i].turns[k].source for i in fed]
            edited_given = step(k, given, [sessions[i] for i in fed], rows=fed)
            cells["teacher_forced_success"][fed, k] = judge(k, fed, given, edited_given, "data")[1]

    rollout(sessions, step, turns=turns, sources=[s.source for s in sessions], on_turn=score, progress=progress,
            desc=f"bench {editor.name}")
    per_session = {**cells, "overall": np.cumprod(cells["success"], axis=1)}   # NaN from a failed or absent turn on
    if teacher_forced:
        per_session["exposure_gap"] = cells["teacher_forced_success"] - cells["success"]
    per_turn = summarize(per_session)
    for k, row in enumerate(per_turn):
        row["n"] = sum(k < len(s.turns) for s in sessions)
        row["failures"] = sum(f["turn"] == k + 1 and f["fed"] == "own" for f in failures)
        row["overall_n"] = int(np.isfinite(per_session["overall"][:, k]).sum())
        row["intent_failures"] = edit.intents.failures(k)
    return {"editor": editor.name, "sessions": len(sessions), "turns": turns, "seed": seed,
            "steps": steps or editor.default_steps, "intent": spec_of(edit.intents), "reward": reward.name,
            "pass_threshold": threshold, "teacher_forced": teacher_forced, "session_ids": [s.id for s in sessions],
            "failures": failures, "per_turn": per_turn, "per_session": {k: to_json(v) for k, v in per_session.items()}}


def by_size(step: EditStep) -> Step:
    """``step`` on the sessions that have turn k, one input size at a time (a real backend's batch
    shares one size); a session past its last turn keeps its image. An output depends only on its
    session, turn and input (:class:`~mteditlab.rollout.EditStep`), so the grouping changes nothing.
    ``rows``: the sessions' positions in the benchmark's list, when called on a subset."""

    def run(k: int, inputs: list[Image.Image], sessions: Sequence[DataSession],
            rows: Sequence[int] | None = None) -> list[Image.Image]:
        rows = list(range(len(sessions))) if rows is None else list(rows)
        results, groups = list(inputs), {}
        for i, session in enumerate(sessions):
            if k < len(session.turns):
                groups.setdefault(inputs[i].size, []).append(i)
        for group in groups.values():
            outputs = step(k, [inputs[i] for i in group], [sessions[i] for i in group], rows=[rows[i] for i in group])
            for i, image in zip(group, outputs):
                results[i] = image
        return results

    return run


def pixel_distance(image: Image.Image, reference: Image.Image) -> tuple[float, float]:
    """``(L1, PSNR)`` of ``image`` against ``reference`` in RGB pixels scaled to [0, 1], at the image's
    size (the reference resized to it, Lanczos, when they differ): L1 = mean |x − y|,
    PSNR = 10·log10(1 / max(MSE, 1e−10)) dB (100 dB for identical images)."""
    reference = reference.convert("RGB")
    if reference.size != image.size:
        reference = reference.resize(image.size, Image.LANCZOS)
    x, y = (np.asarray(im.convert("RGB"), dtype=np.float64) / 255 for im in (image, reference))
    return float(np.abs(x - y).mean()), float(10 * np.log10(1 / max(((x - y) ** 2).mean(), 1e-10)))


def summarize(per_session: dict[str, np.ndarray]) -> list[dict]:
    """Per turn k: every key's mean and standard error over the sessions that have a value there (NaN:
    none; ``None`` when no session has one), and ``marginal_k`` = #(overall_k = 1) / #(overall_{k−1} = 1)
    among the sessions with an ``overall`` at k (P(turn k succeeds | turns 1..k−1 succeeded)) with its
    binomial s.e. √(m(1 − m)/n)."""
    overall = per_session["overall"]
    rows = []
    for k in range(overall.shape[1]):
        counted = ~np.isnan(overall[:, k])
        prior = overall[counted, k - 1].sum() if k else counted.sum()
        row = {"turn": k + 1}
        for key, values in per_session.items():
            row[key], row[f"{key}_se"] = mean_and_error(values[:, k])
        row["marginal"] = float(overall[counted, k].sum() / prior) if prior else 0.0
        row["marginal_se"] = float(np.sqrt(row["marginal"] * (1 - row["marginal"]) / prior)) if prior else 0.0
        rows.append(row)
    return rows


def mean_and_error(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and :func:`standard_error` of the values that are not NaN; ``(None, None)`` when none is."""
    values = values[~np.isnan(values)]
    return (float(values.mean()), standard_error(values)) if len(values) else (None, None)


def to_json(values: np.ndarray) -> list:
    """A per-session array as nested lists, NaN as None."""
    return [[None if x != x else x for x in row] for row in values.tolist()]


def teacher_forced_success(step: Step, sessions: Sequence[Session], k: int) -> list[bool]:
    """Per session, whether ``step`` passes turn ``k`` fed the true previous scene."""
    truth = [render(s.turns[k].before) for s in sessions]
    return [score_turn(s, k, b, a).success for s, b, a in zip(sessions, truth, step(k, truth, sessions))]


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean, std(values, ddof=1) / √n (0 for fewer than two values)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


PAIRED_KEYS = ("success", "overall", "teacher_forced_success", "exposure_gap")
DATA_PAIRED_KEYS = (*SUB_SCORES, "score", *PAIRED_KEYS, "l1", "psnr", "similarity")
SAME = ("split", "start", "sessions", "turns", "seed", "sessions_from", "session_ids", "reward", "pass_threshold")


def paired(result: dict, reference: dict) -> list[dict]:
    """Per turn, Δ = result − reference and its paired s.e. over the sessions where both sides have a
    value, for ``PAIRED_KEYS`` (on data ``DATA_PAIRED_KEYS``, those both results hold). Both results must
    come from the same sessions and seed (on data also the same reward and threshold)."""
    if differ := [k for k in SAME if result.get(k) != reference.get(k)]:
        raise ValueError("paired comparison needs the same split, sessions, turns and seed on both sides (on data "
                         f"also the same sessions, reward and pass threshold); these differ: {', '.join(differ)}")
    keys = [k for k in (DATA_PAIRED_KEYS if "reward" in result else PAIRED_KEYS)
            if k in result["per_session"] and k in reference["per_session"]]
    rows = []
    for k in range(result["turns"]):
        row = {"turn": k + 1}
        for key in keys:
            d = (np.asarray(result["per_session"][key], dtype=float)[:, k]
                 - np.asarray(reference["per_session"][key], dtype=float)[:, k])
            row[f"delta_{key}"], row[f"delta_{key}_se"] = mean_and_error(d)
        rows.append(row)
    return rows


def pass_at_k(editor: Editor, sessions: Sequence[Session], k: int, *, seed: int = 0, steps: int | None = None,
              intent: Reconstructor | str = "oracle", batch_size: int = 64, progress: bool = True) -> dict:
    """Teacher-forced headroom: every turn sampled ``k`` times (seeds seed..seed+k−1) from the true
    previous scene; pass@1 = mean success, pass@k = P(any of the k succeeds), per turn and per op."""
    turns = len(sessions[0].turns)
    ok = np.zeros((len(sessions), turns, k), dtype=bool)
    samplers = [EditStep(editor.edit_batch, seed=seed + j, steps=steps, intent=intent, batch_size=batch_size)
                for j in range(k)]
    for t in tqdm(range(turns), desc=f"pass@{k}", disable=not progress):
        for j, step in enumerate(samplers):
            ok[:, t, j] = teacher_forced_success(step, sessions, t)
    ops = np.array([[s.turns[t].edit.op for t in range(turns)] for s in sessions])

    def rates(cells: np.ndarray) -> dict:   # [items, k] successes
        return {"n": len(cells), "pass@1": float(cells.mean()), f"pass@{k}": float(cells.any(-1).mean())}

    return {"k": k, "per_turn": [{"turn": t + 1, **rates(ok[:, t])} for t in range(turns)],
            "per_op": {op: rates(ok[ops == op]) for op in sorted(set(ops.flat))}}


def markdown_table(result: dict) -> str:
    """Per turn, each metric as mean ± s.e. (— where no session has a value); on data also the sessions
    with the turn (n) and the judgments that failed; on the world also the intents' agreement table."""
    if "reward" in result:
        counts = ["n", "failures"]
        keys = [k for k in (*SUB_SCORES, "score", "success", "overall", "marginal", "exposure_gap", "l1", "psnr",
                            "similarity") if k in result["per_turn"][0]]
    else:
        counts, keys = [], [k for k in ("if", "cc", "ga", "success", "overall", "marginal", "exposure_gap", "quality",
                                         "tint_255") if k in result["per_turn"][0]]
    lines = ["| turn | " + " | ".join(counts + keys) + " |", "|---" * (len(counts + keys) + 1) + "|"]
    for row in result["per_turn"]:
        cells = [str(row[k]) for k in counts] + [_cell(row[k], row[k + "_se"], "") for k in keys]
        lines.append(f"| {row['turn']} | " + " | ".join(cells) + " |")
    if "intent_exact" in result["per_turn"][0]:
        keys = [key + kind for kind in TURN_KINDS for key in AGREEMENT]
        lines += ["", f"intent ({result['intent']}), the text the editor read against the gold: exact match and "
                      "parse-equivalence, on all / referential / explicit turns, and the reconstructor's failures:",
                  "", "| turn | exact | equivalent | referential exact | referential equivalent | explicit exact | "
                      "explicit equivalent | failures |", "|---" * 8 + "|"]
        for row in result["per_turn"]:
            lines.append(f"| {row['turn']} | " + " | ".join(_cell(row[k], row[k + "_se"], "") for k in keys)
                         + f" | {row['intent_failures']} |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    keys = [k.removeprefix("delta_") for k in rows[0] if k.startswith("delta_") and not k.endswith("_se")]
    lines = ["| turn | " + " | ".join(f"Δ {k}" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['turn']} | " + " | ".join(
            _cell(row['delta_' + k], row['delta_' + k + '_se'], "+") for k in keys) + " |")
    return "\n".join(lines)


def _cell(value: float | None, error: float | None, sign: str) -> str:
    return "—" if value is None else f"{value:{sign}.3f} ± {error:.3f}"


def pass_table(result: dict) -> str:
    k = result["k"]
    lines = [f"| turn / op | n | pass@1 | pass@{k} |", "|---|---|---|---|"]
    for label, row in [(f"turn {r['turn']}", r) for r in result["per_turn"]] + list(result["per_op"].items()):
        lines.append(f"| {label} | {row['n']} | {row['pass@1']:.3f} | {row[f'pass@{k}']:.3f} |")
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None) -> None:
    """Success, overall and (when measured) teacher-forced success vs turn, one colour per result."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, result in enumerate(results):
        label = labels[i] if labels else result["editor"]
        t = [r["turn"] for r in result["per_turn"]]

        def curve(key):   # None (no session has a value) is a gap
            return np.array([r[key] for r in result["per_turn"]], dtype=float)

        line, = ax.plot(t, curve("overall"), "o-", label=f"{label}: overall")
        ax.plot(t, curve("success"), "s--", color=line.get_color(), label=f"{label}: turn success")
        if "teacher_forced_success" in result["per_turn"][0]:
            ax.plot(t, curve("teacher_forced_success"), ":", color=line.get_color(),
                    label=f"{label}: fed the true {'input' if 'reward' in result else 'scene'}")
    ax.set(xlabel="turn", ylabel="rate", ylim=(0, 1.02), title=f"multi-turn editing ({results[0]['split']} split)")
    ax.set_xticks(t)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe_failures(failures: Sequence[dict], shown: int = 20) -> str:
    """The failed judgments, one line each (the first ``shown``)."""
    lines = [f"  session {f['session']}, turn {f['turn']} (fed its {'own output' if f['fed'] == 'own' else 'data input'})"
             f": {f['reason']}" for f in failures[:shown]]
    more = f"\n  … and {len(failures) - shown} more (the JSON's failures lists them all)" if len(failures) > shown else ""
    return (f"{len(failures)} judgment(s) failed: no score there, and the session's overall is left out from "
            "that turn on:\n" + "\n".join(lines) + more)


def main(argv: list[str] | None = None, keep: dict | None = None) -> dict:
    """Run the command line ``argv``; return the result. ``keep``, when given, receives the evaluated
    ``sessions`` and the ``sides``, ``(editor, adapter, (output, intent told) per turn by session id)``
    each, of a paired run on data sessions (what ``python -m labeling queue-bench`` stores as labeling
    items)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editor", default="mini", choices=EDITORS)
    parser.add_argument("--adapter", metavar="DIR", help="directory of an RL-tuned LoRA adapter")
    parser.add_argument("--editor-path", help="base weights: mini checkpoint dir, or a model id for real backends")
    parser.add_argument("--split", default="test",
                        help="the world's train, val or test; on data the dataset's split (default: %(default)s)")
    parser.add_argument("--sessions", type=int, help="how many sessions (default: 200 on the world, all on data)")
    parser.add_argument("--start", type=int, default=0, help="first session index")
    parser.add_argument("--turns", type=int,
                        help="turns per session (default: 5 on the world; on data each session's, at most this many)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the editor's)")
    parser.add_argument("--intent", default="oracle", metavar="SPEC",
                        help="the intent reconstructor: oracle (the gold intent; on data the intents column), rule "
                             "(the world's resolver on the images), mini[:DIR], served:URL (an OpenAI-compatible "
                             "endpoint), none (the instruction alone) or concat (the history joined) "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1,
                        help="world: split the sessions over this many processes of one torch thread each, both "
                             "sides of --against at once (2 on a 2-core machine; default: %(default)s)")
    parser.add_argument("--against", help="paired comparison: 'base' (no adapter) or another adapter directory")
    parser.add_argument("--against-result", type=Path,
                        help="paired comparison with a result saved by --json on the same sessions and seed")
    parser.add_argument("--pass-at", type=int, help="teacher-forced pass@1 vs pass@K headroom instead")
    parser.add_argument("--json", type=Path, help="write the metrics here")
    parser.add_argument("--plot", type=Path, help="write a PNG of success vs turn here")
    parser.add_argument("--teacher-forced", action=argparse.BooleanOptionalAction, default=None,
                        help="also feed every turn its true input (the world's true previous scene; on data, the "
                             "data's own input of the turn) and report the exposure gap (default: on for the world, "
                             "off for data; --no-teacher-forced about halves the world's cost)")
    data = parser.add_argument_group("data sessions, judged by a reward instead of the world's verifier")
    data.add_argument("--sessions-from", metavar="DATA",
                      help=".jsonl / .parquet / folder / hf://NAME, as the trainer reads it")
    data.add_argument("--resolution", help="kontext | qwen-edit | N (≈ N² pixels): the data images' size "
                                           "(default: the editor's)")
    data.add_argument("--reward", metavar="NAME",
                      help="the registered reward that judges every turn, named as in training (qwen-vl, judge, ...)")
    data.add_argument("--reward-paths", default="", metavar="NAME=PATH,...",
                      help="a reward's weights, artifact or served http(s)://HOST:PORT/v1 URL, as in training")
    data.add_argument("--pass-threshold", type=float, default=0.5,
                      help="a turn succeeds when the reward's overall score is at least this (default: %(default)s)")
    data.add_argument("--similarity-model", type=Path, metavar="DIR",
                      help="a local vision model with its image processor (DINO, CLIP): also report the cosine "
                           "similarity of each output to its reference in its embedding space")
    add_column_arguments(parser)
    args = parser.parse_args(argv)
    if args.against and args.against_result:
        parser.error("give --against or --against-result, not both")

    try:
        reconstructor = build_reconstructor(args.intent)
    except ReconstructorError as error:
        parser.error(f"--intent: {error}")
    options = dict(seed=args.seed, steps=args.steps, intent=reconstructor, batch_size=args.batch_size)
    if args.sessions_from:
        sessions, skipped, reward = load_data(args, parser)
        similarity = ImageSimilarity(args.similarity_model) if args.similarity_model else None
        title = (f"\n{args.editor}{' + ' + args.adapter if args.adapter else ''} on {args.sessions_from} ({args.split}): "
                 f"{len(sessions)} sessions × up to {max(len(s.turns) for s in sessions)} turns, judged by "
                 f"{args.reward} (success: score ≥ {args.pass_threshold:g}), intent={args.intent}\n")

        def bench(editor: Editor, outputs: dict | None = None) -> dict:
            result = run_data_benchmark(editor, sessions, reward, threshold=args.pass_threshold,
                                        teacher_forced=bool(args.teacher_forced), outputs=outputs,
                                        similarity=similarity, **options)
            return {**result, "split": args.split, "start": args.start, "sessions_from": args.sessions_from,
                    "skipped": skipped}
    else:
        data_only = [f"--{flag.replace('_', '-')}" for flag in ("reward", "resolution", "similarity_model")
                     if getattr(args, flag)] + ["the column flags"] * (columns_from(args) is not None)
        if data_only:
            parser.error(f"{', '.join(data_only)}: for data sessions (--sessions-from); the world is judged by its "
                         "verifier")
        if args.split not in WORLD_SPLITS:
            parser.error(f"the world's splits are {', '.join(WORLD_SPLITS)}")
        count, turns = 200 if args.sessions is None else args.sessions, 5 if args.turns is None else args.turns
        sessions = make_sessions(args.split, count, turns, start=args.start)
        title = (f"\n{args.editor}{' + ' + args.adapter if args.adapter else ''} on {args.split}: {count} sessions "
                 f"from {args.start} × {turns} turns, intent={args.intent}\n")

        def bench(editor: Editor, outputs: dict | None = None) -> dict:
            return run_benchmark(editor, sessions, teacher_forced=args.teacher_forced is not False, **options)

    started = time.perf_counter()
    sharded = []
    if args.workers > 1:
        if args.sessions_from or args.pass_at:
            parser.error("--workers shards the world's benchmark; data sessions and --pass-at run in one process")
        sides = [(args.editor, args.adapter, args.editor_path)]
        if args.against:
            sides.append((args.editor, None if args.against == "base" else args.against, args.editor_path))
        sharded = run_sharded(sides, sessions, args.workers, **{**options, "intent": args.intent},
                              teacher_forced=args.teacher_forced is not False)
    editor = None if sharded else get_editor(args.editor, lora=args.adapter, path=args.editor_path)
    outputs = {"this": {}, "other": {}} if keep is not None else {}
    if args.pass_at:
        result = pass_at_k(editor, sessions, args.pass_at, **options)
        print(title + "\n" + pass_table(result))
    else:
        result = sharded[0] if sharded else bench(editor, outputs.get("this"))
        result["lora"] = args.adapter
        print(title + "\n" + markdown_table(result))
        if result.get("skipped"):
            print("\n" + describe_skipped(args.sessions_from, result["skipped"]))
        report(result)
    if (args.against or args.against_result) and not args.pass_at:
        if args.against:
            lora = None if args.against == "base" else args.against
            if sharded:
                reference = sharded[1]
            else:
                del editor   # one set of weights in memory at a time (real backends are 12–20B parameters)
                reference = bench(get_editor(args.editor, lora=lora, path=args.editor_path), outputs.get("other"))
            reference["lora"] = lora
        else:
            reference = json.loads(args.against_result.read_text())
        name = args.against or str(args.against_result)
        result = {**result, "against": reference, "paired": paired(result, reference)}
        print(f"\nagainst {name}:\n\n{markdown_table(reference)}\n\nΔ = this − {name} "
              f"(± paired s.e.):\n\n{paired_table(result['paired'])}")
        report(reference)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{result['seconds'] / 60:.1f} minutes ({args.workers} process{'es' * (args.workers > 1)})")
    if keep is not None:
        keep.update(sessions=sessions, sides=[(args.editor, args.adapter, outputs["this"]),
                                              (args.editor, result.get("against", {}).get("lora"), outputs["other"])])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot and not args.pass_at:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot([result, result["against"]] if "against" in result else [result], args.plot,
             labels=[args.adapter or args.editor_path or args.editor, name] if "against" in result else None)
    return result


def report(result: dict) -> None:
    """The judgments of a data run that failed (nothing on the world)."""
    if result.get("failures"):
        print(f"\n{result['editor']}{' + ' + result['lora'] if result.get('lora') else ''}: "
              + describe_failures(result["failures"]))


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[DataSession], list[dict], RewardModel]:
    """``--sessions-from``'s sessions (from ``--start``, at most ``--sessions`` of them, each cut to at
    most ``--turns`` turns), the records skipped, and the ``--reward`` that judges them."""
    if not args.reward:
        parser.error("data sessions have no verifier: name the reward that judges each turn, e.g. --reward qwen-vl "
                     "--reward-paths qwen-vl=http://HOST:PORT/v1 (a served judge) or --reward judge (offline)")
    if args.pass_at:
        parser.error("--pass-at samples from the world's true scenes; on data, --teacher-forced feeds the data's inputs")
    if str(args.sessions_from).endswith(".duckdb"):
        parser.error("a label store's arena sessions are read by the trainer (python -m training.grpo --sessions-from "
                     "DB); the benchmark reads datasets: .jsonl / .parquet / folder / hf://NAME")
    skipped: list[dict] = []
    try:
        sessions = read_sessions(args.sessions_from, resolution=data_resolution(args.editor, args.resolution),
                                 split=args.split, columns=columns_from(args), skipped=skipped,
                                 limit=None if args.sessions is None else args.start + args.sessions)[args.start:]
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.turns:
        sessions = [replace(s, turns=s.turns[:args.turns]) for s in sessions]
    if not sessions:
        parser.error(f"{args.sessions_from} ({args.split}): no session to evaluate"
                     + ("\n" + describe_skipped(args.sessions_from, skipped) if skipped else ""))
    paths = mapping(str)(args.reward_paths)
    reward = get_reward(args.reward, **({"path": paths[args.reward]} if args.reward in paths else {}))
    return sessions, skipped, reward


if __name__ == "__main__":
    main()
