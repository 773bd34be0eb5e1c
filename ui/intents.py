"""Each arena side's intent reconstructor (Edit-R2's intent step, :mod:`mteditlab.reconstructors`).

A side is an editor, an optional adapter and an intent reconstructor (``--intent-a/-b SPEC``,
``MTEDITLAB_INTENT_A/_B``; :class:`~ui.config.SideSpec` ``intent``).  Before each turn every side's
reconstructor reads **that side's own** session so far — the source, the earlier instructions, the
intents it reconstructed for them and the side's own latest output — and the new instruction, and
its answer is what that side's editor gets (``edit_batch(..., intents=...)``).

Which reconstructor runs on which image
    ``rule`` (the default) and ``mini[:DIR]`` read only scenes of the built-in world: on any other
    source (an uploaded photo) the side's editor gets the instruction as typed, and nothing is
    counted as failed.  ``served:URL``, ``concat`` and ``none`` run on every source.  ``oracle``
    reads the gold intents of generated sessions, which the arena does not have: refused at start.

Failures
    A reconstructor that fails (no answer, a malformed or empty one, a timeout, an instruction the
    world's rule cannot resolve, or any exception) gives that side the instruction as typed; the
    failure is counted per side (:attr:`SideIntents.failures`, and in the app's profile line at
    shutdown), logged with its reason, stored with the session (``meta.intent_failures``) and
    said on screen for that turn (a served one's reason only as "timed out" or "no usable
    answer": its errors may name the server).  One turn waits at most
    :data:`INTENT_TIMEOUT_S` for the sides' reconstructors (a served one has its own per-request
    ``timeout=`` and ``retries=`` on its URL: keep them short for an interactive arena).

Errors at start
    A spec that names no reconstructor, misses or has an extra argument, or cannot be built (a bad
    URL, a missing checkpoint) is a :class:`~ui.config.ConfigError` naming the flag, raised when the
    flags are parsed (:func:`check_spec`) or when the app is built (:func:`build_reconstructors`),
    before any session starts.

A side whose reconstructor is not the default carries it in its stored model name
(``mini+lora:checkpoints/mini/grpo+intent:served(qwen)``, see :func:`intent_label`), so two sides
with the same editor and different reconstructors are two models of the arena and the leaderboard.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from .config import DEFAULT_INTENT, AppConfig, ConfigError
from .text import md_literal

log = logging.getLogger("mteditlab.ui")
WORLD_READERS = frozenset({"rule", "mini"})   # reconstructors that read only world scenes
INTENT_TIMEOUT_S = 60.0     # the longest one turn waits for the sides' reconstructors
SLOW_S = 1.0                # a reconstruction running longer says so in the progress
SIDE_FLAGS = {"A": "--intent-a", "B": "--intent-b"}


def spec_name(spec: str) -> str:
    return spec.partition(":")[0]


def normal_spec(spec: str | None) -> str:
    """``spec`` stripped; empty: the default; ``off``, ``no``, ``-``: ``none``."""
    spec = (spec or "").strip() or DEFAULT_INTENT
    return "none" if spec.lower() in ("off", "no", "-") else spec


def check_spec(spec: str | None, flag: str) -> str:
    """``spec`` (:func:`normal_spec`) checked against the registry without building it
    (:func:`~mteditlab.reconstructors.reconstructor_class`); a :class:`ConfigError` naming ``flag``
    otherwise."""
    from mteditlab.reconstructors import ReconstructorError, reconstructor_class

    spec = normal_spec(spec)
    try:
        cls = reconstructor_class(spec)
    except ReconstructorError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if cls.privileged:
        raise ConfigError(f"{flag}: the {spec_name(spec)!r} reconstructor reads the gold intents of "
                          "generated sessions, which the arena does not have; use rule, mini[:DIR], "
                          "served:URL, concat or none")
    return spec


def intent_label(spec: str) -> str | None:
    """What a side's stored model name says about its reconstructor: None for the default (``rule``),
    else ``intent:NAME`` — with ``mini``'s checkpoint directory, and a served one's ``model=`` option
    (never its URL: the name is public on the leaderboard)."""
    spec = normal_spec(spec)
    if spec == DEFAULT_INTENT:
        return None
    name, _, arg = spec.partition(":")
    if name == "served":
        model = parse_qs(urlsplit(arg).query).get("model", [""])[-1]
        return f"intent:served({model})" if model else "intent:served"
    return f"intent:{spec}"


def build_reconstructors(config: AppConfig) -> dict:
    """Side -> its built reconstructor (shared per spec with every other caller in the process,
    :func:`mteditlab.intent.shared_reconstructor`); a :class:`ConfigError` naming the flag when one
    cannot be built."""
    from mteditlab.intent import shared_reconstructor

    built = {}
    for key, side in (("A", config.side_a), ("B", config.side_b)):
        flag = SIDE_FLAGS[key]
        spec = check_spec(side.intent, flag)
        try:
            built[key] = shared_reconstructor(spec)
        except Exception as exc:  # noqa: BLE001 - any build failure is a start-up error
            raise ConfigError(f"{flag} {spec}: the reconstructor cannot be built: {exc}") from None
    return built


@dataclasses.dataclass(frozen=True)
class SideIntent:
    """What one side's editor was told at one turn.  ``intent`` None: the instruction as typed,
    because the reconstructor gave none (``none``), failed (``failure``: the reason, for the log and
    the store; ``why``: what the screen may say), or did not run (``skipped``: ``"off"`` when the
    person turned reconstruction off, ``"not a world scene"`` for a world reader on a photo)."""

    intent: str | None
    failure: str | None = None
    why: str | None = None
    skipped: str | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None


def _shown_reason(name: str, failure: str) -> str:
    """A failure's reason as the screen says it: a served reconstructor's transport errors may name
    the server, so only whether it timed out; the others' reasons are about the text or the world."""
    if name == "served":
        return ("the intent model timed out" if "timed out" in failure else
                "the intent model gave no usable answer")
    line = (failure.strip().splitlines() or [""])[0]
    return line if len(line) <= 200 else line[:199] + "…"


class SideIntents:
    """The two sides' reconstructors (side -> built reconstructor; ``specs``: side -> spec) and their
    failure counts (``failures``: side -> turns that fell back to the instruction)."""

    def __init__(self, reconstructors: dict, timeout_s: float = INTENT_TIMEOUT_S, timings=None):
        self.reconstructors = dict(reconstructors)
        self.specs = {k: getattr(r, "spec", "") or getattr(r, "name", "") for k, r in self.reconstructors.items()}
        self.timeout_s = timeout_s
        self.timings = timings
        self.failures: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="intent")

    @classmethod
    def from_config(cls, config: AppConfig, **kwargs) -> "SideIntents":
        return cls(build_reconstructors(config), **kwargs)

    def name(self, side: str) -> str:
        return getattr(self.reconstructors[side], "name", "") or spec_name(self.specs[side])

    def reads_photos(self, side: str) -> bool:
        """Whether ``side``'s reconstructor runs on images that are no world scene."""
        return self.name(side) not in WORLD_READERS

    def reconstruct(self, queries: dict, world: bool, on_slow: Callable[[], object] | None = None
                    ) -> dict[str, SideIntent]:
        """Side -> :class:`SideIntent` for one turn; ``queries``: side ->
        :class:`~mteditlab.reconstructors.IntentQuery` built from that side's own history.  ``world``:
        the source is a scene of the built-in world.  Sides sharing a reconstructor are asked in one
        call, the others at the same time; ``on_slow()`` is called once when they take longer than
        :data:`SLOW_S`.  Never raises."""
        out: dict[str, SideIntent] = {}
        groups: dict[int, list[str]] = {}
        for side in queries:
            if not world and not self.reads_photos(side):
                out[side] = SideIntent(None, skipped="not a world scene")
            else:
                groups.setdefault(id(self.reconstructors[side]), []).append(side)
        start = time.perf_counter()
        futures = {self._pool.submit(self._ask, sides, [queries[s] for s in sides]): sides
                   for sides in groups.values()}
        if futures and on_slow is not None:
            done, _ = concurrent.futures.wait(futures, timeout=SLOW_S)
            if len(done) < len(futures):
                try:
                    on_slow()
                except Exception:  # noqa: BLE001 - progress must never fail a turn
                    log.debug("progress report failed", exc_info=True)
        deadline = start + self.timeout_s
        for future, sides in futures.items():
            try:
                answers = future.result(timeout=max(0.0, deadline - time.perf_counter()))
            except concurrent.futures.TimeoutError:
                answers = [(None, f"no answer within {self.timeout_s:g} s (timed out)")] * len(sides)
            for side, (intent, failure) in zip(sides, answers):
                out[side] = self._result(side, intent, failure)
        if self.timings is not None and futures:
            self.timings.add("edit: intents (both sides)", time.perf_counter() - start)
        return {side: out[side] for side in queries}

    def _ask(self, sides: list[str], queries: list) -> list[tuple[str | None, str | None]]:
        """``(intent, failure)`` per query from the sides' (shared) reconstructor; never raises."""
        reconstructor = self.reconstructors[sides[0]]
        try:
            results = reconstructor.reconstruct(queries)
            if len(results) != len(queries):
                raise ValueError(f"{len(results)} answers for {len(queries)} queries")
            return [(r.intent, r.failure if r.intent is None else None) for r in results]
        except Exception as exc:  # noqa: BLE001 - a reconstructor error is a counted failure
            return [(None, f"{type(exc).__name__}: {exc}")] * len(queries)

    def _result(self, side: str, intent: str | None, failure: str | None) -> SideIntent:
        if intent is not None and not str(intent).strip():
            intent, failure = None, "an empty intent"
        if failure is None:
            return SideIntent(None if intent is None else str(intent))
        with self._lock:
            self.failures[side] += 1
        if self.timings is not None:   # in the app's profile line at shutdown as well
            self.timings.count(f"intent {side}: reconstructor failed", 1)
        log.debug("side %s's intent reconstructor (%s) failed: %s", side, self.name(side), failure)
        return SideIntent(None, failure=failure, why=_shown_reason(self.name(side), failure))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------- on screen
def told_markdown(told: SideIntent | None, detail: bool = False) -> str:
    """What a side's editor used, as Markdown: the intent in quotes (shown literally), or
    "instruction as typed", with a warning when the reconstructor failed (its reason if ``detail``)."""
    if told is None:
        return ""
    if told.intent is not None:
        return f"“{md_literal(told.intent)}”"
    if told.failed:
        reason = f" ({md_literal(told.why)})" if detail and told.why else ""
        return f"⚠️ reconstructor failed, could not resolve the intent{reason}: instruction as typed"
    return "instruction as typed"
