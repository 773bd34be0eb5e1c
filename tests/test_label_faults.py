"""The Label tab and the leaderboard when things go wrong: stale or concurrent submissions,
repeated skips and flags, text the database cannot take, images pushed out of memory before they
are stored (and let go of), server errors, and which votes the leaderboard counts by default.
``gradio_client`` against a launched app (oracle vs identity) on a real store."""

from __future__ import annotations

import logging
import os
import re

import pytest

from mteditlab.editors.reference import IdentityEditor, OracleEditor
from tests.test_labeling_queue import add_arena_battles
from ui.testing import app_config, make_engine, running_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

HEADER, ITEM, STATUS = 0, 1, -1          # label endpoints' outputs
ARENA_STATUS = 7


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from ui.label import populate_queue

    data = tmp_path_factory.mktemp("data")
    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(app_config(data), engine=engine) as (url, demo, ctx):
        populate_queue(ctx, n_sessions=6, n_turns=2, gold_every=0)
        yield url, ctx


def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def judged(ctx, annotator: str):
    frame = ctx.store.judgments_frame(include_simulated=True)
    return frame[frame["annotator"] == annotator]


def current_item(ctx, annotator: str) -> int:
    return ctx.store.next_assignment(annotator).comparison_id


def test_two_concurrent_submissions_of_one_item_store_it_once(app):
    url, ctx = app
    c = client(url)
    out = c.predict("bob", "builder", api_name="/label_sign_in")
    item = out[ITEM]
    assert item == current_item(ctx, "bob")
    jobs = [c.submit(item, "left", "tie", *([None] * 6), "right", api_name="/label_submit")
            for _ in range(2)]
    statuses = sorted(job.result()[STATUS] for job in jobs)
    assert sum("Saved 3 judgments" in s for s in statuses) == 1, statuses
    refused = next(s for s in statuses if "Saved" not in s)
    assert f"item {item}" in refused and "not the item on your screen" in refused, refused
    mine = judged(ctx, "bob")
    assert len(mine) == 3 and set(mine["comparison_id"]) == {item}


def test_a_submission_from_a_second_tab_is_refused_once_the_item_is_judged(app):
    url, ctx = app
    first, second = client(url), client(url)
    item = first.predict("alice", "wonderland", api_name="/label_sign_in")[ITEM]
    assert second.predict("alice", "wonderland", api_name="/label_sign_in")[ITEM] == item
    out = first.predict(item, "left", "left", *([None] * 6), "left", api_name="/label_submit")
    assert "Saved 3 judgments" in out[STATUS]
    out = second.predict(item, "right", "tie", *([None] * 6), "right", api_name="/label_submit")
    assert "already judged" in out[STATUS] and "next item" in out[STATUS], out[STATUS]
    mine = judged(ctx, "alice")
    assert len(mine) == 3 and set(mine["comparison_id"]) == {item}


def test_a_repeated_skip_or_flag_is_refused_and_leaves_the_next_item_alone(app):
    url, ctx = app
    c = client(url)

    def given_back():
        skips = ctx.store.skips()
        return skips[skips["annotator"] == "bob"][["comparison_id", "flagged"]].values.tolist()

    first = c.predict("bob", "builder", api_name="/label_sign_in")[ITEM]
    before = given_back()
    jobs = [c.submit(first, api_name="/label_skip") for _ in range(2)]     # a double click
    outs = [job.result() for job in jobs]
    assert sorted("Skipped" in out[STATUS] for out in outs) == [False, True], outs
    refused = next(out[STATUS] for out in outs if "Skipped" not in out[STATUS])
    assert f"item {first}" in refused and "not the item on your screen" in refused, refused
    second = outs[0][ITEM]
    assert outs[1][ITEM] == second
    assert second != first and second == current_item(ctx, "bob")
    out = c.predict(second, "unreadable", api_name="/label_flag")
    assert "Flagged" in out[STATUS]
    third = out[ITEM]
    out = c.predict(second, "unreadable", api_name="/label_flag")          # sent again
    assert "Not flagged" in out[STATUS] and out[ITEM] == third == current_item(ctx, "bob")
    assert given_back() == before + [[first, False], [second, True]]


def test_flag_and_exclusion_reasons_with_lone_surrogates_are_stored(app):
    # httpx cannot send a lone surrogate (a browser's JSON can): the operations are called on
    # the running app's own context
    from ui import leaderboard as lb
    from ui.label import Labeling, LabelState

    url, ctx = app
    labeling, state = Labeling(ctx), LabelState()
    labeling.sign_in(state, "alice", "wonderland")
    item = state.item["comparison_id"]
    assert "Flagged" in labeling.flag(state, item, "image\ud800 looks   broken")
    flags = ctx.store.skips()
    mine = flags[(flags["comparison_id"] == item) & (flags["annotator"] == "alice")]
    assert mine["reason"].tolist() == ["image\ufffd looks broken"]
    assert "excluded" in lb.set_excluded(ctx.store, "alice", True, "root", "always \udfffleft")
    assert ctx.store.exclusion_log()["reason"].iloc[0] == "always \ufffdleft"
    lb.set_excluded(ctx.store, "alice", False, "root", "")
    assert ctx.store.excluded_voters() == set()


def test_images_of_turns_not_yet_stored_survive_a_full_image_cache(app):
    url, ctx = app
    c = client(url)
    before = ctx.bank.max_bytes
    ctx.bank.max_bytes = 1                       # every image but the newest leaves memory
    try:
        c.predict("Example 2", api_name="/start_example")
        for turn, text in enumerate(["change the background to black",
                                     "change the background to white"], start=1):
            out = c.predict(text, 0, 10, api_name="/edit")
            assert f"Turn {turn} done" in out[ARENA_STATUS], out[ARENA_STATUS]
        out = c.predict(2, "overall", api_name="/vote_left")
        assert "Vote stored for turn 2" in out[ARENA_STATUS], out[ARENA_STATUS]
    finally:
        ctx.bank.max_bytes = before
    voter = judged(ctx, ctx.voter(c.session_hash))
    assert len(voter) == 1


def test_a_leaderboard_failure_shows_a_reference_not_the_error(app, monkeypatch, caplog):
    import duckdb

    url, ctx = app
    secret = f'IO Error: could not read "{ctx.store.path}"'

    def broken(*args, **kwargs):
        raise duckdb.IOException(secret)

    monkeypatch.setattr(ctx.store, "judgments_frame", broken)
    with caplog.at_level(logging.ERROR, logger="mteditlab.ui"):
        shown = client(url).predict(api_name="/leaderboard")[0]
    assert str(ctx.store.path) not in shown and "IOException" not in shown
    reference = re.search(r"reference `([0-9a-f]{8})`", shown)
    assert reference and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown), shown
    logged = [r for r in caplog.records if reference.group(1) in r.getMessage()]
    assert logged and secret in "".join(logging.Formatter().formatException(r.exc_info)
                                        for r in logged if r.exc_info)


def test_the_leaderboard_counts_only_blind_votes_unless_the_box_is_unticked(app):
    from ui import leaderboard as lb

    url, ctx = app
    store = ctx.store
    blind_battle, seen_battle = add_arena_battles(store, 2)
    store.add_annotator("voter-lb")
    store.record_judgment(blind_battle, "voter-lb", 0, "overall", "A", "A", blind=True)
    store.record_judgment(seen_battle, "voter-lb", 0, "overall", "B", "A", blind=False)
    everything = lb.human_frame(store, blind_only=False)
    default = lb.human_frame(store)
    assert set(default["judgment_id"]) == set(everything[everything["blind"]]["judgment_id"])
    assert len(default) < len(everything)

    c = client(url)
    blind_box = c.view_api(print_info=False, return_format="dict")[
        "named_endpoints"]["/leaderboard"]["parameters"][1]
    assert blind_box["parameter_default"] is True

    def count(*args):
        shown = c.predict(*args, api_name="/leaderboard")[0]
        return int(re.search(r"\*\*(\d+)\*\* human votes", shown).group(1))

    assert count() == len(default)                                  # the tab as it opens
    assert count("all human votes", False, "all criteria") == len(everything)


def test_the_image_bank_keeps_on_disk_what_the_store_does_not_hold_yet(tmp_path):
    from labeling.store import LabelStore
    from tests.test_labeling_store import tiny
    from ui.images import ImageBank, png_bytes

    with LabelStore.open(tmp_path / "labels.duckdb") as store:
        bank = ImageBank(max_bytes=1, fallback=store.image_bytes)  # memory holds the newest only
        stored = bank.put(tiny(1), holder="session")
        store.put_image(bank.get_bytes(stored))
        pending = bank.put(tiny(2), holder="session")
        for k in range(3, 6):
            bank.put(tiny(k))
        assert pending in bank and stored not in bank        # only the unstored one is kept
        assert bank.get_bytes(pending) == png_bytes(tiny(2))
        assert bank.get_bytes(stored) == png_bytes(tiny(1))  # from the store


def on_disk(bank) -> set[str]:
    """The images the bank keeps in its spill directory, as the directory lists them."""
    return set(os.listdir(bank.spill_dir)) if bank.spill_dir else set()


def test_the_image_bank_deletes_what_it_kept_on_disk_once_no_holder_refers_to_it(tmp_path):
    from labeling.store import LabelStore
    from tests.test_labeling_store import tiny
    from ui.images import ImageBank, png_bytes

    with LabelStore.open(tmp_path / "labels.duckdb") as store:
        bank = ImageBank(max_bytes=1, fallback=store.image_bytes)
        mine, shared = bank.put(tiny(1), holder="s1"), bank.put(tiny(2), holder="s1")
        bank.hold("s2", [shared])
        loose = bank.put(tiny(3))                             # referred to by nobody
        bank.put(tiny(4))
        assert on_disk(bank) == {mine, shared} and loose not in bank
        bank.hold("s1", [shared])                             # s1 lets go of one image
        assert on_disk(bank) == {shared}
        bank.hold("s1", ())                                   # s2 still refers to the other
        assert on_disk(bank) == {shared} and bank.get_bytes(shared) == png_bytes(tiny(2))
        bank.hold("s2", ())
        assert on_disk(bank) == set() and shared not in bank


def test_arena_images_leave_the_disk_with_the_last_session_that_refers_to_them(tmp_path):
    from ui.arena_state import ArenaState

    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(app_config(tmp_path / "data"), engine=engine) as (url, demo, ctx):
        ctx.bank.max_bytes = 1                       # every image but the newest leaves memory
        first, second = client(url), client(url)

        def state_of(c) -> ArenaState:
            return next(v for v in demo.state_holder[c.session_hash].state_data.values()
                        if isinstance(v, ArenaState))

        def images(c) -> set[str]:
            """The images the arena session of client ``c`` refers to."""
            state = state_of(c)
            return {state.source} | {t.outputs[side] for t in state.turns for side in "AB"}

        def edit(c, text, turn):
            out = c.predict(text, 0, 10, api_name="/edit")
            assert f"Turn {turn} done" in out[ARENA_STATUS], out[ARENA_STATUS]

        first.predict("Example 3", api_name="/start_example")
        edit(first, "change the background to black", 1)
        edit(first, "change the background to white", 2)
        before = on_disk(ctx.bank)
        assert len(before) >= 2 and before <= images(first)
        first.predict(api_name="/undo")
        assert before - images(first) and on_disk(ctx.bank) <= images(first)   # turn 2's gone
        first.predict(api_name="/reset")
        source = state_of(first).source
        assert images(first) == {source} and on_disk(ctx.bank) <= {source}
        second.predict("Example 3", api_name="/start_example")    # the same source
        edit(second, "change the background to black", 1)
        assert source in on_disk(ctx.bank)
        demo.state_holder.delete_state(first.session_hash)        # the first tab closes
        assert source in on_disk(ctx.bank)                        # the second refers to it
        edit(second, "change the background to white", 2)
        demo.state_holder.delete_state(second.session_hash)
        assert on_disk(ctx.bank) == set()
