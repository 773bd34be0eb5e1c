"""The label store: one DuckDB file plus a content-addressed image directory beside it.

Ownership and concurrency
    One process owns the database read-write (DuckDB's rule).  Inside it, every write goes
    through a single writer thread fed by a queue; any number of threads may call the store.
    Reads use one DuckDB cursor per calling thread and see committed data (snapshot isolation).
    A second process that opens the file for writing gets :class:`StoreLockedError`, naming the
    holder's PID and the ways to read meanwhile.  ``LabelStore.open(path, read_only=True)``
    opens the file read-only, or — while another process holds it — a snapshot copy of it.

Durability ("acknowledged" contract)
    :meth:`LabelStore.record_judgment` returns only after the transaction holding the judgment
    has committed (DuckDB writes the commit to its write-ahead log before returning), so an
    acknowledged judgment survives the process being killed.  The writer groups the judgments
    that queue up while it commits into one transaction (group commit): durability per call at
    the throughput of batched inserts.  Judgments are append-only.

Blind votes
    Every judgment records ``blind``: whether the judge did not know which model was on which
    side.  Label judgments always are; arena votes are while the names stay hidden.

Identity rules
    A judgment is keyed by (comparison, annotator, turn, criterion).  Re-sending the same
    choice for a key returns the existing id (safe client retries); a different choice raises
    :class:`DuplicateJudgmentError` — votes are never edited.  ``choice`` names the session
    ('A' = ``session_a``), not the screen side; ``left`` records which session was on the left.

Images
    Stored once under ``<db dir>/images/<sha[:2]>/<sha>.png``; the sha256 is that of a
    canonical PNG re-encoding of the pixels, so equal pixels give one file.  The database holds
    only hashes.  Paths are always derived from a validated hex digest; no path a client sends
    is ever opened.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import queue
import random
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
from PIL import Image

from labeling.queue import (Assignment, AssignmentPolicy, open_assignment, pick_comparison,
                            release)

CHOICES = ("A", "B", "tie", "both_bad")
SIDES = ("A", "B")
DATA_ENV = "MTEDITLAB_DATA"
DB_FILENAME = "labels.duckdb"
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CRITERION_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_LOCK_RE = re.compile(r"Conflicting lock is held in (?P<prog>.*?) \(PID (?P<pid>\d+)\)")

# Migration i (1-based) brings a database from schema version i-1 to i. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE annotators (
            annotator_id INTEGER PRIMARY KEY,
            name VARCHAR NOT NULL UNIQUE,
            simulated BOOLEAN NOT NULL,
            created_at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE images (
            sha256 VARCHAR PRIMARY KEY,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            mode VARCHAR NOT NULL,
            nbytes INTEGER NOT NULL,
            created_at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE sessions (
            session_id INTEGER PRIMARY KEY,
            editor VARCHAR NOT NULL,
            adapter VARCHAR,
            model VARCHAR NOT NULL,
            seed BIGINT,
            source_sha VARCHAR NOT NULL,
            n_turns INTEGER NOT NULL,
            meta VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE turns (
            session_id INTEGER NOT NULL,
            turn_index INTEGER NOT NULL,
            instruction VARCHAR NOT NULL,
            intent VARCHAR,
            input_sha VARCHAR NOT NULL,
            output_sha VARCHAR NOT NULL,
            seconds DOUBLE,
            PRIMARY KEY (session_id, turn_index))""",
        """CREATE TABLE comparisons (
            comparison_id INTEGER PRIMARY KEY,
            session_a INTEGER NOT NULL,
            session_b INTEGER NOT NULL,
            source_sha VARCHAR NOT NULL,
            n_turns INTEGER NOT NULL,
            is_gold BOOLEAN NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            UNIQUE (session_a, session_b))""",
        """CREATE TABLE gold_items (
            comparison_id INTEGER NOT NULL,
            criterion VARCHAR NOT NULL,
            answer VARCHAR NOT NULL CHECK (answer IN ('A', 'B', 'tie', 'both_bad')),
            PRIMARY KEY (comparison_id, criterion))""",
        """CREATE TABLE judgments (
            judgment_id BIGINT NOT NULL,
            comparison_id INTEGER NOT NULL,
            annotator_id INTEGER NOT NULL,
            turn_index INTEGER,
            criterion VARCHAR NOT NULL,
            choice VARCHAR NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'both_bad')),
            left_side VARCHAR NOT NULL CHECK (left_side IN ('A', 'B')),
            latency_ms DOUBLE,
            created_at TIMESTAMPTZ NOT NULL,
            simulated BOOLEAN NOT NULL)""",
        """CREATE TABLE assignments (
            assignment_id INTEGER PRIMARY KEY,
            annotator_id INTEGER NOT NULL,
            comparison_id INTEGER NOT NULL,
            left_side VARCHAR NOT NULL CHECK (left_side IN ('A', 'B')),
            assigned_at TIMESTAMPTZ NOT NULL,
            UNIQUE (annotator_id, comparison_id))""",
    ),
    (  # 2: judgments record whether the judge saw the model names (blind = did not)
        "ALTER TABLE judgments ADD COLUMN blind BOOLEAN NOT NULL DEFAULT true",
        """UPDATE judgments SET blind = false WHERE comparison_id IN (
            SELECT c.comparison_id FROM comparisons c
            JOIN sessions s ON s.session_id = c.session_a
            WHERE json_extract_string(s.meta, '$.origin') = 'arena'
              AND json_extract_string(s.meta, '$.blind') = 'false')""",
    ),
    (  # 3: admins exclude (and re-admit) voters from the ratings; an append-only log
        """CREATE TABLE voter_exclusions (
            exclusion_id INTEGER PRIMARY KEY,
            annotator_id INTEGER NOT NULL,
            excluded BOOLEAN NOT NULL,
            admin VARCHAR NOT NULL,
            reason VARCHAR,
            created_at TIMESTAMPTZ NOT NULL)""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
TABLES = ("annotators", "images", "sessions", "turns", "comparisons", "gold_items",
          "judgments", "assignments", "voter_exclusions")
_ID_COLUMNS = {"annotators": "annotator_id", "sessions": "session_id",
               "comparisons": "comparison_id", "judgments": "judgment_id",
               "assignments": "assignment_id", "voter_exclusions": "exclusion_id"}
_JUDGMENT_SCHEMA = pa.schema([
    ("judgment_id", pa.int64()), ("comparison_id", pa.int32()), ("annotator_id", pa.int32()),
    ("turn_index", pa.int32()), ("criterion", pa.string()), ("choice", pa.string()),
    ("left_side", pa.string()), ("latency_ms", pa.float64()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("simulated", pa.bool_()),
    ("blind", pa.bool_()),
])
_PANDAS_TYPES = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreLockedError(StoreError):
    """Another process (``pid``) holds the database file."""

    def __init__(self, path: Path, pid: int | None, program: str | None):
        self.path, self.pid, self.program = path, pid, program
        if pid == os.getpid():
            super().__init__(f"a LabelStore is already open on {path} in this process; share "
                             "that instance (one owner per file, any number of threads)")
            return
        holder = f"process {pid} ({program})" if pid is not None else "another process"
        super().__init__(
            f"the label database {path} is held by {holder}; only one process may open it "
            f"for writing.\nTo read it meanwhile, take a snapshot:\n"
            f"  python -m labeling --db {path} --read-only stats   (or leaderboard, agreement)\n"
            f"  python -m labeling --db {path} --read-only export --format parquet --out DIR\n"
            f"or stop process {pid if pid is not None else '(the holder)'} first.")


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened read-only."""


class DuplicateJudgmentError(StoreError):
    """The annotator already judged this (comparison, turn, criterion) with another choice."""


class SchemaVersionError(StoreError):
    """The database schema is newer than this code, or too old to read without migrating."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: ``explicit``, else ``$MTEDITLAB_DATA``, else ``./data``."""
    return Path(explicit if explicit is not None else os.environ.get(DATA_ENV, "data"))


def default_db_path(directory: str | os.PathLike | None = None) -> Path:
    """``<data dir>/labels.duckdb`` (see :func:`data_dir`)."""
    return data_dir(directory) / DB_FILENAME


def model_name(editor: str, adapter: str | None) -> str:
    """A session's model: the editor, plus ``+adapter`` when one is loaded (``mini+lora:x``)."""
    return f"{editor}+{adapter}" if adapter else editor


def choice_from_screen(pick: str, left: str) -> str:
    """Map a screen vote ('left', 'right', 'tie', 'both_bad') to a session choice ('A', ...)."""
    if left not in SIDES:
        raise ValueError(f"left must be one of {SIDES}, got {left!r}")
    right = "B" if left == "A" else "A"
    mapping = {"left": left, "right": right, "tie": "tie", "both_bad": "both_bad"}
    if pick not in mapping:
        raise ValueError(f"pick must be one of {tuple(mapping)}, got {pick!r}")
    return mapping[pick]


@dataclasses.dataclass(frozen=True)
class LabelSelection:
    """Which labels an analysis uses, with the counts behind the choice.

    ``include_simulated=None`` (the default everywhere) means: human labels only, unless the
    database holds no human labels, in which case the simulated ones.  Simulated and human
    labels are only mixed when asked for explicitly (``include_simulated=True``).
    """

    human: int
    simulated: int
    include_simulated: bool

    @classmethod
    def resolve(cls, human: int, simulated: int, include_simulated: bool | None):
        use = include_simulated if include_simulated is not None else human == 0
        return cls(human, simulated, bool(use))

    def describe(self) -> str:
        counts = f"judgments: {self.human} human, {self.simulated} simulated"
        if not self.include_simulated or self.simulated == 0:
            hint = " (pass --include-simulated to add the simulated)" if self.simulated else ""
            return f"{counts} -> using the {self.human} human only{hint}"
        if self.human == 0:
            return f"{counts} -> using the {self.simulated} simulated (no human labels yet)"
        return f"{counts} -> MIXING human and simulated as asked ({self.used} in all)"

    @property
    def used(self) -> int:
        return self.human + (self.simulated if self.include_simulated else 0)


@dataclasses.dataclass
class _JudgmentRequest:
    comparison_id: int
    annotator: str
    turn: int | None
    criterion: str
    choice: str
    left: str
    latency_ms: float | None
    simulated: bool | None
    blind: bool
    created_at: dt.datetime
    future: concurrent.futures.Future


@dataclasses.dataclass
class _Call:
    fn: Callable[["_Tx"], Any]
    future: concurrent.futures.Future


@dataclasses.dataclass
class _Tx:
    """A write transaction on the writer thread; cache updates wait in ``on_commit``."""

    cur: duckdb.DuckDBPyConnection
    on_commit: list[Callable[[], None]]


_STOP = object()
_OPEN_PATHS: dict[Path, "LabelStore"] = {}
_OPEN_LOCK = threading.Lock()


def canonical_png(image: bytes | bytearray | memoryview | Image.Image) -> tuple[bytes, Image.Image]:
    """Decode ``image`` and re-encode it as a metadata-free PNG; returns (png bytes, image)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as opened:
            opened.load()
            img = opened.copy()
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"expected PNG/JPEG bytes or a PIL image, got {type(image).__name__}")
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        has_alpha = "A" in img.mode or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    clean = Image.frombytes(img.mode, img.size, img.tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), clean


class LabelStore:
    """DuckDB label store; see the module docstring for the contract.

    Use :meth:`open` (or the constructor) and close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, path: str | os.PathLike, read_only: bool = False,
                 policy: AssignmentPolicy | None = None, max_batch: int = 512):
        self.path = Path(path).resolve()
        self.read_only = read_only
        self.images_dir = self.path.parent / "images"
        self.policy = policy or AssignmentPolicy()
        self.snapshot_of: int | None = None  # PID whose database this is a snapshot of
        self._snapshot_dir: tempfile.TemporaryDirectory | None = None
        self._max_batch = max_batch
        self._local = threading.local()
        self._cursor_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._closed = False
        with _OPEN_LOCK:
            if self.path in _OPEN_PATHS:
                raise StoreLockedError(self.path, os.getpid(), sys.executable)
            self._con = self._connect()
            _OPEN_PATHS[self.path] = self
        try:
            self._prepare()
        except BaseException:
            self._release()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, read_only: bool = False, **kwargs) -> "LabelStore":
        """Open (creating and migrating when writable) the store at ``path``."""
        return cls(path, read_only=read_only, **kwargs)

    # ----------------------------------------------------------------- opening and closing
    def _connect(self) -> duckdb.DuckDBPyConnection:
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return duckdb.connect(str(self.path))
            except duckdb.IOException as exc:
                raise _lock_error(self.path, exc) from None
        if not self.path.exists():
            raise FileNotFoundError(f"no label database at {self.path}; create one with "
                                    f"`python -m labeling --db {self.path} init`")
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

    def _prepare(self) -> None:
        cur = self._con.cursor()
        if self.read_only:
            has_meta = cur.execute("SELECT count(*) FROM information_schema.tables "
                                   "WHERE table_name = 'meta'").fetchall()[0][0]
            version = _schema_version(cur) if has_meta else 0
            if version != SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path} has schema v{version}, this code reads v{SCHEMA_VERSION}; "
                    + ("upgrade MT-EditLab" if version > SCHEMA_VERSION else
                       f"migrate it first: python -m labeling --db {self.path} init"))
            self._ops = None
            return
        cur.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        self._migrate(cur)
        self._load_caches(cur)
        self._rng = random.Random(self.policy.seed)
        self._pair_rng = random.Random(f"pairs:{self.policy.seed}")  # model-pair draws
        self._ops: queue.SimpleQueue | None = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._run_writer, args=(cur,),
                                        name=f"labelstore-writer:{self.path.name}", daemon=True)
        self._writer.start()

    def _migrate(self, cur) -> None:
        """Apply pending :data:`MIGRATIONS`, one transaction each."""
        version = _schema_version(cur)
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(f"{self.path} has schema v{version}, newer than this "
                                     f"code (v{SCHEMA_VERSION}); upgrade MT-EditLab")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            cur.execute("BEGIN")
            try:
                for statement in MIGRATIONS[target - 1]:
                    cur.execute(statement)
                cur.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                            [str(target)])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _load_caches(self, cur) -> None:
        """Load what the writer validates against; only the writer thread touches it after."""
        self._next_id = {t: _first(cur.execute(
            f"SELECT coalesce(max({c}), 0) + 1 FROM {t}"))[0]
                         for t, c in _ID_COLUMNS.items()}
        self._annotators = {name: (aid, sim) for aid, name, sim in cur.execute(
            "SELECT annotator_id, name, simulated FROM annotators").fetchall()}
        self._comparison_turns = dict(cur.execute(
            "SELECT comparison_id, n_turns FROM comparisons").fetchall())
        self._assigned = {(a, c): left for a, c, left in cur.execute(
            "SELECT annotator_id, comparison_id, left_side FROM assignments").fetchall()}
        self._judged = {(c, a, t, k): (j, ch) for j, c, a, t, k, ch in cur.execute(
            "SELECT judgment_id, comparison_id, annotator_id, turn_index, criterion, choice "
            "FROM judgments").fetchall()}

    def close(self) -> None:
        """Finish queued writes, stop the writer and release the database file."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            if self._ops is not None:
                self._ops.put(_STOP)
        if self._ops is not None:
            self._writer.join()
        self._release()

    def _release(self) -> None:
        self._con.close()  # closes every cursor made from it, releasing the file
        if self._snapshot_dir is not None:
            self._snapshot_dir.cleanup()
        with _OPEN_LOCK:
            _OPEN_PATHS.pop(self.path, None)

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------ writer thread
    def _submit(self, item) -> Any:
        if self._ops is None:
            raise ReadOnlyStoreError(f"{self.path} is open read-only")
        with self._submit_lock:  # so nothing is queued behind close()'s stop marker
            if self._closed:
                raise StoreError(f"the store {self.path} is closed")
            self._ops.put(item)
        return item.future.result()

    def _call(self, fn: Callable[[_Tx], Any]) -> Any:
        return self._submit(_Call(fn, concurrent.futures.Future()))

    def _run_writer(self, cur) -> None:
        carry = None
        while True:
            op = carry if carry is not None else self._ops.get()
            carry = None
            if op is _STOP:
                break
            if isinstance(op, _Call):
                self._run_call(cur, op)
                continue
            batch = [op]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, _JudgmentRequest):
                    carry = nxt
                    break
                batch.append(nxt)
            self._write_judgments(cur, batch)

    def _transaction(self, cur, body: Callable[[_Tx], Any]) -> Any:
        tx = _Tx(cur, [])
        cur.execute("BEGIN")
        try:
            result = body(tx)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        for update in tx.on_commit:
            update()
        return result

    def _run_call(self, cur, op: _Call) -> None:
        try:
            result = self._transaction(cur, op.fn)
        except BaseException as exc:
            op.future.set_exception(exc)
        else:
            op.future.set_result(result)

    def _write_judgments(self, cur, batch: list[_JudgmentRequest]) -> None:
        """Validate each request, insert the new ones in one transaction, then acknowledge."""
        rows: list[tuple] = []
        acks: list[tuple[concurrent.futures.Future, int, bool]] = []  # (…, id, in this batch)
        batch_keys: dict[tuple, tuple[int, str]] = {}
        for req in batch:
            try:
                key, row = self._judgment_row(req, batch_keys)
            except BaseException as exc:
                req.future.set_exception(exc)
                continue
            if row is not None:
                rows.append(row)
                batch_keys[key] = (row[0], req.choice)
            in_batch = key in batch_keys
            acks.append((req.future, (batch_keys[key] if in_batch else self._judged[key])[0],
                         in_batch))
        if rows:
            def insert(tx: _Tx) -> None:
                table = pa.Table.from_arrays(
                    [pa.array(column, field.type)
                     for column, field in zip(zip(*rows), _JUDGMENT_SCHEMA)],
                    schema=_JUDGMENT_SCHEMA)
                tx.cur.register("_judgment_batch", table)
                try:
                    tx.cur.execute("INSERT INTO judgments BY NAME SELECT * FROM _judgment_batch")
                finally:
                    tx.cur.unregister("_judgment_batch")
                tx.on_commit.append(lambda: self._judged.update(batch_keys))

            try:
                self._transaction(cur, insert)
            except BaseException as exc:
                for future, jid, in_batch in acks:
                    if in_batch:
                        future.set_exception(exc)
                    else:
                        future.set_result(jid)
                return
        for future, jid, _ in acks:
            future.set_result(jid)

    def _judgment_row(self, req: _JudgmentRequest, batch_keys: dict) -> tuple[tuple, tuple | None]:
        """(key, row to insert) for a request; row is None when it repeats a stored vote."""
        if req.annotator not in self._annotators:
            raise KeyError(f"unknown annotator {req.annotator!r}; add_annotator() first")
        annotator_id, annotator_simulated = self._annotators[req.annotator]
        if req.comparison_id not in self._comparison_turns:
            raise KeyError(f"unknown comparison {req.comparison_id}")
        n_turns = self._comparison_turns[req.comparison_id]
        if req.turn is not None and not 0 <= req.turn < n_turns:
            raise ValueError(f"turn {req.turn} out of range for comparison "
                             f"{req.comparison_id} with {n_turns} turns (None = overall)")
        if req.simulated is not None and req.simulated != annotator_simulated:
            raise ValueError(f"simulated={req.simulated} but annotator {req.annotator!r} is "
                             f"{'simulated' if annotator_simulated else 'human'}")
        assigned_left = self._assigned.get((annotator_id, req.comparison_id))
        if assigned_left is not None and assigned_left != req.left:
            raise ValueError(f"left={req.left!r} but {req.annotator!r} was shown session "
                             f"{assigned_left!r} on the left for comparison {req.comparison_id}")
        key = (req.comparison_id, annotator_id, req.turn, req.criterion)
        previous = batch_keys.get(key) or self._judged.get(key)
        if previous is not None:
            if previous[1] != req.choice:
                raise DuplicateJudgmentError(
                    f"{req.annotator!r} already chose {previous[1]!r} for comparison "
                    f"{req.comparison_id}, turn {req.turn}, criterion {req.criterion!r} "
                    f"(judgment {previous[0]}); judgments are append-only")
            return key, None
        jid = self._take_id("judgments")
        return key, (jid, req.comparison_id, annotator_id, req.turn, req.criterion, req.choice,
                     req.left, req.latency_ms, req.created_at, annotator_simulated, req.blind)

    def _take_id(self, table: str) -> int:
        value = self._next_id[table]
        self._next_id[table] = value + 1
        return value

    # ------------------------------------------------------------------------------ writes
    def put_image(self, image: bytes | bytearray | memoryview | Image.Image) -> str:
        """Store an image (encoded bytes or PIL) once; returns its sha256 (canonical PNG)."""
        if self._ops is None:
            raise ReadOnlyStoreError(f"{self.path} is open read-only")
        png, img = canonical_png(image)
        sha = hashlib.sha256(png).hexdigest()
        target = self._image_path(sha)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(png)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        now = _now()
        self._call(lambda tx: tx.cur.execute(
            "INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?, ?)",
            [sha, img.width, img.height, img.mode, len(png), now]))
        return sha

    def add_annotator(self, name: str, simulated: bool = False) -> int:
        """Register an annotator (idempotent for the same flag); returns its id."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("annotator name must be a non-empty string")
        simulated = bool(simulated)

        def body(tx: _Tx) -> int:
            if name in self._annotators:
                aid, sim = self._annotators[name]
                if sim != simulated:
                    raise ValueError(f"annotator {name!r} exists with simulated={sim}")
                return aid
            aid = self._take_id("annotators")
            tx.cur.execute("INSERT INTO annotators VALUES (?, ?, ?, ?)",
                           [aid, name, simulated, _now()])
            tx.on_commit.append(lambda: self._annotators.__setitem__(name, (aid, simulated)))
            return aid

        return self._call(body)

    def add_session(self, editor: str, adapter: str | None, seed: int | None, source_sha: str,
                    turns: Sequence[Mapping[str, Any]],
                    meta: Mapping[str, Any] | None = None) -> int:
        """Record a finished multi-turn session; returns its id.

        ``turns``: ``{instruction, intent?, input_sha?, output_sha, seconds?}`` in order.  Each
        turn edits the previous turn's output (turn 0 the source); ``input_sha`` may be left
        out and is checked when given.  All hashes must name images already stored.
        """
        if not isinstance(editor, str) or not editor:
            raise ValueError("editor must be a non-empty string")
        if not turns:
            raise ValueError("a session needs at least one turn")
        rows = []
        previous = _check_sha(source_sha)
        for index, turn in enumerate(turns):
            instruction = turn.get("instruction")
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError(f"turn {index}: instruction must be a non-empty string")
            input_sha = _check_sha(turn.get("input_sha", previous))
            if input_sha != previous:
                raise ValueError(f"turn {index}: input_sha {input_sha[:12]} is not the previous "
                                 f"output {previous[:12]} (each turn edits the last output)")
            output_sha = _check_sha(turn.get("output_sha"))
            seconds = turn.get("seconds")
            rows.append((index, instruction, turn.get("intent"), input_sha, output_sha,
                         None if seconds is None else float(seconds)))
            previous = output_sha
        meta_json = json.dumps(dict(meta or {}), sort_keys=True)
        shas = sorted({source_sha} | {r[4] for r in rows})

        def body(tx: _Tx) -> int:
            known = {s for (s,) in tx.cur.execute(
                "SELECT sha256 FROM images WHERE list_contains(?, sha256)", [shas]).fetchall()}
            missing = [s for s in shas if s not in known]
            if missing:
                raise KeyError(f"images not in the store (put_image first): {missing}")
            sid = self._take_id("sessions")
            tx.cur.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [sid, editor, adapter, model_name(editor, adapter), seed, source_sha,
                            len(rows), meta_json, _now()])
            tx.cur.executemany("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(sid, *r) for r in rows])
            return sid

        return self._call(body)

    def add_comparison(self, session_a: int, session_b: int,
                       gold: str | Mapping[str, str] | None = None) -> int:
        """Pair two sessions with the same source and instructions; returns the comparison id.

        ``gold``: the known answer ('A', 'B', 'tie', 'both_bad') for every criterion, or a
        mapping criterion -> answer (key ``'*'`` for the rest).  Ordinary (non-gold)
        comparisons must pit two different models.  Re-adding the same pair with the same gold
        returns the existing id.
        """
        gold_rows = _gold_rows(gold)

        def body(tx: _Tx) -> int:
            sessions = dict((sid, (model, source)) for sid, model, source in tx.cur.execute(
                "SELECT session_id, model, source_sha FROM sessions WHERE session_id IN (?, ?)",
                [session_a, session_b]).fetchall())
            for sid in (session_a, session_b):
                if sid not in sessions:
                    raise KeyError(f"unknown session {sid}")
            if session_a == session_b:
                raise ValueError("a comparison needs two different sessions")
            if sessions[session_a][1] != sessions[session_b][1]:
                raise ValueError(f"sessions {session_a} and {session_b} start from different "
                                 "source images")
            instructions = {sid: [i for (i,) in tx.cur.execute(
                "SELECT instruction FROM turns WHERE session_id = ? ORDER BY turn_index",
                [sid]).fetchall()] for sid in (session_a, session_b)}
            if instructions[session_a] != instructions[session_b]:
                raise ValueError(f"sessions {session_a} and {session_b} follow different "
                                 "instructions")
            if not gold_rows and sessions[session_a][0] == sessions[session_b][0]:
                raise ValueError(f"both sessions are model {sessions[session_a][0]!r}; an "
                                 "ordinary comparison needs two models (gold items may not)")
            existing = _first(tx.cur.execute(
                "SELECT comparison_id, session_a FROM comparisons WHERE (session_a, session_b) "
                "IN ((?, ?), (?, ?))", [session_a, session_b, session_b, session_a]))
            if existing is not None:
                cid, first = existing
                stored = sorted(tx.cur.execute(
                    "SELECT criterion, answer FROM gold_items WHERE comparison_id = ?",
                    [cid]).fetchall())
                if first != session_a or stored != sorted(gold_rows):
                    raise ValueError(f"comparison {cid} already pairs these sessions "
                                     "(other side order or gold)")
                return cid
            cid = self._take_id("comparisons")
            n_turns = len(instructions[session_a])
            tx.cur.execute("INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [cid, session_a, session_b, sessions[session_a][1], n_turns,
                            bool(gold_rows), _now()])
            if gold_rows:
                tx.cur.executemany("INSERT INTO gold_items VALUES (?, ?, ?)",
                                   [(cid, c, a) for c, a in gold_rows])
            tx.on_commit.append(lambda: self._comparison_turns.__setitem__(cid, n_turns))
            return cid

        return self._call(body)

    def record_judgment(self, comparison_id: int, annotator: str, turn: int | None,
                        criterion: str, choice: str, left: str,
                        latency_ms: float | None = None, simulated: bool | None = None,
                        blind: bool = True) -> int:
        """Append one judgment; returns its id once committed (the acknowledgement).

        ``turn``: 0-based turn index, or None for the whole session.  ``choice`` names the
        session (see module docstring); ``left`` the session shown on the left.  ``simulated``
        defaults to the annotator's flag and must agree with it.  ``blind``: the judge did not
        see which model was on which side (labeling always; the arena until names are shown).
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if left not in SIDES:
            raise ValueError(f"left must be one of {SIDES}, got {left!r}")
        if not isinstance(criterion, str) or not _CRITERION_RE.fullmatch(criterion):
            raise ValueError(f"criterion must match {_CRITERION_RE.pattern}, got {criterion!r}")
        if turn is not None and (isinstance(turn, bool) or not isinstance(turn, int)):
            raise TypeError(f"turn must be an int or None, got {turn!r}")
        if latency_ms is not None and not latency_ms >= 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms!r}")
        if not isinstance(blind, bool):
            raise TypeError(f"blind must be a bool, got {blind!r}")
        return self._submit(_JudgmentRequest(
            int(comparison_id), annotator, turn, criterion, choice, left,
            None if latency_ms is None else float(latency_ms),
            None if simulated is None else bool(simulated), blind, _now(),
            concurrent.futures.Future()))

    def next_assignment(self, annotator: str) -> Assignment | None:
        """The annotator's next comparison under :attr:`policy` (see :mod:`labeling.queue`)."""

        def body(tx: _Tx) -> Assignment | None:
            if annotator not in self._annotators:
                raise KeyError(f"unknown annotator {annotator!r}; add_annotator() first")
            aid = self._annotators[annotator][0]
            now = _now()
            expired_before = now - dt.timedelta(seconds=self.policy.ttl_s)
            row = open_assignment(tx.cur, aid, expired_before)
            if row is not None:
                return Assignment(row[0], annotator, row[1], row[2], row[3])
            cid = pick_comparison(tx.cur, aid, self.policy, self._rng, expired_before,
                                  pair_rng=self._pair_rng)
            if cid is None:
                return None
            left = self._rng.choice(SIDES)
            assignment = Assignment(self._take_id("assignments"), annotator, cid, left, now)
            tx.cur.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
                           [assignment.assignment_id, aid, cid, left, now])
            tx.on_commit.append(lambda: self._assigned.__setitem__((aid, cid), left))
            return assignment

        return self._call(body)

    def release_assignment(self, annotator: str, comparison_id: int) -> None:
        """Give an assignment back (skip / flag): it no longer counts against the overlap and
        is never served to this annotator again."""

        def body(tx: _Tx) -> None:
            if annotator not in self._annotators:
                raise KeyError(f"unknown annotator {annotator!r}")
            expired = _now() - dt.timedelta(seconds=self.policy.ttl_s + 1)
            release(tx.cur, self._annotators[annotator][0], int(comparison_id), expired)

        self._call(body)

    def set_voter_excluded(self, annotator: str, excluded: bool, admin: str,
                           reason: str | None = None) -> int:
        """Record an admin's decision to exclude a voter from the ratings (``excluded=True``)
        or to count them again; returns the log row's id.  The latest decision holds; the
        log keeps every one (who, when, why)."""
        if not isinstance(admin, str) or not admin.strip():
            raise ValueError("admin must be a non-empty string")

        def body(tx: _Tx) -> int:
            if annotator not in self._annotators:
                raise KeyError(f"unknown annotator {annotator!r}")
            row_id = self._take_id("voter_exclusions")
            tx.cur.execute("INSERT INTO voter_exclusions VALUES (?, ?, ?, ?, ?, ?)",
                           [row_id, self._annotators[annotator][0], bool(excluded),
                            admin.strip(), reason, _now()])
            return row_id

        return self._call(body)

    def load_tables(self, files: Mapping[str, str | os.PathLike]) -> dict[str, int]:
        """Fill an **empty** store from Parquet files of its own tables (``{table: path}``,
        e.g. a snapshot written by :mod:`labeling.snapshots`), ids kept, in one transaction;
        returns the rows loaded per table.  The images must already be in place."""
        unknown = set(files) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}")

        def body(tx: _Tx) -> dict[str, int]:
            for table in TABLES:
                if _first(tx.cur.execute(f"SELECT count(*) FROM {table}"))[0]:
                    raise StoreError(f"{self.path} is not empty ({table} has rows): a "
                                     "snapshot is loaded only into an empty store")
            loaded = {}
            for table in TABLES:       # in dependency order
                if table not in files:
                    continue
                path = str(Path(files[table])).replace("'", "''")
                tx.cur.execute(f"INSERT INTO {table} SELECT * FROM read_parquet('{path}')")
                loaded[table] = _first(tx.cur.execute(f"SELECT count(*) FROM {table}"))[0]
            self._load_caches(tx.cur)
            return loaded

        try:
            return self._call(body)
        except BaseException:
            self._call(lambda tx: self._load_caches(tx.cur))
            raise

    def excluded_voters(self) -> set[str]:
        """Names of the annotators whose latest exclusion decision is 'excluded'."""
        frame = self.query(
            """SELECT an.name FROM annotators an JOIN (
                   SELECT annotator_id, arg_max(excluded, exclusion_id) AS excluded
                   FROM voter_exclusions GROUP BY annotator_id) x USING (annotator_id)
               WHERE x.excluded""")
        return set(frame["name"])

    # ------------------------------------------------------------------------------- reads
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            if self._closed:
                raise StoreError(f"the store {self.path} is closed")
            with self._cursor_lock:
                cur = self._local.cur = self._con.cursor()
        return cur

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read-only SQL query on this thread's cursor; nullable integer columns."""
        table = self._cursor().sql(sql, params=params).to_arrow_table()
        return table.to_pandas(types_mapper=_PANDAS_TYPES.get)

    def table(self, name: str) -> pd.DataFrame:
        """A whole table (one of :data:`TABLES`) as a DataFrame."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; one of {TABLES}")
        return self.query(f"SELECT * FROM {name} ORDER BY ALL")

    def schema_version(self) -> int:
        return _schema_version(self._cursor())

    def image_bytes(self, sha: str) -> bytes:
        """The stored PNG for ``sha``, verified against its hash."""
        data = self._image_path(_check_sha(sha)).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise StoreError(f"image {sha} is corrupt on disk")
        return data

    def get_image(self, sha: str) -> Image.Image:
        """The stored image for ``sha`` as a loaded PIL image."""
        with Image.open(io.BytesIO(self.image_bytes(sha))) as img:
            img.load()
            return img.copy()

    def _image_path(self, sha: str) -> Path:
        return self.images_dir / sha[:2] / f"{sha}.png"

    def get_comparison(self, comparison_id: int) -> dict[str, Any]:
        """What a client shows for a comparison: source, instructions, both sides' outputs."""
        comp = self.query("SELECT * FROM comparisons WHERE comparison_id = ?", [comparison_id])
        if comp.empty:
            raise KeyError(f"unknown comparison {comparison_id}")
        row = comp.iloc[0]
        turns = self.query(
            "SELECT t.session_id, t.turn_index, t.instruction, t.output_sha, s.model "
            "FROM turns t JOIN sessions s USING (session_id) WHERE session_id IN (?, ?) "
            "ORDER BY t.turn_index", [int(row.session_a), int(row.session_b)])
        sides = {}
        for side, sid in (("A", int(row.session_a)), ("B", int(row.session_b))):
            mine = turns[turns.session_id == sid]
            sides[side] = {"session_id": sid, "model": mine.model.iloc[0],
                           "outputs": mine.output_sha.tolist()}
        return {"comparison_id": int(comparison_id), "source_sha": row.source_sha,
                "instructions": turns[turns.session_id == int(row.session_a)]
                .instruction.tolist(), **sides}

    def label_selection(self, include_simulated: bool | None = None) -> LabelSelection:
        """Counts of human/simulated judgments and the resolved ``include_simulated``."""
        human, simulated = _first(self._cursor().execute(
            "SELECT count(*) FILTER (NOT simulated), count(*) FILTER (simulated) "
            "FROM judgments"))
        return LabelSelection.resolve(human, simulated, include_simulated)

    def judgments_frame(self, include_simulated: bool | None = None) -> pd.DataFrame:
        """Judgments joined with annotator and model names, filtered per :class:`LabelSelection`.

        Columns: judgment_id, comparison_id, annotator, simulated, turn (<NA> = overall),
        criterion, choice, left, latency_ms, created_at, blind, gold, session_a, session_b,
        model_a, model_b.  Callers that report counts resolve the selection first with
        :meth:`label_selection` and pass its ``include_simulated`` here.
        """
        selection = self.label_selection(include_simulated)
        return self.query(
            """SELECT j.judgment_id, j.comparison_id, an.name AS annotator, j.simulated,
                      j.turn_index AS turn, j.criterion, j.choice, j.left_side AS "left",
                      j.latency_ms, j.created_at, j.blind, c.is_gold AS gold, c.session_a, c.session_b,
                      sa.model AS model_a, sb.model AS model_b
               FROM judgments j
               JOIN annotators an USING (annotator_id)
               JOIN comparisons c USING (comparison_id)
               JOIN sessions sa ON sa.session_id = c.session_a
               JOIN sessions sb ON sb.session_id = c.session_b
               WHERE ? OR NOT j.simulated
               ORDER BY j.judgment_id""", [selection.include_simulated])
        return frame

    def counts(self) -> dict[str, int]:
        """Row counts of every table."""
        cur = self._cursor()
        return {t: _first(cur.execute(f"SELECT count(*) FROM {t}"))[0] for t in TABLES}


def without_gold(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop planted gold items (rows whose ``gold`` column is true), if the column exists."""
    return frame[~frame["gold"].astype(bool)] if "gold" in frame.columns else frame


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _first(result) -> tuple | None:
    """First row of an executed query, consuming the result (DuckDB 2 keeps unfinished results
    open on the cursor and refuses further work until they are drained)."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _check_sha(sha: Any) -> str:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return sha


def _gold_rows(gold: str | Mapping[str, str] | None) -> list[tuple[str, str]]:
    if gold is None:
        return []
    items = {"*": gold} if isinstance(gold, str) else dict(gold)
    if not items:
        raise ValueError("gold mapping is empty")
    for criterion, answer in items.items():
        if criterion != "*" and not _CRITERION_RE.fullmatch(str(criterion)):
            raise ValueError(f"bad gold criterion {criterion!r}")
        if answer not in CHOICES:
            raise ValueError(f"gold answer must be one of {CHOICES}, got {answer!r}")
    return sorted(items.items())


def _schema_version(cur) -> int:
    row = _first(cur.execute("SELECT value FROM meta WHERE key = 'schema_version'"))
    return int(row[0]) if row else 0


def _file_state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _lock_error(path: Path, exc: duckdb.IOException) -> StoreLockedError:
    """Turn DuckDB's lock conflict into :class:`StoreLockedError`; re-raise anything else."""
    match = _LOCK_RE.search(str(exc))
    if match is None:
        raise exc
    return StoreLockedError(path, int(match["pid"]), match["prog"])
