"""The served judge (``qwen-vl`` behind an OpenAI-compatible endpoint) and pairwise win rates, against
real HTTP servers on 127.0.0.1: a tiny random-weight Qwen-VL answering with real logprobs, scripted
judges, and servers that time out, fail, return garbage, drop the connection, redirect, trickle, flood,
rate-limit or send invalid logprobs."""

from __future__ import annotations

import email.utils
import math
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from bench.faults import JUDGE_FAULTS, Settings, judge_fault_rows
from mteditlab.rewards import get_reward
from mteditlab.rewards.base import EditSample
from mteditlab.rewards.endpoint import (JUDGE_URL_ENV, EndpointJudge, retry_after_seconds, score_position,
                                       served_judge)
from mteditlab.rewards.pairwise import PairwiseJudge, group_indices, win_rates
from mteditlab.rewards.qwen_vl import QwenVLJudge
from tests.chat_server import (DROP, ChatServer, TinyVLMResponder, completion, decode_data_url, digit_reply, endless,
                               error, flood, rate_limited, redirect, retry_later, text_choice, trickle)
from tests.tiny_qwen_vl import build_model, build_processor, build_tokenizer, judge_samples

FAST = dict(timeout=0.3, retries=2, backoff=0.01, model="tiny")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_model("qwen2_5_vl", tokenizer), build_processor("qwen2_5_vl", tokenizer)


@pytest.fixture(scope="module")
def samples():
    return judge_samples()


def sample(instruction: str, colour=(90, 90, 90), **meta) -> EditSample:
    return EditSample(Image.new("RGB", (16, 16), (255, 255, 255)), Image.new("RGB", (16, 16), colour),
                      instruction, meta=meta)


# ---- the served tiny Qwen-VL ---------------------------------------------------------------------
def test_direct_scores_equal_the_in_process_judge(tiny, samples):
    model, processor = tiny
    vocab = len(processor.tokenizer)
    with ChatServer(TinyVLMResponder(model, processor, max_logprobs=vocab)) as server:
        judge = EndpointJudge(server.url, top_logprobs=vocab, min_score_mass=0.0, concurrency=4)
        out = judge.score(samples)
        chats = server.chats()
    expected = QwenVLJudge(model, processor, min_score_mass=0.0).score(samples)
    assert out.n_failures == 0
    for crit in ("if", "cc", "quality", "ga"):
        np.testing.assert_allclose(out.scores[crit], expected.scores[crit], atol=1e-5)
        np.testing.assert_allclose(out.details["score_mass"][crit], expected.details["score_mass"][crit], atol=1e-6)
    np.testing.assert_allclose(out.overall, expected.overall, atol=1e-5)
    assert [r[0] for r in server.requests].count("models") == 1  # served model name listed once
    assert len(chats) == 11  # 3 items × 4 sub-scores, ga needs history
    assert out.details["endpoint"] == {"requests": 12, "retries": 0, "failed_requests": 0}  # + the model listing
    body = next(b for b in chats if "make it green" in json_text(b))
    assert body["model"] == "tiny-qwen-vl" and body["logprobs"] and body["top_logprobs"] == vocab
    assert body["continue_final_message"] and body["messages"][-1] == {"role": "assistant", "content": "Score: "}
    urls = [p["image_url"]["url"] for p in body["messages"][1]["content"] if p["type"] == "image_url"]
    assert [np.asarray(decode_data_url(u)).tolist() for u in urls] == [
        np.asarray(samples[0].source).tolist(), np.asarray(samples[0].edited).tolist()]  # source, then edited


def json_text(body: dict) -> str:
    return " ".join(p.get("text", "") for m in body["messages"] if not isinstance(m["content"], str)
                    for p in m["content"])


def test_digits_outside_the_top_k_count_as_missing_mass(tiny, samples):
    model, processor = tiny
    with ChatServer(TinyVLMResponder(model, processor, max_logprobs=20)) as server:
        out = EndpointJudge(server.url, sub_scores=("if",)).score(samples)  # random model: digits rarely in top 20
        too_many = EndpointJudge(server.url, sub_scores=("if",), top_logprobs=50, **{**FAST, "model": None})
        refused = too_many.score(samples[:2])
    assert out.n_failures == 3 and all("if: score tokens hold" in f for f in out.failures)
    assert refused.n_failures == 2 and np.isnan(refused.overall).all()
    assert all("HTTP 400" in f and "--max-logprobs" in f for f in refused.failures)
    assert refused.details["endpoint"]["retries"] == 0  # a client error is not retried


def test_thinking_replies_are_seeded_and_votes_counted(tiny, samples):
    model, processor = tiny
    with ChatServer(TinyVLMResponder(model, processor)) as server:
        judge = EndpointJudge(server.url, mode="thinking", votes=2, max_tokens=6, sub_scores=("if", "ga"))
        first, again, other = (judge.score(samples[:2], seed=s) for s in (0, 0, 1))
        bodies = server.chats()
    assert first.details["replies"] == again.details["replies"] != other.details["replies"]
    assert all(len(r) == 2 for r in first.details["replies"]["if"])
    assert all(b["n"] == 2 and b["temperature"] == 0.7 and "logprobs" not in b for b in bodies)
    assert "continue_final_message" not in bodies[0] and bodies[0]["messages"][-1]["role"] == "user"
    for i in range(2):  # random weights: each item is a number or a counted, reported failure
        assert (first.failures[i] is None) == np.isfinite(first.overall[i])
        if first.details["failed_votes"]["if"][i] == 2:
            assert "if: all 2 votes failed" in first.failures[i]


def test_pairwise_win_rates_from_real_logprobs_are_complementary(tiny, samples):
    model, processor = tiny
    vocab = len(processor.tokenizer)
    with ChatServer(TinyVLMResponder(model, processor, max_logprobs=vocab)) as server:
        judge = served_judge(f"{server.url}?pairwise=1&group_size=2&min_score_mass=0&top_logprobs={vocab}")
        out = judge.score(samples[:2])
        body = server.chats()[0]
    assert isinstance(judge, PairwiseJudge) and out.n_failures == 0
    assert out.overall.sum() == pytest.approx(1.0)  # P(a beats b) + P(b beats a) = 1 in both orders
    assert len(out.details["pairs"]) == 2 and sum(p["type"] == "image_url" for p in body["messages"][1]["content"]) == 4


# ---- scripted judges ------------------------------------------------------------------------------
def test_thinking_votes_average_valid_replies():
    replies = {"if": ["Looks right.\nScore: 9", "Score: 6", "Score: 11"], "cc": ["", "ten", "Score: 2\nScore: 4"]}

    def respond(route, body, headers):
        crit = "if" if "INSTRUCTION FOLLOWING" in json_text(body) else "cc"
        return completion([text_choice(r, k) for k, r in enumerate(replies[crit])])

    with ChatServer(respond) as server:
        out = EndpointJudge(server.url, mode="thinking", votes=3, sub_scores=("if", "cc"), **FAST).score(
            [sample("make it grey")])
    assert out.scores["if"][0] == pytest.approx((1 + 6 / 9) / 2) and np.isnan(out.scores["cc"][0])
    assert out.failures[0].startswith("cc: all 3 votes failed: empty reply; no 'Score: N' statement; 2 score")
    assert out.details["failed_votes"]["if"].tolist() == [1] and out.details["failed_votes"]["cc"].tolist() == [3]


def chaos(route, body, headers):
    """Behaviour chosen by the instruction: each failure mode, a flaky server, a good answer."""
    text = json_text(body)
    good = digit_reply({"7": 0.5, "9": 0.25, "x": 0.25})
    if "timeout" in text:
        return ("sleep", 1.0, good)
    if "error500" in text:
        return error(500, "engine died")
    if "malformed" in text:
        return b'{"choices": [ {"message":'
    if "drop" in text:
        return DROP
    if "nologprobs" in text:
        return completion([text_choice("Score: 7")])
    if "flaky" in text and chaos.flaky_calls < 1:
        chaos.flaky_calls += 1
        return error(503, "warming up")
    return good


def test_every_failure_is_nan_with_a_reason_and_counted():
    chaos.flaky_calls = 0
    names = ["ok", "timeout", "error500", "malformed", "drop", "nologprobs", "flaky"]
    with ChatServer(chaos) as server:
        judge = EndpointJudge(server.url, sub_scores=("if",), **FAST)
        start = time.monotonic()
        out = judge.score([sample(n) for n in names])
        elapsed = time.monotonic() - start
    expected = (7 * 0.5 + 9 * 0.25) / 0.75 / 9
    np.testing.assert_allclose(out.overall[[0, 6]], [expected, expected])
    reasons = dict(zip(names, out.failures))
    assert reasons["ok"] is None and reasons["flaky"] is None  # one retry after a 503
    assert reasons["timeout"] == "if: timed out after 0.3 s (after 3 attempts)"
    assert reasons["error500"] == "if: HTTP 500: engine died (after 3 attempts)"
    assert reasons["malformed"].startswith("if: malformed JSON reply") and "(after 3 attempts)" in reasons["malformed"]
    assert reasons["drop"].startswith("if: connection dropped") and "(after 3 attempts)" in reasons["drop"]
    assert reasons["nologprobs"] == "if: reply has no logprobs (the server must support logprobs / top_logprobs)"
    assert out.n_failures == 5 and np.isnan(out.overall[1:6]).all()
    # 4 requests given up after 2 retries each, 1 retry for the flaky one; the reply without logprobs
    # was a request that succeeded and an item that failed
    assert out.details["endpoint"] == {"requests": 7 + 4 * 2 + 1, "retries": 4 * 2 + 1, "failed_requests": 4}
    assert judge.stats == out.details["endpoint"]
    assert elapsed < 5  # concurrent, bounded retries, short timeouts


def test_unreachable_endpoint_fails_each_item(samples):
    with ChatServer(chaos) as server:
        url = server.url
    out = EndpointJudge(url, sub_scores=("if", "cc"), **FAST).score(samples[:2])  # the port is closed now
    assert out.n_failures == 2 and all(f.startswith("if: connection failed") for f in out.failures)
    assert out.details["endpoint"]["failed_requests"] == 4


def preferring_red(route, body, headers):
    """A pairwise judge that prefers the output with more red (tie when equal), optionally always
    answering 'FIRST' (position bias)."""
    images = [decode_data_url(p["image_url"]["url"]) for p in body["messages"][1]["content"]
              if p["type"] == "image_url"]
    first, second = (np.asarray(images[k])[..., 0].mean() for k in (1, 3))
    digit = "2" if preferring_red.biased or first > second else "0" if first < second else "1"
    return digit_reply({digit: 1.0})


@pytest.mark.parametrize("biased, expected", [(False, [1.0, 0.25, 0.25, 0.5, 0.5]), (True, [0.5] * 5)])
def test_pairwise_judge_gives_win_rates_in_groups(biased, expected):
    preferring_red.biased = biased
    group = [sample("redder", (250, 0, 0), group=0), sample("dull", (100, 0, 0), group=0),
             sample("dull", (100, 0, 0), group=0), sample("a", (9, 0, 0), group=1), sample("b", (9, 0, 0), group=1)]
    with ChatServer(preferring_red) as server:
        out = PairwiseJudge(EndpointJudge(server.url, **FAST)).score(group)
        assert len(server.chats()) == 3 * 2 + 2 * 1
    np.testing.assert_allclose(out.scores["win"], expected)
    np.testing.assert_allclose(out.overall, expected)


def test_win_rates_average_both_orders_and_skip_failed_pairs():
    groups = [[0, 1, 2], [3]]
    ok, nan = (lambda q: (q, None)), (math.nan, "HTTP 500: x")
    outcomes = {(0, 1): ok(1.0), (1, 0): ok(0.5), (0, 2): ok(0.5), (2, 0): ok(0.5),
                (1, 2): nan, (2, 1): nan}
    rates, reasons = win_rates(4, groups, outcomes)
    # P(0 beats 1) = mean(1, 1 - 0.5) = 0.75; P(0 beats 2) = 0.5; the 1–2 pair failed both ways
    np.testing.assert_allclose(rates[:3], [(0.75 + 0.5) / 2, 0.25, 0.5])
    assert reasons[:3] == [None, None, None]
    assert np.isnan(rates[3]) and reasons[3] == "no other rollout in its group to compare with"
    rates, reasons = win_rates(2, [[0, 1]], {(0, 1): nan, (1, 0): nan})
    assert np.isnan(rates).all() and reasons[0] == "all 2 comparisons failed: HTTP 500: x ×2"


def test_groups_from_meta_size_or_session():
    world_a, world_b = ({"split": "train", "index": i, "turns": 2} for i in (0, 1))
    by_session = [sample("x", world=w, turn=1) for w in (world_a, world_a, world_b, world_b)]
    assert group_indices(by_session) == [[0, 1], [2, 3]]
    assert group_indices([sample("x", group=g) for g in "abab"]) == [[0, 2], [1, 3]]
    assert group_indices([sample("x")] * 4, group_size=2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="groups"):
        group_indices([sample("x")] * 2)


# ---- selection and configuration ------------------------------------------------------------------
def test_get_reward_selects_the_endpoint_by_url_or_environment(monkeypatch):
    seen = []

    def respond(route, body, headers):
        seen.append(headers.get("Authorization"))
        return digit_reply({"9": 1.0})

    monkeypatch.setenv("MTEDITLAB_JUDGE_API_KEY", "secret-token")
    with ChatServer(respond) as server:
        judge = get_reward("qwen-vl", path=f"{server.url}?sub_scores=if+quality&model=tiny&retries=0")
        assert isinstance(judge, EndpointJudge) and judge.sub_scores == ("if", "quality")
        assert judge.score([sample("x")]).overall.tolist() == [1.0]
        monkeypatch.setenv(JUDGE_URL_ENV, f"{server.url}?mode=thinking&votes=3")
        from_env = get_reward("qwen-vl")
    assert seen == ["Bearer secret-token"] * 2
    assert isinstance(from_env, EndpointJudge) and (from_env.mode, from_env.votes) == ("thinking", 3)
    with pytest.raises(ValueError, match="unknown judge URL option 'colour'"):
        get_reward("qwen-vl", path="http://127.0.0.1:1/v1?colour=red")
    with pytest.raises(ValueError, match="votes"):
        served_judge("http://127.0.0.1:1/v1?votes=3")  # direct mode takes one vote


def test_without_prefill_the_score_is_the_first_single_digit_token():
    tokens = [{"token": "Score"}, {"token": ":"}, {"token": " 12"}, {"token": " 7"}, {"token": "."}]
    assert score_position(tokens, prefill=False) == {"token": " 7"}
    assert score_position(tokens, prefill=True) == {"token": "Score"}


# ---- hostile servers ------------------------------------------------------------------------------
SEVEN = digit_reply({"7": 1.0})


@pytest.mark.parametrize("status, route", [(301, "models"), (302, "chat/completions")])
def test_a_redirect_is_a_failure_and_nothing_reaches_the_other_host(monkeypatch, status, route):
    monkeypatch.setenv("MTEDITLAB_JUDGE_API_KEY", "secret-token")
    listing = {"object": "list", "data": [{"id": "tiny"}]}
    with ChatServer(lambda r, *a: listing if r == "models" else digit_reply({"9": 1.0})) as elsewhere:
        target = f"{elsewhere.url}/{route}"
        with ChatServer(lambda r, *a: redirect(target, status) if r == route else listing if r == "models"
                        else SEVEN) as server:
            out = EndpointJudge(server.url, sub_scores=("if",), **{**FAST, "model": None}).score([sample("x")])
    assert elsewhere.requests == [] and elsewhere.bytes_received == 0
    assert np.isnan(out.overall[0]) and out.failures == [f"if: HTTP {status} redirect to {target} (not followed)"]
    assert out.details["endpoint"]["retries"] == 0


@pytest.mark.parametrize("hostile", [lambda: trickle(SEVEN, 0.02), lambda: endless(0.05)], ids=["trickle", "endless"])
def test_a_request_ends_at_its_deadline_however_slowly_the_reply_comes(hostile):
    with ChatServer(lambda *a: hostile()) as server:
        judge = EndpointJudge(server.url, sub_scores=("if",), **{**FAST, "timeout": 1.0, "retries": 0})
        start = time.monotonic()
        out = judge.score([sample("x")])
        elapsed = time.monotonic() - start
    assert out.failures == ["if: timed out after 1 s"] and 1.0 <= elapsed < 1.5


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_reply_over_the_size_cap_is_a_failure_and_read_no_further(declared):
    with ChatServer(lambda *a: flood(4_000_000, declared=declared)) as server:
        judge = served_judge(f"{server.url}?max_body=1000000&model=tiny&retries=2&sub_scores=if")
        tracemalloc.start()
        out = judge.score([sample("x")])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert out.failures == ["if: reply body over the 1000000-byte cap (max_body)"]
    assert out.details["endpoint"]["retries"] == 0  # the same reply again would be as large
    assert peak < 2_500_000


def test_retry_after_is_honoured_within_the_timeout():
    respond = rate_limited(1.0, SEVEN)
    with ChatServer(respond) as server:  # backoff alone would give up after 0.05 + 0.1 + 0.2 s
        judge = EndpointJudge(server.url, sub_scores=("if",), **{**FAST, "timeout": 2.0, "retries": 3,
                                                                 "backoff": 0.05})
        start = time.monotonic()
        out = judge.score([sample("x")])
        elapsed = time.monotonic() - start
    assert out.failures == [None] and out.overall[0] == pytest.approx(7 / 9)
    assert len(respond.asked) == 2 and 1.0 <= elapsed < 1.5
    with ChatServer(lambda *a: retry_later("60")) as server:
        start = time.monotonic()
        out = EndpointJudge(server.url, sub_scores=("if",), **{**FAST, "timeout": 1.0}).score([sample("x")])
        assert len(server.chats()) == 1 and time.monotonic() - start < 0.5
    assert out.failures == ["if: HTTP 429: rate limited (asked to retry after 60 s, beyond the 1 s timeout)"]
    assert retry_after_seconds(email.utils.formatdate(time.time() + 30, usegmt=True)) == pytest.approx(30, abs=1.5)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert [retry_after_seconds(v) for v in (None, "", "soon", "-1", "nan", "inf")] == [None] * 6


def test_a_failed_model_listing_fails_the_other_chats_at_once():
    with ChatServer(lambda route, *a: error(503, "loading") if route == "models" else SEVEN) as server:
        judge = EndpointJudge(server.url, sub_scores=("if",), timeout=1.0, retries=2, backoff=0.05, concurrency=4)
        out = judge.score([sample(str(k)) for k in range(4)])
        again = judge.score([sample("x")])
        routes = [route for route, _, _ in server.requests]
    assert routes == ["models"] * 3  # one listing and its 2 retries for all 5 chats
    assert out.failures == ["if: HTTP 503: loading (after 3 attempts)"] * 4 and again.failures == out.failures[:1]


@pytest.mark.parametrize("other", [
    {"token": "²", "logprob": math.log(0.05)}, {"token": "９", "logprob": math.log(0.05)},
    {"token": 9, "logprob": math.log(0.05)}, {"token": "9", "logprob": True}, {"token": "9", "logprob": 0.5},
    {"token": "9", "logprob": "-0.1"}, {"token": "9", "logprob": math.nan}, "9"],
    ids=["superscript", "fullwidth", "int-token", "bool", "positive", "string", "nan", "not-an-object"])
def test_only_ascii_digits_with_real_logprobs_count(other):
    seven = {"token": "7", "logprob": math.log(0.905)}
    reply = completion([text_choice("7", logprobs=[{**seven, "top_logprobs": [seven, other]}])])
    with ChatServer(lambda *a: reply) as server:
        out = EndpointJudge(server.url, sub_scores=("if",), **FAST).score([sample("x")])
    assert out.failures == [None] and out.overall[0] == pytest.approx(7 / 9)
    assert out.details["score_mass"]["if"][0] == pytest.approx(0.905)


def test_a_vote_that_is_not_text_is_one_failed_vote():
    parts = {"index": 1, "message": {"role": "assistant", "content": [{"type": "text", "text": "Score: 9"}]}}
    replies = {"if": [text_choice("Score: 7", 0), parts, "Score: 3", text_choice("Score: 5", 3)],
               "cc": [parts, parts, parts, parts]}

    def respond(route, body, headers):
        return completion(replies["if" if "INSTRUCTION FOLLOWING" in json_text(body) else "cc"])

    with ChatServer(respond) as server:
        out = EndpointJudge(server.url, mode="thinking", votes=4, sub_scores=("if", "cc"), **FAST).score(
            [sample("x")])
    assert out.scores["if"][0] == pytest.approx(6 / 9) and out.details["failed_votes"]["if"].tolist() == [2]
    assert out.failures == ["cc: all 4 votes failed: reply is a JSON list, not text ×4"]


def test_the_fault_bench_leaks_nothing_and_fails_where_it_must():
    rows = judge_fault_rows(Settings(timeout=0.5, body_bytes=2_000_000, max_body=256_000, retry_after=0.3))
    assert [row["fault"] for row in rows] == [fault.name for fault in JUDGE_FAULTS]
    for row, fault in zip(rows, JUDGE_FAULTS):
        assert row["bytes_elsewhere"] == 0 and row["outcome"].startswith(fault.expect), row
        assert row["judgments_before"] is row["judgments_after"] is None
    by_fault = {row["fault"]: row for row in rows}
    assert by_fault["huge body, no length"]["peak_mb"] < 1.0  # read no further than the cap
    for slow in ("trickle (a byte every timeout/20)", "endless body"):  # 3 deadlines and 2 backoffs
        assert by_fault[slow]["seconds"] < 3 * 0.5 + 0.1 + 0.2 + 0.5
    assert by_fault["invalid logprobs"]["outcome"] == "scored 0.778"
