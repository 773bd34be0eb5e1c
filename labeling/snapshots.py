"""Labels that survive a restart: Parquet snapshots of the store pushed on a schedule, and a
fresh store resumed from the last one.

A Space without persistent storage loses its disk on every restart.  With a snapshot target
set (``MTEDITLAB_HUB_DATASET=user/name``), the app writes a **snapshot** of the label store
every few minutes and pushes what changed; on a start with an empty store it downloads the
last snapshot and loads it, so labeling resumes where it stopped.  The live DuckDB file is
never uploaded (it may be mid-write, and only one process may open it).

Snapshot layout (``snapshot/`` in the target)::

    manifest.json                 schema version, row counts, time
    tables/<table>.parquet        every store table, rows ordered by key
    images/<sha[:2]>/<sha>.png    the content-addressed images (written once, never changed)

A snapshot is exported in one read transaction (tables consistent with each other); a table
file is rewritten only when its content changed, so a push uploads only what changed.

Targets (pluggable; :func:`target_from_spec`)
    * ``user/name`` or ``hf:user/name``: a Hugging Face **dataset** repo (created private if
      missing), pushed by ``huggingface_hub.CommitScheduler`` (a background thread; the token
      comes from ``HF_TOKEN`` or the cached login) and read back with ``snapshot_download``.
    * ``file:DIR``: a local folder, the same protocol without a network (copies files into
      ``DIR/snapshot/``); for tests, and for a mounted disk or a folder another tool syncs.
"""

from __future__ import annotations

import datetime as dt
import filecmp
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Protocol

from labeling.blobs import ImageBlobs
from labeling.schema import SCHEMA_VERSION, TABLES

log = logging.getLogger("mteditlab.labeling")
SNAPSHOT_DIR = "snapshot"


# ------------------------------------------------------------------------------ export
def export_snapshot(store, folder: str | os.PathLike) -> dict:
    """Write (update) a snapshot of ``store`` in ``folder``; returns the manifest."""
    folder = Path(folder)
    tables_dir, images = folder / "tables", ImageBlobs(folder / "images")
    tables_dir.mkdir(parents=True, exist_ok=True)
    images.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    counts = {}
    try:
        with store.consistent_reads() as cur:     # every table from one read transaction
            for table, key in TABLES.items():
                counts[table] = cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                tmp = work / f"{table}.parquet"
                cur.execute(f"COPY (SELECT * FROM {table} ORDER BY {key}) TO "
                            f"'{_sql_path(tmp)}' (FORMAT parquet)")
            shas = [r[0] for r in cur.execute("SELECT sha256 FROM images").fetchall()]
        for table in TABLES:
            _replace_if_changed(work / f"{table}.parquet", tables_dir / f"{table}.parquet")
        for sha in shas:
            target = images.path(sha)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = work / f"{sha}.png"
                shutil.copyfile(store.blobs.path(sha), tmp)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = {"schema_version": SCHEMA_VERSION, "counts": counts}
    old = _read_manifest(folder)
    if old is None or {k: old.get(k) for k in manifest} != manifest:
        manifest["written_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        tmp = folder / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, folder / "manifest.json")
    return manifest


def _replace_if_changed(new: Path, old: Path) -> None:
    if old.exists() and filecmp.cmp(new, old, shallow=False):
        return                              # unchanged: keep the file (and its mtime)
    os.replace(new, old)


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


# ----------------------------------------------------------------------------- restore
def restore_snapshot(store, folder: str | os.PathLike) -> dict:
    """Load the snapshot in ``folder`` into an **empty** ``store`` (ids kept); returns the row
    counts loaded.  Refuses a non-empty store or another schema version."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no snapshot manifest in {folder}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"the snapshot has schema v{manifest.get('schema_version')}, this "
                         f"code reads v{SCHEMA_VERSION}")
    for path in (folder / "images").glob("*/*.png"):
        target = store.blobs.path(path.stem)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    tables = {t: folder / "tables" / f"{t}.parquet" for t in TABLES}
    return store.load_tables({t: p for t, p in tables.items() if p.exists()})


# ----------------------------------------------------------------------------- targets
class Scheduler(Protocol):
    def trigger(self): ...
    def stop(self) -> None: ...


class SnapshotTarget(Protocol):
    """Where snapshots go: ``start`` a scheduler pushing ``folder`` every ``every_min``
    minutes (calling ``before_push`` first, under the scheduler's lock), ``fetch`` the last
    snapshot into a folder (False when there is none)."""

    description: str

    def start(self, folder: Path, every_min: float, before_push: Callable[[], None]
              ) -> Scheduler: ...

    def fetch(self, dest: Path) -> bool: ...


class FolderTarget:
    """A local folder: pushes copy changed files into ``<root>/snapshot/``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.description = f"folder {self.root}"

    def start(self, folder, every_min, before_push):
        return FolderScheduler(folder, self.root / SNAPSHOT_DIR, every_min, before_push)

    def fetch(self, dest: Path) -> bool:
        source = self.root / SNAPSHOT_DIR
        if not (source / "manifest.json").exists():
            return False
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return True


class FolderScheduler:
    """CommitScheduler's contract (a thread pushing every ``every`` minutes, ``trigger()``
    for an immediate push, ``stop()``) with a folder copy as the commit."""

    def __init__(self, folder: Path, target: Path, every_min: float,
                 before_push: Callable[[], None]):
        self.folder, self.target, self.every_s = Path(folder), Path(target), every_min * 60.0
        self.before_push = before_push
        self.lock = threading.Lock()
        self.pushes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshot-folder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.trigger()

    def trigger(self) -> None:
        with self.lock:
            try:
                self.before_push()
                self._copy()
                self.pushes += 1
            except Exception:  # noqa: BLE001 - a failed push is retried at the next one
                log.exception("snapshot push to %s failed", self.target)

    def _copy(self) -> None:
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            rel = path.relative_to(self.folder)
            if rel.parts[0].startswith("."):
                continue
            out = self.target / rel
            if out.exists() and (rel.parts[0] == "images"     # content-addressed: never changes
                                 or filecmp.cmp(path, out, shallow=False)):
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, out)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class HubTarget:
    """A Hugging Face dataset repo, pushed by ``huggingface_hub.CommitScheduler``."""

    def __init__(self, repo_id: str, token: str | None = None, private: bool = True):
        self.repo_id, self.token, self.private = repo_id, token, private
        self.description = f"Hugging Face dataset {repo_id}"

    def start(self, folder, every_min, before_push):
        from huggingface_hub import CommitScheduler

        class SnapshotScheduler(CommitScheduler):
            def push_to_hub(self):
                with self.lock:
                    before_push()
                return super().push_to_hub()

        return SnapshotScheduler(repo_id=self.repo_id, repo_type="dataset",
                                 folder_path=folder, path_in_repo=SNAPSHOT_DIR,
                                 every=every_min, private=self.private, token=self.token,
                                 ignore_patterns=[".*", "**/.*"])

    def fetch(self, dest: Path) -> bool:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (EntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        try:
            local = snapshot_download(self.repo_id, repo_type="dataset", token=self.token,
                                      allow_patterns=[f"{SNAPSHOT_DIR}/**"])
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
            return False
        source = Path(local) / SNAPSHOT_DIR
        if not (source / "manifest.json").exists():
            return False
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return True


def target_from_spec(spec: str, token: str | None = None) -> SnapshotTarget:
    """``user/name`` / ``hf:user/name`` (a Hub dataset) or ``file:DIR`` (a local folder)."""
    spec = spec.strip()
    if spec.startswith("file:"):
        path = spec[len("file:"):]
        if path.startswith("//"):
            path = path[2:]
        return FolderTarget(Path(path).expanduser())
    repo = spec[len("hf:"):] if spec.startswith("hf:") else spec
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"expected a dataset repo id user/name or file:DIR, got {spec!r}")
    return HubTarget(repo, token=token)


# ------------------------------------------------------------------------------ syncing
class SnapshotSync:
    """Resume the store from the target's last snapshot when it is empty, then push
    snapshots every ``every_min`` minutes and once more on :meth:`stop`."""

    def __init__(self, store, target: SnapshotTarget, every_min: float = 5.0,
                 staging: str | os.PathLike | None = None):
        self.store, self.target, self.every_min = store, target, float(every_min)
        self.staging = Path(staging) if staging else Path(store.path).parent / "snapshot"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.scheduler: Scheduler | None = None
        self.restored: dict | None = None

    def resume(self) -> dict | None:
        """Load the last snapshot into the store if the store holds no labels yet."""
        counts = self.store.counts()
        if counts["judgments"] or counts["comparisons"] or counts["sessions"]:
            return None
        with tempfile.TemporaryDirectory(prefix="mteditlab-resume-") as tmp:
            if not self.target.fetch(Path(tmp)):
                log.info("no snapshot in %s yet: starting empty", self.target.description)
                return None
            self.restored = restore_snapshot(self.store, tmp)
        log.info("resumed the label store from %s: %s", self.target.description,
                 ", ".join(f"{v} {k}" for k, v in self.restored.items()))
        return self.restored

    def snapshot(self) -> None:
        export_snapshot(self.store, self.staging)

    def start(self) -> "SnapshotSync":
        self.scheduler = self.target.start(self.staging, self.every_min, self.snapshot)
        return self

    def push_now(self):
        """Export and push at once (waits for it)."""
        if self.scheduler is None:
            raise RuntimeError("start() first")
        result = self.scheduler.trigger()
        return result.result() if hasattr(result, "result") else result

    def stop(self, final_push: bool = True) -> None:
        if self.scheduler is None:
            return
        try:
            if final_push:
                self.push_now()
        except Exception:  # noqa: BLE001 - shutting down: log, never raise
            log.exception("final snapshot push failed")
        finally:
            self.scheduler.stop()
            self.scheduler = None
