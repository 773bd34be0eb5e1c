"""What writes are checked against: an in-memory index of the stored rows, kept by the writer.

Judgment rules (enforced by :meth:`Ledger.write_judgments`)
    A judgment is keyed by (comparison, annotator, turn, criterion).  Re-sending the same
    choice for a key returns the existing id (safe client retries); a different choice raises
    :class:`DuplicateJudgmentError` — votes are never edited.  ``turn`` must lie in the
    comparison, ``simulated`` agree with the annotator, and ``left`` with the side the
    annotator's assignment showed on the left.  Judgments are append-only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from labeling.errors import DuplicateJudgmentError
from labeling.schema import CHOICES, CRITERION_RE, ID_COLUMNS, SIDES
from labeling.writer import Batched, Tx

_JUDGMENT_SCHEMA = pa.schema([
    ("judgment_id", pa.int64()), ("comparison_id", pa.int32()), ("annotator_id", pa.int32()),
    ("turn_index", pa.int32()), ("criterion", pa.string()), ("choice", pa.string()),
    ("left_side", pa.string()), ("latency_ms", pa.float64()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("simulated", pa.bool_()),
    ("blind", pa.bool_()),
])


@dataclasses.dataclass
class JudgmentRequest(Batched):
    """One judgment to append, its fields checked on creation; its future gets the id."""

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

    def __post_init__(self) -> None:
        if self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {self.choice!r}")
        if self.left not in SIDES:
            raise ValueError(f"left must be one of {SIDES}, got {self.left!r}")
        if not isinstance(self.criterion, str) or not CRITERION_RE.fullmatch(self.criterion):
            raise ValueError(f"criterion must match {CRITERION_RE.pattern}, "
                             f"got {self.criterion!r}")
        if self.turn is not None and (isinstance(self.turn, bool)
                                      or not isinstance(self.turn, int)):
            raise TypeError(f"turn must be an int or None, got {self.turn!r}")
        if self.latency_ms is not None and not self.latency_ms >= 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms!r}")
        if not isinstance(self.blind, bool):
            raise TypeError(f"blind must be a bool, got {self.blind!r}")


class Ledger:
    """The next id of each table, annotators (name -> (id, simulated)), comparison turn
    counts, assignment sides ((annotator id, comparison id) -> left) and judgment keys
    (key -> (id, choice)).  Loaded from the database; afterwards touched only by the writer
    thread, which updates it when a transaction commits."""

    def __init__(self, cur):
        self.load(cur)

    def load(self, cur) -> None:
        self.next_id = {t: cur.execute(f"SELECT coalesce(max({c}), 0) + 1 FROM {t}")
                        .fetchall()[0][0] for t, c in ID_COLUMNS.items()}
        self.annotators = {name: (aid, sim) for aid, name, sim in cur.execute(
            "SELECT annotator_id, name, simulated FROM annotators").fetchall()}
        self.comparison_turns = dict(cur.execute(
            "SELECT comparison_id, n_turns FROM comparisons").fetchall())
        self.assigned = {(a, c): left for a, c, left in cur.execute(
            "SELECT annotator_id, comparison_id, left_side FROM assignments").fetchall()}
        self.judged = {(c, a, t, k): (j, ch) for j, c, a, t, k, ch in cur.execute(
            "SELECT judgment_id, comparison_id, annotator_id, turn_index, criterion, choice "
            "FROM judgments").fetchall()}

    def take_id(self, table: str) -> int:
        value = self.next_id[table]
        self.next_id[table] = value + 1
        return value

    def annotator_id(self, name: str) -> int:
        if name not in self.annotators:
            raise KeyError(f"unknown annotator {name!r}; add_annotator() first")
        return self.annotators[name][0]

    def write_judgments(self, transaction: Callable[[Callable[[Tx], Any]], Any],
                        batch: list[JudgmentRequest]) -> None:
        """Validate each request, insert the new ones in one ``transaction``, then resolve
        every request's future (the acknowledgement)."""
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
            acks.append((req.future, (batch_keys[key] if in_batch else self.judged[key])[0],
                         in_batch))
        if rows:
            def insert(tx: Tx) -> None:
                table = pa.Table.from_arrays(
                    [pa.array(column, field.type)
                     for column, field in zip(zip(*rows), _JUDGMENT_SCHEMA)],
                    schema=_JUDGMENT_SCHEMA)
                tx.cur.register("_judgment_batch", table)
                try:
                    tx.cur.execute("INSERT INTO judgments BY NAME SELECT * FROM _judgment_batch")
                finally:
                    tx.cur.unregister("_judgment_batch")
                tx.on_commit.append(lambda: self.judged.update(batch_keys))

            try:
                transaction(insert)
            except BaseException as exc:
                for future, jid, in_batch in acks:
                    if in_batch:
                        future.set_exception(exc)
                    else:
                        future.set_result(jid)
                return
        for future, jid, _ in acks:
            future.set_result(jid)

    def _judgment_row(self, req: JudgmentRequest, batch_keys: dict) -> tuple[tuple, tuple | None]:
        """(key, row to insert) for a request; row is None when it repeats a stored vote."""
        annotator_id = self.annotator_id(req.annotator)
        annotator_simulated = self.annotators[req.annotator][1]
        if req.comparison_id not in self.comparison_turns:
            raise KeyError(f"unknown comparison {req.comparison_id}")
        n_turns = self.comparison_turns[req.comparison_id]
        if req.turn is not None and not 0 <= req.turn < n_turns:
            raise ValueError(f"turn {req.turn} out of range for comparison "
                             f"{req.comparison_id} with {n_turns} turns (None = overall)")
        if req.simulated is not None and req.simulated != annotator_simulated:
            raise ValueError(f"simulated={req.simulated} but annotator {req.annotator!r} is "
                             f"{'simulated' if annotator_simulated else 'human'}")
        assigned_left = self.assigned.get((annotator_id, req.comparison_id))
        if assigned_left is not None and assigned_left != req.left:
            raise ValueError(f"left={req.left!r} but {req.annotator!r} was shown session "
                             f"{assigned_left!r} on the left for comparison {req.comparison_id}")
        key = (req.comparison_id, annotator_id, req.turn, req.criterion)
        previous = batch_keys.get(key) or self.judged.get(key)
        if previous is not None:
            if previous[1] != req.choice:
                raise DuplicateJudgmentError(
                    f"{req.annotator!r} already chose {previous[1]!r} for comparison "
                    f"{req.comparison_id}, turn {req.turn}, criterion {req.criterion!r} "
                    f"(judgment {previous[0]}); judgments are append-only")
            return key, None
        jid = self.take_id("judgments")
        return key, (jid, req.comparison_id, annotator_id, req.turn, req.criterion, req.choice,
                     req.left, req.latency_ms, req.created_at, annotator_simulated, req.blind)
