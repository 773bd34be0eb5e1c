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
    By default each side's editor runs in a process of its own (:mod:`ui.editor_process`), so
    its torch work never competes with the web server for Python's GIL; ``--in-process-editors``
    (and ``--take-turns``, ZeroGPU) keeps them in the web process.  Either way an
    :class:`~ui.batcher.EditorWorker` gathers the edit requests queued by concurrent users into
    one ``edit_batch`` call per side (up to ``--max-batch``); the two sides' batches run at the
    same time, each on the editor threads of ``--threads`` (see :mod:`ui.threads`);
    ``--take-turns`` runs one side's batch at a time.  On ZeroGPU Spaces the GPU exists only
    inside ``spaces.GPU`` functions, so there the edits run directly inside :func:`run_pair`,
    which carries the decorator (a no-op elsewhere).

Progress
    Editors report each denoising step (``edit_batch(..., callback=)``); the worker passes the
    steps of a batch to every request in it (from an editor process, one message per step of a
    batch), and :func:`run_pair` hands the caller each side's ``(steps done, steps in all)``
    from the caller's own thread (where ``gr.Progress`` works): when a side starts and when it
    finishes at once, in between every ``REPORT_EVERY_S``.  Editors that have no denoising loop
    (the reference editors) report their side finished when their result arrives.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
from typing import Any, Callable

from PIL import Image

from .batcher import EditFailure, EditorWorker, describe
from .config import AppConfig, SideSpec, resolve_path
from .editor_process import EditorProcess
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


def editors_in_own_processes(config: AppConfig) -> bool:
    """Whether the sides' editors run in processes of their own (see the module docstring)."""
    return not (config.in_process_editors or config.take_turns or on_zero_gpu())


@dataclasses.dataclass
class Side:
    """A loaded arena side: the store's (editor, adapter) naming plus what runs its edits."""

    key: str                     # "A" or "B" (the store's session_a / session_b)
    editor_name: str             # store `editor` column, e.g. "mini"
    adapter: str | None          # store `adapter` column, e.g. "lora:checkpoints/mini/grpo"
    editor: Any                  # mteditlab.editors.Editor; None when `process` runs it
    requested: SideSpec | None = None
    fallback_reason: str | None = None
    resolution: int | None = None   # the editor's square working size (None: any)
    default_steps: int = 10
    is_world: bool = False          # it edits the world's scenes (``Editor.world``)
    process: EditorProcess | None = None   # the editor's own process, if it has one
    intent: str | None = None       # the reconstructor spec ``adapter`` names (None: not named yet)

    def __post_init__(self):
        if self.editor is not None:
            value = getattr(self.editor, "resolution", None)
            self.resolution = int(value) if value else None
            self.default_steps = int(getattr(self.editor, "default_steps", 10) or 10)
            self.is_world = bool(getattr(self.editor, "world", False))

    @property
    def model(self) -> str:
        return f"{self.editor_name}+{self.adapter}" if self.adapter else self.editor_name


def _store_names(spec: SideSpec) -> tuple[str, str | None]:
    """The store's (editor, adapter) of a side: the adapter column names the LoRA and, when it is
    not the default, the side's intent reconstructor (:func:`ui.intents.intent_label`)."""
    from .intents import intent_label

    editor = spec.editor + (f"@{spec.model}" if spec.model else "")
    parts = [f"lora:{spec.lora}"] if spec.lora else []
    label = intent_label(spec.intent)
    return editor, "+".join(parts + ([label] if label else [])) or None


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
    return Side(key, name, adapter, editor, requested=spec, intent=spec.intent)


SideStarter = Callable[[str, SideSpec], concurrent.futures.Future]


def _load_here(device: str | None) -> SideStarter:
    """Load a side in this process (at once; the future is already done)."""
    def start(key: str, spec: SideSpec) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(load_side(key, spec, device))
        except Exception as exc:  # noqa: BLE001 - the caller decides (fallback or strict)
            future.set_exception(exc)
        return future
    return start


def start_in_process(key: str, spec: SideSpec, *, config: AppConfig, timings: Timings) -> concurrent.futures.Future:
    """Load a side in its own editor process (``editors_in_own_processes``); the future is its readiness."""
    load = functools.partial(load_side, key, spec, config.device)
    return EditorProcess(key, load, threads=config.threads, max_batch=config.max_batch, timings=timings).ready


def _reference(start: SideStarter, key: str, name: str, reason: str,
               requested: SideSpec) -> Side:
    side = start(key, SideSpec(name, intent=requested.intent)).result()
    side.requested, side.fallback_reason = requested, reason
    return side


def _discard(side: Side) -> None:
    if side.process is not None:
        side.process.stop()


def load_sides(config: AppConfig, start: SideStarter | None = None
               ) -> tuple[Side, Side, list[str]]:
    """Both sides with the fallbacks of the module docstring; returns (A, B, notices).
    ``start(key, spec)`` begins loading a side and returns a future of it (default: load it in
    this process); both sides are started before either is waited for."""
    start = start or _load_here(config.device)
    notices: list[str] = []
    sides: dict[str, Side] = {}
    errors: dict[str, str] = {}
    loading = {key: start(key, spec) for key, spec in (("A", config.side_a), ("B", config.side_b))}
    for key, spec in (("A", config.side_a), ("B", config.side_b)):
        try:
            sides[key] = loading[key].result()
        except Exception as exc:  # noqa: BLE001 - any load failure becomes a visible notice
            if config.strict:
                for other in loading.values():
                    if other.done() and other.exception() is None:
                        _discard(other.result())
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
            sides[key] = _reference(start, key, name, reason, spec)
        else:
            name = "identity" if key == "A" else "oracle"
            reason = (f"Side {key} ({spec.describe()}) could not be loaded — {errors[key]}. "
                      f"It runs the **{name}** reference editor instead"
                      + (" (returns its input unchanged)." if name == "identity" else
                         " (the world's exact editor)."))
            sides[key] = _reference(start, key, name, reason, base_only)
        notices.append(reason)
    a, b = sides["A"], sides["B"]
    if a.model == b.model:
        name = "oracle" if a.editor_name != "oracle" else "identity"
        reason = (f"Both sides would run {a.model}; a same-model arena carries no information, "
                  f"so side B runs the **{name}** editor.")
        _discard(b)
        b = _reference(start, "B", name, reason, b.requested)
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


class Engine:
    """Both sides, what runs their edits (``workers``: an :class:`~ui.batcher.EditorWorker`
    per side in this process, or the side's :class:`~ui.editor_process.EditorProcess`) and the
    working image size."""

    def __init__(self, a: Side, b: Side, notices: list[str], max_batch: int = 16,
                 take_turns: bool = False, timings: Timings | None = None):
        self.sides = {"A": a, "B": b}
        self.notices = notices
        self.size = working_size(a, b)
        self.batching = not on_zero_gpu()
        self.timings = timings if timings is not None else Timings()
        # take_turns: one side's batch at a time (a lock shared by both workers); measured
        # against both at once in docs/app_load.md
        shared = threading.Lock() if take_turns else None
        self.workers = {k: s.process or EditorWorker(s, max_batch, timings=self.timings,
                                                     run_lock=shared)
                        for k, s in self.sides.items()}

    @classmethod
    def from_config(cls, config: AppConfig) -> "Engine":
        timings = Timings()
        start = functools.partial(start_in_process, config=config, timings=timings) \
            if editors_in_own_processes(config) else None
        a, b, notices = load_sides(config, start)
        return cls(a, b, notices, config.max_batch, take_turns=config.take_turns,
                   timings=timings)

    @property
    def world(self) -> bool:
        return all(s.is_world for s in self.sides.values())

    def name_intents(self, specs: dict[str, str]) -> None:
        """Make each side's store name carry its intent reconstructor ``specs[key]`` (as
        :func:`load_side` does; sides built around editors directly, in tests, are named here)."""
        from .intents import intent_label

        for key, side in self.sides.items():
            if key not in specs:
                continue
            adapter, old = side.adapter, intent_label(side.intent) if side.intent else None
            if old and adapter and adapter.endswith(old):     # named for another one: rename
                adapter = adapter[: -len(old)].rstrip("+") or None
            side.adapter = "+".join(p for p in (adapter, intent_label(specs[key])) if p) or None
            side.intent = specs[key]

    def default_steps(self) -> int:
        return max(s.default_steps for s in self.sides.values())

    def close(self) -> None:
        """Stop both sides at once (an editor process first finishes the edits it has)."""
        stopping = [threading.Thread(target=w.stop) for w in self.workers.values()]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        _ENGINES.pop(id(self), None)


_ENGINES: dict[int, "Engine"] = {}


class PairProgress:
    """Each side's denoising steps during one :func:`run_pair` (written by the threads that run
    the editors or hear from their processes, read by the caller's thread)."""

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
            total = self._steps[side][1] or 1
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


def run_pair(engine: Engine, inputs: dict[str, Image.Image], instruction: str,
             intent: str | None | dict[str, str | None], seed: int, steps: int | None,
             progress: ProgressFn | None = None
             ) -> dict[str, tuple[Image.Image | None, float, str | None]]:
    """Edit both sides' own inputs with the same instruction and seed; ``intent``: what every
    side's editor is told, or side -> what that side's is (each side's own reconstructor's answer,
    :mod:`ui.intents`; None: the instruction as typed).

    Returns side -> (output or None, seconds, error message or None); one side failing does not
    lose the other's result (the caller decides what to keep).  ``progress(steps)`` is called
    from this thread with ``{side: (steps done, steps in all or None)}`` each time a side takes
    a denoising step (see the module docstring).

    The GPU-decorated part (ZeroGPU) takes only picklable arguments, since ZeroGPU runs it in
    another process: the engine is looked up by key in a module registry the worker process
    inherits, and progress is not reported from there."""
    _ENGINES.setdefault(id(engine), engine)
    intent = dict(intent) if isinstance(intent, dict) else {k: intent for k in inputs}
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
        fut = engine.workers[k].submit(inputs[k], instruction, intent.get(k), seed, steps,
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
            results[k] = (None, seconds, describe(exc))
    return results


@gpu(duration=120)
def _run_pair_gpu(engine_key: int, inputs: dict[str, Image.Image], instruction: str,
                  intent: dict[str, str | None], seed: int, steps: int | None) -> dict:
    engine = _ENGINES[engine_key]
    results: dict[str, tuple[Image.Image | None, float, str | None]] = {}
    for k in inputs:
        t0 = time.perf_counter()
        try:
            out = engine.workers[k].edit_direct(inputs[k], instruction, intent.get(k), seed, steps)
            results[k] = (_check_output(out), time.perf_counter() - t0, None)
        except Exception as exc:  # noqa: BLE001
            results[k] = (None, time.perf_counter() - t0, describe(exc))
    return results


def _check_output(out) -> Image.Image:
    if not isinstance(out, Image.Image):
        raise EditFailure(f"the editor returned {type(out).__name__}, not an image")
    return out.convert("RGB")
