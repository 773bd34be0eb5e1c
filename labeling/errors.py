"""The label store's errors."""

from __future__ import annotations

import os
from pathlib import Path


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
            "for writing.  Open it read-only to read a snapshot meanwhile, or stop "
            f"process {pid if pid is not None else '(the holder)'} first.")


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened read-only."""


class DuplicateJudgmentError(StoreError):
    """The annotator already judged this (comparison, turn, criterion) with another choice."""


class AssignmentError(StoreError):
    """Judgments, a skip or a flag for a comparison that is not the annotator's open assignment;
    ``reason``: 'never assigned', 'already judged' or 'given back' (see :mod:`labeling.queue`)."""

    def __init__(self, annotator: str, comparison_id: int, reason: str):
        self.annotator, self.comparison_id, self.reason = annotator, comparison_id, reason
        super().__init__(f"comparison {comparison_id} is not open to {annotator!r}: {reason}; "
                         "judgments, skips and flags are taken only for the annotator's open assignment, once "
                         "(ask for the next assignment)")


class SchemaVersionError(StoreError):
    """The database schema is newer than this code, or (``older``) too old to read without
    migrating."""

    def __init__(self, message: str, older: bool = False):
        super().__init__(message)
        self.older = older
