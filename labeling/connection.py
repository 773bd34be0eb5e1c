"""Opening a label database file: where it lives, one owner per file, lock conflicts,
read-only snapshots.

DuckDB lets one process open a file read-write.  Inside a process, one :class:`DatabaseFile`
per path (a second gets :class:`StoreLockedError` pointing at the first); across processes, a
conflicting open becomes :class:`StoreLockedError` with the holder's PID.  Read-only opens read
the file, or — while another process holds it — a snapshot copy of it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import duckdb

from labeling.errors import StoreError, StoreLockedError

DATA_ENV = "MTEDITLAB_DATA"
DB_FILENAME = "labels.duckdb"
SPACE_STORAGE = Path("/data")   # a Hugging Face Space's persistent storage, when it has some
_LOCK_RE = re.compile(r"Conflicting lock is held in (?P<prog>.*?) \(PID (?P<pid>\d+)\)")
_OPEN_PATHS: set[Path] = set()
_OPEN_LOCK = threading.Lock()


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory, the one rule for the app and the CLI: ``explicit``, else
    ``$MTEDITLAB_DATA``, else ``/data/mteditlab`` on a Hugging Face Space (``$SPACE_ID`` set)
    whose persistent storage :data:`SPACE_STORAGE` is writable, else ``./data``.  Empty values
    count as unset."""
    if explicit:
        return Path(explicit)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    if os.environ.get("SPACE_ID") and os.access(SPACE_STORAGE, os.W_OK):
        return SPACE_STORAGE / "mteditlab"
    return Path("data")


def default_db_path(directory: str | os.PathLike | None = None) -> Path:
    """``<data dir>/labels.duckdb`` (see :func:`data_dir`)."""
    return data_dir(directory) / DB_FILENAME


class DatabaseFile:
    """The DuckDB connection to ``path`` (resolved) owned by this process until :meth:`close`.

    ``snapshot_of``: the PID holding the file when a read-only open fell back to a snapshot.
    """

    def __init__(self, path: Path, read_only: bool):
        self.path, self.read_only = path, read_only
        self.snapshot_of: int | None = None
        self._snapshot_dir: tempfile.TemporaryDirectory | None = None
        with _OPEN_LOCK:
            if path in _OPEN_PATHS:
                raise StoreLockedError(path, os.getpid(), sys.executable)
            self.con = self._connect()
            _OPEN_PATHS.add(path)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return duckdb.connect(str(self.path))
            except duckdb.IOException as exc:
                raise _lock_error(self.path, exc) from None
        if not self.path.exists():
            raise FileNotFoundError(f"no label database at {self.path}")
        try:
            return duckdb.connect(str(self.path), read_only=True)
        except duckdb.IOException as exc:
            holder = _lock_error(self.path, exc)
        return self._connect_snapshot(holder.pid)

    def _connect_snapshot(self, pid: int | None) -> duckdb.DuckDBPyConnection:
        """Copy the database (file, then write-ahead log) and open the copy read-only.

        A checkpoint by the holder while copying could pair a stale file with a newer log, so
        the copy is retried until the database file is unchanged across the whole copy.  A log
        caught mid-append is fine: replay stops at the last complete commit, exactly as after
        a crash.
        """
        self._snapshot_dir = tempfile.TemporaryDirectory(prefix="mteditlab-snapshot-")
        copy = Path(self._snapshot_dir.name) / self.path.name
        wal = self.path.with_name(self.path.name + ".wal")
        for _ in range(20):
            before = _file_state(self.path)
            shutil.copyfile(self.path, copy)
            if wal.exists():
                shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
            if _file_state(self.path) == before:
                self.snapshot_of = pid
                return duckdb.connect(str(copy), read_only=True)
        raise StoreError(f"could not take a stable snapshot of {self.path}: process {pid} "
                         "keeps checkpointing it; try again or stop it")

    def close(self) -> None:
        """Close the connection (and every cursor made from it), releasing the file."""
        self.con.close()
        if self._snapshot_dir is not None:
            self._snapshot_dir.cleanup()
        with _OPEN_LOCK:
            _OPEN_PATHS.discard(self.path)


def _file_state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _lock_error(path: Path, exc: duckdb.IOException) -> StoreLockedError:
    """Turn DuckDB's lock conflict into :class:`StoreLockedError`; re-raise anything else."""
    match = _LOCK_RE.search(str(exc))
    if match is None:
        raise exc
    return StoreLockedError(path, int(match["pid"]), match["prog"])
