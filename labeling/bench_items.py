"""``python -m labeling queue-bench BENCH-ARGS``: a paired benchmark run on data sessions, its two
sides' sessions stored as labeling items the annotators' queue serves.

    python -m labeling --db data/labels.duckdb queue-bench --editor kontext --adapter runs/grpo/adapter \
        --against base --sessions-from DATA --reward qwen-vl --reward-paths qwen-vl=http://HOST:PORT/v1

``BENCH-ARGS`` are :mod:`mteditlab.bench`'s (``--sessions-from`` and ``--against`` required); the run
prints and writes what the benchmark does. Each session's two sides (source, instructions, each turn's
output) become two label-store sessions paired as one comparison, ``meta["origin"] = "bench"``.
"""

from __future__ import annotations

import sys
from typing import Sequence

from labeling.store import LabelStore

ORIGIN = "bench"


def store_items(store: LabelStore, sessions: Sequence, sides: Sequence[tuple[str, str | None, dict]], *,
                seed: int, meta: dict) -> int:
    """Store each data session's ``sides``, ``(editor, adapter, (output, intent told) per turn by session
    id)``, and pair them as one labeling item; returns the number of items. ``meta`` (plus the session's
    id) goes on both."""
    for session in sessions:
        source = store.put_image(session.source)
        ids = [store.add_session(editor, adapter, seed, source,
                                 [{"instruction": t.instruction, "intent": intent, "output_sha": store.put_image(o)}
                                  for t, (o, intent) in zip(session.turns, outputs[session.id])],
                                 {**meta, "session": session.id})
               for editor, adapter, outputs in sides]
        store.add_comparison(*ids)
    return len(sessions)


def cmd_queue_bench(args) -> int:
    from labeling.cli import open_store
    from mteditlab import bench

    given = set(args.passed_on)
    if "--sessions-from" not in given or "--against" not in given:
        print("error: queue-bench pairs two models on data sessions: give --sessions-from DATA and --against "
              "(base, with --adapter DIR, or another adapter)", file=sys.stderr)
        return 2
    keep: dict = {}
    result = bench.main(args.passed_on, keep=keep)
    (editor, adapter, _), (_, other, _) = keep["sides"]
    if adapter == other:
        print("error: both sides are the same model: give --adapter DIR with --against base, or two adapters",
              file=sys.stderr)
        return 2
    with open_store(args, writable=True) as store:
        items = store_items(store, keep["sessions"], keep["sides"], seed=result["seed"],
                            meta={"origin": ORIGIN, "sessions_from": result["sessions_from"],
                                  "split": result["split"]})
    print(f"\n{store.path}: {items} labeling items ({editor}{' + ' + adapter if adapter else ''} vs "
          f"{other or 'base'}), served by the annotators' queue")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("queue-bench", help="a paired benchmark on data sessions, stored as labeling items "
                              "(arguments: python -m mteditlab.bench's)")
    p.set_defaults(handler=cmd_queue_bench, passed_on=[])
