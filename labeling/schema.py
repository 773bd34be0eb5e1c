"""The label database's tables and their migrations.

A database records its schema version in ``meta``; :func:`migrate` brings it to
:data:`SCHEMA_VERSION` by applying :data:`MIGRATIONS` in order, one transaction each.  A
migration step is SQL text, or a function of (cursor, database path) for steps SQL cannot say.

Comparisons carry a ``kind`` (:data:`KINDS`): ``'item'`` a labeling item the queue hands to
annotators, ``'gold'`` a labeling item with a known answer (``gold_items``), ``'arena'`` a
battle voted in the arena (never queued).  Skips and flags of labeling items are ``skips`` rows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path

from labeling.errors import SchemaVersionError

log = logging.getLogger("mteditlab.labeling")
KINDS = ("arena", "item", "gold")      # comparisons.kind
CHOICES = ("A", "B", "tie", "both_bad")  # judgments.choice, gold_items.answer
SCORES = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}  # choice -> A's share of a win, B has the rest
SIDES = ("A", "B")                      # judgments.left_side, assignments.left_side
CRITERION_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")  # judgments.criterion
EVENTS_FILENAME = "app_events.jsonl"   # skips and flags before schema v4, beside the database


def _import_skips(cur, db_path: Path) -> None:
    """Load the skips and flags the app logged to ``<db dir>/app_events.jsonl`` (one JSON object
    a line: time, kind 'skip' | 'flag', annotator, comparison_id, reason); the file is left as
    it was and no longer written.  Lines that do not parse or name no known annotator are
    dropped (and counted in the log)."""
    path = Path(db_path).parent / EVENTS_FILENAME
    if not path.is_file():
        return
    annotators = dict(cur.execute("SELECT name, annotator_id FROM annotators").fetchall())
    rows, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
            row = (len(rows) + 1, annotators[event["annotator"]], int(event["comparison_id"]),
                   event["kind"] == "flag", event.get("reason"),
                   dt.datetime.fromtimestamp(float(event["time"]), dt.timezone.utc))
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if event["kind"] in ("skip", "flag"):
            rows.append(row)
    if rows:
        cur.executemany("INSERT INTO skips VALUES (?, ?, ?, ?, ?, ?)", rows)
    log.info("imported %d skips and flags from %s (%d lines dropped)", len(rows), path, dropped)


# Migration i (1-based) brings a database from schema version i-1 to i. Append, never edit.
MIGRATIONS: tuple[tuple, ...] = (
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
    (  # 4: comparisons say their kind (was: is_gold, and arena sessions' meta origin);
       #    skips and flags move from app_events.jsonl into the database
        """CREATE TABLE comparisons_v4 (
            comparison_id INTEGER PRIMARY KEY,
            session_a INTEGER NOT NULL,
            session_b INTEGER NOT NULL,
            source_sha VARCHAR NOT NULL,
            n_turns INTEGER NOT NULL,
            kind VARCHAR NOT NULL CHECK (kind IN ('arena', 'item', 'gold')),
            created_at TIMESTAMPTZ NOT NULL,
            UNIQUE (session_a, session_b))""",
        """INSERT INTO comparisons_v4 SELECT c.comparison_id, c.session_a, c.session_b,
                  c.source_sha, c.n_turns,
                  CASE WHEN c.is_gold THEN 'gold'
                       WHEN json_extract_string(s.meta, '$.origin') = 'arena' THEN 'arena'
                       ELSE 'item' END,
                  c.created_at
           FROM comparisons c JOIN sessions s ON s.session_id = c.session_a""",
        "DROP TABLE comparisons",
        "ALTER TABLE comparisons_v4 RENAME TO comparisons",
        """CREATE TABLE skips (
            skip_id INTEGER PRIMARY KEY,
            annotator_id INTEGER NOT NULL,
            comparison_id INTEGER NOT NULL,
            flagged BOOLEAN NOT NULL,
            reason VARCHAR,
            created_at TIMESTAMPTZ NOT NULL)""",
        _import_skips,
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
# table -> its key (the order of its rows in snapshots), in dependency order
TABLES = {"annotators": "annotator_id", "images": "sha256", "sessions": "session_id",
          "turns": "session_id, turn_index", "comparisons": "comparison_id",
          "gold_items": "comparison_id, criterion", "judgments": "judgment_id",
          "assignments": "assignment_id", "voter_exclusions": "exclusion_id",
          "skips": "skip_id"}
ID_COLUMNS = {t: k for t, k in TABLES.items() if k.endswith("_id")}  # tables keyed by an id the store hands out


def schema_version(cur) -> int:
    """The version recorded in ``meta`` (0 for a database without it)."""
    has_meta = cur.execute("SELECT count(*) FROM information_schema.tables "
                           "WHERE table_name = 'meta'").fetchall()[0][0]
    if not has_meta:
        return 0
    rows = cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    return int(rows[0][0]) if rows else 0


def check_readable(cur, path: Path) -> None:
    """Raise :class:`SchemaVersionError` unless the database is at :data:`SCHEMA_VERSION`."""
    version = schema_version(cur)
    if version != SCHEMA_VERSION:
        older = version < SCHEMA_VERSION
        raise SchemaVersionError(
            f"{path} has schema v{version}, this code reads v{SCHEMA_VERSION}; "
            + ("migrate it first by opening it writable once" if older else
               "upgrade MT-EditLab"), older=older)


def migrate(cur, path: Path) -> None:
    """Apply the pending :data:`MIGRATIONS` to the database at ``path``, one transaction each."""
    cur.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    version = schema_version(cur)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"{path} has schema v{version}, newer than this "
                                 f"code (v{SCHEMA_VERSION}); upgrade MT-EditLab")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        cur.execute("BEGIN")
        try:
            for step in MIGRATIONS[target - 1]:
                if callable(step):
                    step(cur, path)
                else:
                    cur.execute(step)
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                        [str(target)])
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
