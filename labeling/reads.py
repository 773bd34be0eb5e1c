"""The read side of :class:`labeling.store.LabelStore` (which inherits it): tables, frames of
judgments, progress and logs, each from this thread's own cursor (committed data only)."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
from PIL import Image

from labeling.blobs import ImageBlobs
from labeling.errors import StoreError
from labeling.queue import AssignmentPolicy, count_open
from labeling.schema import TABLES, schema_version
from labeling.selection import LabelSelection

_PANDAS_TYPES = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}


class StoreReads:
    """Reads of a store whose connection is ``_con`` (see :class:`labeling.store.LabelStore`)."""

    path: Path
    blobs: ImageBlobs
    policy: AssignmentPolicy
    _con: duckdb.DuckDBPyConnection
    _local: threading.local
    _cursor_lock: threading.Lock
    _closed: bool

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            if self._closed:
                raise StoreError(f"the store {self.path} is closed")
            with self._cursor_lock:
                cur = self._local.cur = self._con.cursor()
        return cur

    @contextlib.contextmanager
    def consistent_reads(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own inside one read transaction: every query on it sees the same
        committed state (e.g. to export all tables consistently)."""
        with self._cursor_lock:
            cur = self._con.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            yield cur
            cur.execute("COMMIT")
        finally:
            cur.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read-only SQL query on this thread's cursor; nullable integer columns."""
        table = self._cursor().sql(sql, params=params).to_arrow_table()
        return table.to_pandas(types_mapper=_PANDAS_TYPES.get)

    def table(self, name: str) -> pd.DataFrame:
        """A whole table (one of :data:`~labeling.schema.TABLES`) as a DataFrame."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; one of {tuple(TABLES)}")
        return self.query(f"SELECT * FROM {name} ORDER BY ALL")

    def counts(self) -> dict[str, int]:
        """Row counts of every table."""
        cur = self._cursor()
        return {t: cur.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}

    def schema_version(self) -> int:
        return schema_version(self._cursor())

    def image_bytes(self, sha: str) -> bytes:
        """The stored PNG for ``sha``, verified against its hash."""
        return self.blobs.read(sha)

    def get_image(self, sha: str) -> Image.Image:
        """The stored image for ``sha`` as a loaded PIL image."""
        return self.blobs.image(sha)

    def get_comparison(self, comparison_id: int) -> dict[str, Any]:
        """What a client shows for a comparison: kind, source, instructions, both sides'
        outputs."""
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
        return {"comparison_id": int(comparison_id), "kind": row.kind,
                "source_sha": row.source_sha,
                "instructions": turns[turns.session_id == int(row.session_a)]
                .instruction.tolist(), **sides}

    def label_selection(self, include_simulated: bool | None = None) -> LabelSelection:
        """Counts of human/simulated judgments and the resolved ``include_simulated``."""
        human, simulated = self._cursor().execute(
            "SELECT count(*) FILTER (NOT simulated), count(*) FILTER (simulated) "
            "FROM judgments").fetchall()[0]
        return LabelSelection.resolve(human, simulated, include_simulated)

    def judgments_frame(self, include_simulated: bool | None = None) -> pd.DataFrame:
        """Judgments joined with annotator and model names, filtered per :class:`LabelSelection`.

        Columns: judgment_id, comparison_id, annotator, simulated, turn (<NA> = overall),
        criterion, choice, left, latency_ms, created_at, blind, kind (the comparison's), gold
        (kind is 'gold'), session_a, session_b, model_a, model_b.  Callers that report counts
        resolve the selection first with :meth:`label_selection` and pass its
        ``include_simulated`` here.
        """
        if include_simulated is None:
            include_simulated = self.label_selection().include_simulated
        return self.query(
            """SELECT j.judgment_id, j.comparison_id, an.name AS annotator, j.simulated,
                      j.turn_index AS turn, j.criterion, j.choice, j.left_side AS "left",
                      j.latency_ms, j.created_at, j.blind, c.kind, c.kind = 'gold' AS gold,
                      c.session_a, c.session_b, sa.model AS model_a, sb.model AS model_b
               FROM judgments j
               JOIN annotators an USING (annotator_id)
               JOIN comparisons c USING (comparison_id)
               JOIN sessions sa ON sa.session_id = c.session_a
               JOIN sessions sb ON sb.session_id = c.session_b
               WHERE ? OR NOT j.simulated
               ORDER BY j.judgment_id""", [include_simulated])

    def label_progress(self, annotator: str) -> tuple[int, int]:
        """(comparisons the annotator judged, labeling items still open to them) under
        :attr:`policy`; the open ones are those the queue could serve next (gold aside)."""
        aid = self.query("SELECT annotator_id FROM annotators WHERE name = ?", [annotator])
        if aid.empty:
            return 0, 0
        aid = int(aid["annotator_id"].iloc[0])
        cur = self._cursor()
        judged = cur.execute("SELECT count(DISTINCT comparison_id) FROM judgments "
                             "WHERE annotator_id = ?", [aid]).fetchall()[0][0]
        expired = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.policy.ttl_s)
        return int(judged), count_open(cur, aid, self.policy, expired)

    def next_session_index(self, origin: str) -> int:
        """1 + the largest ``meta["index"]`` among sessions whose ``meta["origin"]`` is
        ``origin`` (0 when there are none): where seeding more of them continues."""
        return int(self._cursor().execute(
            "SELECT coalesce(max(json_extract(meta, '$.index')::INTEGER) + 1, 0) FROM sessions "
            "WHERE json_extract_string(meta, '$.origin') = ?", [origin]).fetchall()[0][0])

    def excluded_voters(self) -> set[str]:
        """Names of the annotators whose latest exclusion decision is 'excluded'."""
        frame = self.query(
            """SELECT an.name FROM annotators an JOIN (
                   SELECT annotator_id, arg_max(excluded, exclusion_id) AS excluded
                   FROM voter_exclusions GROUP BY annotator_id) x USING (annotator_id)
               WHERE x.excluded""")
        return set(frame["name"])

    def exclusion_log(self) -> pd.DataFrame:
        """Every exclusion decision, newest first: voter, excluded, admin, reason, time."""
        return self.query(
            """SELECT an.name AS voter, x.excluded, x.admin, x.reason,
                      strftime(x.created_at, '%Y-%m-%d %H:%M:%S') AS time
               FROM voter_exclusions x JOIN annotators an USING (annotator_id)
               ORDER BY x.exclusion_id DESC""")

    def skips(self) -> pd.DataFrame:
        """Every skip and flag, oldest first: skip_id, annotator, comparison_id, flagged,
        reason (flags only), created_at."""
        return self.query(
            """SELECT s.skip_id, an.name AS annotator, s.comparison_id, s.flagged, s.reason,
                      s.created_at
               FROM skips s JOIN annotators an USING (annotator_id) ORDER BY s.skip_id""")
