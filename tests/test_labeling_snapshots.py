"""Labels survive a restart: Parquet snapshots pushed to a target on a schedule, a fresh store
resumed from the last one.  Offline, against a local folder target (``file:DIR``), the same
protocol the Hugging Face dataset target follows."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from labeling.snapshots import FolderTarget, HubTarget, SnapshotSync, target_from_spec
from labeling.errors import StoreError
from labeling.store import LabelStore
from tests.test_labeling_store import build_store, vote

MODELS = (("mini", None), ("mini", "lora:ck/grpo"))


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _labelled_store(path: Path):
    store, comparisons, golds = build_store(path, models=MODELS, n_sources=5, gold=2)
    vote(store, comparisons, ["ann1", "ann2"], {"mini": 0.0, "mini+lora:ck/grpo": 0.5},
         np.random.default_rng(0), turns=(None, 0, 1))
    store.add_annotator("arena:anon-1")
    store.set_voter_excluded("arena:anon-1", True, admin="root", reason="test")
    store.next_assignment("ann1")
    store.add_annotator("ann9")
    job = store.next_assignment("ann9")
    store.release_assignment("ann9", job.comparison_id, flag="blurry")
    return store, comparisons


def _frames(store):
    return {t: store.table(t).sort_values(list(store.table(t).columns[:1])).reset_index(drop=True)
            for t in ("annotators", "sessions", "turns", "comparisons", "gold_items",
                      "judgments", "assignments", "voter_exclusions", "skips", "images")}


def test_push_then_resume_a_fresh_store_from_a_folder_target(tmp_path):
    target = FolderTarget(tmp_path / "remote")
    store, comparisons = _labelled_store(tmp_path / "a" / "labels.duckdb")
    with store:
        sync = SnapshotSync(store, target, every_min=60).start()
        sync.push_now()
        before = _frames(store)
        n_judgments = len(before["judgments"])
        sync.stop(final_push=False)
    remote = tmp_path / "remote" / "snapshot"
    assert (remote / "manifest.json").exists()
    assert {p.name for p in (remote / "tables").iterdir()} >= {"judgments.parquet",
                                                               "comparisons.parquet"}
    assert pq.read_table(remote / "tables" / "judgments.parquet").num_rows == n_judgments > 0
    assert not [p for p in (tmp_path / "remote").rglob("*") if "duckdb" in p.name]
    assert len(list((remote / "images").rglob("*.png"))) == len(before["images"])

    fresh = LabelStore.open(tmp_path / "b" / "labels.duckdb")
    with fresh:
        sync = SnapshotSync(fresh, target)
        loaded = sync.resume()
        assert loaded["judgments"] == n_judgments
        after = _frames(fresh)
        for table, frame in before.items():
            pd.testing.assert_frame_equal(frame, after[table], check_dtype=False, obj=table)
        assert fresh.excluded_voters() == {"arena:anon-1"}
        assert list(fresh.skips()["reason"]) == ["blurry"]
        info = fresh.get_comparison(comparisons[0])              # images came along
        assert fresh.get_image(info["A"]["outputs"][0]).size == (4, 4)
        # the store goes on from there: new ids, the queue remembers who has what
        fresh.add_annotator("ann3")
        jid = fresh.record_judgment(comparisons[0], "ann3", None, "quality", "A", "A", blind=True)
        assert jid > before["judgments"]["judgment_id"].max()
        job = fresh.next_assignment("ann1")
        assert job.assignment_id > before["assignments"]["assignment_id"].max()
        assert job.comparison_id not in set(before["assignments"]["comparison_id"])
        assert sync.resume() is None                              # never over a store in use
        with pytest.raises(StoreError, match="not empty"):
            fresh.load_tables({"judgments": remote / "tables" / "judgments.parquet"})


def test_nothing_to_resume_starts_empty(tmp_path):
    with LabelStore.open(tmp_path / "labels.duckdb") as store:
        assert SnapshotSync(store, FolderTarget(tmp_path / "nothing")).resume() is None
        assert store.counts()["judgments"] == 0


def test_scheduled_pushes_carry_new_judgments_and_only_changed_files(tmp_path):
    target = FolderTarget(tmp_path / "remote")
    store, comparisons = _labelled_store(tmp_path / "a" / "labels.duckdb")
    remote = tmp_path / "remote" / "snapshot" / "tables"
    with store:
        sync = SnapshotSync(store, target, every_min=0.3 / 60).start()    # every 0.3 s
        try:
            assert wait_for(lambda: (remote / "judgments.parquet").exists())
            n = pq.read_table(remote / "judgments.parquet").num_rows
            sessions_mtime = (remote / "sessions.parquet").stat().st_mtime_ns
            store.add_annotator("late")
            store.record_judgment(comparisons[1], "late", None, "overall", "tie", "B", blind=True)
            assert wait_for(lambda: pq.read_table(remote / "judgments.parquet").num_rows == n + 1)
            assert wait_for(lambda: sync.scheduler.pushes >= 4)
            assert (remote / "sessions.parquet").stat().st_mtime_ns == sessions_mtime
        finally:
            sync.stop()


def test_app_restart_keeps_arena_votes_and_labels(tmp_path):
    from ui.arena import Arena
    from ui.arena_state import ArenaState
    from ui.context import AppContext
    from ui.label import populate_queue
    from ui.testing import app_config, make_engine
    from mteditlab.editors.reference import IdentityEditor, OracleEditor

    remote = tmp_path / "remote"

    def context(data):
        config = app_config(data, hub_dataset=f"file:{remote}", hub_every=60.0)
        return AppContext.create(config, engine=make_engine(OracleEditor(), IdentityEditor()))

    ctx = context(tmp_path / "first")
    try:
        populate_queue(ctx, n_sessions=2, n_turns=1, gold_every=0)
        arena = Arena(ctx)
        state = ArenaState(anonymous_next=True, arena_key=arena.key)
        arena.start_example(state, "2")
        arena.edit(state, "add a small red circle at the top left", 0, None)
        arena.vote(state, "left", 1, "overall", ctx.voter("browser-session"))
        before = ctx.store.judgments_frame(include_simulated=True)
    finally:
        ctx.close()                                       # the final push
    assert len(before) == 1
    assert not list(remote.rglob("*.duckdb*"))

    ctx = context(tmp_path / "second")                    # a restart on an empty disk
    try:
        after = ctx.store.judgments_frame(include_simulated=True)
        pd.testing.assert_frame_equal(before.reset_index(drop=True),
                                      after.reset_index(drop=True), check_dtype=False)
        assert ctx.store.counts()["comparisons"] == 3     # 2 queue items + the arena battle
        assert ctx.snapshots.restored["judgments"] == 1
        ctx.ensure_annotator("alice")
        assert ctx.store.next_assignment("alice") is not None
    finally:
        ctx.close()


def test_voters_restored_under_their_session_hash_get_keyed_ids(tmp_path):
    """A snapshot from before keyed voter ids: the restored voters are renamed (their votes
    follow) and the next push carries the keyed ids only."""
    from ui.context import AppContext
    from ui.testing import app_config, make_engine
    from mteditlab.editors.reference import IdentityEditor, OracleEditor

    remote, raw = tmp_path / "remote", "arena:anon-some-session-hash"
    store, comparisons = _labelled_store(tmp_path / "old" / "labels.duckdb")
    with store:
        store.add_annotator(raw)
        store.record_judgment(comparisons[0], raw, None, "overall", "A", "A", blind=False)
        SnapshotSync(store, FolderTarget(remote), every_min=60).start().stop()
    config = app_config(tmp_path / "new", hub_dataset=f"file:{remote}", hub_every=60.0)
    ctx = AppContext.create(config, engine=make_engine(OracleEditor(), IdentityEditor()))
    try:
        assert ctx.snapshots.restored["judgments"] > 1
        keyed = ctx.voter("some-session-hash")
        names = set(ctx.store.table("annotators")["name"])
        assert keyed in names and not {raw, "arena:anon-1"} & names
        frame = ctx.store.judgments_frame(include_simulated=True)
        assert list(frame.loc[frame["annotator"] == keyed, "comparison_id"]) == [comparisons[0]]
    finally:
        ctx.close()                                       # the final push
    pushed = pq.read_table(remote / "snapshot" / "tables" / "annotators.parquet")
    assert keyed in pushed["name"].to_pylist()
    assert not [n for n in pushed["name"].to_pylist() if n in (raw, "arena:anon-1")]


def test_target_specs():
    assert isinstance(target_from_spec("file:/tmp/x"), FolderTarget)
    assert target_from_spec("file:///tmp/x").root == Path("/tmp/x")
    hub = target_from_spec("someone/labels")
    assert isinstance(hub, HubTarget) and hub.repo_id == "someone/labels" and hub.private
    assert target_from_spec("hf:someone/labels").repo_id == "someone/labels"
    for bad in ("labels", "a/b/c", "/abs"):
        with pytest.raises(ValueError):
            target_from_spec(bad)
