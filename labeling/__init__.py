"""Labeling: DuckDB label store, assignment queue, ratings, agreement, export and CLI.

Start with :class:`labeling.store.LabelStore`; ``python -m labeling --help`` for the CLI.
"""

from labeling.queue import Assignment, AssignmentPolicy
from labeling.store import (CHOICES, DuplicateJudgmentError, LabelSelection, LabelStore,
                            ReadOnlyStoreError, SchemaVersionError, StoreError,
                            StoreLockedError, choice_from_screen, default_db_path, model_name)

__all__ = ["Assignment", "AssignmentPolicy", "CHOICES", "DuplicateJudgmentError",
           "LabelSelection", "LabelStore", "ReadOnlyStoreError", "SchemaVersionError",
           "StoreError", "StoreLockedError", "choice_from_screen", "default_db_path",
           "model_name"]
