"""Automatic raters (``labeling.raters``): a served pairwise judge answers the store's comparisons
turn by turn through a real local HTTP server; its verdicts land as ``judge:`` judgments."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from labeling import cli
from labeling.raters import rate_comparisons, turn_samples, verdict
from labeling.store import LabelStore
from mteditlab.rewards import get_reward
from tests.chat_server import ChatServer, completion, text_choice


@pytest.fixture()
def store(tmp_path):
    """Simulated sessions, and a person who judged turn 1 of every other comparison."""
    db = tmp_path / "labels.duckdb"
    assert cli.main(["--db", str(db), "simulate", "--sessions", "6", "--turns", "2", "--annotators", "2",
                     "--overlap", "1"]) == 0
    store = LabelStore.open(db)
    store.add_annotator("alice")
    ids = store.query("SELECT comparison_id FROM comparisons WHERE kind <> 'gold' ORDER BY 1").comparison_id.tolist()
    for cid in ids[::2]:
        store.record_judgment(int(cid), "alice", 0, "overall", "A", "A", blind=True)
    yield store
    store.close()


def brightness(url: str) -> float:
    data = base64.b64decode(url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=float).mean())


def pair_answer(route, body, headers, *, prefer_first: bool | None = None):
    """A pairwise judge that prefers the brighter edit (or, with ``prefer_first``, always the FIRST one:
    pure position bias); answers with the digit's logprobs."""
    if route == "models":
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
    urls = [part["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
            for part in m["content"] if part.get("type") == "image_url"]
    first, second = brightness(urls[1]), brightness(urls[3])   # (source, edited) of FIRST, then of SECOND
    digit = "2" if prefer_first or (prefer_first is None and first > second) else "1" if first == second else "0"
    top = [{"token": digit, "logprob": 0.0}]
    return completion([text_choice(digit, logprobs=[{"token": digit, "logprob": 0.0, "top_logprobs": top}])],
                      "scripted")


def served(server: ChatServer) -> str:
    return f"{server.url}?model=scripted&pairwise=1&retries=0&top_logprobs=1&min_score_mass=0"


def test_the_verdict_is_the_sign_of_the_score_difference_beyond_the_margin():
    assert [verdict(0.9, 0.2, 0.05), verdict(0.2, 0.9, 0.05), verdict(0.52, 0.5, 0.05)] == ["A", "B", "tie"]
    assert verdict(math.nan, 0.5, 0.05) is None


def test_a_served_pairwise_judge_rates_every_turn_people_judged_and_only_once(store):
    judged = store.query("SELECT DISTINCT comparison_id FROM judgments JOIN annotators USING (annotator_id) "
                         "WHERE name = 'alice'").comparison_id.tolist()
    with ChatServer(pair_answer) as server:
        report = rate_comparisons(store, get_reward("qwen-vl", path=served(server)), name="bright", progress=False)
        assert (report.comparisons, report.judgments, report.failed_turns) == (len(judged), 2 * len(judged), 0)
        chats = sum(route == "chat/completions" for route, _, _ in server.requests)
        assert chats == 2 * report.judgments   # both orders of each turn
        again = rate_comparisons(store, get_reward("qwen-vl", path=served(server)), name="bright", progress=False)
    assert (again.comparisons, again.judgments) == (0, 0)
    rows = store.judgments_frame(include_simulated=True)
    rows = rows[rows.annotator == "judge:bright"]
    assert sorted(rows.comparison_id.unique()) == sorted(judged) and set(rows.criterion) == {"overall"}
    assert rows.blind.all() and not rows.simulated.any()
    for row in rows.itertuples():   # the verdict follows the brighter edit of that turn
        a, b = turn_samples(store, row.comparison_id)[row.turn]
        want = verdict(*(float(np.asarray(s.edited.convert("L"), dtype=float).mean()) for s in (a, b)), 0.0)
        assert row.choice == want


def test_a_judge_biased_to_the_first_position_ties_once_both_orders_are_asked(store):
    with ChatServer(lambda *a: pair_answer(*a, prefer_first=True)) as server:
        report = rate_comparisons(store, get_reward("qwen-vl", path=served(server)), name="first", progress=False)
    rows = store.judgments_frame(include_simulated=True)
    assert report.judgments > 0 and set(rows[rows.annotator == "judge:first"].choice) == {"tie"}


def test_the_rate_command_runs_the_world_judge(store, capsys):
    path = store.path
    store.close()
    assert cli.main(["--db", str(path), "rate", "--reward", "judge"]) == 0
    assert "judge:judge:" in capsys.readouterr().out
    reopened = LabelStore.open(path)
    try:
        rows = reopened.judgments_frame(include_simulated=True)
    finally:
        reopened.close()
    assert (rows.annotator == "judge:judge").sum() > 0


def test_the_leaderboard_reports_the_raters_agreement_with_people_per_turn(store):
    from ui.leaderboard import machine_agreement

    with ChatServer(pair_answer) as server:
        rate_comparisons(store, get_reward("qwen-vl", path=served(server)), name="bright", progress=False)
    table = machine_agreement(store)
    rows = store.judgments_frame(include_simulated=True)
    mine = rows[(rows.annotator == "judge:bright") & (rows.turn == 0)]   # alice judged turn 1 only: 'A'
    assert table.rater.eq("judge:bright").all() and list(table.turn) == ["all", "1"]
    for row in table.itertuples():
        assert row.units == len(mine) and row.agreement == pytest.approx((mine.choice == "A").mean(), abs=1e-3)
