"""The multi-turn benchmark: run an editor over sessions, each turn fed its own previous output.

    python -m mteditlab.bench --editor mini [--lora DIR] [--split test] [--sessions 200] [--turns 5]

Per turn k it reports IF, CC, GA and success; ``overall_k`` = fraction of sessions whose turns 1..k
all succeeded; ``marginal_k`` = P(turn k succeeds | turns 1..k−1 succeeded); ``exposure_gap_k`` =
success of turn k fed the *true* previous scene minus success fed the editor's own output.
It also reports how the outputs look, whatever their content (:mod:`mteditlab.rewards.features`):
``quality`` (1 = a pixel-exact render of the scene the image shows) and ``tint_255`` (the distance of
the background from the nearest palette colour, in 0–255 units: what tint-averse people notice).
Every per-turn rate comes with its standard error over sessions (``KEY_se``).

    python -m mteditlab.bench --editor mini --lora DIR --against base   # paired: Δ ± paired s.e. per turn
    python -m mteditlab.bench --editor mini --pass-at 8 --split val     # headroom: pass@1 vs pass@K

``--against`` runs a second editor (``base`` = the same backend without the adapter, or another adapter
directory) on the same sessions and seeds and reports Δ = this − that per turn with the paired standard
error s.e.(Δ) = std(d_i) / √n over the per-session differences d_i; ``--against-result R.json`` pairs
with a result saved earlier by ``--json`` (same split, sessions and seed) instead of running it again. ``--pass-at K`` samples every turn
K times from the true previous scene (teacher-forced, seeds ``seed..seed+K−1``) and reports pass@1 (mean
success) and pass@K (any success) per turn and per operation. ``--start N`` takes sessions N, N+1, ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from mteditlab.editors import EDITORS, Editor, get_editor
from mteditlab.intent import INTENT_MODES
from mteditlab.rewards.features import TINT_SCALE, image_features, parse_cached
from mteditlab.rollout import Step, edit_step, rollout
from mteditlab.world import Session, render, score_turn, sessions as make_sessions


def run_benchmark(editor: Editor, sessions: Sequence[Session], *, seed: int = 0, steps: int | None = None,
                  intent: str = "reconstruct", batch_size: int = 64, progress: bool = True) -> dict:
    """Roll ``editor`` over ``sessions`` (own outputs) and, from turn 2 on, also from the true previous
    scene; return the metrics dictionary (see module docstring)."""
    turns = len(sessions[0].turns)
    step = edit_step(editor.edit_batch, seed=seed, steps=steps, intent=intent, batch_size=batch_size)
    own = np.zeros((len(sessions), turns, 4))  # if, cc, ga, success
    looks = np.zeros((len(sessions), turns, 2))  # quality, tint
    forced = np.zeros((len(sessions), turns))

    def score(k: int, inputs: list[Image.Image], outputs: list[Image.Image]) -> None:
        for i, (s, before, after) in enumerate(zip(sessions, inputs, outputs)):
            scene = parse_cached(after, after.width)  # parsed once: the verdict, the looks, the next turn
            own[i, k] = list(score_turn(s, k, parse_cached(before, before.width), scene).as_dict().values())
            features = image_features(after, after.width, scene=scene)
            looks[i, k] = features["quality"], features["tint"] * TINT_SCALE * 255
        forced[:, k] = teacher_forced_success(step, sessions, k) if k else own[:, 0, 3]

    rollout(sessions, step, turns=turns, sources=[render(s.source) for s in sessions], on_turn=score,
            progress=progress, desc=f"bench {editor.name}")
    all_ok = np.cumprod(own[:, :, 3], axis=1)
    per_session = {"if": own[:, :, 0], "cc": own[:, :, 1], "ga": own[:, :, 2], "success": own[:, :, 3],
                   "overall": all_ok, "teacher_forced_success": forced, "exposure_gap": forced - own[:, :, 3],
                   "quality": looks[:, :, 0], "tint_255": looks[:, :, 1]}
    per_turn = []
    for k in range(turns):
        prior = all_ok[:, k - 1].sum() if k else len(sessions)
        row = {"turn": k + 1}
        for key, values in per_session.items():
            row[key], row[f"{key}_se"] = float(values[:, k].mean()), standard_error(values[:, k])
        row["marginal"] = float(all_ok[:, k].sum() / prior) if prior else 0.0
        row["marginal_se"] = float(np.sqrt(row["marginal"] * (1 - row["marginal"]) / prior)) if prior else 0.0
        per_turn.append(row)
    return {"editor": editor.name, "split": sessions[0].split, "start": sessions[0].index, "sessions": len(sessions),
            "turns": turns, "seed": seed, "steps": steps or editor.default_steps, "intent": intent,
            "per_turn": per_turn, "per_session": {k: v.tolist() for k, v in per_session.items()}}


def teacher_forced_success(step: Step, sessions: Sequence[Session], k: int) -> list[bool]:
    """Per session, whether ``step`` passes turn ``k`` fed the true previous scene."""
    truth = [render(s.turns[k].before) for s in sessions]
    return [score_turn(s, k, b, a).success for s, b, a in zip(sessions, truth, step(k, truth, sessions))]


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean, std(values, ddof=1) / √n (0 for fewer than two values)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


PAIRED_KEYS = ("success", "overall", "teacher_forced_success", "exposure_gap")


def paired(result: dict, reference: dict) -> list[dict]:
    """Per turn, Δ = result − reference and its paired s.e. over sessions, for ``PAIRED_KEYS``.
    Both results must come from the same sessions and seed."""
    same = ("split", "start", "sessions", "turns", "seed")
    if [result.get(k) for k in same] != [reference.get(k) for k in same]:
        raise ValueError("paired comparison needs the same split, sessions, turns and seed on both sides")
    rows = []
    for k in range(result["turns"]):
        row = {"turn": k + 1}
        for key in PAIRED_KEYS:
            d = np.asarray(result["per_session"][key])[:, k] - np.asarray(reference["per_session"][key])[:, k]
            row[f"delta_{key}"], row[f"delta_{key}_se"] = float(d.mean()), standard_error(d)
        rows.append(row)
    return rows


def pass_at_k(editor: Editor, sessions: Sequence[Session], k: int, *, seed: int = 0, steps: int | None = None,
              intent: str = "reconstruct", batch_size: int = 64, progress: bool = True) -> dict:
    """Teacher-forced headroom: every turn sampled ``k`` times (seeds seed..seed+k−1) from the true
    previous scene; pass@1 = mean success, pass@k = P(any of the k succeeds), per turn and per op."""
    turns = len(sessions[0].turns)
    ok = np.zeros((len(sessions), turns, k), dtype=bool)
    samplers = [edit_step(editor.edit_batch, seed=seed + j, steps=steps, intent=intent, batch_size=batch_size)
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
    keys = ["if", "cc", "ga", "success", "overall", "marginal", "exposure_gap", "quality", "tint_255"]
    lines = ["| turn | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in result["per_turn"]:
        lines.append(f"| {row['turn']} | " + " | ".join(f"{row[k]:.3f} ± {row[k + '_se']:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    lines = ["| turn | " + " | ".join(f"Δ {k}" for k in PAIRED_KEYS) + " |", "|---" * (len(PAIRED_KEYS) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['turn']} | " + " | ".join(
            f"{row['delta_' + k]:+.3f} ± {row['delta_' + k + '_se']:.3f}" for k in PAIRED_KEYS) + " |")
    return "\n".join(lines)


def pass_table(result: dict) -> str:
    k = result["k"]
    lines = [f"| turn / op | n | pass@1 | pass@{k} |", "|---|---|---|---|"]
    for label, row in [(f"turn {r['turn']}", r) for r in result["per_turn"]] + list(result["per_op"].items()):
        lines.append(f"| {label} | {row['n']} | {row['pass@1']:.3f} | {row[f'pass@{k}']:.3f} |")
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None) -> None:
    """Success, overall and teacher-forced success vs turn, one colour per result."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, result in enumerate(results):
        label = labels[i] if labels else result["editor"]
        t = [r["turn"] for r in result["per_turn"]]
        line, = ax.plot(t, [r["overall"] for r in result["per_turn"]], "o-", label=f"{label}: overall")
        ax.plot(t, [r["success"] for r in result["per_turn"]], "s--", color=line.get_color(), label=f"{label}: turn success")
        ax.plot(t, [r["teacher_forced_success"] for r in result["per_turn"]], ":", color=line.get_color(),
                label=f"{label}: fed the true scene")
    ax.set(xlabel="turn", ylabel="rate", ylim=(0, 1.02), title=f"multi-turn editing ({results[0]['split']} split)")
    ax.set_xticks(t)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editor", default="mini", choices=EDITORS)
    parser.add_argument("--lora", help="directory of an RL-tuned LoRA adapter")
    parser.add_argument("--editor-path", help="base weights: mini checkpoint dir, or a model id for real backends")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--start", type=int, default=0, help="first session index")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the editor's)")
    parser.add_argument("--intent", default="reconstruct", choices=INTENT_MODES)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--against", help="paired comparison: 'base' (no adapter) or another adapter directory")
    parser.add_argument("--against-result", type=Path,
                        help="paired comparison with a result saved by --json on the same sessions and seed")
    parser.add_argument("--pass-at", type=int, help="teacher-forced pass@1 vs pass@K headroom instead")
    parser.add_argument("--json", type=Path, help="write the metrics here")
    parser.add_argument("--plot", type=Path, help="write a PNG of success vs turn here")
    args = parser.parse_args(argv)

    editor = get_editor(args.editor, lora=args.lora, path=args.editor_path)
    sessions = make_sessions(args.split, args.sessions, args.turns, start=args.start)
    options = dict(seed=args.seed, steps=args.steps, intent=args.intent, batch_size=args.batch_size)
    title = (f"\n{args.editor}{' + ' + args.lora if args.lora else ''} on {args.split}: {args.sessions} sessions "
             f"from {args.start} × {args.turns} turns, intent={args.intent}\n")
    if args.pass_at:
        result = pass_at_k(editor, sessions, args.pass_at, **options)
        print(title + "\n" + pass_table(result))
    else:
        result = run_benchmark(editor, sessions, **options)
        result["lora"] = args.lora
        print(title + "\n" + markdown_table(result))
    if args.against and args.against_result:
        parser.error("give --against or --against-result, not both")
    if (args.against or args.against_result) and not args.pass_at:
        if args.against:
            del editor   # one set of weights in memory at a time (real backends are 12–20B parameters)
            other = get_editor(args.editor, lora=None if args.against == "base" else args.against,
                               path=args.editor_path)
            reference = run_benchmark(other, sessions, **options)
            reference["lora"] = None if args.against == "base" else args.against
        else:
            reference = json.loads(args.against_result.read_text())
        name = args.against or str(args.against_result)
        result = {**result, "against": reference, "paired": paired(result, reference)}
        print(f"\nagainst {name}:\n\n{markdown_table(reference)}\n\nΔ = this − {name} "
              f"(± paired s.e.):\n\n{paired_table(result['paired'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot and not args.pass_at:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot([result, result["against"]] if "against" in result else [result], args.plot,
             labels=[args.lora or args.editor_path or args.editor, name] if "against" in result else None)
    return result


if __name__ == "__main__":
    main()
