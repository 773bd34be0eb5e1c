"""Fault injection: the served judge against hostile local servers, and the label store's snapshot
faults of :mod:`bench.snapshot_faults`, one row per fault.

    python -m bench.faults [--timeout 2] [--body-mb 50] [--retry-after 1] [--json docs/faults.json]

Judge faults (:data:`JUDGE_FAULTS`, :func:`judge_fault_rows`): the ``qwen-vl`` judge scores against a
server on 127.0.0.1 (:class:`tests.chat_server.ChatServer`) that redirects to a second local server,
trickles its reply, sends an endless body or a 50 MB body of logprobs (no announced length), answers
429 with Retry-After until that time has passed, sends invalid logprobs, fails one request in three,
sends a thinking-mode vote that is not text, or fails its ``/models`` listing.

Columns: ``fault``; ``outcome`` (``scored …``, ``failed: reason`` or ``k/n scored, …``); ``seconds``
(wall clock of one ``score`` call); ``peak_mb`` (tracemalloc peak of the Python allocations during it,
MiB: the server threads count too, but they stream their replies in pieces of at most 64 KiB, so what
shows is the judge's reading); ``bytes_elsewhere`` (bytes received by any host other than the judge —
the redirect target counts every byte — must be 0); ``judgments_before`` / ``judgments_after`` (the
judgments pushed and resumed in a snapshot fault; None for judge faults).

Prints a markdown table, writes JSON (``--json``) and exits 1 when a byte reached another host or a
judge fault did not end as it must (its ``expect``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from mteditlab.rewards.base import EditSample
from mteditlab.rewards.endpoint import MAX_BODY, EndpointJudge
from tests.chat_server import (ChatServer, completion, digit_reply, endless, error, failing_every, flood,
                               rate_limited, redirect, text_choice, trickle)

GOOD = digit_reply({"7": 0.8, "8": 0.2})
LISTING = {"object": "list", "data": [{"id": "tiny", "object": "model"}]}
SEVEN = {"token": "7", "logprob": math.log(0.905)}
INVALID = completion([text_choice("7", logprobs=[{**SEVEN, "top_logprobs": [
    SEVEN, {"token": "²", "logprob": math.log(0.05)}, {"token": "９", "logprob": math.log(0.04)},
    {"token": 9, "logprob": -1.0}, {"token": "9", "logprob": True}, {"token": "9", "logprob": 0.5},
    {"token": "9", "logprob": "-0.1"}, {"token": "9", "logprob": math.nan}, "9"]}])])
NOT_TEXT = completion([text_choice("Score: 7", 0), {"index": 1, "message": {
    "role": "assistant", "content": [{"type": "text", "text": "Score: 9"}]}}, text_choice("Score: 5", 2)])


@dataclass
class Settings:
    """``timeout``: the judge's deadline per request (s); ``body_bytes``: size of the flood;
    ``max_body``: the judge's body cap; ``retry_after``: what the 429 asks for (s, at most ``timeout``)."""

    timeout: float = 2.0
    body_bytes: int = 50_000_000
    max_body: int = MAX_BODY
    retry_after: float = 1.0


@dataclass
class JudgeFault:
    """``responder(settings, elsewhere_url)`` makes the judge server's responder; ``expect``: how every
    chat must end, ``"scored"`` or ``"failed"``; ``judge``: options over the bench's judge; ``items``:
    samples scored."""

    name: str
    expect: str
    responder: Callable[[Settings, str], Callable]
    judge: dict = field(default_factory=dict)
    items: int = 1


JUDGE_FAULTS = (
    JudgeFault("redirect to another host (302)", "failed",
               lambda s, elsewhere: lambda route, *request: redirect(f"{elsewhere}/{route}")),
    JudgeFault("trickle (a byte every timeout/20)", "failed",
               lambda s, _: lambda *request: trickle(GOOD, s.timeout / 20)),
    JudgeFault("endless body", "failed", lambda s, _: lambda *request: endless(0.01)),
    JudgeFault("huge body, no length", "failed", lambda s, _: lambda *request: flood(s.body_bytes, declared=False)),
    JudgeFault("429 with Retry-After", "scored", lambda s, _: rate_limited(s.retry_after, GOOD)),
    JudgeFault("invalid logprobs", "scored", lambda s, _: lambda *request: INVALID),
    JudgeFault("one request in three fails (500)", "scored", lambda s, _: failing_every(3, GOOD), items=9),
    JudgeFault("thinking vote that is not text", "scored", lambda s, _: lambda *request: NOT_TEXT,
               {"mode": "thinking", "votes": 3}),
    JudgeFault("/models listing fails (503), 4 chats", "failed",
               lambda s, _: lambda route, *request: error(503, "loading") if route == "models" else GOOD,
               {"model": None}, items=4),
)


def outcome(scores: np.ndarray, failures: list[str | None]) -> str:
    """``scored X`` (one item) or ``scored n/n``; ``failed: reason`` (the first item's, its sub-score
    prefix dropped); ``k/n scored, failed: reason`` when some failed."""
    ok, n = np.isfinite(scores), len(scores)
    if ok.all():
        return f"scored {scores[0]:.3f}" if n == 1 else f"scored {n}/{n}"
    reason = next(f for f in failures if f).split(": ", 1)[1]
    return f"failed: {reason}" if not ok.any() else f"{ok.sum()}/{n} scored, failed: {reason}"


def judge_fault_rows(settings: Settings = Settings()) -> list[dict]:
    """One row per :data:`JUDGE_FAULTS` entry (columns: module docstring). The judge: ``if`` only,
    model ``tiny``, ``settings.timeout``, 2 retries with backoff 0.1 s, ``settings.max_body``."""
    items = [EditSample(Image.new("RGB", (16, 16), (255, 255, 255)), Image.new("RGB", (16, 16), (90, 90, 90)),
                        f"make it grey {k}") for k in range(max(f.items for f in JUDGE_FAULTS))]
    rows = []
    with ChatServer(lambda route, *a: LISTING if route == "models" else digit_reply({"9": 1.0})) as elsewhere:
        for fault in JUDGE_FAULTS:
            with ChatServer(fault.responder(settings, elsewhere.url)) as server:
                judge = EndpointJudge(server.url, **{
                    "sub_scores": ("if",), "model": "tiny", "timeout": settings.timeout, "retries": 2,
                    "backoff": 0.1, "max_body": settings.max_body, "concurrency": 4, **fault.judge})
                received = elsewhere.bytes_received
                tracemalloc.start()
                start = time.perf_counter()
                out = judge.score(items[:fault.items])
                seconds = time.perf_counter() - start
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            rows.append({"fault": fault.name, "outcome": outcome(out.overall, out.failures),
                         "seconds": round(seconds, 3), "peak_mb": round(peak / 2**20, 2),
                         "bytes_elsewhere": elsewhere.bytes_received - received,
                         "judgments_before": None, "judgments_after": None})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=Settings.timeout, help="judge deadline per request (s)")
    parser.add_argument("--body-mb", type=float, default=Settings.body_bytes / 1e6, help="size of the huge body (MB)")
    parser.add_argument("--retry-after", type=float, default=Settings.retry_after,
                        help="what the 429 asks to wait (s, at most --timeout)")
    parser.add_argument("--json", type=Path, default=Path("docs/faults.json"))
    args = parser.parse_args(argv)
    settings = Settings(args.timeout, int(args.body_mb * 1e6), MAX_BODY, args.retry_after)
    judge_rows = judge_fault_rows(settings)
    from bench.snapshot_faults import snapshot_fault_rows  # the label store's side and its imports

    rows = judge_rows + snapshot_fault_rows()
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join("—" if v is None else str(v) for v in row.values()) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": vars(settings), "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.json}")
    leaked = [row["fault"] for row in rows if row["bytes_elsewhere"]]
    wrong = [row["fault"] for row, fault in zip(judge_rows, JUDGE_FAULTS)
             if not row["outcome"].startswith(fault.expect)]
    for name, faults in (("bytes reached another host", leaked), ("did not end as it must", wrong)):
        if faults:
            print(f"{name}: {', '.join(faults)}", file=sys.stderr)
    return 1 if leaked or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
