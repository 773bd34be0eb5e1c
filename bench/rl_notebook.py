"""The RL lab notebook: one row per training run, paired with the base on the same `val` sessions.

    python -m mteditlab.bench --adapter runs/X/adapter --split val --sessions 1000 --turns 10 \\
        --no-teacher-forced --workers 2 --against-result runs/bench/base-val.json --json runs/X/val.json
    python -m bench.rl_notebook add runs/X --val runs/X/val.json --stopped "the 35-minute budget"

``add`` appends the run's row to ``docs/rl_notebook.jsonl`` and rewrites the table in
``docs/rl_notebook.md`` (the text outside the table is kept). A row holds: the commit, the command
(the flags that differ from the defaults, from the run's ``config.json``), training minutes and images
sampled (``metrics.jsonl``), Δ overall at turns 5 and 10 ± paired s.e. (the benchmark's ``paired``),
the exposure gap and the background tint (0–255) at turn 10, the fraction of rollouts whose advantage was zero (GRPO,
NFT) and the drift E‖v_θ − v_base‖² of the exported adapter on 256 teacher-forced `val` pairs at fixed
(t, ε) (:func:`velocity_drift`), and why the run stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from mteditlab.editors import get_editor
from mteditlab.world import render, sessions as make_sessions
from training.config import GRPOConfig
from training.objectives import OBJECTIVES

ROWS, PAGE = Path("docs/rl_notebook.jsonl"), Path("docs/rl_notebook.md")
BEGIN, END = "<!-- rows: python -m bench.rl_notebook add -->", "<!-- /rows -->"


def velocity_drift(adapter: str | Path, base: str | Path | None = None, pairs: int = 256, seed: int = 0) -> float:
    """E‖v_θ − v_base‖² per latent element on ``pairs`` teacher-forced `val` pairs (true scene before,
    gold intent, true scene after) at forward-process times t ~ U(0, 1) and noise ε fixed by ``seed``;
    ``base``: the base weights the adapter was trained on (default: the shipped base)."""
    editor = get_editor("mini", lora=adapter, path=base, fuse=False)
    turns = [(s, k) for s in make_sessions("val", pairs // 4 + 1, 4) for k in range(4)][:pairs]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = editor.encode([render(s.turns[k].before) for s, k in turns], [s.turns[k].intent for s, k in turns])
        x0 = editor.encode_images([render(s.turns[k].after) for s, k in turns])
        t = torch.rand(len(turns), generator=generator)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator)
        tuned = editor.velocity(x_t, t, cond)
        with editor.adapter_disabled():
            base = editor.velocity(x_t, t, cond)
    return float(((tuned - base) ** 2).mean())


def run_row(run: Path, val: dict, stopped: str, commit: str = "HEAD") -> dict:
    """The notebook row of training run ``run`` (trained at ``commit``) benchmarked as ``val`` (a
    paired benchmark result)."""
    config = json.loads((run / "config.json").read_text())
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r.get("kind") == "train"]
    sampled = config["sessions_per_step"] * config["num_generations"] * config["turns"]
    paired = {r["turn"]: r for r in val["paired"]}
    gap = val["per_turn"][-1].get("exposure_gap")
    zero = [r["zero_advantage"] for r in train if "zero_advantage" in r]
    return {
        "run": run.name,
        "commit": subprocess.run(["git", "rev-parse", "--short", commit], capture_output=True, text=True).stdout.strip(),
        "command": command_of(config),
        "iterations": len(train),
        "train_minutes": round(train[-1]["train_minutes"], 1) if train else 0.0,
        "images_sampled": sampled * len(train) if OBJECTIVES[config["algo"]].samples else 0,
        "val_sessions": val["sessions"],
        **{f"delta_overall_t{k}": paired[k]["delta_overall"] for k in (5, 10) if k in paired},
        **{f"delta_overall_t{k}_se": paired[k]["delta_overall_se"] for k in (5, 10) if k in paired},
        "exposure_gap_t10": gap,
        "tint_t10": val["per_turn"][-1]["tint_255"],
        "base_tint_t10": val["against"]["per_turn"][-1]["tint_255"],
        "zero_advantage": float(np.mean(zero)) if zero else None,
        "drift": velocity_drift(run / "adapter", config["editor_path"]),
        "stopped": stopped,
    }


def command_of(config: dict) -> str:
    """The training command of a run's ``config.json``: the flags whose value differs from the default."""
    defaults = GRPOConfig()
    flags = []
    for name, value in config.items():
        if name != "out" and value != getattr(defaults, name):
            setattr(defaults, name, value)
            flags.append(defaults.as_flag(name))
    return " ".join(["python -m training.grpo --lora", *flags])


def table(rows: list[dict]) -> str:
    """The notebook's Markdown table."""
    def delta(row, k):
        return f"{row[f'delta_overall_t{k}']:+.3f} ± {row[f'delta_overall_t{k}_se']:.3f}" if f"delta_overall_t{k}" in row else "—"

    def maybe(value, form):
        return "—" if value is None else format(value, form)

    lines = ["| run | commit | command | min | images | Δ overall t5 | Δ overall t10 | gap t10 | tint t10 (base) | zero-adv. "
             "| drift | stopped |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['commit']} | `{r['command']}` | {r['train_minutes']:.0f} | {r['images_sampled']:,} "
                     f"| {delta(r, 5)} | {delta(r, 10)} | {maybe(r['exposure_gap_t10'], '.3f')} "
                     f"| {r['tint_t10']:.2f} ({r['base_tint_t10']:.2f}) "
                     f"| {maybe(r['zero_advantage'], '.2f')} | {r['drift']:.2e} | {r['stopped']} |")
    return "\n".join(lines)


def write_page(rows: list[dict]) -> None:
    """Rewrite the table between the markers of ``docs/rl_notebook.md``."""
    page = PAGE.read_text()
    head, rest = page.split(BEGIN)
    PAGE.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{rest.split(END)[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="append a run's row")
    add.add_argument("run", type=Path, help="the training run's directory (config.json, metrics.jsonl, adapter/)")
    add.add_argument("--val", type=Path, required=True, help="its paired benchmark on val (--json of mteditlab.bench)")
    add.add_argument("--stopped", required=True, help="why the run stopped")
    add.add_argument("--commit", default="HEAD", help="the commit the run was trained at (default: %(default)s)")
    commands.add_parser("render", help="rewrite the table from docs/rl_notebook.jsonl")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.exists() else []
    if args.command == "add":
        val = json.loads(args.val.read_text())
        if "paired" not in val or val["split"] != "val":
            parser.error(f"{args.val}: a paired benchmark on the val split is needed (--against-result base-val.json)")
        rows = [r for r in rows if r["run"] != args.run.name] + [run_row(args.run, val, args.stopped, args.commit)]
        ROWS.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_page(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
