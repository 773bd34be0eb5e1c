"""What the trainer's rollouts look like as inputs to the next turn, by where the SDE window sits.

    python -m bench.own_states --sessions 16 --turns 5 --json docs/own_states.json

The trainer samples each turn by the ODE except for ``sde_window`` steps, where Flow-GRPO's Gaussian
step adds noise of std a·sqrt(σ/(1 − σ))·sqrt(−dt). Noise added at a late step (small σ) is not
denoised by the steps after it, so the turn's output carries it into the next turn's input. For each
window start (and the plain ODE) this draws the same sessions and seeds with the base editor and
reports, over every turn of every rollout:

* ``pass``: the verifier's success of the turn (own previous output as input);
* ``quality``: pixel quality of the outputs (1 = a pixel-exact render of the scene they show);
* ``loss_own`` / ``loss_render``: the base's flow-matching loss on (own input, intent, target) with
  target = the output itself / the clean render of the scene the verifier reads in it (RFT's
  ``own`` / ``render`` examples, passed turns only), beside ``loss_gold`` on the sessions' true pairs
  and ``loss_render_clean_input`` (the same render targets, each input replaced by the clean render of
  the scene it shows): what the base's velocity pays for inputs that are not clean renders.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mteditlab.editors.mini import MiniEditor
from mteditlab.rewards.features import image_features, parse_cached
from mteditlab.world import render
from mteditlab.world.verifier import score_turn
from training.config import GRPOConfig
from training.objectives.base import flow_matching_loss
from training.objectives.rft import rft_examples
from training.objectives.sft import gold_examples
from training.sampling import WorldSessions, sample_turns


def mean_loss(editor: MiniEditor, examples: list[tuple], draws: int = 8, seed: int = 1) -> float:
    """The flow-matching loss on ``examples`` averaged over ``draws`` noise and time draws (NaN: none)."""
    if not examples:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(np.mean([flow_matching_loss(editor, examples, generator).item() for _ in range(draws)]))


def measure(editor: MiniEditor, cfg: GRPOConfig, start: int | None) -> dict:
    """One row: rollouts with the SDE window at ``start`` (None: every step by the ODE, noise 0)."""
    cfg = replace(cfg, noise_level=0.0) if start is None else replace(cfg, sde_window_starts=f"{start}-{start}")
    source = WorldSessions(cfg)
    sessions = source.draw(0)
    turns = sample_turns(editor, sessions, [source.image(s) for s in sessions], cfg, 0)
    S, G, T = len(sessions), cfg.num_generations, cfg.turns
    passed = np.zeros((S, G, T), bool)
    for k, turn in enumerate(turns):
        for i in range(S * G):
            passed[i // G, i % G, k] = score_turn(sessions[i // G], k, turn.before[i], turn.after[i]).success
    quality = [image_features(image)["quality"] for turn in turns for image in turn.after]
    render_examples = rft_examples(editor, turns, passed, "render")
    clean_inputs = [(render(parse_cached(image, image.width), image.width), text, x0)
                    for image, text, x0 in render_examples]
    return {"window_start": "ODE" if start is None else start, "pass": passed.mean((0, 1)).round(3).tolist(),
            "quality": float(np.mean(quality)),
            "loss_gold": mean_loss(editor, gold_examples(editor, sessions, cfg)),
            "loss_own": mean_loss(editor, rft_examples(editor, turns, passed, "own")),
            "loss_render": mean_loss(editor, render_examples),
            "loss_render_clean_input": mean_loss(editor, clean_inputs)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editor-path", help="mini checkpoint (default: the shipped base)")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    editor = MiniEditor.from_pretrained(args.editor_path)
    cfg = GRPOConfig(sessions_per_step=args.sessions, num_generations=args.num_generations, turns=args.turns,
                     steps=args.steps, noise_level=args.noise_level, op_weights={})
    rows = [measure(editor, cfg, start) for start in (None, *range(1, args.steps - cfg.sde_window + 1))]
    keys = ["quality", "loss_gold", "loss_own", "loss_render", "loss_render_clean_input"]
    print(f"| SDE window start | pass per turn | {' | '.join(keys)} |\n|---" + "|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {row['window_start']} | {' '.join(f'{p:.2f}' for p in row['pass'])} | "
              + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
