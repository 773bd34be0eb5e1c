"""Cost of one multi-turn GRPO / NFT iteration on the mini editor, split by phase.

    python -m bench.grpo_step [--iterations 5] [--json out/bench/grpo_step.json] [TRAINER FLAGS ...]

Runs the real trainer (``training.grpo.train``) for a few iterations with the default configuration,
changed by any trainer flags given (``--algo grpo``, ``--steps 8``, ...), into a scratch directory and
reports medians of seconds per iteration (rollout / reward / update), trajectories·turns per second
and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
from pathlib import Path

from training.grpo import parse_args, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("out/bench/grpo_step.json"))
    args, trainer_flags = parser.parse_known_args()

    with tempfile.TemporaryDirectory() as scratch:
        cfg = parse_args(["--lora", *trainer_flags, "--iterations", str(args.iterations), "--eval-every", str(10**9),
                          "--save-every", str(10**9), "--max-minutes", "0", "--out", scratch])
        train(cfg)
        rows = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"][1:] or rows  # drop the warm-up iteration
    phases = {p: statistics.median(r.get(p, 0.0) for r in rows) for p in ("rollout_s", "reward_s", "update_s")}
    total = sum(phases.values())
    trajectories = cfg.sessions_per_step * cfg.num_generations
    result = {"machine": platform.processor() or platform.machine(), "algo": cfg.algo, "flags": trainer_flags,
              "config": {k: getattr(cfg, k) for k in ("num_generations", "sessions_per_step", "turns", "steps", "sde_window")},
              "seconds_per_iteration": total, **phases,
              "trajectory_turns_per_second": trajectories * cfg.turns / total,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"\n{cfg.algo}: {trajectories} trajectories × {cfg.turns} turns × {cfg.steps} steps per iteration "
          f"(SDE window {cfg.sde_window}), medians over {len(rows)} iterations\n")
    print("| phase | seconds | share |\n|---|---|---|")
    for name, value in phases.items():
        print(f"| {name[:-2]} | {value:.2f} | {100 * value / total:.0f}% |")
    print(f"| **iteration** | **{total:.2f}** | |\n")
    print(f"trajectory·turns per second: {result['trajectory_turns_per_second']:.2f}; peak RSS {result['peak_rss_mb']:.0f} MB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
