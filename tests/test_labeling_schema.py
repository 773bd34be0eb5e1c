"""Schema v4 and the store's public API for the UI: comparison kinds (and their migration from
older databases), skips and flags as rows (and the import of the old JSONL log), label
progress, the exclusion log, where seeding continues."""

from __future__ import annotations

import json

import duckdb
import pytest

from labeling.queue import AssignmentPolicy
from labeling.schema import EVENTS_FILENAME, MIGRATIONS, SCHEMA_VERSION
from labeling.store import LabelStore
from tests.test_labeling_queue import add_arena_battles
from tests.test_labeling_store import build_store, tiny

NOW = "2026-01-01 00:00:00+00"


def version_3_database(path, events: list | None = None):
    """A database as schema v3 wrote it: an ordinary item, a gold item and an arena battle,
    one judgment on each; ``events`` go to the app's old JSONL log beside it."""
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    for migration in MIGRATIONS[:3]:
        for statement in migration:
            con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    con.execute(f"INSERT INTO annotators VALUES (1, 'ann', false, '{NOW}'), "
                f"(2, 'arena:anon-1', false, '{NOW}')")
    metas = ['{"origin": "world-test", "index": 4}', '{"origin": "world-test", "index": 4}',
             '{"k": 1}', '{"k": 1}', '{"origin": "arena", "blind": true}',
             '{"origin": "arena", "blind": true}']
    for sid, meta in enumerate(metas, start=1):
        con.execute("INSERT INTO sessions VALUES (?, 'mini', ?, ?, 0, 's', 1, ?, ?)",
                    [sid, None, f"m{sid % 2}", meta, NOW])
    for cid, (a, b, gold, voter) in enumerate([(1, 2, False, 1), (3, 4, True, 1),
                                                (5, 6, False, 2)], start=1):
        con.execute(f"INSERT INTO comparisons VALUES (?, ?, ?, 's', 1, ?, '{NOW}')",
                    [cid, a, b, gold])
        con.execute(f"INSERT INTO judgments VALUES (?, ?, ?, 0, 'overall', 'A', 'A', 1.0, "
                    f"'{NOW}', false, true)", [cid, cid, voter])
    con.execute("INSERT INTO gold_items VALUES (2, '*', 'A')")
    con.close()
    if events is not None:
        lines = [json.dumps(e) if isinstance(e, dict) else e for e in events]
        (path.parent / EVENTS_FILENAME).write_text("\n".join(lines) + "\n")


def test_a_version_3_database_gets_kinds_from_the_old_signals(tmp_path):
    path = tmp_path / "labels.duckdb"
    version_3_database(path)
    with LabelStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        kinds = store.table("comparisons").set_index("comparison_id")["kind"]
        assert kinds.to_dict() == {1: "item", 2: "gold", 3: "arena"}
        assert "is_gold" not in store.table("comparisons").columns
        frame = store.judgments_frame().set_index("comparison_id")
        assert list(frame["kind"]) == ["item", "gold", "arena"]
        assert list(frame["gold"]) == [False, True, False]
        assert store.skips().empty                   # no old log: nothing imported
        assert store.next_session_index("world-test") == 5
        assert store.next_session_index("nowhere") == 0


def test_the_old_skip_and_flag_log_is_imported_once(tmp_path):
    path = tmp_path / "labels.duckdb"
    version_3_database(path, events=[
        {"time": 1767225600.0, "kind": "skip", "annotator": "ann", "comparison_id": 1},
        "not json",
        {"time": 1767225660.5, "kind": "flag", "annotator": "ann", "comparison_id": 2,
         "reason": "broken image"},
        {"time": 1767225700.0, "kind": "flag", "annotator": "ghost", "comparison_id": 2},
    ])
    with LabelStore.open(path) as store:
        skips = store.skips()
        assert list(skips["annotator"]) == ["ann", "ann"]
        assert list(skips["comparison_id"]) == [1, 2]
        assert list(skips["flagged"]) == [False, True]
        assert skips["reason"].iloc[1] == "broken image" and skips["reason"].isna().iloc[0]
        assert skips["created_at"].iloc[1].timestamp() == 1767225660.5
        store.add_annotator("bob")
        store.add_session("mini", None, 0, store.put_image(tiny(1)),
                          [{"instruction": "x", "output_sha": store.put_image(tiny(2))}])
        job = store.next_assignment("bob")
        store.release_assignment("bob", job.comparison_id)   # new ids continue after the imported
    with LabelStore.open(path) as store:              # reopened: not imported again
        assert list(store.skips()["skip_id"]) == [1, 2, 3]
    assert (tmp_path / EVENTS_FILENAME).exists()       # left as it was


def test_comparison_kinds_are_explicit_and_checked(tmp_path):
    store, comparisons, golds = build_store(tmp_path / "l.duckdb", n_sources=1, gold=1)
    with store:
        arena = add_arena_battles(store, 1)
        kinds = store.table("comparisons").set_index("comparison_id")["kind"]
        assert kinds[comparisons[0]] == "item" and kinds[golds[0]] == "gold"
        assert kinds[arena[0]] == "arena" and store.get_comparison(arena[0])["kind"] == "arena"
        info = store.get_comparison(comparisons[0])
        a, b = info["A"]["session_id"], info["B"]["session_id"]
        assert store.add_comparison(a, b) == comparisons[0]          # same pair, same kind
        with pytest.raises(ValueError, match="kind"):
            store.add_comparison(a, b, kind="arena")
        with pytest.raises(ValueError, match="kind"):
            store.add_comparison(a, b, kind="battle")
        with pytest.raises(ValueError, match="kind"):
            store.add_comparison(a, b, gold="A", kind="arena")
        with pytest.raises(ValueError, match="kind"):
            store.add_comparison(a, b, kind="gold")                  # gold needs its answer


def test_skips_flags_and_label_progress(tmp_path):
    policy = AssignmentPolicy(overlap=1, gold_rate=0.0)
    store, comparisons, _ = build_store(tmp_path / "l.duckdb", n_sources=3, gold=1,
                                        policy=policy)
    with store:
        add_arena_battles(store, 2)                   # never counted as open work
        for name in ("x", "y"):
            store.add_annotator(name)
        assert store.label_progress("x") == (0, 3)
        assert store.label_progress("nobody") == (0, 0)
        first = store.next_assignment("x")
        assert store.label_progress("x") == (0, 2)    # held by x now
        assert store.label_progress("y") == (0, 2)    # overlap 1: held for y too
        store.record_judgment(first.comparison_id, "x", None, "overall", "A", first.left,
                              blind=True)
        assert store.label_progress("x") == (1, 2)
        second = store.next_assignment("x")
        skip_id = store.release_assignment("x", second.comparison_id)
        third = store.next_assignment("x")
        flag_id = store.release_assignment("x", third.comparison_id, flag="wrong source")
        assert store.label_progress("x") == (1, 0)    # the released items never return to x
        assert store.label_progress("y") == (0, 2)    # ... but free their slots for y
        skips = store.skips()
        assert list(skips["skip_id"]) == [skip_id, flag_id]
        assert list(skips["comparison_id"]) == [second.comparison_id, third.comparison_id]
        assert list(skips["flagged"]) == [False, True]
        assert skips["reason"].iloc[1] == "wrong source"
        assert set(store.table("skips")["annotator_id"]) == {
            int(store.table("annotators").set_index("name").loc["x", "annotator_id"])}


def test_exclusion_log_is_newest_first(tmp_path):
    store, _, _ = build_store(tmp_path / "l.duckdb", n_sources=1)
    with store:
        store.add_annotator("spammer")
        store.set_voter_excluded("spammer", True, admin="root", reason="always left")
        store.set_voter_excluded("spammer", False, admin="root2")
        log = store.exclusion_log()
        assert list(log.columns) == ["voter", "excluded", "admin", "reason", "time"]
        assert list(log["admin"]) == ["root2", "root"] and list(log["excluded"]) == [False, True]
