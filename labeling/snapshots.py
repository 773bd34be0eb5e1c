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
file is rewritten only when its content changed, so a push uploads only what changed.  A
snapshot of an older schema is migrated when it is loaded, by the same migrations that bring an
older database file up to date when it is opened (:func:`labeling.schema.migrate`).

Resuming never pushes over a snapshot it could not read
    Only the target's own answer that it holds no snapshot (for the Hub: HTTP 404 for the repo,
    revision or file; :func:`hub_says_missing`) means "start empty".  Any other failure to
    fetch (connection error, timeout, Hub 5xx, 401) is retried with backoff for
    :data:`RESUME_WAIT_S` seconds.  When the last snapshot still cannot be read — or cannot be
    loaded (a newer schema, a broken file) — the store is served as it is with **pushing
    disabled**: :attr:`SnapshotSync.problem` says why (the app shows a notice that labels are
    not being backed up) and a marker file ``.unverified`` in the staging folder remembers it.
    A later start on the same disk that finds labels and that marker pushes them only once the
    target answers that it holds no snapshot; if it holds one, pushing stays disabled (the
    problem says how to keep both).  Nothing is ever written anywhere else.

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
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import duckdb

from labeling.blobs import ImageBlobs
from labeling.errors import SchemaVersionError
from labeling.schema import SCHEMA_VERSION, TABLES, migrate

log = logging.getLogger("mteditlab.labeling")
SNAPSHOT_DIR = "snapshot"
RESUME_WAIT_S = 120.0          # how long a resume retries a target it cannot read
UNVERIFIED = ".unverified"     # staging-folder marker: the store started without the snapshot


# ------------------------------------------------------------------------------ export
def export_snapshot(store, folder: str | os.PathLike) -> dict:
    """Write (update) a snapshot of ``store`` in ``folder``; returns the manifest."""
    folder = Path(folder)
    tables_dir, images = folder / "tables", ImageBlobs(folder / "images")
    tables_dir.mkdir(parents=True, exist_ok=True)
    images.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        with store.consistent_reads() as cur:     # every table from one read transaction
            counts = _write_tables(cur, work)
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


def _write_tables(cur, out: Path) -> dict[str, int]:
    """Every store table read through ``cur`` to ``out/<table>.parquet``, rows ordered by key;
    returns the row counts."""
    counts = {}
    for table, key in TABLES.items():
        counts[table] = cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        cur.execute(f"COPY (SELECT * FROM {table} ORDER BY {key}) TO "
                    f"'{_sql_path(out / f'{table}.parquet')}' (FORMAT parquet)")
    return counts


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
    counts loaded.  A snapshot of an older schema is migrated first.  Raises
    :class:`SchemaVersionError` for a newer schema, :class:`StoreError` for a non-empty store."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no snapshot manifest in {folder}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise SchemaVersionError(f"the snapshot has schema v{version}, this code reads up to "
                                 f"v{SCHEMA_VERSION}; upgrade MT-EditLab to resume from it")
    for path in (folder / "images").glob("*/*.png"):
        target = store.blobs.path(path.stem)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    tables = {t: folder / "tables" / f"{t}.parquet" for t in TABLES}
    if version == SCHEMA_VERSION:
        return store.load_tables({t: p for t, p in tables.items() if p.exists()})
    with tempfile.TemporaryDirectory(prefix="mteditlab-migrate-") as work:
        return store.load_tables(_migrated_tables(folder / "tables", version, Path(work)))


def _migrated_tables(tables: Path, version: int, work: Path) -> dict[str, Path]:
    """The snapshot tables in ``tables`` (schema ``version``) brought to :data:`SCHEMA_VERSION`
    by :func:`labeling.schema.migrate` in a scratch database marked ``version``; returns
    ``{table: parquet file in work}``."""
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(version)])
        for file in sorted(tables.glob("*.parquet")):
            name = file.stem.replace('"', '""')
            con.execute(f"CREATE TABLE \"{name}\" AS SELECT * FROM "
                        f"read_parquet('{_sql_path(file)}')")
        migrate(con, work / "snapshot.duckdb")     # no app_events.jsonl beside it: none imported
        _write_tables(con, work)
    finally:
        con.close()
    return {t: work / f"{t}.parquet" for t in TABLES}


# ----------------------------------------------------------------------------- targets
class Scheduler(Protocol):
    def trigger(self): ...
    def stop(self) -> None: ...


class SnapshotTarget(Protocol):
    """Where snapshots go: ``start`` a scheduler pushing ``folder`` every ``every_min``
    minutes (calling ``before_push`` first, under the scheduler's lock), ``fetch`` the last
    snapshot into a folder.  ``fetch`` returns False only when the target answers that it
    holds no snapshot, and raises whenever it cannot tell."""

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
        try:
            source = self._download()
        except Exception as exc:
            if hub_says_missing(exc):
                return False
            raise
        if source is None:
            return False
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return True

    def _download(self) -> Path | None:
        """The repo's ``snapshot/`` folder at its current revision, downloaded (None: the repo
        lists no snapshot manifest)."""
        from huggingface_hub import HfApi, snapshot_download

        info = HfApi(token=self.token).dataset_info(self.repo_id)
        if info.siblings is None:
            raise RuntimeError(f"the Hub listed no files of {self.repo_id}; try again")
        if f"{SNAPSHOT_DIR}/manifest.json" not in {f.rfilename for f in info.siblings}:
            return None
        local = snapshot_download(self.repo_id, repo_type="dataset", revision=info.sha,
                                  token=self.token, allow_patterns=[f"{SNAPSHOT_DIR}/**"])
        source = Path(local) / SNAPSHOT_DIR
        if not (source / "manifest.json").exists():
            raise FileNotFoundError(f"{SNAPSHOT_DIR}/manifest.json of {self.repo_id} at "
                                    f"{info.sha} was listed but not downloaded; try again")
        return source


def hub_says_missing(exc: BaseException) -> bool:
    """True only for the Hub's own answer that a repo, revision or file does not exist (HTTP
    404).  Not for connection errors, timeouts, 5xx or 401 (also a missing or wrong token), nor
    for ``LocalEntryNotFoundError``: huggingface_hub raises that "entry not found" when it could
    not reach the Hub at all."""
    from huggingface_hub.errors import (RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    return (isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError,
                             RemoteEntryNotFoundError))
            and exc.response.status_code == 404)


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
    snapshots every ``every_min`` minutes and once more on :meth:`stop` — unless the resume
    could not read the target (:attr:`problem`; see the module docstring)."""

    def __init__(self, store, target: SnapshotTarget, every_min: float = 5.0,
                 staging: str | os.PathLike | None = None,
                 resume_wait_s: float = RESUME_WAIT_S):
        self.store, self.target, self.every_min = store, target, float(every_min)
        self.staging = Path(staging) if staging else Path(store.path).parent / "snapshot"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.marker = self.staging / UNVERIFIED
        self.resume_wait_s = float(resume_wait_s)
        self.scheduler: Scheduler | None = None
        self.restored: dict | None = None
        self.problem: str | None = None      # why nothing is pushed (None: pushing)

    def resume(self) -> dict | None:
        """Load the target's last snapshot into the store if it holds no labels yet; returns
        the row counts loaded, or None.  Never raises for the target: when its snapshot cannot
        be read or loaded, :attr:`problem` says why and :meth:`start` pushes nothing."""
        counts = self.store.counts()
        has_labels = bool(counts["judgments"] or counts["comparisons"] or counts["sessions"])
        if has_labels and not self.marker.exists():
            return None                         # this store carries on the target's snapshots
        with tempfile.TemporaryDirectory(prefix="mteditlab-resume-") as tmp:
            try:
                source = self._fetch(Path(tmp))
            except Exception as exc:  # noqa: BLE001 - any failure: cannot tell, never push
                self._disable(f"its last snapshot could not be read ({exc}); restart the app "
                              "once it answers")
                return None
            if source is not None and has_labels:
                self._disable(
                    "this store holds labels given while its snapshot could not be read, and "
                    "pushing them would replace that snapshot; to keep both, export these "
                    "(python -m labeling export) and move this data directory aside, or delete "
                    f"{self.marker} to push them over it")
                return None
            if source is not None:
                try:
                    self.restored = restore_snapshot(self.store, source)
                except Exception as exc:  # noqa: BLE001 - a snapshot we cannot load: keep it
                    self._disable(f"its last snapshot could not be loaded ({exc})")
                    return None
        self.marker.unlink(missing_ok=True)
        if self.restored is None:
            log.info("no snapshot in %s yet: pushing this store", self.target.description)
        else:
            log.info("resumed the label store from %s: %s", self.target.description,
                     ", ".join(f"{v} {k}" for k, v in self.restored.items()))
        return self.restored

    def _fetch(self, tmp: Path) -> Path | None:
        """The folder the target's last snapshot was fetched into (None: the target holds
        none), retrying with backoff for :attr:`resume_wait_s` seconds; then raises."""
        deadline = time.monotonic() + self.resume_wait_s
        delay = min(1.0, self.resume_wait_s / 10)
        for attempt in itertools.count(1):
            dest = tmp / str(attempt)           # a fresh folder: nothing left from a failed try
            try:
                return dest if self.target.fetch(dest) else None
            except Exception as exc:  # noqa: BLE001 - retried, then raised
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("reading the last snapshot from %s failed (try %d: %s); retrying "
                            "in %.3g s", self.target.description, attempt, exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def _disable(self, why: str) -> None:
        """Push nothing (:meth:`start`), now and at a later start on this disk that finds
        labels, until a resume reads the target; ``why``: the reason and what to do."""
        self.problem = (f"labels are not backed up to {self.target.description} (nothing is "
                        f"pushed there): {why}")
        self.marker.write_text(self.problem + "\n")
        log.error("%s", self.problem)

    def snapshot(self) -> None:
        export_snapshot(self.store, self.staging)

    def start(self) -> "SnapshotSync":
        """Push on the schedule, starting now; nothing when :attr:`problem` is set."""
        if self.problem is None:
            self.scheduler = self.target.start(self.staging, self.every_min, self.snapshot)
        return self

    def push_now(self):
        """Export and push at once (waits for it)."""
        if self.scheduler is None:
            raise RuntimeError(f"pushing is disabled: {self.problem}" if self.problem else
                               "start() first")
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
