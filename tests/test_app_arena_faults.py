"""The arena when things go wrong or people try to see through it: a failing editor while the
sides are hidden, replaying a revealed edit, half a character, instructions that are only
whitespace or invisible.  ``gradio_client`` (and raw HTTP where it cannot send the text)
against a launched app (oracle vs identity) on a real store."""

from __future__ import annotations

import json

import httpx
import pytest

from mteditlab.editors.reference import IdentityEditor, OracleEditor
from ui.testing import app_config, make_engine, running_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

STATUS, TURN, SEED = 7, 8, 13
FAILURE = "the editor of side A (oracle) exploded"


class FlakyOracle(OracleEditor):
    """The oracle, except that it fails, naming its side and model, on 'explode'."""

    def edit_batch(self, images, instructions, **kwargs):
        if any("explode" in text for text in instructions):
            raise RuntimeError(FAILURE)
        return super().edit_batch(images, instructions, **kwargs)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    engine = make_engine(FlakyOracle(), IdentityEditor())
    with running_app(app_config(data), engine=engine) as (url, demo, ctx):
        yield url, ctx


def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def message(out) -> str:
    """The first paragraph of the status: what the last operation answered."""
    return out[STATUS].split("\n\n")[0]


def votes(ctx, c: Client):
    frame = ctx.store.judgments_frame(include_simulated=True)
    return frame[frame["annotator"] == ctx.voter(c.session_hash)].reset_index(drop=True)


def stored_seeds(ctx, session_id: int) -> list:
    meta = ctx.store.query(f"SELECT meta FROM sessions WHERE session_id = {int(session_id)}")
    return json.loads(meta["meta"].iloc[0])["seeds"]


# ------------------------------------------------------------------------ failing editor
def test_a_failing_editor_is_not_named_while_the_sides_are_hidden(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 1", api_name="/start_example")
    out = c.predict("explode the red circle", 1, 10, api_name="/edit")
    text = message(out)
    assert "did not go through" in text and out[TURN] == 0, text
    for leak in ("Model A", "Model B", "side A", "side B", "oracle", "identity", "exploded"):
        assert leak not in text, (leak, text)
    out = c.predict("change the background to black", 1, 10, api_name="/edit")
    assert out[TURN] == 1
    assert "Vote stored" in message(c.predict(1, "overall", api_name="/vote_left"))
    assert votes(ctx, c)["blind"].all()


def test_a_failing_editor_is_named_when_the_names_are_shown(app):
    url, ctx = app
    c = client(url)
    c.predict(True, False, False, api_name="/settings")          # names shown from the start
    c.predict("Example 1", api_name="/start_example")
    text = message(c.predict("explode the red circle", 1, 10, api_name="/edit"))
    assert "did not go through" in text and "oracle" in text and FAILURE in text, text


# ------------------------------------------------------------------------------- replay
def test_replaying_a_revealed_edit_is_not_blind(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 2", api_name="/start_example")
    c.predict("change the background to black", 7, 10, api_name="/edit")
    c.predict(1, "overall", api_name="/vote_left")
    assert "Session ended" in message(c.predict(api_name="/end_session"))
    c.predict(api_name="/reset")                                  # the sides shuffled again
    c.predict("change the background to black", 7, 10, api_name="/edit")   # the same edit
    text = message(c.predict(1, "overall", api_name="/vote_left"))
    assert "Vote stored" in text and "not blind" in text, text
    c.predict("change the background to white", 7, 10, api_name="/edit")   # later turns too
    c.predict(2, "overall", api_name="/vote_right")
    assert list(votes(ctx, c)["blind"]) == [True, False, False]
    # the outputs alone give the sides away: a new session, another seed, the same images
    c.predict("Example 2", api_name="/start_example")
    c.predict("change the background to black", 8, 10, api_name="/edit")
    c.predict(1, "overall", api_name="/vote_tie")
    assert list(votes(ctx, c)["blind"]) == [True, False, False, False]
    # somebody who has not seen the names votes blind on the very same edit
    other = client(url)
    other.predict("Example 2", api_name="/start_example")
    other.predict("change the background to black", 7, 10, api_name="/edit")
    assert "Vote stored" in message(other.predict(1, "overall", api_name="/vote_left"))
    assert votes(ctx, other)["blind"].all()


def test_each_new_session_gets_a_fresh_default_seed(app):
    url, ctx = app
    c = client(url)
    seeds = [c.predict("Example 3", api_name="/start_example")[SEED]]
    seeds.append(c.predict(api_name="/reset")[SEED])
    seeds.append(c.predict(api_name="/start_random")[SEED])
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 3, seeds
    c.predict("change the background to black", None, 10, api_name="/edit")   # the default
    c.predict("change the background to white", 12345, 10, api_name="/edit")  # a typed seed
    c.predict(2, "overall", api_name="/vote_tie")
    session = votes(ctx, c)["session_a"].iloc[0]
    assert stored_seeds(ctx, session) == [seeds[-1], 12345]


# ------------------------------------------------------------------------ what is typed
def raw_edit(url: str, c: Client, instruction: str) -> dict:
    """``/edit`` as a browser sends it: JSON with ``\\ud83d`` escapes, which ``gradio_client``
    (httpx encodes UTF-8) cannot send; returns gradio's ``process_completed`` message."""
    body = {"data": [None, instruction, 1, 10], "fn_index": c._infer_fn_index("/edit", None),
            "session_hash": c.session_hash, "event_data": None, "trigger_id": None}
    with httpx.Client(base_url=url, timeout=60) as http:
        joined = http.post("gradio_api/queue/join", content=json.dumps(body),
                           headers={"content-type": "application/json"})
        assert joined.status_code == 200, joined.text
        event = joined.json()["event_id"]
        with http.stream("GET", "gradio_api/queue/data",
                         params={"session_hash": c.session_hash}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") == event and msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("no answer to the edit")


def test_half_a_character_is_refused_and_the_session_goes_on(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 1", api_name="/start_example")
    for text in ("change the background to black \ud83d", "\ud83d", "\udfff then"):
        done = raw_edit(url, c, text)
        assert done["success"], done
        shown = json.dumps(done["output"]["data"])
        assert "half of a character" in shown and "turn **0**" in shown, shown
    out = c.predict("change the background to black", 1, 10, api_name="/edit")
    assert out[TURN] == 1 and "Turn 1 done" in message(out)


def test_instructions_are_stored_as_typed(app):
    url, ctx = app
    c = client(url)
    c.predict("Example 4", api_name="/start_example")
    typed = "change the background\n\tto  black  "
    out = c.predict(typed, 1, 10, api_name="/edit")
    assert out[TURN] == 1, message(out)
    assert "Vote stored" in message(c.predict(1, "overall", api_name="/vote_left"))
    session = votes(ctx, c)["session_a"].iloc[0]
    stored = ctx.store.query(f"SELECT instruction FROM turns WHERE session_id = {int(session)}")
    assert list(stored["instruction"]) == [typed]
    history = out[-1]
    assert "<br>" in history and "&nbsp;&nbsp;" in history, history


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200c\u200d\u2060\ufeff", "\u00a0\u3000 \t",
                                  "\u3164\u2800", "\u00ad\u034f", "\n\r\n"])
def test_invisible_instructions_are_refused(app, text):
    url, ctx = app
    c = client(url)
    c.predict("Example 1", api_name="/start_example")
    out = c.predict(text, 1, 10, api_name="/edit")
    assert out[TURN] == 0 and "no visible characters" in message(out), message(out)


def test_one_check_for_every_instruction():
    from ui.arena_state import ArenaError, check_instruction

    for typed in ("add a red circle", "  two\nlines\tand  spaces ", "ändere 🟥 → 🟦"):
        assert check_instruction(typed) == typed
    for bad, fragment in [(None, "Type an instruction"), ("", "empty"),
                          ("\u200b \u2060", "no visible characters"),
                          ("red\ud83d", "half of a character"), ("bell\x07", "control"),
                          ("x" * 501, "501 characters")]:
        with pytest.raises(ArenaError, match=fragment):
            check_instruction(bad)
