"""Intent reconstructors (Edit-R2's intent step): the registry and its specs, each reconstructor's
contract, the per-rollout bookkeeping every caller shares, and the benchmark's intent metrics — with a
scripted chat server for the served one (valid, slow and broken answers) and a tiny random-weight
Qwen-VL served on 127.0.0.1 driving the mini editor on the world and a tiny FLUX.1 Kontext on data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mteditlab.bench import main
from mteditlab.intent import TurnIntents
from mteditlab.reconstructors import (RECONSTRUCTORS, IntentQuery, Reconstruction, Reconstructor, ReconstructorError,
                                      build_reconstructor)
from mteditlab.reconstructors.metrics import intent_agreement
from mteditlab.reconstructors.served import parse_intent
from mteditlab.world import render, sessions as make_sessions
from tests.chat_server import ChatServer, completion, decode_data_url, text_choice
from tests.tiny_pipelines import tiny_kontext
from tests.tiny_qwen_vl import served_tiny_judge
from training.config import parse_args

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sessions" / "sessions.jsonl"


def noise(seed: int = 0) -> Image.Image:
    """An image that is no scene of the world."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def true_scene_intents(spec: str, sessions) -> TurnIntents:
    """Every turn of ``sessions`` reconstructed by ``spec``, each fed the true scene before it."""
    intents = TurnIntents(spec)
    for k in range(len(sessions[0].turns)):
        intents(k, [render(s.turns[k].before) for s in sessions], sessions)
    return intents


# ---- the registry and its specs -------------------------------------------------------------------
def test_registry_names_and_specs():
    assert {"oracle", "rule", "none", "concat", "served"} <= set(RECONSTRUCTORS)
    oracle, rule = build_reconstructor("oracle"), build_reconstructor("rule")
    assert oracle.privileged and not rule.privileged and (oracle.spec, rule.name) == ("oracle", "rule")
    served = build_reconstructor("served:http://127.0.0.1:9/v1?model=qwen&timeout=2.5&retries=0&concurrency=3")
    assert served.client.base_url == "http://127.0.0.1:9/v1" and served.client.served_model() == "qwen"
    assert (served.client.timeout, served.client.retries, served.concurrency) == (2.5, 0, 3)
    assert served.spec.startswith("served:http://127.0.0.1:9/v1?model=qwen")   # what the result JSON names
    for spec, message in (("nope", "unknown reconstructor 'nope'; choose one of .*rule"),
                          ("oracle:gold.json", "'oracle' takes no argument: write 'oracle'"),
                          ("served", "'served' needs its url: write served:URL"),
                          ("served:ftp://host/v1", "not an http\\(s\\) URL"),
                          ("served:http://host/v1?colour=red", "unknown reconstructor URL option 'colour'")):
        with pytest.raises(ReconstructorError, match=message):
            build_reconstructor(spec)


def test_the_flags_check_the_spec_before_running(capsys):
    with pytest.raises(SystemExit):
        main(["--editor", "oracle", "--sessions", "2", "--intent", "reconstruct"])
    assert "--intent: unknown reconstructor 'reconstruct'; choose one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--intent: reconstructor 'served' needs its url"):
        parse_args(["--lora", "--intent", "served"])
    assert parse_args(["--lora"]).intent == "oracle" and parse_args(["--lora", "--intent", "rule"]).intent == "rule"


# ---- oracle, none, concat -------------------------------------------------------------------------
def test_oracle_is_the_gold_and_none_and_concat_are_the_instructions():
    sessions = make_sessions("val", 6, 4)
    told = {spec: true_scene_intents(spec, sessions) for spec in ("oracle", "none", "concat")}
    for i, s in enumerate(sessions):
        assert told["oracle"].told(i) == [t.intent for t in s.turns]
        assert told["none"].told(i) == [None] * 4
        assert told["concat"].told(i) == ["; ".join(t.instruction for t in s.turns[:k + 1]) for k in range(4)]
    with pytest.raises(ReconstructorError, match="query has no session: use a reconstructor that reads the history"):
        build_reconstructor("oracle").reconstruct([IntentQuery(["make it red"], [], noise(), noise())])


class Counting(Reconstructor):
    """Says ``"turn N"``; ``asked`` counts the queries it got."""

    name, asked = "counting", 0

    def reconstruct(self, queries):
        self.asked += len(queries)
        return [Reconstruction(f"turn {q.turn + 1}") for q in queries]


def test_each_turn_is_reconstructed_once_in_order_and_kept_per_row():
    sessions, counting = make_sessions("val", 3, 3), Counting()
    intents = TurnIntents(counting)
    sources = [render(s.source) for s in sessions]
    assert intents(0, sources, sessions) == [(s.turns[0].instruction, "turn 1") for s in sessions]
    intents(0, sources[1:], sessions[1:], rows=[1, 2])           # a second pass over turn 1 (teacher-forced)
    assert counting.asked == 3 and intents.sources[2] is sources[2]
    assert intents(1, sources[2:], sessions[2:], rows=[2]) == [(sessions[2].turns[1].instruction, "turn 2")]
    with pytest.raises(ValueError, match="turn 3 of item 0 was asked before its turn 2"):
        intents(2, sources[:1], sessions[:1])
    pairs = [(s, g) for s in sessions[:1] for g in range(2)]     # the trainer's (session, generation) items
    assert TurnIntents("oracle")(0, sources[:1] * 2, pairs) == [(sessions[0].turns[0].instruction,
                                                                 sessions[0].turns[0].intent)] * 2


# ---- rule -----------------------------------------------------------------------------------------
def test_rule_reaches_the_gold_on_true_scenes_without_reading_it():
    sessions = make_sessions("val", 120, 8)
    intents = true_scene_intents("rule", sessions)
    agree = {True: [], False: []}   # referential -> parse-equivalent per turn
    for i, s in enumerate(sessions):
        for k, r in enumerate(intents.results[i]):
            agree[s.turns[k].referential].append(intent_agreement(r.intent, s, k)[1])
    assert len(agree[True]) > 150 and len(agree[False]) > 500
    assert np.mean(agree[False]) >= 0.98 and np.mean(agree[True]) >= 0.98   # measured: 1.0 and 1.0
    assert sum(intents.failures(k) for k in range(8)) == 0


def test_rule_resolves_a_referential_follow_up_from_its_own_history():
    session = make_sessions("val", 1, 4)[0]       # move the orange square …, paint it green, make it smaller
    rule, history = build_reconstructor("rule"), []
    for k, turn in enumerate(session.turns):
        query = IntentQuery([t.instruction for t in session.turns[:k + 1]], list(history), render(turn.before),
                            render(session.source))   # no session: the rule never sees the gold
        [result] = rule.reconstruct([query])
        assert result.intent == turn.intent and result.details["scene"] == "intended"
        history.append(result.intent)
    assert session.turns[2].instruction == "make it smaller"
    assert history[2] == "make the green square in the center smaller"


def test_rule_without_the_intended_scene_reads_the_image_and_fails_with_reasons():
    session = make_sessions("val", 1, 4)[0]
    rule, before = build_reconstructor("rule"), render(session.turns[3].before)
    lost = [t.instruction for t in session.turns]      # turn 3 had no intent: the intended scene is lost
    explicit, referential, photo = rule.reconstruct([
        IntentQuery(lost, [session.turns[0].intent, session.turns[1].intent, None], before, render(session.source)),
        IntentQuery(lost[:3], [session.turns[0].intent, None], render(session.turns[2].before),
                    render(session.source)),
        IntentQuery(lost[:1], [], noise(), noise())])
    assert explicit.intent == session.turns[3].intent and explicit.details["scene"] == "current image"
    assert referential.intent is None and "cannot resolve" in referential.failure   # "make it smaller", no history
    assert photo.intent is None and "not a scene of the world" in photo.failure


# ---- served ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, intent", [
    ("make the red circle at the top left bigger", "make the red circle at the top left bigger"),
    ("Intent: make the red circle bigger.", "make the red circle bigger"),
    ("**Explicit instruction:** \"remove the blue square\"\nIt was the one added last.", "remove the blue square"),
    ("<think>it = the green triangle</think>\n\n- make the green triangle at the center red",
     "make the green triangle at the center red"),
])
def test_parse_intent_takes_the_first_line(reply, intent):
    assert parse_intent(reply) == intent


@pytest.mark.parametrize("reply, reason", [
    ("", "empty reply"), ("  \n Intent:  \n", "empty reply"), (None, "missing"), (["make it red"], "JSON list"),
    ("make it " + "really " * 60 + "red", "no one-line instruction")])
def test_parse_intent_rejects(reply, reason):
    with pytest.raises(ValueError, match=reason):
        parse_intent(reply)


def scripted(answer):
    """A chat server answering every chat with ``answer(body)`` as the assistant's text."""
    def respond(route, body, headers):
        if route == "models":
            return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
        return completion([text_choice(answer(body))], "scripted")
    return respond


def test_served_sends_the_history_and_reads_the_answer(monkeypatch):
    monkeypatch.setenv("MTEDITLAB_INTENT_API_KEY", "intent-key")
    sessions = make_sessions("val", 2, 3)
    gold = {s.turns[k].instruction: s.turns[k].intent for s in sessions for k in range(3)}

    def new_instruction(chat):
        return chat["messages"][1]["content"][-1]["text"].split('"')[1]

    def answer(body):   # the new instruction's gold intent, behind a label and a period
        return f"Intent: {gold[new_instruction(body)]}."

    with ChatServer(scripted(answer)) as server:
        intents = true_scene_intents(f"served:{server.url}?retries=0", sessions)
        chats, requests = server.chats(), server.requests
    assert [intents.told(i) for i in range(2)] == [[t.intent for t in s.turns] for s in sessions]
    assert requests[0][0] == "models" and len(chats) == 6 and chats[0]["model"] == "scripted"
    assert all(headers["Authorization"] == "Bearer intent-key" for _, _, headers in requests)
    assert chats[0]["temperature"] == 0.0 and chats[0]["messages"][0]["role"] == "system"
    first, third = (next(c["messages"][1]["content"] for c in chats if new_instruction(c) == t.instruction)
                    for t in (sessions[0].turns[0], sessions[0].turns[2]))
    images = [decode_data_url(p["image_url"]["url"]) for p in third if p["type"] == "image_url"]
    assert sum(p["type"] == "image_url" for p in first) == 1 and len(images) == 2
    assert np.array_equal(np.asarray(images[0]), np.asarray(render(sessions[0].source)))       # the first image
    assert np.array_equal(np.asarray(images[1]), np.asarray(render(sessions[0].turns[2].before)))   # the current
    history = "\n".join(p["text"] for p in third if p["type"] == "text")
    t0, t1, t2 = sessions[0].turns
    assert f'1. "{t0.instruction}" (meant: "{t0.intent}")' in history and f'2. "{t1.instruction}"' in history
    assert f'New instruction: "{t2.instruction}"' in history and "colour, shape and position" in history


@pytest.mark.parametrize("respond, reason", [
    (lambda route, body, headers: ("sleep", 1.0, completion([text_choice("remove it")])), "timed out after 0.2 s"),
    (lambda route, body, headers: b"<html>upstream error</html>", "malformed JSON reply"),
    (lambda route, body, headers: completion([text_choice("   ")]), "empty reply"),
    (lambda route, body, headers: completion([]), "reply without choices"),
    (lambda route, body, headers: {"choices": [{"message": {"content": 7}}]}, "JSON int"),
])
def test_served_failures_fall_back_to_the_instruction_and_are_counted(respond, reason):
    sessions = make_sessions("val", 2, 1)
    with ChatServer(respond) as server:
        intents = TurnIntents(f"served:{server.url}?model=m&timeout=0.2&retries=0")
        texts = intents(0, [render(s.source) for s in sessions], sessions)
    assert texts == [(s.turns[0].instruction, None) for s in sessions] and intents.failures(0) == 2
    assert all(reason in r[0].failure for r in intents.results.values())


def test_served_down_fails_every_turn_without_raising():
    result = main(["--editor", "oracle", "--sessions", "3", "--turns", "2", "--split", "val", "--no-teacher-forced",
                   "--intent", "served:http://127.0.0.1:9/v1?model=m&retries=0&timeout=1"])
    assert [row["intent_failures"] for row in result["per_turn"]] == [3, 3]
    assert result["per_turn"][0]["success"] == 1.0   # turn 1 is explicit: the instruction alone does it


# ---- the benchmark's intent metrics ---------------------------------------------------------------
def test_bench_reports_how_the_intents_agree_with_the_gold(capsys):
    common = ["--editor", "oracle", "--sessions", "8", "--turns", "4", "--split", "val", "--no-teacher-forced"]
    rule, none = main([*common, "--intent", "rule"]), main([*common, "--intent", "none"])
    printed = capsys.readouterr().out
    assert rule["intent"] == "rule" and none["intent"] == "none"
    assert "| turn | exact | equivalent | referential exact | referential equivalent |" in printed
    for row in rule["per_turn"]:
        assert row["intent_equivalent"] == row["intent_exact"] == 1.0 and row["intent_failures"] == 0
        assert row["success"] == 1.0
    assert rule["per_turn"][0]["intent_equivalent_referential"] is None   # turn 1 is never referential
    # the instruction alone: explicit turns parse to the same edit, referential ones ("paint it green") do not
    assert all(row["intent_equivalent_explicit"] == 1.0 for row in none["per_turn"])
    assert all(row["intent_equivalent_referential"] == 0.0 for row in none["per_turn"][1:])
    assert none["per_turn"][1]["success"] < 1.0 and none["per_turn"][1]["intent_failures"] == 0
    cells = np.array(none["per_session"]["intent_equivalent_referential"], dtype=float)
    assert np.isnan(cells[1]).all() and cells[0, 1] == 0.0   # session 1 has no referential turn; 0's turn 2 is one


def test_rule_on_data_reads_world_renders_and_fails_on_photos():
    result = main(["--editor", "identity", "--sessions-from", str(EXAMPLES), "--reward", "judge", "--intent", "rule",
                   "--resolution", "64"])
    assert result["intent"] == "rule" and result["session_ids"] == ["world-3", "world-11", "landscape", "still-life"]
    assert [row["intent_failures"] for row in result["per_turn"]] == [2, 2, 2]   # the photo and the drawing


# ---- a tiny Qwen-VL served on 127.0.0.1 -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm():
    with served_tiny_judge() as (server, _):
        yield server


def test_served_tiny_qwen_vl_drives_the_mini_editor_on_the_world(tiny_vlm):
    before = len(tiny_vlm.chats())
    result = main(["--editor", "mini", "--sessions", "2", "--turns", "3", "--split", "val", "--no-teacher-forced",
                   "--intent", f"served:{tiny_vlm.url}?model=tiny-qwen-vl&max_tokens=8&retries=0"])
    chats = tiny_vlm.chats()[before:]
    assert len(chats) == 6 and all(chat["max_tokens"] == 8 for chat in chats)
    images = [sum(p["type"] == "image_url" for p in chat["messages"][1]["content"]) for chat in chats]
    assert images == [1, 1, 2, 2, 2, 2]   # turn 1: the source; then the source and the current image
    for row in result["per_turn"]:   # random weights say gibberish, which the editor reads and no parse accepts;
        # a failed turn would fall back to the instruction (which may parse)
        assert row["intent_equivalent"] <= row["intent_failures"] / 2 and row["success"] is not None


def test_served_tiny_qwen_vl_drives_tiny_kontext_through_a_three_turn_session(tiny_vlm, tmp_path):
    tiny_kontext().save_pretrained(tmp_path / "kontext")
    before = len(tiny_vlm.chats())
    result = main(["--editor", "kontext", "--editor-path", str(tmp_path / "kontext"), "--sessions-from", str(EXAMPLES),
                   "--sessions", "1", "--resolution", "32", "--steps", "2", "--reward", "judge",
                   "--intent", f"served:{tiny_vlm.url}?model=tiny-qwen-vl&max_tokens=8&retries=0"])
    chats = tiny_vlm.chats()[before:]
    assert result["session_ids"] == ["world-3"] and result["turns"] == 3 and len(chats) == 3
    assert result["intent"].startswith("served:") and sum(row["intent_failures"] for row in result["per_turn"]) <= 3
    assert all(0 <= row["score"] <= 1 for row in result["per_turn"])
    sizes = {decode_data_url(p["image_url"]["url"]).size for chat in chats for p in chat["messages"][1]["content"]
             if p["type"] == "image_url"}
    assert sizes == {(32, 32)}   # the editor's own outputs at its resolution, and the source


def test_served_tiny_qwen_vl_reconstructs_every_turn_of_a_training_iteration_on_tiny_kontext(tiny_vlm, tmp_path):
    import json

    from training.grpo import train

    tiny_kontext().save_pretrained(tmp_path / "kontext")
    before = len(tiny_vlm.chats())
    out = tmp_path / "run"
    train(parse_args(["--lora", "--editor", "kontext", "--editor-path", str(tmp_path / "kontext"), "--sessions-from",
                      str(EXAMPLES), "--resolution", "32", "--turns", "3", "--steps", "2", "--sde-window", "1",
                      "--sessions-per-step", "1", "--num-generations", "2", "--lora-rank", "2", "--lora-alpha", "4",
                      "--algo", "nft", "--reward", "judge=1.0", "--iterations", "1", "--out", str(out),
                      "--intent", f"served:{tiny_vlm.url}?model=tiny-qwen-vl&max_tokens=8&retries=0"]))
    chats = tiny_vlm.chats()[before:]
    assert len(chats) == 1 * 2 * 3          # one reconstruction per rollout and turn
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["iteration"] == 1 and row["loss_terms"] > 0
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
