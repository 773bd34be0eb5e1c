"""The JSON-lines logs of resumable runs."""

from __future__ import annotations

import json
from pathlib import Path


def truncate_log(path: Path, key: str, last: int) -> None:
    """Keep the lines of ``path`` whose ``key`` is at most ``last`` (creating it when missing): a run
    resumed from its checkpoint at ``last`` logs again what it had logged after it."""
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)[key] <= last))
