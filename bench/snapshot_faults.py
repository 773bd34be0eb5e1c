"""Faults at resume against a Hub-like snapshot target, end to end with a real label store.

:class:`HubLikeTarget` is :class:`labeling.snapshots.HubTarget` with the Hub replaced by a local
folder: its fetches go through HubTarget's own error handling and fail the way huggingface_hub
fails (a 5xx answer, a read timeout); its pushes copy into the folder.

:func:`snapshot_fault_rows` runs each fault of :data:`FAULTS` (a labelled store pushed, then a
restart on an empty disk while the fault lasts, then a restart once it is over) and returns one
row per fault.  ``python -m bench.snapshot_faults`` prints them as a markdown table.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import duckdb
import httpx2
import numpy as np
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import hf_raise_for_status

from bench.label_store import setup
from labeling.snapshots import (SNAPSHOT_DIR, FolderScheduler, HubTarget, SnapshotSync,
                                export_snapshot)
from labeling.store import LabelStore

FAULTS = ("hub 5xx at resume", "timeout at resume", "older schema snapshot")


class HubLikeTarget(HubTarget):
    """A snapshot target keeping the "repo" in ``root/snapshot/``.

    ``fault``: ``"5xx"`` (the download fails on a 503, raised as huggingface_hub raises it:
    ``LocalEntryNotFoundError`` from the ``HfHubHTTPError``), ``"timeout"`` (the repo lookup
    hangs ``hang_s`` seconds, then ``httpx2.ReadTimeout``) or None.  ``failures``: how many
    fetches fail (None: all).  A missing ``root`` is a repo the Hub does not know (404).
    """

    def __init__(self, root: str | Path, fault: str | None = None, failures: int | None = None,
                 hang_s: float = 0.05):
        super().__init__("bench/hub-like")
        if fault not in (None, "5xx", "timeout"):
            raise ValueError(f"fault: '5xx', 'timeout' or None, got {fault!r}")
        self.root, self.fault, self.failures, self.hang_s = Path(root), fault, failures, hang_s
        self.fetches = self.pushes = 0

    def _download(self) -> Path | None:
        self.fetches += 1
        if self.fault and (self.failures is None or self.fetches <= self.failures):
            if self.fault == "timeout":
                time.sleep(self.hang_s)
                raise httpx2.ReadTimeout("The read operation timed out")
            try:
                _hub_answer(503, "")
            except Exception as exc:
                raise LocalEntryNotFoundError(f"Got: {type(exc).__name__}: {exc}") from exc
        if not self.root.is_dir():
            _hub_answer(404, "RepoNotFound")
        source = self.root / SNAPSHOT_DIR
        return source if (source / "manifest.json").exists() else None

    def start(self, folder, every_min, before_push):
        def counted() -> None:
            before_push()
            self.pushes += 1

        return FolderScheduler(folder, self.root / SNAPSHOT_DIR, every_min, counted)


def _hub_answer(status: int, error_code: str) -> None:
    """Raise what huggingface_hub raises for this Hub answer to a dataset lookup."""
    request = httpx2.Request("GET", "https://huggingface.co/api/datasets/bench/hub-like")
    headers = {"X-Error-Code": error_code} if error_code else {}
    hf_raise_for_status(httpx2.Response(status, headers=headers, request=request))


def labelled_store(path: Path, n_comparisons: int = 6, seed: int = 0) -> LabelStore:
    """A store at ``path`` with comparisons between 8 models and judgments by 3 annotators."""
    store = LabelStore.open(path)
    rng = np.random.default_rng(seed)
    for cid in setup(store, n_comparisons, n_turns=2):
        for name in ("ann1", "ann2", "ann3"):
            store.add_annotator(name)
            for turn in (None, 0, 1):
                choice = ("A", "B", "tie")[rng.integers(3)]
                store.record_judgment(cid, name, turn, "overall", choice, "A",
                                      float(rng.integers(300, 9000)), blind=True)
    return store


def write_v3_snapshot(store: LabelStore, folder: Path) -> None:
    """A snapshot of ``store`` as schema v3 wrote it: comparisons say ``is_gold`` (no kind),
    no skips table."""
    export_snapshot(store, folder)
    tables = folder / "tables"
    (tables / "skips.parquet").unlink()
    path = str(tables / "comparisons.parquet")
    con = duckdb.connect()
    try:
        con.execute(f"COPY (SELECT comparison_id, session_a, session_b, source_sha, n_turns, "
                    f"kind = 'gold' AS is_gold, created_at FROM read_parquet('{path}')) "
                    f"TO '{path}.v3' (FORMAT parquet)")
    finally:
        con.close()
    Path(path + ".v3").replace(path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 3
    manifest["counts"].pop("skips")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def digest(folder: Path) -> str:
    """sha256 over every file's path and bytes under ``folder``."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def restart(data: Path, target, wait_s: float) -> tuple[SnapshotSync, int]:
    """What the app does on a start with an empty disk at ``data``: resume (retrying for
    ``wait_s`` seconds), push, stop with a final push.  Returns the sync and the judgments
    the store held after the resume."""
    with LabelStore.open(data / "labels.duckdb") as store:
        sync = SnapshotSync(store, target, every_min=60, resume_wait_s=wait_s)
        sync.resume()
        resumed = store.counts()["judgments"]
        sync.start()
        sync.stop()
    return sync, resumed


def run_fault(fault: str, workdir: Path, wait_s: float = 0.5) -> dict:
    """One row of :func:`snapshot_fault_rows` (``workdir``: an empty folder)."""
    remote = workdir / "remote"
    target = HubLikeTarget(remote)
    with labelled_store(workdir / "first" / "labels.duckdb") as store:
        before = store.counts()["judgments"]
        if fault == "older schema snapshot":
            write_v3_snapshot(store, remote / SNAPSHOT_DIR)
        else:
            SnapshotSync(store, target, every_min=60).start().stop()
    pushed = digest(remote)
    target.fault = {"hub 5xx at resume": "5xx", "timeout at resume": "timeout"}.get(fault)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        sync, resumed = restart(workdir / "second", target, wait_s)
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if sync.problem:
        outcome = (f"{target.fetches} tries, then served with pushing disabled; remote "
                   + ("unchanged" if digest(remote) == pushed else "CHANGED"))
    else:
        outcome = f"resumed {resumed} judgments, pushing"
    target.fault = None
    after = restart(workdir / "third", target, wait_s)[1]
    elsewhere = sum(p.stat().st_size for p in remote.rglob("*")
                    if p.is_file() and p.relative_to(remote).parts[0] != SNAPSHOT_DIR)
    return {"fault": fault, "outcome": outcome, "seconds": round(seconds, 3),
            "peak_mb": round(peak / 2**20, 2), "bytes_elsewhere": elsewhere,
            "judgments_before": before, "judgments_after": after}


def snapshot_fault_rows(wait_s: float = 0.5) -> list[dict]:
    """Each fault of :data:`FAULTS`, end to end in a temporary folder: a store with judgments is
    pushed; a restart on an empty disk meets the fault (``wait_s``: how long the resume retries)
    and stops; a restart after the fault resumes from the remote.  Per fault:
    ``fault``, ``outcome``, ``seconds`` and ``peak_mb`` (wall time and tracemalloc peak of the
    faulty restart), ``bytes_elsewhere`` (bytes written to the remote outside its snapshot),
    ``judgments_before`` (pushed) and ``judgments_after`` (resumed by the last restart)."""
    rows = []
    for fault in FAULTS:
        with tempfile.TemporaryDirectory(prefix="mteditlab-fault-") as tmp:
            rows.append(run_fault(fault, Path(tmp), wait_s))
    return rows


def main() -> int:
    rows = snapshot_fault_rows()
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
