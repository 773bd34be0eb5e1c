"""Where training sessions come from besides the world: data files, a ``datasets`` dataset, or the
sessions people typed in the arena (the app's DuckDB label store).

``sessions_from(spec)`` is the one entry point (``--sessions-from SPEC`` of the trainer and the
benchmark): a ``.duckdb`` file (or an open ``LabelStore``) reads the label store
(:func:`read_arena_sessions`), anything else goes to :func:`mteditlab.sessions_data.read_sessions`
(one row per session, or per turn as MagicBrush).

Arena sessions: the store keeps, per vote, both sides' sessions over the same source and
instructions, and an arena session again each time a later turn is voted on. A training session is
one (source image, instruction sequence): sessions that share the source and whose instructions are
a prefix of another's are folded into the longest; what the app recorded as the explicit intent is
kept. The store is opened read-only (a snapshot while the app holds it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from labeling.store import LabelStore
from mteditlab.sessions_data import DataSession, DataTurn, TurnColumns, fit_image, read_sessions

ARENA_ORIGINS = ("arena",)


def sessions_from(spec, *, resolution=None, split: str = "train", limit: int | None = None,
                  origins: Sequence[str] | None = ARENA_ORIGINS, columns: TurnColumns | None = None,
                  skipped: list[dict] | None = None) -> list[DataSession]:
    """Sessions from ``spec`` (module docstring); ``origins`` filters label-store sessions; ``columns``
    and ``skipped`` go to :func:`~mteditlab.sessions_data.read_sessions` (per-turn layouts, records
    that do not form a session)."""
    if isinstance(spec, LabelStore) or isinstance(spec, (str, Path)) and str(spec).endswith(".duckdb"):
        sessions = read_arena_sessions(spec, origins=origins, resolution=resolution)
        return sessions[:limit] if limit is not None else sessions
    return read_sessions(spec, resolution=resolution, split=split, limit=limit, columns=columns, skipped=skipped)


def read_arena_sessions(db, *, origins: Sequence[str] | None = ARENA_ORIGINS,
                        resolution=None) -> list[DataSession]:
    """The distinct (source, instructions) sessions stored in the label database ``db`` (a path,
    opened read-only; or the process's open :class:`LabelStore`) whose ``meta["origin"]`` is in
    ``origins`` (``None``: all), oldest first. ``meta``: ``origin``, ``session_ids`` (the store's
    sessions folded into this one), ``source_sha``."""
    owned = not isinstance(db, LabelStore)
    store = LabelStore.open(db, read_only=True) if owned else db
    try:
        rows = store.query(
            "SELECT s.session_id, s.source_sha, s.meta, t.turn_index, t.instruction, t.intent "
            "FROM sessions s JOIN turns t USING (session_id) ORDER BY s.session_id, t.turn_index")
        stored: dict[int, dict] = {}
        for row in rows.itertuples(index=False):
            session = stored.setdefault(int(row.session_id), {
                "source_sha": row.source_sha, "origin": json.loads(row.meta).get("origin"), "turns": []})
            session["turns"].append((row.instruction, row.intent if isinstance(row.intent, str) else None))
        kept = fold_prefixes([(sid, s) for sid, s in stored.items() if origins is None or s["origin"] in origins])
        sources = {s["source_sha"]: fit_image(store.get_image(s["source_sha"]), resolution) for _, s in kept}
    finally:
        if owned:
            store.close()
    return [DataSession(index, f"arena-{ids[0]}", sources[s["source_sha"]],
                        [DataTurn(text, intent) for text, intent in s["turns"]],
                        {"origin": s["origin"], "session_ids": ids, "source_sha": s["source_sha"]})
            for index, ((ids, s)) in enumerate(kept)]


def fold_prefixes(sessions: Sequence[tuple[int, dict]]) -> list[tuple[list[int], dict]]:
    """Fold every session into the longest one with the same source whose instructions it prefixes
    (equal ones included); returns ``(ids folded in, oldest first; the kept session)`` in order of
    the kept sessions' first id."""
    def key(s):
        return s["source_sha"], tuple(text for text, _ in s["turns"])

    longest = sorted(sessions, key=lambda item: -len(item[1]["turns"]))
    kept: list[tuple[list[int], dict]] = []
    for sid, session in longest:
        source, texts = key(session)
        home = next((group for group in kept if key(group[1])[0] == source
                     and key(group[1])[1][:len(texts)] == texts), None)
        if home is None:
            kept.append(([sid], session))
        else:
            home[0].append(sid)
    for ids, _ in kept:
        ids.sort()
    return sorted(kept, key=lambda group: group[0][0])
