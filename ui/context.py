"""Per-process services shared by every user: the editors and their intent reconstructors, the
label store, the image bank.

One :class:`AppContext` per process.  It owns the single :class:`labeling.store.LabelStore`
(DuckDB allows one read-write process; the store serialises writes on its own thread and any
number of gradio worker threads may call it).

Anonymous arena voters are named ``arena:anon-<HMAC-SHA256(server secret, session hash)>``
(first 24 hex digits): stable for one browser session, unlinkable to it without the secret.
The session hash itself is a live credential (whoever holds it can act in that session), so it
is never stored, exported or shown.  The secret is 32 random bytes generated once in
``<data dir>/voter_secret.key`` (mode 0600) and kept across restarts.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

from .config import AppConfig
from .images import DisplayFiles, ImageBank
from .profile import Timings

log = logging.getLogger("mteditlab.ui")
SECRET_FILENAME = "voter_secret.key"
ANON_PREFIX = "arena:anon-"
KEYED_ID = re.compile(r"[0-9a-f]{24}")
NOT_BACKED_UP = ("**Labels are not being backed up**: the last snapshot of the labels could not "
                 "be read when the app started, so none is pushed (it would replace the saved "
                 "ones). Labels given now may be lost at the next restart; the server log says "
                 "why.")


def server_secret(data_dir: Path) -> bytes:
    """The server's voter secret in ``data_dir``: read it, or create it once (mode 0600)."""
    path = Path(data_dir) / SECRET_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"{path} holds {len(secret)} bytes, expected a 32-byte secret; "
                             "remove it to generate a new one") from None
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
        fh.flush()
        os.fsync(fh.fileno())
    return secret


def voter_id(secret: bytes, session_hash: str | None) -> str:
    """The stored name of an anonymous arena voter: a keyed hash of the session hash."""
    digest = hmac.new(secret, (session_hash or "").encode("utf-8", "replace"), hashlib.sha256)
    return ANON_PREFIX + digest.hexdigest()[:24]


def rename_raw_voter_ids(store, secret: bytes) -> int:
    """Older versions stored anonymous voters as ``arena:anon-<session hash>``; rename each to
    :func:`voter_id` of that hash (the id the same browser session gets now), so no stored value
    holds a session hash. Idempotent; read-only stores are left alone. Returns how many."""
    if getattr(store, "read_only", False):
        return 0
    names = store.table("annotators")["name"]
    raw = [n for n in names if n.startswith(ANON_PREFIX) and not KEYED_ID.fullmatch(n[len(ANON_PREFIX):])]
    return store.rename_annotators({n: voter_id(secret, n[len(ANON_PREFIX):]) for n in raw}) if raw else 0


class AppContext:
    def __init__(self, config: AppConfig, engine, store, owns_store: bool = True, intents=None):
        from .intents import SideIntents

        self.config = config
        self.engine = engine
        self.store = store
        self.owns_store = owns_store
        self.data_dir = Path(store.path).parent
        self.secret = server_secret(self.data_dir)
        self._rename_raw_voters()
        self.bank = ImageBank(fallback=store.image_bytes)
        self.display_dir = Path(tempfile.mkdtemp(prefix="mteditlab-display-"))
        self.display = DisplayFiles(self.bank, self.display_dir)
        self._session_locks: dict[str, list] = {}   # key -> [RLock, holders and waiters]
        self._session_locks_guard = threading.Lock()
        self._annotators: set[str] = set()
        self._annotator_lock = threading.Lock()
        self.closers: list = []   # called by close()
        # request timings (see ui.profile), shared with the engine's workers
        self.timings = getattr(engine, "timings", None) or Timings()
        self.snapshots = None     # labeling.snapshots.SnapshotSync when --hub-dataset is set
        # each side's intent reconstructor (ui.intents; built from config.side_a/_b.intent)
        self.intents = intents or SideIntents.from_config(config)
        self.intents.timings = self.timings
        if hasattr(engine, "name_intents"):
            engine.name_intents(self.intents.specs)
        self.closers.append(self.intents.close)

    @classmethod
    def create(cls, config: AppConfig, *, engine=None, store=None) -> "AppContext":
        from labeling.queue import AssignmentPolicy
        from labeling.connection import default_db_path
        from labeling.store import LabelStore

        from .engine import Engine
        from .intents import SideIntents

        # the sides' intent reconstructors first: a bad spec stops the start before anything loads
        intents = SideIntents.from_config(config)
        owns = store is None
        if store is None:
            store = LabelStore.open(default_db_path(config.resolved_data_dir()),
                                    policy=AssignmentPolicy(selection=config.queue_selection))
        try:
            engine = engine or Engine.from_config(config)
        except BaseException:
            if owns:
                store.close()
            raise
        ctx = cls(config, engine, store, owns_store=owns, intents=intents)
        if config.hub_dataset:
            ctx.start_snapshots()
        return ctx

    def _rename_raw_voters(self) -> None:
        renamed = rename_raw_voter_ids(self.store, self.secret)
        if renamed:
            log.info("renamed %d arena voters stored under their session hash to keyed ids",
                     renamed)

    def start_snapshots(self, target=None, **sync_options) -> None:
        """Labels that survive a restart (see :mod:`labeling.snapshots`): resume an empty
        store from the last snapshot in ``target`` (default: the configured ``hub_dataset``),
        give restored voters keyed ids, then push snapshots every ``hub_every`` minutes and
        once more when the app closes.  When the last snapshot cannot be read, nothing is
        pushed and the page header says that labels are not being backed up.
        ``sync_options``: more :class:`~labeling.snapshots.SnapshotSync` arguments."""
        from labeling.snapshots import SnapshotSync, target_from_spec

        sync = SnapshotSync(self.store, target or target_from_spec(self.config.hub_dataset),
                            self.config.hub_every, **sync_options)
        if sync.resume() is not None:
            self._rename_raw_voters()
        sync.start()
        self.snapshots = sync
        self.closers.append(sync.stop)
        if sync.problem:
            self.engine.notices.append(NOT_BACKED_UP)
        else:
            log.info("label snapshots go to %s every %g min", sync.target.description,
                     self.config.hub_every)

    def voter(self, session_hash: str | None) -> str:
        """Anonymous arena voter id of a browser session (see the module docstring)."""
        return voter_id(self.secret, session_hash)

    @contextlib.contextmanager
    def lock_for(self, key: str):
        """Serialise the events of one user session: a lock of that session's own (counted,
        dropped when nobody holds or waits for it), so two people never wait for each other
        (a fixed set of striped locks made unrelated sessions queue behind each other's edits)."""
        with self._session_locks_guard:
            entry = self._session_locks.get(key)
            if entry is None:
                entry = self._session_locks[key] = [threading.RLock(), 0]
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._session_locks_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    self._session_locks.pop(key, None)

    def ensure_annotator(self, name: str) -> None:
        with self._annotator_lock:
            if name in self._annotators:
                return
        self.store.add_annotator(name, simulated=False)
        with self._annotator_lock:
            self._annotators.add(name)

    def close(self) -> None:
        summary = self.timings.summary()
        if summary:
            log.info("app profile: %s", json.dumps(summary))
        for closer in self.closers:
            closer()
        if self.engine is not None:
            self.engine.close()
        if self.owns_store:
            self.store.close()
        shutil.rmtree(self.display_dir, ignore_errors=True)
