"""Where the time of a served request goes: cheap, thread-safe timing counters.

The app records a few named durations per request (the editor queue wait, each batch's
compute, image encoding, the vote's store writes, the rendering of the answer) and the sizes of
the editor batches actually reached.  ``summary()`` gives count, mean, p50, p95 and total per
name; the app logs it once when it shuts down (a line ``app profile: {json}``), which
``bench/app_load.py`` reads back into its report.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

MAX_SAMPLES = 200_000   # per name; beyond it only count and total grow


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``, linearly interpolated; nan if empty."""
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Timings:
    """name -> durations (seconds) and name -> integer histograms (batch sizes)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._samples: dict[str, list[float]] = collections.defaultdict(list)
        self._totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        self._hist: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            total = self._totals[name]
            total[0] += 1
            total[1] += seconds
            samples = self._samples[name]
            if len(samples) < MAX_SAMPLES:
                samples.append(seconds)

    def count(self, name: str, value: int) -> None:
        with self._lock:
            self._hist[name][int(value)] += 1

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def summary(self) -> dict:
        with self._lock:
            out: dict = {}
            for name, samples in sorted(self._samples.items()):
                n, total = self._totals[name]
                out[name] = {"n": n, "mean": round(total / n, 4),
                             "p50": round(percentile(samples, 50), 4),
                             "p95": round(percentile(samples, 95), 4), "total": round(total, 2)}
            for name, hist in sorted(self._hist.items()):
                n = sum(hist.values())
                out[name] = {"n": n, "mean": round(sum(k * v for k, v in hist.items()) / n, 2),
                             "max": max(hist), "histogram": dict(sorted(hist.items()))}
            return out
