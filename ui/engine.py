"""The two arena sides: loading editors (with documented fallbacks) and running edits.

Fallbacks (never crash on a fresh clone; ``--strict`` turns them into errors)
    * A side's **adapter** is missing: that side runs the **oracle** instead (the world's exact
      editor, a ceiling reference) when the other side is a world editor, else **identity**
      (a no-op baseline that works on any image).  Running the base model on both sides would
      make every vote a same-model comparison, which carries no information (and the label
      store refuses it).
    * A side's **base weights** are missing (e.g. ``checkpoints/mini/base`` not trained or not
      fetched): side A falls back to **identity** and side B to **oracle**, so the arena still
      works on world scenes (oracle vs no-op).
    * Two sides that end up as the same model: side B becomes oracle (or identity).
    Every fallback is listed in a notice shown at the top of the app.

Running edits
    Each side has an :class:`EditorWorker`: a thread that gathers the edit requests queued by
    concurrent users into one ``edit_batch`` call (up to ``max_batch``; items with the same step
    count), so 20 users cost one batched forward pass per side rather than 20.  The two sides'
    batches run at the same time, each on the app's intra-op threads (``--threads``, see
    :mod:`ui.threads`); ``--take-turns`` runs one side's batch at a time.  Item i of a batch
    depends only on its own seed (the editor protocol), so batching never changes a result.  On
    ZeroGPU Spaces the GPU exists only inside ``spaces.GPU`` functions, so there the edits run
    directly inside :func:`run_pair`, which carries the decorator (a no-op elsewhere).

Progress
    Editors report each denoising step (``edit_batch(..., callback=)``); the worker passes the
    steps of a batch to every request in it, and :func:`run_pair` hands the caller each side's
    ``(steps done, steps in all)`` from the caller's own thread (where ``gr.Progress`` works):
    when a side starts and when it finishes at once, in between every ``REPORT_EVERY_S``.  Editors that have no denoising loop (the reference editors) report
    their side finished when their result arrives.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import logging
import os
import queue
import threading
import time
from typing import Any, Callable

from PIL import Image

from .config import WORLD_EDITORS, AppConfig, SideSpec, resolve_path
from .profile import Timings

log = logging.getLogger("mteditlab.ui")
EDIT_TIMEOUT_S = 300.0


def gpu(duration: int = 60) -> Callable:
    """``spaces.GPU(duration=…)`` when the ``spaces`` package is installed (a no-op off ZeroGPU),
    else the identity decorator."""
    try:
        import spaces  # type: ignore
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


class EditFailure(RuntimeError):
    """An editor failed or timed out; ``str()`` is shown to the user."""


@dataclasses.dataclass
class Side:
    """A loaded arena side: the store's (editor, adapter) naming plus the editor object."""

    key: str                     # "A" or "B" (the store's session_a / session_b)
    editor_name: str             # store `editor` column, e.g. "mini"
    adapter: str | None          # store `adapter` column, e.g. "lora:checkpoints/mini/grpo"
    editor: Any                  # mteditlab.editors.Editor
    requested: SideSpec | None = None
    fallback_reason: str | None = None

    @property
    def model(self) -> str:
        return f"{self.editor_name}+{self.adapter}" if self.adapter else self.editor_name

    @property
    def is_world(self) -> bool:
        return self.editor_name.split("@")[0] in WORLD_EDITORS

    @property
    def resolution(self) -> int | None:
        value = getattr(self.editor, "resolution", None)
        return int(value) if value else None


def _store_names(spec: SideSpec) -> tuple[str, str | None]:
    editor = spec.editor + (f"@{spec.model}" if spec.model else "")
    return editor, (f"lora:{spec.lora}" if spec.lora else None)


def load_side(key: str, spec: SideSpec, device: str | None = None) -> Side:
    """Load one side exactly as specified (raises ``EditorError`` / ``OSError`` on failure)."""
    from mteditlab.editors import EDITORS, get_editor

    lora = resolve_path(spec.lora)
    model = resolve_path(spec.model) if EDITORS[spec.editor].local_weights else spec.model
    if lora is not None and not (lora / "pytorch_lora_weights.safetensors").is_file():
        from mteditlab.editors import EditorError

        raise EditorError(f"no LoRA adapter at {lora} (expected pytorch_lora_weights.safetensors)")
    editor = get_editor(spec.editor, lora=lora, path=model, device=device)
    name, adapter = _store_names(spec)
    return Side(key, name, adapter, editor, requested=spec)


def _reference(key: str, name: str, reason: str, requested: SideSpec) -> Side:
    from mteditlab.editors import get_editor

    return Side(key, name, None, get_editor(name), requested=requested, fallback_reason=reason)


def load_sides(config: AppConfig) -> tuple[Side, Side, list[str]]:
    """Both sides with the fallbacks of the module docstring; returns (A, B, notices)."""
    notices: list[str] = []
    sides: dict[str, Side] = {}
    errors: dict[str, str] = {}
    for key, spec in (("A", config.side_a), ("B", config.side_b)):
        try:
            sides[key] = load_side(key, spec, config.device)
        except Exception as exc:  # noqa: BLE001 - any load failure becomes a visible notice
            if config.strict:
                raise
            errors[key] = f"{type(exc).__name__}: {exc}"
            log.warning("side %s (%s) could not be loaded: %s", key, spec.describe(), exc)
    for key, spec in (("A", config.side_a), ("B", config.side_b)):
        if key in sides:
            continue
        other = sides.get("B" if key == "A" else "A")
        base_only = dataclasses.replace(spec, lora=None)
        if spec.lora and other is not None:
            # the adapter is what failed if the base alone loads: compare against a reference
            world = other.is_world
            name = "oracle" if world else "identity"
            reason = (f"Side {key} ({spec.describe()}) could not be loaded — {errors[key]}. "
                      f"It runs the **{name}** editor instead"
                      + (" (the world's exact editor, a ceiling reference)." if world else
                         " (returns its input unchanged)."))
            sides[key] = _reference(key, name, reason, spec)
        else:
            name = "identity" if key == "A" else "oracle"
            reason = (f"Side {key} ({spec.describe()}) could not be loaded — {errors[key]}. "
                      f"It runs the **{name}** reference editor instead"
                      + (" (returns its input unchanged)." if name == "identity" else
                         " (the world's exact editor)."))
            sides[key] = _reference(key, name, reason, base_only)
        notices.append(reason)
    a, b = sides["A"], sides["B"]
    if a.model == b.model:
        name = "oracle" if a.editor_name != "oracle" else "identity"
        reason = (f"Both sides would run {a.model}; a same-model arena carries no information, "
                  f"so side B runs the **{name}** editor.")
        b = _reference("B", name, reason, b.requested)
        notices.append(reason)
    return a, b, notices


def working_size(a: Side, b: Side) -> int:
    """Square size sources are prepared at: the largest editor resolution (32 for the world)."""
    sizes = [s.resolution for s in (a, b) if s.resolution]
    if sizes:
        return max(sizes)
    if a.is_world and b.is_world:
        from mteditlab.world import DEFAULT_RESOLUTION

        return DEFAULT_RESOLUTION
    return 512


@dataclasses.dataclass
class _Request:
    image: Image.Image
    instruction: str
    intent: str | None
    seed: int
    steps: int | None
    future: concurrent.futures.Future
    on_step: Callable[[int, int], Any] | None = None
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)


def takes_callback(editor) -> bool:
    """Whether ``editor.edit_batch`` accepts a ``callback`` keyword (the protocol's step hook;
    editors written before it, or that forward ``**kwargs`` elsewhere, are called without)."""
    try:
        params = inspect.signature(editor.edit_batch).parameters
    except (TypeError, ValueError):
        return False
    return "callback" in params


def _fan_out(callbacks: list) -> Callable[[int, int], None] | None:
    """One step callback calling every request's own (errors in a listener are ignored)."""
    live = [cb for cb in callbacks if cb is not None]
    if not live:
        return None

    def callback(done: int, total: int) -> None:
        for cb in live:
            try:
                cb(done, total)
            except Exception:  # noqa: BLE001 - progress must never fail an edit
                pass
    return callback


class EditorWorker:
    """One thread per editor that batches concurrent requests (see the module docstring)."""

    def __init__(self, side: Side, max_batch: int = 16, gather_s: float = 0.01,
                 timings: Timings | None = None, run_lock: threading.Lock | None = None):
        self.side = side
        self.timings = timings if timings is not None else Timings()
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # held while the editor runs; shared by both sides' workers when their batches take
        # turns on the CPU (see Engine)
        self._lock = run_lock or threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"editor-{side.key}", daemon=True)
        self._stopped = False
        self._thread.start()
        self.batches = 0
        self.items = 0
        self.with_steps = takes_callback(side.editor)

    def submit(self, image, instruction, intent, seed, steps,
               on_step: Callable[[int, int], Any] | None = None) -> concurrent.futures.Future:
        """Queue one edit; ``on_step(done, total)`` is called (on the worker thread) after each
        denoising step of the batch it runs in."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Request(image, instruction, intent, seed, steps, future, on_step))
        return future

    def _edit_batch(self, images, instructions, intents, seeds, steps, callback=None) -> list:
        extra = {"callback": callback} if callback is not None and self.with_steps else {}
        return self.side.editor.edit_batch(images, instructions, intents=intents, seeds=seeds,
                                           steps=steps, **extra)

    def edit_direct(self, image, instruction, intent, seed, steps,
                    on_step: Callable[[int, int], Any] | None = None) -> Image.Image:
        with self._lock:
            return self._edit_batch([image], [instruction], [intent], [seed], steps,
                                    _fan_out([on_step]))[0]

    def edit_many(self, images, instructions, intents, seeds, steps=None, chunk: int = 64) -> list:
        """A direct batched call (seeding the labeling queue), in chunks, under the lock."""
        out = []
        for i in range(0, len(images), chunk):
            with self._lock:
                out += self.side.editor.edit_batch(
                    images[i:i + chunk], instructions[i:i + chunk], intents=intents[i:i + chunk],
                    seeds=seeds[i:i + chunk], steps=steps)
        return out

    def stop(self) -> None:
        self._stopped = True
        self._queue.put(None)

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
                    _fan_out([r.on_step for r in live]))
                self.timings.add(f"editor {key}: batch compute", time.perf_counter() - start)
            self.timings.count(f"editor {key}: batch size", len(live))
            self.batches += 1
            self.items += len(live)
        except Exception as exc:  # noqa: BLE001
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            for r in live:  # isolate the failing item(s): one bad request fails only itself
                try:
                    with self._lock:
                        out = self._edit_batch([r.image], [r.instruction], [r.intent],
                                               [r.seed], steps, _fan_out([r.on_step]))[0]
                    r.future.set_result(out)
                except Exception as single:  # noqa: BLE001
                    r.future.set_exception(single)
            return
        for r, out in zip(live, outputs):
            r.future.set_result(out)


class Engine:
    """Both sides, their workers and the working image size."""

    def __init__(self, a: Side, b: Side, notices: list[str], max_batch: int = 16,
                 take_turns: bool = False):
        self.sides = {"A": a, "B": b}
        self.notices = notices
        self.size = working_size(a, b)
        self.batching = not on_zero_gpu()
        self.timings = Timings()
        # take_turns: one side's batch at a time (a lock shared by both workers); measured
        # against both at once in docs/app_load.md
        self.take_turns = take_turns
        shared = threading.Lock() if take_turns else None
        self.workers = {k: EditorWorker(s, max_batch, timings=self.timings, run_lock=shared)
                        for k, s in self.sides.items()}

    @classmethod
    def from_config(cls, config: AppConfig) -> "Engine":
        a, b, notices = load_sides(config)
        return cls(a, b, notices, config.max_batch, take_turns=config.take_turns)

    @property
    def world(self) -> bool:
        return all(s.is_world for s in self.sides.values())

    def default_steps(self) -> int:
        return max(int(getattr(s.editor, "default_steps", 10) or 10) for s in self.sides.values())

    def close(self) -> None:
        for w in self.workers.values():
            w.stop()
        _ENGINES.pop(id(self), None)


_ENGINES: dict[int, "Engine"] = {}


class PairProgress:
    """Each side's denoising steps during one :func:`run_pair` (written by the editor threads,
    read by the caller's thread)."""

    def __init__(self, sides):
        self._lock = threading.Lock()
        self._steps: dict[str, tuple[int, int | None]] = {k: (0, None) for k in sides}
        self.changed = threading.Event()

    def step(self, side: str, done: int, total: int) -> None:
        with self._lock:
            first = self._steps[side][1] is None
            self._steps[side] = (int(done), int(total))
        if first:   # a side started: show it at once; later steps are polled (REPORT_EVERY_S)
            self.changed.set()

    def finish(self, side: str) -> None:
        with self._lock:
            done, total = self._steps[side]
            total = total or 1
            self._steps[side] = (total, total)
        self.changed.set()

    def snapshot(self) -> dict[str, tuple[int, int | None]]:
        with self._lock:
            return dict(self._steps)


def progress_fraction(steps: dict[str, tuple[int, int | None]]) -> float:
    """Share of the pair's denoising steps done (a side with no total yet counts as 0)."""
    parts = [done / total if total else 0.0 for done, total in steps.values()]
    return sum(parts) / max(1, len(parts))


ProgressFn = Callable[[dict[str, tuple[int, int | None]]], Any]
# progress goes out when a side starts or finishes and otherwise at most this often: every
# report is a message through gradio's event loop, and waking each waiting request on every
# denoising step of a 16-item batch costs the editors the CPU they need
REPORT_EVERY_S = 0.25


def run_pair(engine: Engine, inputs: dict[str, Image.Image], instruction: str, intent: str | None,
             seed: int, steps: int | None, progress: ProgressFn | None = None
             ) -> dict[str, tuple[Image.Image | None, float, str | None]]:
    """Edit both sides' own inputs with the same instruction, intent and seed.

    Returns side -> (output or None, seconds, error message or None); one side failing does not
    lose the other's result (the caller decides what to keep).  ``progress(steps)`` is called
    from this thread with ``{side: (steps done, steps in all or None)}`` each time a side takes
    a denoising step (see the module docstring).

    The GPU-decorated part (ZeroGPU) takes only picklable arguments, since ZeroGPU runs it in
    another process: the engine is looked up by key in a module registry the worker process
    inherits, and progress is not reported from there."""
    _ENGINES.setdefault(id(engine), engine)
    if engine.batching:
        return _run_pair_batched(engine, inputs, instruction, intent, seed, steps, progress)
    return _run_pair_gpu(id(engine), inputs, instruction, intent, seed, steps)


def _run_pair_batched(engine: Engine, inputs, instruction, intent, seed, steps,
                      progress: ProgressFn | None) -> dict:
    tracker = PairProgress(inputs)
    start = time.perf_counter()
    finished: dict[str, float] = {}
    futures = {}
    for k in inputs:
        fut = engine.workers[k].submit(inputs[k], instruction, intent, seed, steps,
                                       on_step=functools.partial(tracker.step, k))

        def done(_, key=k):
            finished[key] = time.perf_counter() - start
            tracker.finish(key)
        fut.add_done_callback(done)
        futures[k] = fut
    deadline = start + EDIT_TIMEOUT_S
    shown = None
    while True:
        tracker.changed.clear()   # before looking: a side finishing from now on wakes the wait
        all_done = all(f.done() for f in futures.values())
        if progress is not None:
            now = tracker.snapshot()
            if now != shown:
                shown = now
                try:
                    progress(now)
                except Exception:  # noqa: BLE001 - progress must never fail an edit
                    log.debug("progress report failed", exc_info=True)
        if all_done or time.perf_counter() >= deadline:
            break
        tracker.changed.wait(min(REPORT_EVERY_S, max(0.0, deadline - time.perf_counter())))
    results: dict[str, tuple[Image.Image | None, float, str | None]] = {}
    for k, fut in futures.items():
        if not fut.done():
            fut.cancel()
            results[k] = (None, time.perf_counter() - start,
                          f"timed out after {EDIT_TIMEOUT_S:.0f} s")
            continue
        seconds = finished.get(k, time.perf_counter() - start)
        try:
            results[k] = (_check_output(fut.result()), seconds, None)
        except Exception as exc:  # noqa: BLE001
            results[k] = (None, seconds, _describe(exc))
    return results


@gpu(duration=120)
def _run_pair_gpu(engine_key: int, inputs: dict[str, Image.Image], instruction: str,
                  intent: str | None, seed: int, steps: int | None) -> dict:
    engine = _ENGINES[engine_key]
    results: dict[str, tuple[Image.Image | None, float, str | None]] = {}
    for k in inputs:
        t0 = time.perf_counter()
        try:
            out = engine.workers[k].edit_direct(inputs[k], instruction, intent, seed, steps)
            results[k] = (_check_output(out), time.perf_counter() - t0, None)
        except Exception as exc:  # noqa: BLE001
            results[k] = (None, time.perf_counter() - t0, _describe(exc))
    return results


def _check_output(out) -> Image.Image:
    if not isinstance(out, Image.Image):
        raise EditFailure(f"the editor returned {type(out).__name__}, not an image")
    return out.convert("RGB")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
