"""Batching of concurrent edit requests to one editor: :class:`EditorWorker`.

A worker is a thread beside the editor (in the web process, or inside a side's editor process,
see :mod:`ui.editor_process`).  It gathers the requests queued by concurrent users into one
``edit_batch`` call (up to ``max_batch`` items with the same step count, waiting at most
``gather_s`` for more after the first), so 20 users cost one batched forward pass per side
rather than 20.  Item i of a batch depends only on its own seed (the editor protocol), so
batching never changes a result.  A batch that fails is retried item by item, so one bad
request fails only itself.

Steps: editors that take a ``callback`` keyword call it after each denoising step; the worker
hands each step of a batch to its ``step_hook(listeners, done, total)`` once, with the
``on_step`` of every request in it (default :func:`fan_out`: call each as ``on_step(done,
total)``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import queue
import threading
import time
from typing import Any, Callable

from .profile import Timings

StepHook = Callable[[list, int, int], Any]


class EditFailure(RuntimeError):
    """An editor failed, timed out or stopped; ``str()`` is shown to the user."""


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), as the user sees a failure."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def takes_callback(editor) -> bool:
    """Whether ``editor.edit_batch`` accepts a ``callback`` keyword (the protocol's step hook;
    editors written before it, or that forward ``**kwargs`` elsewhere, are called without)."""
    try:
        params = inspect.signature(editor.edit_batch).parameters
    except (TypeError, ValueError):
        return False
    return "callback" in params


def fan_out(listeners: list, done: int, total: int) -> None:
    """The default step hook: ``listener(done, total)`` for each (errors are ignored: progress
    must never fail an edit)."""
    for listener in listeners:
        try:
            listener(done, total)
        except Exception:  # noqa: BLE001
            pass


@dataclasses.dataclass
class _Request:
    image: Any
    instruction: str
    intent: str | None
    seed: int
    steps: int | None
    future: concurrent.futures.Future
    on_step: Any = None
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)


class EditorWorker:
    """One thread per editor that batches concurrent requests (see the module docstring).

    ``timings`` receives ``editor K: queue wait`` per request, ``editor K: batch compute`` and
    the ``editor K: batch size`` count per batch (any object with :class:`~ui.profile.Timings`'
    ``add`` and ``count``); ``run_lock`` is held while the editor runs (one lock shared by both
    sides' workers makes their batches take turns)."""

    def __init__(self, side, max_batch: int = 16, gather_s: float = 0.01,
                 timings: Timings | None = None, run_lock: threading.Lock | None = None,
                 step_hook: StepHook = fan_out):
        self.side = side
        self.timings = timings if timings is not None else Timings()
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.step_hook = step_hook
        self.items = 0
        self.with_steps = takes_callback(side.editor)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = run_lock or threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"editor-{side.key}", daemon=True)
        self._thread.start()

    def submit(self, image, instruction, intent, seed, steps, on_step=None
               ) -> concurrent.futures.Future:
        """Queue one edit; the future holds the output image.  ``on_step`` is what the step
        hook gets for this request (by default a callable ``(done, total)``, called on the
        worker thread after each denoising step of the batch it runs in)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Request(image, instruction, intent, seed, steps, future, on_step))
        return future

    def _edit_batch(self, images, instructions, intents, seeds, steps, listeners=()) -> list:
        live = [listener for listener in listeners if listener is not None]
        extra = ({"callback": functools.partial(self.step_hook, live)}
                 if live and self.with_steps else {})
        return self.side.editor.edit_batch(images, instructions, intents=intents, seeds=seeds,
                                           steps=steps, **extra)

    def edit_direct(self, image, instruction, intent, seed, steps):
        """One edit on the calling thread (under the run lock), no batching."""
        with self._lock:
            return self._edit_batch([image], [instruction], [intent], [seed], steps)[0]

    def edit_many(self, images, instructions, intents, seeds, steps=None, chunk: int = 64) -> list:
        """A direct batched call (seeding the labeling queue), in chunks, under the lock."""
        out = []
        for i in range(0, len(images), chunk):
            with self._lock:
                out += self.side.editor.edit_batch(
                    images[i:i + chunk], instructions[i:i + chunk], intents=intents[i:i + chunk],
                    seeds=seeds[i:i + chunk], steps=steps)
        return out

    def stop(self, wait_s: float | None = None) -> None:
        """Stop after the requests already queued; ``wait_s``: wait that long for them."""
        self._queue.put(None)
        if wait_s is not None:
            self._thread.join(wait_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.gather_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            groups: dict[Any, list[_Request]] = {}
            for req in batch:
                groups.setdefault(req.steps, []).append(req)
            for steps, reqs in groups.items():
                self._run_batch(steps, reqs)

    def _run_batch(self, steps, reqs: list[_Request]) -> None:
        live = [r for r in reqs if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        key = self.side.key
        try:
            with self._lock:
                start = time.perf_counter()
                for r in live:
                    self.timings.add(f"editor {key}: queue wait", start - r.queued_at)
                outputs = self._edit_batch(
                    [r.image for r in live], [r.instruction for r in live],
                    [r.intent for r in live], [r.seed for r in live], steps,
                    [r.on_step for r in live])
                self.timings.add(f"editor {key}: batch compute", time.perf_counter() - start)
            self.timings.count(f"editor {key}: batch size", len(live))
            self.items += len(live)
        except Exception as exc:  # noqa: BLE001
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            for r in live:  # isolate the failing item(s): one bad request fails only itself
                try:
                    with self._lock:
                        out = self._edit_batch([r.image], [r.instruction], [r.intent],
                                               [r.seed], steps, [r.on_step])[0]
                    r.future.set_result(out)
                except Exception as single:  # noqa: BLE001
                    r.future.set_exception(single)
            return
        for r, out in zip(live, outputs):
            r.future.set_result(out)
