"""The app's thread policy, per process: how many CPU threads torch may use, how idle ones
wait, and how quickly a thread gets Python's GIL back.

A process that runs editors (each side's editor process, or the web process with
``--in-process-editors``) calls :func:`apply_thread_policy`:

* ``OMP_WAIT_POLICY=PASSIVE`` (:func:`set_wait_policy`, before torch is imported, unless
  already set; ``app.py`` sets it, and editor processes inherit it): OpenMP threads that run
  out of work sleep instead of spinning.  Spinning threads keep cores busy between two small
  ops; beside another torch job on the same machine both jobs then spin on cores the other one
  needs and each slows down many times over.
* ``--threads N`` / ``MTEDITLAB_THREADS``: torch's intra-op threads of each side's editor.  The
  two arena sides run their batches at the same time, so the default gives each half the cores
  the process may run on (its CPU affinity, not the machine's core count): 1 on 2 cores.  With
  passive waiting, more threads than that make the mini editor's many tiny ops slower, not
  faster (each op wakes sleeping threads).  On a machine shared with another heavy job,
  ``--threads 1``.
* Python's thread switch interval is lowered to 0.5 ms: an editor thread gives up the GIL
  around every torch op and otherwise waits up to the default 5 ms to get it back from the
  process's other threads, for each of the UNet's hundreds of ops.

The web process, when the editors run in their own processes, calls :func:`apply_web_policy`:
it does no torch work (it does not even import torch), so torch gets one thread should
anything have imported it, and the switch interval stays at Python's default.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("mteditlab.ui")
MAX_AUTO_THREADS = 8
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
SWITCH_INTERVAL_S = float(os.environ.get("MTEDITLAB_SWITCH_INTERVAL", "0.0005"))


def set_wait_policy() -> None:
    """Set the OpenMP environment defaults (effective only before torch is imported)."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_threads() -> int:
    return max(1, min(MAX_AUTO_THREADS, available_cores() // 2))


def apply_thread_policy(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: :func:`auto_threads`); returns the number set."""
    import torch

    n = threads or auto_threads()
    torch.set_num_threads(n)
    if SWITCH_INTERVAL_S:
        sys.setswitchinterval(float(SWITCH_INTERVAL_S))
    log.info("torch intra-op threads: %d (of %d available cores; OMP_WAIT_POLICY=%s)", n,
             available_cores(), os.environ.get("OMP_WAIT_POLICY", "unset"))
    return n


def apply_web_policy() -> None:
    """The policy of a web process whose editors run elsewhere (see the module docstring)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
