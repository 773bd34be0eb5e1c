"""A side's editor in a process of its own: :class:`EditorProcess`, the web process's handle
on it, and :func:`serve`, that process's main.

Why: an editor's forward pass is hundreds of small torch ops, and its thread takes Python's
GIL around each; in the web server's process it shares that lock with gradio's event loop and
the request threads, so under load each batch ran 3–4 times slower than alone
(docs/app_load.md).  In a process of its own the editor has a GIL to itself, and the web
process only moves requests and answers.

Inside the process an :class:`~ui.batcher.EditorWorker` batches the requests as it does in the
web process, with that process's thread policy (:func:`ui.threads.apply_thread_policy`).
Requests and answers go over one duplex pipe as pickled tuples; images travel as PIL images
(pickled as their raw uint8 pixels, no encoding):

    web → editor   ("edit", rid, image, instruction, intent, seed, steps)
                   ("many", rid, images, instructions, intents, seeds, steps): a direct batched
                   call in chunks (:meth:`~ui.batcher.EditorWorker.edit_many`)
                   None: stop after the requests already received
    editor → web   ("ready", side) once the editor is loaded, or ("failed", exception)
                   ("step", [rid, ...], done, total): one denoising step of a batch, once for
                   every request in it
                   ("done", rid, output) or ("error", rid, exception)
                   ("time", name, seconds) and ("count", name, value): the worker's timings,
                   added to the web process's :class:`~ui.profile.Timings`

A crash (the pipe closes without a stop): every request in flight fails at once with an
:class:`~ui.batcher.EditFailure` that says so, and a new process is started with the same
editor; requests sent meanwhile wait for it to load.  When a restarted process cannot load its
editor, requests fail at once with that error and the restart is tried again every
``RETRY_S``.  The process ignores SIGINT (the web process stops it) and exits when the web
process is gone (its end of the pipe closes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
import time
from typing import Any, Callable

from .batcher import EditFailure, EditorWorker, describe, fan_out
from .profile import Timings
from .threads import apply_thread_policy, set_wait_policy

log = logging.getLogger("mteditlab.ui")
RETRY_S = 10.0        # between restarts of a process that could not load its editor
STOP_WAIT_S = 30.0    # for the requests in flight when the app stops


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _settle(future: concurrent.futures.Future, value=None, error: BaseException | None = None):
    """Complete ``future`` unless it is done already (a caller that gave up cancels it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


class EditorProcess:
    """The web process's handle on one side's editor process (see the module docstring).

    ``load()`` builds the side (a picklable call, e.g. ``functools.partial(load_side, key,
    spec, device)``) and runs in the editor process; :attr:`ready` is a future of that side
    (its ``editor`` stays in the other process) or of the load error.  Like an
    :class:`~ui.batcher.EditorWorker`: :meth:`submit`, :meth:`edit_many`, :meth:`stop`."""

    def __init__(self, key: str, load: Callable[[], Any], *, threads: int | None = None,
                 max_batch: int = 16, timings: Timings | None = None):
        self.key = key
        self.timings = timings if timings is not None else Timings()
        self._args = (load, threads, max_batch)
        self._mp = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()        # _pending, _conn, _proc, _down, _stopping
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[concurrent.futures.Future, Any]] = {}
        self._ids = itertools.count()
        self._down: str | None = None        # why requests fail at once (a restart failed)
        self._stopping = False
        # the loaded side (``side.process`` is this handle), or the load error (the process
        # has then ended)
        self.ready: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._spawn()

    # ------------------------------------------------------------------ web process side
    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def submit(self, image, instruction, intent, seed, steps, on_step=None
               ) -> concurrent.futures.Future:
        """Queue one edit (the future holds the output image); ``on_step(done, total)`` is
        called on this handle's reader thread after each denoising step."""
        return self._request(("edit", image, instruction, intent, seed, steps), on_step)

    def edit_many(self, images, instructions, intents, seeds, steps=None) -> list:
        """A direct batched call in the editor process (seeding the labeling queue)."""
        return self._request(("many", images, instructions, intents, seeds, steps)).result()

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop the process after the requests it has (killed if it takes over ``wait_s``)."""
        with self._lock:
            self._stopping = True
            conn, proc = self._conn, self._proc
        try:
            with self._send_lock:
                conn.send(None)
        except (OSError, ValueError):
            pass
        proc.join(wait_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)

    def _request(self, payload: tuple, on_step=None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            refusal = ("the app is shutting down" if self._stopping else self._down)
            if refusal is None:
                rid = next(self._ids)
                self._pending[rid] = (future, on_step)
                conn = self._conn
        if refusal is not None:
            future.set_exception(EditFailure(refusal))
            return future
        try:
            with self._send_lock:
                conn.send((payload[0], rid, *payload[1:]))
        except Exception as exc:  # noqa: BLE001 - a dead pipe or an unpicklable request
            with self._lock:
                entry = self._pending.pop(rid, None)
            if entry is not None:
                _settle(future, error=EditFailure(f"the editor of side {self.key} could not be "
                                                  f"reached ({describe(exc)}); try again in a "
                                                  "moment"))
        return future

    def _spawn(self) -> None:
        """Start a process (with ``_lock`` held) and the thread that reads its answers."""
        load, threads, max_batch = self._args
        ours, theirs = self._mp.Pipe()
        proc = self._mp.Process(target=serve, args=(theirs, load, threads, max_batch),
                                name=f"editor-{self.key}", daemon=True)
        proc.start()
        theirs.close()   # so that the process's exit closes the pipe for the reader
        self._conn, self._proc = ours, proc
        threading.Thread(target=self._read, args=(ours, proc), name=f"editor-{self.key}-answers",
                         daemon=True).start()

    def _read(self, conn, proc) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - an answer that does not unpickle
                log.exception("side %s: unreadable answer from the editor process", self.key)
                continue
            self._handle(message)
        conn.close()
        proc.join(5)
        self._lost(proc.exitcode)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, rids, done, total = message
            with self._lock:
                listeners = [self._pending[r][1] for r in rids if r in self._pending]
            fan_out([listener for listener in listeners if listener is not None], done, total)
        elif kind in ("done", "error"):
            with self._lock:
                entry = self._pending.pop(message[1], None)
            if entry is not None:
                _settle(entry[0], *((message[2], None) if kind == "done" else (None, message[2])))
        elif kind == "time":
            self.timings.add(message[1], message[2])
        elif kind == "count":
            self.timings.count(message[1], message[2])
        elif kind == "ready":
            side = message[1]
            side.process = self
            with self._lock:
                self._down = None
            if self.ready.done():
                log.warning("side %s: the editor process is back", self.key)
            else:
                self.ready.set_result(side)
        elif kind == "failed":
            if self.ready.done():
                log.error("side %s: the restarted editor process could not load its editor: "
                          "%s", self.key, describe(message[1]))
                with self._lock:
                    self._down = (f"the editor of side {self.key} is unavailable: it stopped "
                                  f"and could not be loaded again ({describe(message[1])})")
            else:
                self.ready.set_exception(message[1])

    def _lost(self, code: int | None) -> None:
        """The process ended: fail what was in flight, and restart it unless stopping."""
        with self._lock:
            pending, self._pending = self._pending, {}
            stopping, down = self._stopping, self._down
            served = self.ready.done() and self.ready.exception() is None
            if served and not stopping and down is None:
                self._spawn()   # at once, under the lock: later requests go to the new one
        if stopping:
            reason = "the app is shutting down"
        elif down:
            reason = down
        else:
            reason = (f"the editor of side {self.key} stopped unexpectedly ({_exit_text(code)}); "
                      "it is restarting: try again in a moment")
            log.error("side %s: %s", self.key, reason)
        for future, _ in pending.values():
            _settle(future, error=EditFailure(reason))
        if not self.ready.done():
            self.ready.set_exception(EditFailure(
                f"the editor process of side {self.key} ended while loading ({_exit_text(code)})"))
        elif served and not stopping and down is not None:
            time.sleep(RETRY_S)
            with self._lock:
                if not self._stopping:
                    self._spawn()


# ---------------------------------------------------------------------- editor process side
class _Outbox:
    """The editor process's end of the pipe: answers, steps and timings, one send at a time.
    Also the worker's ``timings`` (``add`` / ``count``) and its ``step_hook``."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message) -> None:
        """Send ``message`` (raises what pickling it raises; a closed pipe is ignored: the main
        loop ends on it)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._lock:
                self.conn.send_bytes(data)
        except (OSError, ValueError):
            pass

    def add(self, name: str, seconds: float) -> None:
        self.send(("time", name, seconds))

    def count(self, name: str, value: int) -> None:
        self.send(("count", name, value))

    def steps(self, rids: list, done: int, total: int) -> None:
        self.send(("step", rids, done, total))

    def answer(self, rid: int, future: concurrent.futures.Future) -> None:
        error = future.exception()
        if error is None:
            output = future.result()
            try:
                self.send(("done", rid, output))
                return
            except Exception as exc:  # noqa: BLE001 - an output that does not pickle
                error = EditFailure(f"the editor returned an unsendable {type(output).__name__} "
                                    f"({describe(exc)})")
        self.send(("error", rid, sendable(error)))


def sendable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (most do), else an :class:`EditFailure` saying it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - an exception type that does not round-trip
        return EditFailure(describe(error))
    return error


def serve(conn, load: Callable[[], Any], threads: int | None, max_batch: int) -> None:
    """The editor process: thread policy, ``load()``, then answer requests until told to stop
    or the web process is gone (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_wait_policy()
    apply_thread_policy(threads)
    try:
        side = load()
    except Exception as exc:  # noqa: BLE001 - reported to the web process, which falls back
        conn.send(("failed", sendable(exc)))
        conn.close()
        return
    outbox = _Outbox(conn)
    worker = EditorWorker(side, max_batch, timings=outbox, step_hook=outbox.steps)
    direct = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edit-many")
    outbox.send(("ready", dataclasses.replace(side, editor=None)))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        kind, rid, *args = message
        if kind == "edit":
            future = worker.submit(*args, on_step=rid)
        else:
            future = direct.submit(worker.edit_many, *args)
        future.add_done_callback(functools.partial(outbox.answer, rid))
    worker.stop(wait_s=STOP_WAIT_S)
    direct.shutdown(wait=True)
    conn.close()
