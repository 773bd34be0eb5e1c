"""Benchmark of the label store and the leaderboard (a benchmark, not a timed test).

1. Write load: ``--writers`` threads (default 32), one annotator each, record ``--judgments``
   judgments in all (default 20,000) through one :class:`labeling.store.LabelStore`.  Every
   call is timed from request to acknowledgement (commit).  Afterwards the store is closed and
   reopened and every judgment key is looked up: ``lost`` = acknowledged keys missing,
   ``duplicated`` = rows beyond one per key.
2. Leaderboard: Bradley–Terry fit plus ``--rounds`` bootstrap rounds (default 1,000) over
   ``--battles`` judgments (default 100,000) of ``--models`` models (default 20).

Prints a markdown table and writes JSON (``--out``, default ``out/bench/label_store.json``)
with writers, judgments, per_second, p99_ms, lost, duplicated and the leaderboard figures.
Run with ``nice -n 10 python -m bench.label_store``; on a shared CPU the figures are a
lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from labeling import ratings
from labeling.store import LabelStore

CRITERIA = ("overall", "instruction", "consistency", "quality")


def setup(store: LabelStore, n_comparisons: int, n_turns: int = 3) -> list[int]:
    """``n_comparisons`` comparisons, each between two of 8 models on its own source."""
    models = [("mini", None)] + [("mini", f"lora:ck/{k}") for k in range(7)]
    comparisons = []
    for c in range(n_comparisons):
        source = store.put_image(Image.new("RGB", (8, 8), (c % 256, c // 256, 0)))
        sessions = []
        for side in range(2):
            editor, adapter = models[(c + side * (1 + (c // 8) % 7)) % len(models)]
            turns = [{"instruction": f"edit {t}", "output_sha": store.put_image(
                Image.new("RGB", (8, 8), (c % 256, c // 256, 1 + side * 8 + t)))}
                for t in range(n_turns)]
            sessions.append(store.add_session(editor, adapter, c, source, turns))
        comparisons.append(store.add_comparison(*sessions))
    return comparisons


def write_load(writers: int, judgments: int, workdir: Path) -> dict:
    path = workdir / "labels.duckdb"
    per_writer = -(-judgments // writers)
    slots = [(turn, criterion) for turn in (None, 0, 1, 2) for criterion in CRITERIA]
    n_comparisons = -(-per_writer // len(slots))
    with LabelStore.open(path) as store:
        comparisons = setup(store, n_comparisons)
        names = [f"annotator{k:02d}" for k in range(writers)]
        for name in names:
            store.add_annotator(name)
        keys = [(cid, turn, criterion) for cid in comparisons for turn, criterion in slots]
        jobs = {name: keys[:per_writer] for name in names}
        remainder = per_writer * writers - judgments  # trim so the total is exact
        for name in names[:remainder]:
            jobs[name] = jobs[name][:-1]
        latencies: list[np.ndarray] = []
        acked: list[tuple] = []
        lock = threading.Lock()
        barrier = threading.Barrier(writers + 1)

        def work(k: int, name: str) -> None:
            rng = np.random.default_rng(k)
            mine, times = [], []
            barrier.wait()
            for cid, turn, criterion in jobs[name]:
                choice = ("A", "B", "tie", "both_bad")[rng.integers(4)]
                t0 = time.perf_counter()
                jid = store.record_judgment(cid, name, turn, criterion, choice,
                                            "A" if rng.random() < 0.5 else "B",
                                            float(rng.integers(300, 9000)), blind=True)
                times.append(time.perf_counter() - t0)
                mine.append(((cid, name, turn, criterion), jid))
            with lock:
                latencies.append(np.array(times))
                acked.extend(mine)

        threads = [threading.Thread(target=work, args=kn) for kn in enumerate(names)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    with LabelStore.open(path, read_only=True) as store:
        frame = store.judgments_frame()
    stored = frame.groupby(["comparison_id", "annotator", "turn", "criterion"],
                           dropna=False).size()
    stored_keys = {(int(c), a, None if pd.isna(t) else int(t), k)
                   for (c, a, t, k) in stored.index}
    acked_keys = {key for key, _ in acked}
    lat = np.concatenate(latencies) * 1000
    return {
        "writers": writers, "judgments": len(acked), "seconds": round(elapsed, 3),
        "per_second": round(len(acked) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "lost": len(acked_keys - stored_keys),
        "duplicated": int((stored - 1).clip(lower=0).sum()),
        "distinct_ids": len({jid for _, jid in acked}),
    }


def leaderboard_load(battles: int, models: int, rounds: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 0.6, models)
    names = np.array([f"model{k:02d}" for k in range(models)])
    a = rng.integers(0, models, battles)
    b = (a + rng.integers(1, models, battles)) % models
    p = 1 / (1 + np.exp(theta[b] - theta[a]))
    choice = np.where(rng.random(battles) < p, "A", "B")
    choice = np.where(rng.random(battles) < 0.1, "tie", choice)
    frame = pd.DataFrame({"model_a": names[a], "model_b": names[b], "choice": choice})
    start = time.perf_counter()
    table = ratings.leaderboard(frame, n_boot=rounds, seed=seed)
    elapsed = time.perf_counter() - start
    assert len(table) == models
    return {"battles": battles, "models": models, "rounds": rounds,
            "seconds": round(elapsed, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--judgments", type=int, default=20_000)
    parser.add_argument("--battles", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("out/bench/label_store.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="label-bench-") as tmp:
        writes = write_load(args.writers, args.judgments, Path(tmp))
    board = leaderboard_load(args.battles, args.models, args.rounds)
    result = {**writes, "leaderboard": board,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}}
    print("| measure | value |\n|---|---|")
    for key in ("writers", "judgments", "seconds", "per_second", "p50_ms", "p99_ms", "lost",
                "duplicated"):
        print(f"| write: {key} | {writes[key]} |")
    print(f"| leaderboard: {board['rounds']} bootstrap rounds, {board['battles']} battles, "
          f"{board['models']} models (s) | {board['seconds']} |")
    print(f"| machine: CPUs / 1-min load average | {result['machine']['cpus']} / "
          f"{result['machine']['load_avg_1m']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    ok = writes["lost"] == 0 and writes["duplicated"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
