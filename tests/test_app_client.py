"""The app as an API user sees it: ``gradio_client`` against a launched app (oracle vs identity,
a temporary data directory), then the DuckDB store checked for exactly what was acknowledged."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from ui.screen import choice_from_screen
from ui.testing import make_engine, running_app, app_config
from mteditlab.editors.reference import IdentityEditor, OracleEditor
from mteditlab.world import generate_session, render

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

# outputs of every arena endpoint (the state and the vote buttons are not API outputs)
SOURCE, TITLE_L, TITLE_R, IMG_L, IMG_R, GAL_L, GAL_R, STATUS, TURN = range(9)


class FlakyOracle(OracleEditor):
    """The oracle, except that it fails on any instruction containing 'explode'."""

    def edit_batch(self, images, instructions, **kwargs):
        if any("explode" in text for text in instructions):
            raise RuntimeError("the backend exploded")
        return super().edit_batch(images, instructions, **kwargs)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    engine = make_engine(FlakyOracle(), IdentityEditor())
    with running_app(app_config(data, min_battles=1), engine=engine) as (url, demo, ctx):
        yield url, ctx


def client(url: str, download_files: bool = False) -> Client:
    return Client(url, verbose=False, download_files=download_files)


def voter(ctx, c: Client) -> str:
    return ctx.voter(c.session_hash)


def judgments(ctx, annotator: str):
    frame = ctx.store.judgments_frame(include_simulated=True)
    return frame[frame["annotator"] == annotator].reset_index(drop=True)


def status(out) -> str:
    return out[STATUS]


def left_model(text: str) -> str:
    return re.search(r"Model A was \*\*(\w+)\*\*", text).group(1)


def test_choice_from_screen():
    assert choice_from_screen("left", "B") == "B"
    assert choice_from_screen("right", "B") == "A"
    assert choice_from_screen("tie", "A") == "tie"
    with pytest.raises(ValueError):
        choice_from_screen("up", "A")


def test_three_turn_arena_session_with_votes_lands_in_duckdb(app):
    url, ctx = app
    c = client(url)
    out = c.predict("Example 2", api_name="/start_example")
    assert "example 2" in status(out) and out[TURN] == 0
    session = generate_session("test", 3, turns=5)  # example 2 is test session 3
    picks = ["left", "tie", "right"]
    left = None
    for k in range(3):
        out = c.predict(session.turns[k].instruction, 7, 10, api_name="/edit")
        assert out[TURN] == k + 1, status(out)
        assert f"Turn {k + 1} done" in status(out) and "Reconstructed intent" in status(out)
        assert len(out[GAL_L]) == len(out[GAL_R]) == k + 2     # source + every turn
        out = c.predict(k + 1, "overall", api_name=f"/vote_{picks[k]}")
        assert f"Vote stored for turn {k + 1}" in status(out), status(out)
        # a vote answers with the pictures as they are (plain values, never gr.update())
        assert len(out[GAL_L]) == len(out[GAL_R]) == k + 2
        shown = " ".join(str(o) for o in out)
        assert "oracle" not in shown and "identity" not in shown   # hidden until the end
    out = c.predict(api_name="/end_session")
    left = left_model(status(out))
    assert "`" in out[TITLE_L] and left in out[TITLE_L]
    frame = judgments(ctx, voter(ctx, c))
    assert frame["blind"].all() and (frame["kind"] == "arena").all()
    assert list(frame["turn"]) == [0, 1, 2]
    side_of_left = "A" if left == "oracle" else "B"
    expected = {"left": side_of_left, "right": "B" if side_of_left == "A" else "A", "tie": "tie"}
    assert list(frame["choice"]) == [expected[p] for p in picks]
    assert set(frame["left"]) == {side_of_left}
    assert set(frame["model_a"]) == {"oracle"} and set(frame["model_b"]) == {"identity"}
    assert (frame["latency_ms"] >= 0).all() and not frame["simulated"].any()
    # each vote's comparison holds both sessions up to the voted turn, own outputs chained
    turns = ctx.store.table("turns")
    for _, row in frame.iterrows():
        for sid in (row["session_a"], row["session_b"]):
            mine = turns[turns["session_id"] == sid].sort_values("turn_index")
            assert len(mine) == row["turn"] + 1
            assert list(mine["input_sha"])[1:] == list(mine["output_sha"])[:-1]
            assert list(mine["instruction"]) == [t.instruction for t in session.turns[: len(mine)]]
    # the oracle side really edited: its last output is the true scene after three turns
    last = frame.iloc[-1]
    oracle_sid = last["session_a"]
    sha = turns[(turns["session_id"] == oracle_sid) & (turns["turn_index"] == 2)]["output_sha"].iloc[0]
    assert np.array_equal(np.asarray(ctx.store.get_image(sha)), np.asarray(render(session.turns[2].after)))


def test_forged_repeated_and_out_of_order_votes_are_rejected_and_not_stored(app):
    url, ctx = app
    c = client(url)
    assert "Nothing to vote on" in status(c.predict(1, "overall", api_name="/vote_left"))
    c.predict(api_name="/start_random")
    assert "Nothing to vote on" in status(c.predict(1, "overall", api_name="/vote_left"))
    c.predict("change the background to black", 0, 10, api_name="/edit")
    for turn, criterion, fragment in [(2, "overall", "is for turn 2"), (0, "overall", "between 1"),
                                      (1.6, "overall", "is for turn 2")]:  # rounded to 2
        out = c.predict(turn, criterion, api_name="/vote_tie")
        assert fragment in status(out), status(out)
    # values the components themselves refuse never reach the handler
    for turn, criterion in [(1, "bribery"), ("1; DROP TABLE judgments", "overall")]:
        with pytest.raises(Exception):
            c.predict(turn, criterion, api_name="/vote_tie")
    assert judgments(ctx, voter(ctx, c)).empty
    assert "Vote stored" in status(c.predict(1, "quality", api_name="/vote_both_bad"))
    for pick in ("left", "both_bad"):
        assert "already has a vote" in status(c.predict(1, "overall", api_name=f"/vote_{pick}"))
    c.predict("change the background to white", 0, 10, api_name="/edit")
    assert "is for turn 1" in status(c.predict(1, "overall", api_name="/vote_right"))
    frame = judgments(ctx, voter(ctx, c))
    assert len(frame) == 1 and frame["choice"].iloc[0] == "both_bad"
    assert frame["criterion"].iloc[0] == "quality"


def test_bad_instructions_and_a_failing_backend_keep_the_session(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 1", api_name="/start_example")
    out = c.predict("add a large blue square in the center", 1, 10, api_name="/edit")
    assert out[TURN] == 1
    for text, fragment in [("", "empty"), ("   \n\t ", "empty"),
                           ("x" * 10_000, "10,000 characters")]:
        out = c.predict(text, 1, 10, api_name="/edit")
        assert fragment in status(out) and out[TURN] == 1, status(out)
    out = c.predict("explode the red circle", 1, 10, api_name="/edit")
    assert "did not go through" in status(out) and "exploded" not in status(out)  # still blind
    assert out[TURN] == 1
    for seed, steps in [(-1, 10), (0, 0), (0, 1000)]:  # the components refuse these
        with pytest.raises(Exception, match="(less|greater) than"):
            c.predict("remove it", seed, steps, api_name="/edit")
    out = c.predict("make the background black", 1, 10, api_name="/edit")
    assert out[TURN] == 2, status(out)
    out = c.predict("please paint something nice", 1, 10, api_name="/edit")
    assert out[TURN] == 3 and "could not resolve" in status(out)


def test_uploads_good_and_bad(app, tmp_path):
    url, ctx = app
    c = client(url)
    c.predict(api_name="/start_random")
    c.predict("change the background to gray", 0, 10, api_name="/edit")

    def upload(name: str, data: bytes):
        path = tmp_path / name
        path.write_bytes(data)
        return c.predict(handle_file(str(path)), api_name="/start_upload")

    def png(image, **kw):
        buf = io.BytesIO()
        image.save(buf, format="PNG", **kw)
        return buf.getvalue()

    scene = render(generate_session("test", 5).source)
    noisy = png(Image.effect_noise((64, 64), 60).convert("RGB"))
    bad = {"notes.png": (b"just some text, not an image\n" * 20, "not an image"),
           "half.png": (noisy[: len(noisy) // 2], "truncated or corrupt"),
           "bomb.png": (png(Image.new("1", (20_000, 20_000))), "decompression bomb"),
           "empty.png": (b"", "empty")}
    for name, (data, fragment) in bad.items():
        out = upload(name, data)
        text = status(out)
        assert "Upload refused" in text and fragment in text, (name, text)
        assert out[TURN] == 1, name                      # the running session is untouched
    odd = {"gray.png": png(scene.convert("L")),
           "rgba.png": png(scene.convert("RGBA")),
           "sixteen.png": png(Image.fromarray((np.asarray(scene.convert("L"), dtype=np.uint16) * 257))),
           "big-world.png": png(scene.resize((256, 256), Image.Resampling.NEAREST))}
    for name, data in odd.items():
        out = upload(name, data)
        assert "New session on your upload" in status(out) and out[TURN] == 0, (name, status(out))
    assert "reads as a scene of the built-in world" in status(out)   # the upscaled render
    out = c.predict("make the background white", 0, 10, api_name="/edit")
    assert out[TURN] == 1


def test_undo_fork_reset_and_the_unvoted_tail_is_stored(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 3", api_name="/start_example")
    session = generate_session("test", 7, turns=5)
    for k in range(3):
        c.predict(session.turns[k].instruction, 3, 10, api_name="/edit")
    assert "Vote stored" in status(c.predict(3, "overall", api_name="/vote_left"))
    out = c.predict(api_name="/undo")
    assert out[TURN] == 2 and "Undid turn 3" in status(out)
    with pytest.raises(Exception, match="greater than maximum"):  # the session's own bound
        c.predict(5, api_name="/fork")
    out = c.predict(2, api_name="/fork")
    assert out[TURN] == 2 and "already the latest" in status(out)
    out = c.predict(1, api_name="/fork")
    assert out[TURN] == 1 and "Forked from turn 1" in status(out)
    c.predict(session.turns[1].instruction, 3, 10, api_name="/edit")
    out = c.predict(api_name="/reset")
    assert out[TURN] == 0 and "Reset" in status(out)
    assert "Nothing to undo" in status(c.predict(api_name="/undo"))
    # one vote; the branch cut by the fork had no unvoted turns beyond the vote (3 turns, voted
    # at 3), the branch ended by the reset had turn 2 unvoted -> stored as a comparison without
    # a judgment
    frame = judgments(ctx, voter(ctx, c))
    assert len(frame) == 1
    sessions = ctx.store.query("SELECT session_id, n_turns, json_extract_string(meta, '$.arena_id') "
                               "AS arena, json_extract(meta, '$.unvoted_tail')::VARCHAR AS tail "
                               "FROM sessions")
    voted_arena = sessions[sessions["session_id"] == frame["session_a"].iloc[0]]["arena"].iloc[0]
    mine = sessions[sessions["arena"] == voted_arena]
    assert sorted(mine["n_turns"]) == [2, 2, 3, 3] and (mine["tail"] == "true").sum() == 2


def test_labeling_an_item_stores_exactly_its_judgments(app):
    from ui.label import populate_queue

    url, ctx = app
    made = populate_queue(ctx, n_sessions=3, n_turns=2, gold_every=0, start=100)
    assert made == {"comparisons": 3, "gold": 0}
    c = client(url)
    out = c.predict("alice", "not-the-password", api_name="/label_sign_in")
    assert "wrong password" in out[-1]
    out = c.predict(None, *(["left"] * 8), "left", api_name="/label_submit")
    assert "Sign in first" in out[-1]
    out = c.predict("alice", "wonderland", api_name="/label_sign_in")
    assert "Signed in as **alice**" in out[0] and "item **1 of 3**" in out[0], out[0]
    assert "Item loaded: 2 turns" in out[-1]
    item = out[1]                                  # the id of the item on screen
    out = c.predict(item, "right", None, *([None] * 6), "left", api_name="/label_submit")
    assert "missing: turn 2" in out[-1]
    assert judgments(ctx, "alice").empty
    out = c.predict(item, "right", "tie", *([None] * 6), "left", api_name="/label_submit")
    assert "Saved 3 judgments" in out[-1] and "item **2 of 3**" in out[0], out
    second = out[1]                                # the next item
    frame = judgments(ctx, "alice")
    assert len(frame) == 3 and list(frame["turn"].astype("Float64").fillna(-1)) == [0, 1, -1]
    left = frame["left"].iloc[0]
    right = "B" if left == "A" else "A"
    assert list(frame["choice"]) == [right, "tie", left]
    assert set(frame["criterion"]) == {"overall"} and (frame["latency_ms"] > 0).all()
    assert set(frame["comparison_id"]) == {item}
    # the arena battles are not labeling items; the skip / flag path frees the item
    out = c.predict(second, "image looks broken", api_name="/label_flag")
    assert "Flagged" in out[-1]
    skips = ctx.store.skips()
    assert list(skips["flagged"]) == [True] and list(skips["reason"]) == ["image looks broken"]
    assert list(skips["comparison_id"]) == [second]
    assert len(judgments(ctx, "alice")) == 3
    # another annotator skips: the skipped item is released and never comes back to them
    b = client(url)
    out = b.predict("bob", "builder", api_name="/label_sign_in")
    assert "item **1 of 3**" in out[0], out[0]
    first = ctx.store.query("SELECT comparison_id FROM assignments a JOIN annotators n "
                            "USING (annotator_id) WHERE n.name = 'bob'")["comparison_id"].tolist()
    assert first == [out[1]]
    out = b.predict(out[1], api_name="/label_skip")
    assert "Skipped" in out[-1] and "Item loaded" in out[-1] and "item **1 of 2**" in out[0]
    shown = ctx.store.query("SELECT comparison_id, assigned_at FROM assignments a JOIN annotators n "
                            "USING (annotator_id) WHERE n.name = 'bob' ORDER BY assignment_id")
    assert shown["comparison_id"].iloc[-1] not in first and len(shown) == 2
    skips = ctx.store.skips()
    assert list(skips["annotator"]) == ["alice", "bob"] and list(skips["flagged"]) == [True, False]
    assert skips["comparison_id"].iloc[-1] in first
    assert judgments(ctx, "bob").empty


def test_leaderboard_and_admin_views(app):
    url, ctx = app
    c = client(url, download_files=True)
    c.predict(True, False, False, api_name="/settings")          # names shown from the start
    c.predict("Example 4", api_name="/start_example")           # two non-blind votes:
    for k, text in enumerate(["change the background to black", "change the background to white"]):
        c.predict(text, 0, 10, api_name="/edit")
        assert "Vote stored" in status(c.predict(k + 1, "overall", api_name="/vote_left"))
    out = c.predict("all human votes", False, "all criteria", api_name="/leaderboard")
    assert "human votes" in out[0] and out[1] is not None          # summary and ratings plot
    everyone = int(re.search(r"\*\*(\d+)\*\* human votes", out[0]).group(1))
    blind = c.predict("arena votes", True, "all criteria", api_name="/leaderboard")
    blind_n = int(re.search(r"\*\*(\d+)\*\* human votes", blind[0]).group(1))
    assert 0 < blind_n < everyone      # votes cast with the names shown are left out
    assert not judgments(ctx, voter(ctx, c))["blind"].any()
    assert {"oracle", "identity"} <= set(out[3]["data"][i][0] for i in range(len(out[3]["data"])))
    assert c.predict(api_name="/admin_export") is None               # not signed in
    out = c.predict("root", "wrong", api_name="/admin_sign_in")
    assert "wrong password" in out[0]
    out = c.predict("root", "secret", api_name="/admin_sign_in")
    assert "Signed in as admin" in out[0]
    path = c.predict(api_name="/admin_export")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert "parquet/labels.parquet" in names and any(n.startswith("images/") for n in names)


def test_concurrent_clients_are_batched_and_every_vote_is_stored(app):
    import threading

    url, ctx = app
    clients = [client(url) for _ in range(4)]
    errors = []
    before = {k: w.items for k, w in ctx.engine.workers.items()}

    def play(c):
        try:
            c.predict(api_name="/start_random")
            for k, text in enumerate(["change the background to black",
                                      "change the background to white"]):
                assert c.predict(text, k, 10, api_name="/edit")[TURN] == k + 1
                assert "Vote stored" in status(c.predict(k + 1, "overall", api_name="/vote_tie"))
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=play, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for c in clients:
        frame = judgments(ctx, voter(ctx, c))
        assert list(frame["turn"]) == [0, 1] and set(frame["choice"]) == {"tie"}
    assert all(w.items - before[k] == 8 for k, w in ctx.engine.workers.items())
