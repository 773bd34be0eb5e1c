"""The app as people meet it: an annotator facing a store full of arena battles, voters whose
ids must not leak their session, blind votes, user text shown as text, what the header tells
a visitor.  ``gradio_client`` against a launched app (oracle vs identity) on a real store."""

from __future__ import annotations

import pytest

from ui.testing import app_config, make_engine, running_app
from mteditlab.editors.reference import IdentityEditor, OracleEditor
from tests.test_labeling_queue import add_arena_battles

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

STATUS, TURN = 7, 8


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(app_config(data), engine=engine) as (url, demo, ctx):
        yield url, ctx


def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def test_an_annotator_gets_a_labeling_item_among_hundreds_of_arena_battles(app):
    from ui.label import populate_queue

    url, ctx = app
    battles = set(add_arena_battles(ctx.store, 300))
    made = populate_queue(ctx, n_sessions=2, n_turns=2, gold_every=0, start=200)
    assert made == {"comparisons": 2, "gold": 0}
    c = client(url)
    out = c.predict("alice", "wonderland", api_name="/label_sign_in")
    assert "Item loaded: 2 turns" in out[-1] and "item **1 of 2**" in out[0], (out[0], out[-1])
    assigned = set(ctx.store.table("assignments")["comparison_id"])
    assert len(assigned) == 1 and not assigned & battles


def everything_stored(ctx) -> str:
    """Every value of every table of the store, as text."""
    from labeling.schema import TABLES

    return "\n".join(ctx.store.table(name).to_csv() for name in TABLES)


def test_no_stored_exported_or_displayed_value_holds_the_session_hash(app, tmp_path):
    import os
    import stat
    import zipfile

    import pyarrow.parquet as pq

    url, ctx = app
    c = Client(url, verbose=False, download_files=str(tmp_path))
    token = c.session_hash
    c.predict("Example 2", api_name="/start_example")
    c.predict("change the background to black", 0, 10, api_name="/edit")
    assert "Vote stored" in c.predict(1, "overall", api_name="/vote_left")[STATUS]
    voter = ctx.voter(token)
    assert voter.startswith("arena:anon-") and token not in voter
    frame = ctx.store.judgments_frame(include_simulated=True)
    assert (frame["annotator"] == voter).sum() == 1
    shown = [c.predict("all human votes", False, "all criteria", api_name="/leaderboard"),
             c.predict("root", "secret", api_name="/admin_sign_in"),
             c.predict(api_name="/admin_refresh")]
    export = c.predict(api_name="/admin_export")
    with zipfile.ZipFile(export) as zf:
        zf.extractall(tmp_path / "export")
    exported = [pq.read_table(p).to_pandas().to_csv()
                for p in (tmp_path / "export").rglob("*.parquet")]
    assert any(voter in text for text in exported)
    texts = [everything_stored(ctx), repr(shown), *exported]
    texts += [p.read_text(errors="replace") for p in ctx.data_dir.glob("*.jsonl")]
    for prefix in (token, token[:11], token[:8]):
        assert not any(prefix in text for text in texts), prefix
    key = ctx.data_dir / "voter_secret.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and len(key.read_bytes()) == 32


def test_the_voter_secret_is_made_once_and_kept(tmp_path):
    from ui.context import server_secret, voter_id

    first = server_secret(tmp_path)
    assert server_secret(tmp_path) == first
    assert voter_id(first, "abc") == voter_id(server_secret(tmp_path), "abc")
    assert voter_id(first, "abc") != voter_id(b"x" * 32, "abc")



def test_voters_stored_under_their_session_hash_by_older_versions_are_renamed_on_start(tmp_path):
    from labeling.store import LabelStore
    from mteditlab.editors.reference import IdentityEditor, OracleEditor
    from ui.context import AppContext, rename_raw_voter_ids, voter_id
    from ui.testing import app_config, make_engine

    config = app_config(tmp_path / "data")
    old = "arena:anon-Qx7_raw-hash"   # what an older version stored: the session hash itself
    with LabelStore.open(config.data_dir / "labels.duckdb") as store:
        store.add_annotator(old)
        store.set_voter_excluded(old, True, admin="root", reason="spam")
    for _ in range(2):   # the second start finds nothing left to rename
        ctx = AppContext.create(config, engine=make_engine(OracleEditor(), IdentityEditor()))
        try:
            assert ctx.store.excluded_voters() == {voter_id(ctx.secret, "Qx7_raw-hash")}
            assert "Qx7_raw-hash" not in everything_stored(ctx)
            assert rename_raw_voter_ids(ctx.store, ctx.secret) == 0   # none left to rename
        finally:
            ctx.close()

def test_names_stay_hidden_until_the_session_ends(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 3", api_name="/start_example")
    for k, text in enumerate(["change the background to black", "change the background to white"]):
        out = c.predict(text, 0, 10, api_name="/edit")
        out = c.predict(k + 1, "overall", api_name="/vote_right")
        shown = " ".join(map(str, out))
        assert "Vote stored" in out[STATUS] and "oracle" not in shown and "identity" not in shown
    out = c.predict("change the background to gray", 0, 10, api_name="/edit")  # left unvoted
    out = c.predict(api_name="/end_session")
    assert "Session ended" in out[STATUS] and "oracle" in out[STATUS] and "identity" in out[STATUS]
    for call in [("make it red", 0, 10, "/edit"), (3, "overall", "/vote_left"), ("/undo",),
                 (1, "/fork")]:
        assert "has ended" in c.predict(*call[:-1], api_name=call[-1])[STATUS]
    assert "already ended" in c.predict(api_name="/end_session")[STATUS]
    frame = ctx.store.judgments_frame(include_simulated=True)
    mine = frame[frame["annotator"] == ctx.voter(c.session_hash)]
    assert len(mine) == 2 and mine["blind"].all()
    tail = ctx.store.query("SELECT count(*) AS n FROM sessions WHERE json_extract_string(meta, "
                           "'$.unvoted_tail') = 'true' AND n_turns = 3")
    assert tail["n"].iloc[0] == 2                     # ending stored the unvoted third turn
    out = c.predict(api_name="/reset")                # a new session on the same source
    assert out[TURN] == 0 and "hidden" in out[2]


def test_the_leaderboard_counts_blind_votes_unless_asked(app):
    import re

    url, ctx = app
    c = client(url)
    c.predict(True, False, False, api_name="/settings")          # anonymity off: not blind
    c.predict("Example 1", api_name="/start_example")
    c.predict("change the background to black", 0, 10, api_name="/edit")
    assert "Vote stored" in c.predict(1, "overall", api_name="/vote_left")[STATUS]
    mine = ctx.store.judgments_frame(include_simulated=True)
    assert not mine[mine["annotator"] == ctx.voter(c.session_hash)]["blind"].any()

    def count(*args):
        out = c.predict(*args, api_name="/leaderboard")
        return int(re.search(r"\*\*(\d+)\*\* human votes", out[0]).group(1))

    human = mine[~mine["annotator"].str.startswith(("judge:", "reward:")) & ~mine["simulated"]]
    assert count("all human votes", True, "all criteria") == human["blind"].sum()
    assert count("all human votes", False, "all criteria") == len(human)


HOSTILE = ["<b>x</b>", "![](http://127.0.0.1:9/pixel.png)", "**bold** _it_ `code`",
           "[click](javascript:alert(1)) <img src=x onerror=alert(1)>", "# head | a | b |",
           "www.example.com http://example.com a@b.co", "$$x^2$$ \\(y\\) 1. not a list &amp;"]


def rendered(markdown: str) -> tuple[str, str]:
    """(HTML, visible text) of ``markdown`` under CommonMark with raw HTML enabled."""
    import html
    import re

    from markdown_it import MarkdownIt

    out = MarkdownIt("commonmark", {"html": True, "linkify": False}).render(markdown)
    return out, html.unescape(re.sub(r"<[^>]+>", "", out)).strip()


@pytest.mark.parametrize("text", HOSTILE)
def test_user_text_renders_literally(text):
    from ui.text import md_literal

    out, visible = rendered(md_literal(text))
    assert visible == text
    assert not any(tag in out for tag in ("<b>", "<img", "<a ", "<em>", "<strong>", "<code>",
                                          "<h1>", "<ol>"))


def test_instructions_show_as_text_in_the_history(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 1", api_name="/start_example")
    for text in HOSTILE[:2]:
        out = c.predict(text, 0, 10, api_name="/edit")
        assert "done" in out[STATUS], out[STATUS]
    history = out[-1]
    assert "<b>" not in history and "![](" not in history
    html_out, visible = rendered(history)
    assert "<img" not in html_out and "<b>" not in html_out
    assert HOSTILE[0] in visible and HOSTILE[1] in visible


def test_only_the_admin_sees_the_database_path(app):
    import urllib.request

    url, ctx = app
    path = str(ctx.store.path)
    for page in ("", "config"):
        with urllib.request.urlopen(url + page, timeout=60) as response:
            body = response.read().decode("utf-8", "replace")
        assert path not in body and str(ctx.data_dir.resolve()) not in body, page
    c = client(url)
    assert path not in repr(c.predict("root", "wrong", api_name="/admin_sign_in"))
    assert path in c.predict("root", "secret", api_name="/admin_sign_in")[0]


def test_the_leaderboard_sets_provisional_models_apart(tmp_path):
    """Two votes for a new model list it apart, unranked; a 25-0 record is flagged open."""
    from tests.test_labeling_store import tiny

    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(app_config(tmp_path / "data", min_battles=20), engine=engine) as (url, _, ctx):
        store = ctx.store
        store.add_annotator("ann")
        plan = ([(None, "lora:a", "A" if k % 3 else "B") for k in range(30)]
                + [("lora:new", None, "A")] * 2 + [("lora:w", "lora:a", "A")] * 25)
        for k, (first, second, choice) in enumerate(plan):
            source = store.put_image(tiny(k))
            sides = [store.add_session("mini", adapter, k, source, [
                {"instruction": "add a red circle", "output_sha": store.put_image(tiny(500 + 2 * k + j))}])
                for j, adapter in enumerate((first, second))]
            cid = store.add_comparison(*sides)
            store.record_judgment(cid, "ann", None, "overall", choice, "A", blind=True)
        out = client(url).predict("all human votes", True, "all criteria", api_name="/leaderboard")
        ranked = {row[0]: row for row in out[3]["data"]}
        assert set(ranked) == {"mini", "mini+lora:a", "mini+lora:w"}
        assert ranked["mini+lora:w"][3] == "+∞" and "never lost" in ranked["mini+lora:w"][-1]
        update = out[-1]                                 # a visibility update with a value
        assert update["visible"] is True
        provisional = [row[0] for row in update["value"]["data"]]
        assert provisional == ["mini+lora:new"]
        assert "provisional" in out[-2] and "never lost" in out[-2] and "∞" in out[-2]


def test_seed_queue_runs_after_the_server_is_up_with_a_progress_bar(tmp_path):
    """``python app.py --seed-queue N``: the port opens first, a tqdm bar counts the sessions,
    and the items end up in the queue."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from labeling.store import LabelStore
    from ui.testing import free_port

    repo = Path(__file__).resolve().parents[1]
    port, log_path = free_port(), tmp_path / "app.log"
    cmd = [sys.executable, str(repo / "app.py"), "--editor-a", "oracle", "--editor-b", "identity",
           "--adapter-b", "none", "--data-dir", str(tmp_path / "data"), "--port", str(port),
           "--host", "127.0.0.1", "--seed-queue", "6"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        text = ""
        while time.time() < deadline and "label queue seeded" not in text:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.5)
            text = log_path.read_text()
        assert "label queue seeded: 6 comparisons, 2 gold items" in text, text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    up = text.index("Running on local URL")
    assert up < text.index("seeding the label queue") < text.index("6/6")
    with LabelStore.open(tmp_path / "data" / "labels.duckdb", read_only=True) as store:
        assert store.counts()["comparisons"] == 8


def test_an_admin_excludes_a_voter_from_the_ratings_and_can_undo_it(app):
    import re

    url, ctx = app
    c = client(url)
    c.predict("Example 4", api_name="/start_example")
    c.predict("change the background to black", 0, 10, api_name="/edit")
    assert "Vote stored" in c.predict(1, "overall", api_name="/vote_left")[STATUS]
    voter = ctx.voter(c.session_hash)

    def count():
        out = c.predict("all human votes", False, "all criteria", api_name="/leaderboard")
        found = re.search(r"\*\*(\d+)\*\* human votes", out[0])
        return int(found.group(1)) if found else 0

    before = count()
    admin = client(url)
    assert "sign-in required" in admin.predict(voter, "spam", api_name="/admin_exclude_voter")[0]
    assert ctx.store.excluded_voters() == set()
    admin.predict("root", "secret", api_name="/admin_sign_in")
    assert "No voter" in admin.predict("arena:nobody", "", api_name="/admin_exclude_voter")[0]
    out = admin.predict(voter, "always left", api_name="/admin_exclude_voter")
    assert "excluded" in out[0] and ctx.store.excluded_voters() == {voter}
    assert out[-1]["data"][0][:4] == [voter, True, "root", "always left"]
    assert count() == before - 1
    out = admin.predict(voter, "reviewed", api_name="/admin_restore_voter")
    assert "again" in out[0] and ctx.store.excluded_voters() == set()
    assert count() == before
    assert len(ctx.store.table("voter_exclusions")) == 2
