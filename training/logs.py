"""Resumable runs: restoring a checkpoint, and the JSON-lines logs written after it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def truncate_log(path: Path, key: str, last: int) -> None:
    """Keep the lines of ``path`` whose ``key`` is at most ``last`` (creating it when missing): a run
    resumed from its checkpoint at ``last`` logs again what it had logged after it."""
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)[key] <= last))


def restore(state: dict, **modules) -> int:
    """Load each module's (or optimizer's) ``state[name]``, then the torch and Python RNG states the
    checkpoint saved (``rng``, ``py_rng``); return the checkpoint's ``step``."""
    for name, module in modules.items():
        module.load_state_dict(state[name])
    torch.set_rng_state(state["rng"])
    random.setstate(state["py_rng"])
    print(f"resuming from step {state['step']}")
    return state["step"]
