"""Each arena side's intent reconstructor (``ui/intents.py``): every turn each side's editor gets
the intent its own reconstructor reads from that side's own history, a failure falls back to the
instruction as typed (counted, said on screen), the verifier keeps its target, and the labeling
queue's sides are told what their reconstructors say.  Real parts throughout: the registered
reconstructors, a real chat-completions server on 127.0.0.1 (:mod:`tests.chat_server`), the
reference editors (wrapped only to note what they were told), the label store."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image

from mteditlab.editors.reference import IdentityEditor, OracleEditor
from mteditlab.world import generate_session
from tests.chat_server import ChatServer, completion, decode_data_url, text_choice
from ui.arena import Arena
from ui.arena_state import ArenaState
from ui.config import SideSpec
from ui.context import AppContext
from ui.testing import NotingEditor, app_config, make_engine

EXAMPLE_2 = generate_session("test", 3, turns=5)      # the session behind "Example 2"
GOLD = {t.instruction: t.intent for t in EXAMPLE_2.turns}


def photo(seed: int = 0) -> Image.Image:
    """A picture that is no scene of the world."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))


def new_instruction(chat: dict) -> str:
    return chat["messages"][1]["content"][-1]["text"].split('"')[1]


def scripted(tag: str | None):
    """A chat server's responder: the intent ``TAG: NEW INSTRUCTION`` behind a label (no ``tag``:
    the new instruction's gold intent in Example 2)."""
    def respond(route, body, headers):
        if route == "models":
            return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
        text = new_instruction(body)
        return completion([text_choice(f"Intent: {GOLD[text] if tag is None else f'{tag}: {text}'}")],
                          "scripted")
    return respond


@pytest.fixture
def arena_for(tmp_path):
    """``arena_for(intent_a, intent_b)`` → (arena, state, editors A and B, ctx): the arena around
    an oracle (A) and an identity (B) that note what they were told, names shown (left = A)."""
    opened = []

    def make(intent_a="rule", intent_b="rule"):
        editors = NotingEditor(OracleEditor()), NotingEditor(IdentityEditor())
        config = app_config(tmp_path / f"data{len(opened)}", side_a=SideSpec("oracle", intent=intent_a),
                            side_b=SideSpec("identity", intent=intent_b))
        ctx = AppContext.create(config, engine=make_engine(*editors))
        opened.append(ctx)
        arena = Arena(ctx)
        state = ArenaState(arena_key=arena.key, anonymous_next=False, show_verdict=True)
        return arena, state, editors, ctx

    yield make
    for ctx in opened:
        ctx.close()


def test_by_default_both_sides_read_the_world_with_the_rule_and_the_verifier_keeps_working(arena_for):
    arena, state, (a, b), ctx = arena_for()
    arena.start_example(state, 2)
    for k in range(3):
        arena.edit(state, EXAMPLE_2.turns[k].instruction, 7, None)
    gold = [t.intent for t in EXAMPLE_2.turns[:3]]
    assert a.calls == b.calls == [(t.instruction, t.intent) for t in EXAMPLE_2.turns[:3]]
    assert [t.target for t in state.turns] == gold        # the verifier's target: the world's reading
    assert all(t.verdicts["A"]["success"] and not t.verdicts["B"]["success"] for t in state.turns)
    status = arena.status(state)
    assert f"Reconstructed intent** of turn 3 · Models A and B: “{gold[2]}”" in status.replace("\\", "")
    assert "Model A ✅" in status and "Model B ❌" in status
    assert arena.told(state, "left").replace("\\", "") == f"**Intent used** in turn 3: “{gold[2]}”"
    assert "make it smaller" in EXAMPLE_2.turns[1].instruction     # a referential turn, resolved
    assert sum(ctx.intents.failures.values()) == 0


def test_each_side_is_told_what_its_own_reconstructor_reads_from_its_own_history(arena_for):
    """Two served reconstructors behind two servers: each side's second chat carries that side's
    own first intent and that side's own first output (the oracle's edit, the identity's copy)."""
    with ChatServer(scripted(None)) as one, ChatServer(scripted("right")) as two:
        arena, state, (a, b), ctx = arena_for(f"served:{one.url}?retries=0", f"served:{two.url}?retries=0")
        arena.start_example(state, 2)
        first, second = (t.instruction for t in EXAMPLE_2.turns[:2])
        arena.edit(state, first, 7, None)
        arena.edit(state, second, 7, None)
        chats = {"A": one.chats(), "B": two.chats()}
    told = {"A": [GOLD[first], GOLD[second]], "B": [f"right: {first}", f"right: {second}"]}
    assert a.calls == [(first, told["A"][0]), (second, told["A"][1])]
    assert b.calls == [(first, told["B"][0]), (second, told["B"][1])]
    for side in "AB":
        assert len(chats[side]) == 2
        parts = chats[side][1]["messages"][1]["content"]
        text = "\n".join(p["text"] for p in parts if p["type"] == "text")
        assert f'1. "{first}" (meant: "{told[side][0]}")' in text
        source, current = (decode_data_url(p["image_url"]["url"]) for p in parts if p["type"] == "image_url")
        assert np.array_equal(np.asarray(source), np.asarray(arena.bank.get(state.source)))
        own = arena.bank.get(state.turns[0].outputs[side])
        assert np.array_equal(np.asarray(current), np.asarray(own))
    assert state.turns[0].outputs["A"] != state.turns[0].outputs["B"]    # the two histories differ
    status = arena.status(state).replace("\\", "")
    assert f"Model A: “{told['A'][1]}” · Model B: “right: {second}”" in status
    history = arena.history(state).replace("\\", "")
    assert f"→ A: *“{told['A'][0]}”* · B: *“right: {first}”*" in history
    # the verifier still judges both against the world's reading, not what each side was told
    assert state.turns[1].target == EXAMPLE_2.turns[1].intent and state.turns[1].verdicts["B"] is not None
    assert sum(ctx.intents.failures.values()) == 0


def test_a_photo_gets_no_world_reading_but_a_served_reconstructor_reads_it(arena_for, tmp_path):
    path = tmp_path / "photo.png"
    photo().save(path)
    with ChatServer(scripted("seen")) as server:
        arena, state, (a, b), ctx = arena_for("rule", f"served:{server.url}?retries=0")
        note = arena.start_upload(state, str(path))
        assert state.scene is None and "intents come only from reconstructors that read photos" in note
        arena.edit(state, "make it brighter", 1, None)
        assert len(server.chats()) == 1
    assert a.calls == [("make it brighter", None)] and b.calls == [("make it brighter", "seen: make it brighter")]
    assert arena.told(state, "left") == "**Intent used** in turn 1: instruction as typed"
    assert "seen" in arena.told(state, "right")
    assert sum(ctx.intents.failures.values()) == 0          # the rule was not asked: nothing failed
    assert state.turns[0].verdicts == {"A": None, "B": None} and state.turns[0].target is None


@pytest.mark.parametrize("respond, shown", [
    (lambda route, body, headers: b"<html>upstream error</html>", "the intent model gave no usable answer"),
    (lambda route, body, headers: ("sleep", 2.0, completion([text_choice("remove it")])),
     "the intent model timed out"),
])
def test_a_failing_reconstructor_falls_back_to_the_instruction_is_counted_and_said(arena_for, respond, shown):
    with ChatServer(respond) as server:
        arena, state, (a, b), ctx = arena_for(f"served:{server.url}?model=m&timeout=0.3&retries=0", "rule")
        arena.start_example(state, 2)
        text = EXAMPLE_2.turns[0].instruction
        message = arena.edit(state, text, 1, None)
        assert "Turn 1 done" in message
        assert a.calls == [(text, None)] and b.calls == [(text, EXAMPLE_2.turns[0].intent)]
        assert ctx.intents.failures == {"A": 1}
        status = arena.status(state)
        assert "Model A: ⚠️ reconstructor failed" in status and shown in status and "instruction as typed" in status
        assert "server" not in arena.told(state, "left") and "reconstructor failed" in arena.told(state, "left")
        assert "127.0.0.1" not in status                      # the endpoint is never named on screen
        assert state.turns[0].verdicts["A"]["success"]        # turn 1 is explicit: the instruction does it
        arena.edit(state, EXAMPLE_2.turns[1].instruction, 1, None)   # the app keeps serving
        assert state.n == 2 and ctx.intents.failures == {"A": 2}


def test_the_arena_waits_for_a_reconstructor_only_so_long(arena_for):
    slow = lambda route, body, headers: ("sleep", 3.0, completion([text_choice("remove it")]))  # noqa: E731
    with ChatServer(slow) as server:
        arena, state, (a, b), ctx = arena_for(f"served:{server.url}?model=m&timeout=30&retries=0", "none")
        ctx.intents.timeout_s = 0.4
        arena.start_random(state)
        start = time.perf_counter()
        arena.edit(state, "change the background to black", 1, None)
        assert time.perf_counter() - start < 2.5
    assert a.calls == b.calls == [("change the background to black", None)]
    assert ctx.intents.failures == {"A": 1} and "no answer within 0.4 s" in state.turns[0].told["A"].failure
    assert state.turns[0].told["B"].failure is None                        # `none` says nothing, and fails not


def test_turning_reconstruction_off_asks_nobody_and_undo_drops_the_undone_intent(arena_for):
    with ChatServer(scripted("s")) as server:
        arena, state, (a, b), ctx = arena_for(f"served:{server.url}?retries=0", f"served:{server.url}?retries=0")
        arena.start_example(state, 2)
        first, second, third = (t.instruction for t in EXAMPLE_2.turns[:3])
        arena.edit(state, first, 1, None)
        assert len(server.chats()) == 2 and a.calls[-1] == (first, f"s: {first}")
        arena.edit(state, "change the background to black", 1, None)
        arena.undo(state)
        state.use_intent = False
        arena.edit(state, second, 1, None)
        assert len(server.chats()) == 4 and a.calls[-1] == b.calls[-1] == (second, None)
        assert "reconstruction is off" in arena.status(state)
        assert arena.told(state, "right") == "**Intent used** in turn 2: instruction as typed"
        state.use_intent = True
        arena.edit(state, third, 1, None)
        last = server.chats()[-1]["messages"][1]["content"]
    history = "\n".join(p["text"] for p in last if p["type"] == "text")
    assert f'1. "{first}" (meant: "s: {first}")' in history and f'2. "{second}"\n' in history
    assert "background to black" not in history                       # undone: not in the history
    assert sum(ctx.intents.failures.values()) == 0


def test_votes_store_what_each_side_was_told(arena_for):
    arena, state, _, ctx = arena_for("rule", "none")
    arena.start_example(state, 2)
    for k in range(2):
        arena.edit(state, EXAMPLE_2.turns[k].instruction, 1, None)
    arena.vote(state, "left", 2, "overall", "arena:tester")
    sessions = ctx.store.query("SELECT session_id, model, meta FROM sessions ORDER BY session_id")
    turns = ctx.store.table("turns")
    import json

    metas = {json.loads(m)["side"]: (sid, model, json.loads(m)) for sid, model, m in sessions.itertuples(index=False)}
    assert metas["A"][1] == "oracle" and metas["B"][1] == "identity+intent:none"   # the side's whole system
    gold = [t.intent for t in EXAMPLE_2.turns[:2]]
    assert metas["A"][2]["intents"] == gold and metas["B"][2]["intents"] == [None, None]
    assert metas["A"][2]["intent_reconstructor"] == "rule" and metas["B"][2]["intent_reconstructor"] == "none"
    assert metas["A"][2]["targets"] == gold and metas["B"][2]["intent_failures"] == [None, None]
    for side, told in (("A", gold), ("B", [None, None])):
        mine = turns[turns["session_id"] == metas[side][0]].sort_values("turn_index")
        assert [None if v is None or v != v else v for v in mine["intent"]] == told


def test_the_labeling_queue_sides_are_told_what_their_reconstructors_say(arena_for):
    from ui.label import populate_queue

    _, _, _, ctx = arena_for("rule", "none")
    populate_queue(ctx, n_sessions=2, n_turns=2, gold_every=0)
    frame = ctx.store.query("SELECT s.model, t.intent FROM turns t JOIN sessions s USING (session_id)")
    told = {model: list(group["intent"]) for model, group in frame.groupby("model")}
    assert all(isinstance(i, str) and i for i in told["oracle"])
    assert all(i is None or i != i for i in told["identity+intent:none"])


def test_intent_text_from_a_model_is_shown_literally(arena_for):
    answer = "**bold** <img src=x onerror=alert(1)> [link](http://example.com)"

    def respond(route, body, headers):
        if route == "models":
            return {"object": "list", "data": [{"id": "m", "object": "model"}]}
        return completion([text_choice(answer)])
    with ChatServer(respond) as server:
        arena, state, _, _ = arena_for(f"served:{server.url}?model=m&retries=0", "rule")
        arena.start_random(state)
        arena.edit(state, "change the background to black", 1, None)
    shown = arena.told(state, "left")
    assert "<img" not in shown and "&lt;img" in shown and "\\*\\*bold\\*\\*" in shown
    assert re.search(r"\\\[link\\\]", shown)
