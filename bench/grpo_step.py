"""Cost of one multi-turn GRPO / NFT iteration on the mini editor, split by phase.

    python -m bench.grpo_step [--iterations 5] [--json out/bench/grpo_step.json] [TRAINER FLAGS ...]
    python -m bench.grpo_step --judge-latency 0.25 [TRAINER FLAGS ...]   # served judge: overlap on vs off

Runs the real trainer (``training.grpo.train``) for a few iterations with the default configuration,
changed by any trainer flags given (``--algo grpo``, ``--steps 8``, ...), into a scratch directory and
reports medians of seconds per iteration (rollout / reward / update), trajectories·turns per second
and the peak resident memory of the process.

``--judge-latency S`` trains on a judge served over HTTP (a local OpenAI-compatible server, in its own process, that
answers every chat after S seconds, as an inference engine busy with other requests would; its
answers are fixed digit log-probabilities, so both runs see the same rewards) and runs the trainer
twice, with ``--no-overlap-scoring`` and ``--overlap-scoring``; the table compares the two. ``reward``
is the time the loop waits for scores after sampling, ``reward busy`` the time spent scoring.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import platform
import resource
import statistics
import tempfile
import threading
from pathlib import Path

from tests.chat_server import ChatServer, completion, text_choice
from training.config import parse_args
from training.grpo import train

PHASES = ("rollout_s", "reward_s", "update_s")


def answer_after(latency: float, route: str, body, headers):
    """A served judge's reply after ``latency`` seconds: P(9) = 0.8, P(0) = 0.2."""
    if route == "models":
        return {"object": "list", "data": [{"id": "served", "object": "model"}]}
    top = [{"token": "9", "logprob": math.log(0.8)}, {"token": "0", "logprob": math.log(0.2)}]
    return ("sleep", latency, completion([text_choice("9", logprobs=[{**top[0], "top_logprobs": top}])], "served"))


def serve(latency: float, urls) -> None:
    """Run the served judge in its own process (as an inference engine is), until terminated."""
    with ChatServer(functools.partial(answer_after, latency)) as server:
        urls.put(server.url)
        threading.Event().wait()


def run(flags: list[str], iterations: int) -> tuple[dict, object]:
    """Train for ``iterations`` with ``flags``; medians of the phases over the iterations after the first."""
    with tempfile.TemporaryDirectory() as scratch:
        cfg = parse_args(["--lora", *flags, "--iterations", str(iterations), "--eval-every", "0",
                          "--save-every", str(10**9), "--max-minutes", "0", "--out", scratch])
        train(cfg)
        rows = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"][1:] or rows  # drop the warm-up iteration
    phases = {p: statistics.median(r.get(p, 0.0) for r in rows) for p in (*PHASES, "reward_busy_s")}
    total = sum(phases[p] for p in PHASES)
    trajectories = cfg.sessions_per_step * cfg.num_generations
    return {"seconds_per_iteration": total, **phases, "iterations_measured": len(rows),
            "trajectory_turns_per_second": trajectories * cfg.turns / total}, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--judge-latency", type=float, help="seconds per chat of a served judge: compare overlap on/off")
    parser.add_argument("--json", type=Path, default=Path("out/bench/grpo_step.json"))
    args, trainer_flags = parser.parse_known_args()

    if args.judge_latency is None:
        runs = {"": run(trainer_flags, args.iterations)}
    else:
        urls = multiprocessing.get_context("spawn").Queue()
        server = multiprocessing.get_context("spawn").Process(target=serve, args=(args.judge_latency, urls), daemon=True)
        server.start()
        try:
            judge = ["--reward", "qwen-vl=1.0", "--reward-paths",
                     f"qwen-vl={urls.get(timeout=60)}?model=served&top_logprobs=2&min_score_mass=0&retries=0"]
            runs = {mode: run([*judge, *trainer_flags, f"--{mode}"], args.iterations)
                    for mode in ("no-overlap-scoring", "overlap-scoring")}
        finally:
            server.terminate()
    cfg = next(iter(runs.values()))[1]
    result = {"machine": platform.processor() or platform.machine(), "algo": cfg.algo, "flags": trainer_flags,
              "judge_latency_s": args.judge_latency,
              "config": {k: getattr(cfg, k) for k in ("num_generations", "sessions_per_step", "turns", "steps", "sde_window")},
              "runs": {mode or "default": figures for mode, (figures, _) in runs.items()},
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    measured = next(iter(result["runs"].values()))["iterations_measured"]
    print(f"\n{cfg.algo}: {cfg.sessions_per_step * cfg.num_generations} trajectories × {cfg.turns} turns × {cfg.steps} "
          f"steps per iteration (SDE window {cfg.sde_window}), medians over {measured} iterations"
          + (f"; served judge answering after {args.judge_latency:g} s" if args.judge_latency is not None else "") + "\n")
    names = list(result["runs"])
    print("| phase | " + " | ".join(f"{n} (s)" for n in names) + " |\n|---" + "|---" * len(names) + "|")
    for phase in (*PHASES, "reward_busy_s"):
        label = phase[:-2].replace("_", " ")
        print(f"| {label} | " + " | ".join(f"{result['runs'][n][phase]:.2f}" for n in names) + " |")
    print("| **iteration** | " + " | ".join(f"**{result['runs'][n]['seconds_per_iteration']:.2f}**" for n in names) + " |\n")
    if len(names) == 2:
        before, after = (result["runs"][n]["seconds_per_iteration"] for n in names)
        result["speedup"] = before / after
        print(f"overlapped scoring: {before:.2f} → {after:.2f} s per iteration ({result['speedup']:.2f}×)")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
