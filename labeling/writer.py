"""The single writer thread: every write of a store runs on it, in order, in a transaction.

Any number of threads hand it work and wait for the result.  :meth:`Writer.call` runs one
function in its own transaction.  :meth:`Writer.submit` queues a :class:`Batched` request;
consecutive requests that queue up while the writer is busy are handed together (up to
``max_batch``) to ``write_batch(transaction, batch)``, which writes them in one
``transaction`` (:meth:`Writer.transaction`) and resolves each request's future (group
commit: durability per request at the throughput of batched inserts).  A result is returned
only after its transaction committed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable
from typing import Any

import duckdb

from labeling.errors import StoreError


@dataclasses.dataclass
class Tx:
    """A write transaction on the writer thread; cache updates wait in ``on_commit``."""

    cur: duckdb.DuckDBPyConnection
    on_commit: list[Callable[[], None]]


@dataclasses.dataclass
class Batched:
    """A request the writer groups with the ones queued behind it; ``future`` gets its result."""

    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future, kw_only=True)


@dataclasses.dataclass
class _Call:
    fn: Callable[[Tx], Any]
    future: concurrent.futures.Future


_STOP = object()


class Writer:
    """The writer thread over cursor ``cur`` (see the module docstring)."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, name: str,
                 write_batch: Callable[[Callable, list], None], max_batch: int = 512):
        self._cur, self._write_batch, self._max_batch = cur, write_batch, max_batch
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[Tx], Any]) -> Any:
        """Run ``fn(tx)`` in one transaction on the writer thread; its result once committed."""
        return self._put(_Call(fn, concurrent.futures.Future()))

    def submit(self, request: Batched) -> Any:
        """Queue ``request`` for ``write_batch``; its result once committed."""
        return self._put(request)

    def transaction(self, body: Callable[[Tx], Any]) -> Any:
        """Run ``body(tx)`` between BEGIN and COMMIT (ROLLBACK on error), then its on-commit
        updates.  Only on the writer thread."""
        tx = Tx(self._cur, [])
        self._cur.execute("BEGIN")
        try:
            result = body(tx)
            self._cur.execute("COMMIT")
        except BaseException:
            self._cur.execute("ROLLBACK")
            raise
        for update in tx.on_commit:
            update()
        return result

    def close(self) -> None:
        """Finish the queued work and stop the thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ops.put(_STOP)
        self._thread.join()

    def _put(self, item) -> Any:
        with self._lock:  # so nothing is queued behind close()'s stop marker
            if self._closed:
                raise StoreError("the store is closed")
            self._ops.put(item)
        return item.future.result()

    def _run(self) -> None:
        carry = None
        while True:
            op = carry if carry is not None else self._ops.get()
            carry = None
            if op is _STOP:
                break
            if isinstance(op, _Call):
                try:
                    op.future.set_result(self.transaction(op.fn))
                except BaseException as exc:
                    op.future.set_exception(exc)
                continue
            batch = [op]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, Batched):
                    carry = nxt
                    break
                batch.append(nxt)
            self._write_batch(self.transaction, batch)
