"""The label store: one DuckDB file plus a content-addressed image directory beside it.

:class:`LabelStore` is the one entry point: every read and write of labels goes through its
methods.  Built from :mod:`~labeling.connection`, :mod:`~labeling.schema`,
:mod:`~labeling.writer`, :mod:`~labeling.ledger`, :mod:`~labeling.blobs`,
:mod:`~labeling.queue` and :mod:`~labeling.reads` (its read methods).

Ownership and concurrency
    One process owns the database read-write (DuckDB's rule).  Inside it, every write goes
    through the single writer thread; any number of threads may call the store.  Reads use one
    DuckDB cursor per calling thread and see committed data (snapshot isolation).  A second
    process that opens the file for writing gets :class:`StoreLockedError`, naming the holder's
    PID.  ``LabelStore.open(path, read_only=True)`` opens the file read-only, or — while
    another process holds it — a snapshot copy of it.

Durability ("acknowledged" contract)
    :meth:`LabelStore.record_judgment` returns only after the transaction holding the judgment
    has committed (DuckDB writes the commit to its write-ahead log before returning), so an
    acknowledged judgment survives the process being killed.  Judgments that queue up while
    the writer commits share one transaction (group commit);
    :meth:`LabelStore.record_submission` writes a labeling item's judgments in a transaction
    of their own, all or nothing.  Identity rules: see :mod:`labeling.ledger`.

Comparisons and votes
    A comparison's ``kind`` says what it is: ``'item'`` (labeling item), ``'gold'`` (labeling
    item with a known answer) or ``'arena'`` (arena battle).  ``choice`` names the session
    ('A' = ``session_a``), not the screen side; ``left`` records which session was on the left.
    Every judgment records ``blind``: whether the judge did not know which model was on which
    side.  Skips and flags of labeling items are rows too (:meth:`LabelStore.release_assignment`).

Free text
    Reasons (flags, voter exclusions) are stored as :func:`clean_reason` makes them (lone
    surrogates become U+FFFD), never refused.

Opening
    A file DuckDB cannot read (corrupt, truncated, not a database) is a :class:`StoreError`
    saying so in one line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
from PIL import Image

from labeling.blobs import ImageBlobs, check_sha
from labeling.connection import DatabaseFile
from labeling.errors import AssignmentError, ReadOnlyStoreError, StoreError
from labeling.ledger import JudgmentRequest, Ledger
from labeling.queue import (Assignment, AssignmentPolicy, closed_because, open_assignment,
                            pick_comparison, release)
from labeling.reads import StoreReads
from labeling.schema import CHOICES, CRITERION_RE, KINDS, SIDES, TABLES, check_readable, migrate
from labeling.writer import Tx, Writer

REASON_CHARS = 500  # longest stored reason (flags, exclusions)


def model_name(editor: str, adapter: str | None) -> str:
    """A session's model: the editor, plus ``+adapter`` when one is loaded (``mini+lora:x``)."""
    return f"{editor}+{adapter}" if adapter else editor


class LabelStore(StoreReads):
    """DuckDB label store; see the module docstring for the contract.

    Use :meth:`open` (or the constructor) and close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, path: str | os.PathLike, read_only: bool = False,
                 policy: AssignmentPolicy | None = None, max_batch: int = 512):
        self.path = Path(path).resolve()
        self.read_only = read_only
        self.blobs = ImageBlobs(self.path.parent / "images")
        self.images_dir = self.blobs.root
        self.policy = policy or AssignmentPolicy()
        try:
            self._db = DatabaseFile(self.path, read_only)
        except duckdb.Error as exc:
            raise _unreadable(self.path, exc) from exc
        self.snapshot_of = self._db.snapshot_of  # PID whose database this is a snapshot of
        self._con = self._db.con
        self._local = threading.local()
        self._cursor_lock = threading.Lock()
        self._closed = False
        self._writer: Writer | None = None
        try:
            cur = self._con.cursor()
            if read_only:
                check_readable(cur, self.path)
                return
            migrate(cur, self.path)
            self._ledger = Ledger(cur)
            self._rng = random.Random(self.policy.seed)
            self._pair_rng = random.Random(f"pairs:{self.policy.seed}")  # model-pair draws
            self._writer = Writer(cur, f"labelstore-writer:{self.path.name}",
                                  self._ledger.write_judgments, max_batch)
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, duckdb.Error):
                raise _unreadable(self.path, exc) from exc
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, read_only: bool = False, **kwargs) -> "LabelStore":
        """Open (creating and migrating when writable) the store at ``path``."""
        return cls(path, read_only=read_only, **kwargs)

    def close(self) -> None:
        """Finish queued writes, stop the writer and release the database file."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        self._db.close()

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self) -> Writer:
        if self._writer is None:
            raise ReadOnlyStoreError(f"{self.path} is open read-only")
        return self._writer

    def _call(self, fn) -> Any:
        """Run ``fn(tx)`` in a write transaction on the writer thread."""
        return self._write().call(fn)

    # ------------------------------------------------------------------------------ writes
    def put_image(self, image: bytes | bytearray | memoryview | Image.Image) -> str:
        """Store an image (encoded bytes or PIL) once; returns its sha256 (canonical PNG)."""
        self._write()
        sha, png, img = self.blobs.put(image)
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

        def body(tx: Tx) -> int:
            known = self._ledger.annotators
            if name in known:
                if known[name][1] != simulated:
                    raise ValueError(f"annotator {name!r} exists with simulated={known[name][1]}")
                return known[name][0]
            aid = self._ledger.take_id("annotators")
            tx.cur.execute("INSERT INTO annotators VALUES (?, ?, ?, ?)",
                           [aid, name, simulated, _now()])
            tx.on_commit.append(lambda: known.__setitem__(name, (aid, simulated)))
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
        previous = check_sha(source_sha)
        for index, turn in enumerate(turns):
            instruction = turn.get("instruction")
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError(f"turn {index}: instruction must be a non-empty string")
            input_sha = check_sha(turn.get("input_sha", previous))
            if input_sha != previous:
                raise ValueError(f"turn {index}: input_sha {input_sha[:12]} is not the previous "
                                 f"output {previous[:12]} (each turn edits the last output)")
            output_sha = check_sha(turn.get("output_sha"))
            seconds = turn.get("seconds")
            rows.append((index, instruction, turn.get("intent"), input_sha, output_sha,
                         None if seconds is None else float(seconds)))
            previous = output_sha
        meta_json = json.dumps(dict(meta or {}), sort_keys=True)
        shas = sorted({source_sha} | {r[4] for r in rows})

        def body(tx: Tx) -> int:
            known = {s for (s,) in tx.cur.execute(
                "SELECT sha256 FROM images WHERE list_contains(?, sha256)", [shas]).fetchall()}
            missing = [s for s in shas if s not in known]
            if missing:
                raise KeyError(f"images not in the store (put_image first): {missing}")
            sid = self._ledger.take_id("sessions")
            tx.cur.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [sid, editor, adapter, model_name(editor, adapter), seed, source_sha,
                            len(rows), meta_json, _now()])
            tx.cur.executemany("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(sid, *r) for r in rows])
            return sid

        return self._call(body)

    def add_comparison(self, session_a: int, session_b: int,
                       gold: str | Mapping[str, str] | None = None,
                       kind: str | None = None) -> int:
        """Pair two sessions with the same source and instructions; returns the comparison id.

        ``kind``: one of :data:`~labeling.schema.KINDS`; default ``'gold'`` when ``gold`` is
        given, else ``'item'``.  ``gold`` (gold items only): the known answer ('A', 'B', 'tie',
        'both_bad') for every criterion, or a mapping criterion -> answer (key ``'*'`` for the
        rest).  Other comparisons must pit two different models.  Re-adding the same pair with
        the same kind and gold returns the existing id.
        """
        gold_rows = _gold_rows(gold)
        kind = kind or ("gold" if gold_rows else "item")
        if kind not in KINDS or (kind == "gold") != bool(gold_rows):
            raise ValueError(f"kind must be one of {KINDS}, 'gold' exactly when gold answers "
                             f"are given; got kind={kind!r}, gold={gold!r}")

        def body(tx: Tx) -> int:
            sessions = {sid: (model, source) for sid, model, source in tx.cur.execute(
                "SELECT session_id, model, source_sha FROM sessions WHERE session_id IN (?, ?)",
                [session_a, session_b]).fetchall()}
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
            if kind != "gold" and sessions[session_a][0] == sessions[session_b][0]:
                raise ValueError(f"both sessions are model {sessions[session_a][0]!r}; a "
                                 "comparison needs two models (gold items may not)")
            existing = _first(tx.cur.execute(
                "SELECT comparison_id, session_a, kind FROM comparisons WHERE (session_a, "
                "session_b) IN ((?, ?), (?, ?))", [session_a, session_b, session_b, session_a]))
            if existing is not None:
                cid, first, stored_kind = existing
                stored = sorted(tx.cur.execute(
                    "SELECT criterion, answer FROM gold_items WHERE comparison_id = ?",
                    [cid]).fetchall())
                if first != session_a or stored_kind != kind or stored != sorted(gold_rows):
                    raise ValueError(f"comparison {cid} already pairs these sessions "
                                     "(other side order, kind or gold)")
                return cid
            cid = self._ledger.take_id("comparisons")
            n_turns = len(instructions[session_a])
            tx.cur.execute("INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [cid, session_a, session_b, sessions[session_a][1], n_turns, kind,
                            _now()])
            if gold_rows:
                tx.cur.executemany("INSERT INTO gold_items VALUES (?, ?, ?)",
                                   [(cid, c, a) for c, a in gold_rows])
            tx.on_commit.append(lambda: self._ledger.comparison_turns.__setitem__(cid, n_turns))
            return cid

        return self._call(body)

    def record_judgment(self, comparison_id: int, annotator: str, turn: int | None,
                        criterion: str, choice: str, left: str,
                        latency_ms: float | None = None, simulated: bool | None = None, *,
                        blind: bool) -> int:
        """Append one judgment; returns its id once committed (the acknowledgement).

        ``turn``: 0-based turn index, or None for the whole session.  ``choice`` names the
        session (see module docstring); ``left`` the session shown on the left.  ``simulated``
        defaults to the annotator's flag and must agree with it.  ``blind`` (required): the
        judge did not see which model was on which side (labeling always; the arena until the
        names are shown).
        """
        return self._write().submit(_request(comparison_id, annotator, turn, criterion, choice,
                                             left, latency_ms, simulated, blind, _now()))

    def record_submission(self, annotator: str, comparison_id: int, left: str,
                          judgments: Sequence[tuple[int | None, str, str, float | None]], *,
                          blind: bool) -> list[int]:
        """Record an annotator's judgments of their assigned comparison together, in one
        transaction (all or nothing); returns their ids once committed.

        ``judgments``: ``(turn, criterion, choice, latency_ms)`` each, checked as by
        :meth:`record_judgment`, with ``left`` and ``blind`` shared (``simulated``: the
        annotator's).  Unless ``comparison_id`` is the annotator's open assignment (see
        :mod:`labeling.queue`) it is refused with :class:`AssignmentError`: a stale or repeated
        submission stores nothing.
        """
        if not judgments:
            raise ValueError("a submission needs at least one judgment")
        now = _now()
        requests = [_request(comparison_id, annotator, turn, criterion, choice, left, ms, None,
                             blind, now) for turn, criterion, choice, ms in judgments]

        def body(tx: Tx) -> list[int]:
            cid = requests[0].comparison_id
            reason = closed_because(tx.cur, self._ledger.annotator_id(annotator), cid)
            if reason is not None:
                raise AssignmentError(annotator, cid, reason)
            self._ledger.write_judgments(lambda insert: insert(tx), requests)
            return [request.future.result() for request in requests]  # a refusal undoes all

        return self._call(body)

    def next_assignment(self, annotator: str) -> Assignment | None:
        """The annotator's next comparison under :attr:`policy` (see :mod:`labeling.queue`)."""

        def body(tx: Tx) -> Assignment | None:
            aid = self._ledger.annotator_id(annotator)
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
            assignment = Assignment(self._ledger.take_id("assignments"), annotator, cid, left,
                                    now)
            tx.cur.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
                           [assignment.assignment_id, aid, cid, left, now])
            tx.on_commit.append(lambda: self._ledger.assigned.__setitem__((aid, cid), left))
            return assignment

        return self._call(body)

    def release_assignment(self, annotator: str, comparison_id: int,
                           flag: str | None = None) -> int:
        """Give an assignment back: skip it, or flag it for review (``flag``: the annotator's
        reason).  It no longer counts against the overlap and is never served to this
        annotator again; the skip (or flag) is recorded as a ``skips`` row, whose id this
        returns.  ``flag`` is stored as :func:`clean_reason` makes it.  Unless ``comparison_id``
        is the annotator's open assignment it is refused with :class:`AssignmentError`, as
        :meth:`record_submission` refuses it: a stale or repeated skip records nothing."""
        flag = None if flag is None else clean_reason(flag)

        def body(tx: Tx) -> int:
            aid = self._ledger.annotator_id(annotator)
            reason = closed_because(tx.cur, aid, int(comparison_id))
            if reason is not None:
                raise AssignmentError(annotator, int(comparison_id), reason)
            now = _now()
            release(tx.cur, aid, int(comparison_id),
                    now - dt.timedelta(seconds=self.policy.ttl_s + 1))
            skip_id = self._ledger.take_id("skips")
            tx.cur.execute("INSERT INTO skips VALUES (?, ?, ?, ?, ?, ?)",
                           [skip_id, aid, int(comparison_id), flag is not None, flag, now])
            return skip_id

        return self._call(body)

    def set_voter_excluded(self, annotator: str, excluded: bool, admin: str,
                           reason: str | None = None) -> int:
        """Record an admin's decision to exclude a voter from the ratings (``excluded=True``)
        or to count them again; returns the log row's id.  The latest decision holds; the
        log keeps every one (who, when, why); ``reason`` is stored as :func:`clean_reason`
        makes it (None when that is empty)."""
        if not isinstance(admin, str) or not admin.strip():
            raise ValueError("admin must be a non-empty string")
        reason = clean_reason(reason) or None

        def body(tx: Tx) -> int:
            if annotator not in self._ledger.annotators:
                raise KeyError(f"unknown annotator {annotator!r}")
            row_id = self._ledger.take_id("voter_exclusions")
            tx.cur.execute("INSERT INTO voter_exclusions VALUES (?, ?, ?, ?, ?, ?)",
                           [row_id, self._ledger.annotators[annotator][0], bool(excluded),
                            admin.strip(), reason, _now()])
            return row_id

        return self._call(body)

    def rename_annotators(self, names: Mapping[str, str]) -> int:
        """Rename annotators ``{old: new}`` everywhere at once (their judgments, assignments, skips
        and exclusions follow by id); unknown old names are ignored; returns how many were renamed.
        A new name that is already taken is an error: two voters are never merged."""

        def body(tx: Tx) -> int:
            known = self._ledger.annotators
            todo = {old: new for old, new in names.items() if old in known and old != new}
            taken = sorted(new for new in todo.values() if new in known or list(todo.values()).count(new) > 1)
            if taken:
                raise ValueError(f"annotator names already taken: {taken}")
            tx.cur.executemany("UPDATE annotators SET name = ? WHERE name = ?",
                               [(new, old) for old, new in todo.items()])

            def commit() -> None:
                for old, new in todo.items():
                    known[new] = known.pop(old)

            tx.on_commit.append(commit)
            return len(todo)

        return self._call(body)

    def load_tables(self, files: Mapping[str, str | os.PathLike]) -> dict[str, int]:
        """Fill an **empty** store from Parquet files of its own tables (``{table: path}``,
        e.g. a snapshot written by :mod:`labeling.snapshots`), ids kept, in one transaction;
        returns the rows loaded per table.  The images must already be in place."""
        unknown = set(files) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}")

        def body(tx: Tx) -> dict[str, int]:
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
            tx.on_commit.append(lambda: self._ledger.load(tx.cur))
            return loaded

        return self._call(body)


def clean_reason(text: Any) -> str:
    """``text`` as a stored reason: one line (whitespace runs become one space) of at most
    :data:`REASON_CHARS` characters; lone surrogates (a browser's JSON can carry them, DuckDB
    cannot store them) become U+FFFD, paired ones the character they encode.  '' for None."""
    text = str(text or "").encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return " ".join(text.split())[:REASON_CHARS]


def _request(comparison_id, annotator, turn, criterion, choice, left, latency_ms, simulated,
             blind, created_at) -> JudgmentRequest:
    return JudgmentRequest(int(comparison_id), annotator, turn, criterion, choice, left,
                           None if latency_ms is None else float(latency_ms),
                           None if simulated is None else bool(simulated), blind, created_at)


def _unreadable(path: Path, exc: duckdb.Error) -> StoreError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StoreError(f"{path} is not a readable label database ({reason}); check the path, "
                      "or restore the file from a backup or snapshot")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _first(result) -> tuple | None:
    """First row of an executed query, consuming the result (DuckDB 2 keeps unfinished results
    open on the cursor and refuses further work until they are drained)."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _gold_rows(gold: str | Mapping[str, str] | None) -> list[tuple[str, str]]:
    if gold is None:
        return []
    items = {"*": gold} if isinstance(gold, str) else dict(gold)
    if not items:
        raise ValueError("gold mapping is empty")
    for criterion, answer in items.items():
        if criterion != "*" and not CRITERION_RE.fullmatch(str(criterion)):
            raise ValueError(f"bad gold criterion {criterion!r}")
        if answer not in CHOICES:
            raise ValueError(f"gold answer must be one of {CHOICES}, got {answer!r}")
    return sorted(items.items())
