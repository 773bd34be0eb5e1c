"""The multi-turn benchmark: run an editor over sessions, each turn fed its own previous output.

    python -m mteditlab.bench --editor mini [--lora DIR] [--split test] [--sessions 200] [--turns 5]

Per turn k it reports IF, CC, GA and success; ``overall_k`` = fraction of sessions whose turns 1..k
all succeeded; ``marginal_k`` = P(turn k succeeds | turns 1..k−1 succeeded); ``exposure_gap_k`` =
success of turn k fed the *true* previous scene minus success fed the editor's own output.
It also reports how the outputs look, whatever their content (:mod:`mteditlab.rewards.features`):
``quality`` (1 = a pixel-exact render of the scene the image shows) and ``tint_255`` (the distance of
the background from the nearest palette colour, in 0–255 units: what tint-averse people notice).
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
from mteditlab.intent import INTENT_MODES, turn_seed, turn_text
from mteditlab.rewards.features import TINT_SCALE, image_features, parse_cached
from mteditlab.world import Session, render, score_turn, sessions as make_sessions


def _edit_all(editor: Editor, inputs: list[Image.Image], items: list[tuple[Session, int]], *, seed: int,
              steps: int | None, intent: str, batch_size: int) -> list[Image.Image]:
    outputs = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts = [turn_text(s, k, intent) for s, k in chunk]
        outputs += editor.edit_batch(inputs[start:start + batch_size], [t[0] for t in texts],
                                     intents=[t[1] for t in texts],
                                     seeds=[turn_seed(seed, s.index, k) for s, k in chunk], steps=steps)
    return outputs


def run_benchmark(editor: Editor, sessions: Sequence[Session], *, seed: int = 0, steps: int | None = None,
                  intent: str = "reconstruct", batch_size: int = 64, progress: bool = True) -> dict:
    """Roll ``editor`` over ``sessions`` (own outputs) and, from turn 2 on, also from the true previous
    scene; return the metrics dictionary (see module docstring)."""
    turns = len(sessions[0].turns)
    current = [render(s.source) for s in sessions]
    own = np.zeros((len(sessions), turns, 4))  # if, cc, ga, success
    looks = np.zeros((len(sessions), turns, 2))  # quality, tint
    forced = np.zeros((len(sessions), turns))
    for k in tqdm(range(turns), desc=f"bench {editor.name}", disable=not progress):
        items = [(s, k) for s in sessions]
        outputs = _edit_all(editor, current, items, seed=seed, steps=steps, intent=intent, batch_size=batch_size)
        for i, (s, before, after) in enumerate(zip(sessions, current, outputs)):
            scene = parse_cached(after, after.width)  # parsed once: the verdict, the looks, the next turn
            own[i, k] = list(score_turn(s, k, parse_cached(before, before.width), scene).as_dict().values())
            features = image_features(after, after.width, scene=scene)
            looks[i, k] = features["quality"], features["tint"] * TINT_SCALE * 255
        if k == 0:
            forced[:, 0] = own[:, 0, 3]
        else:
            truth = [render(s.turns[k].before) for s in sessions]
            tf_out = _edit_all(editor, truth, items, seed=seed, steps=steps, intent=intent, batch_size=batch_size)
            forced[:, k] = [score_turn(s, k, b, a).success for s, b, a in zip(sessions, truth, tf_out)]
        current = outputs
    all_ok = np.cumprod(own[:, :, 3], axis=1)
    per_turn = []
    for k in range(turns):
        prior = all_ok[:, k - 1].sum() if k else len(sessions)
        per_turn.append({
            "turn": k + 1,
            "if": float(own[:, k, 0].mean()), "cc": float(own[:, k, 1].mean()), "ga": float(own[:, k, 2].mean()),
            "success": float(own[:, k, 3].mean()),
            "overall": float(all_ok[:, k].mean()),
            "marginal": float(all_ok[:, k].sum() / prior) if prior else 0.0,
            "teacher_forced_success": float(forced[:, k].mean()),
            "exposure_gap": float(forced[:, k].mean() - own[:, k, 3].mean()),
            "quality": float(looks[:, k, 0].mean()), "tint_255": float(looks[:, k, 1].mean()),
        })
    return {"editor": editor.name, "split": sessions[0].split, "sessions": len(sessions), "turns": turns,
            "seed": seed, "steps": steps or editor.default_steps, "intent": intent, "per_turn": per_turn}


def markdown_table(result: dict) -> str:
    keys = ["if", "cc", "ga", "success", "overall", "marginal", "exposure_gap", "quality", "tint_255"]
    lines = ["| turn | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in result["per_turn"]:
        lines.append(f"| {row['turn']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
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
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the editor's)")
    parser.add_argument("--intent", default="reconstruct", choices=INTENT_MODES)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the metrics here")
    parser.add_argument("--plot", type=Path, help="write a PNG of success vs turn here")
    args = parser.parse_args(argv)

    editor = get_editor(args.editor, lora=args.lora, path=args.editor_path)
    result = run_benchmark(editor, make_sessions(args.split, args.sessions, args.turns), seed=args.seed,
                           steps=args.steps, intent=args.intent, batch_size=args.batch_size)
    result["lora"] = args.lora
    print(f"\n{args.editor}{' + ' + args.lora if args.lora else ''} on {args.split}: "
          f"{args.sessions} sessions × {args.turns} turns, intent={args.intent}\n")
    print(markdown_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot([result], args.plot)
    return result


if __name__ == "__main__":
    main()
