"""Labeling: DuckDB label store, assignment queue, ratings, agreement, export and CLI.

Start with :class:`labeling.store.LabelStore`; ``python -m labeling --help`` for the CLI.
"""

from labeling.connection import default_db_path
from labeling.errors import (AssignmentError, DuplicateJudgmentError, ReadOnlyStoreError,
                             SchemaVersionError, StoreError, StoreLockedError)
from labeling.queue import Assignment, AssignmentPolicy
from labeling.selection import LabelSelection
from labeling.schema import CHOICES
from labeling.store import LabelStore, model_name

__all__ = ["Assignment", "AssignmentError", "AssignmentPolicy", "CHOICES", "DuplicateJudgmentError",
           "LabelSelection", "LabelStore", "ReadOnlyStoreError", "SchemaVersionError",
           "StoreError", "StoreLockedError", "default_db_path", "model_name"]
