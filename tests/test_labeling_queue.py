"""Assignment queue: k-way overlap, no repeats, gold mixed in, left/right randomised, expiry."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from labeling.queue import AssignmentPolicy
from tests.test_labeling_store import build_store

THREE_MODELS = (("mini", None), ("mini", "lora:a"), ("mini", "lora:b"))


def drain(store, annotators):
    """Annotators take turns asking for work and judging it until the queue is empty."""
    served = []
    active = list(annotators)
    while active:
        for name in list(active):
            job = store.next_assignment(name)
            if job is None:
                active.remove(name)
                continue
            assert store.next_assignment(name) == job  # asking again resumes, burns nothing
            store.record_judgment(job.comparison_id, name, None, "overall", "A", job.left, blind=True)
            served.append(job)
    return served


def test_overlap_no_repeats_gold_rate_and_recorded_sides(tmp_path):
    policy = AssignmentPolicy(overlap=2, gold_rate=0.25, seed=3)
    store, comparisons, golds = build_store(tmp_path / "l.duckdb", models=THREE_MODELS,
                                            n_sources=4, gold=3, policy=policy)
    with store:
        names = [f"a{k}" for k in range(6)]
        for name in names:
            store.add_annotator(name)
        served = drain(store, names)
        per_comparison = Counter(job.comparison_id for job in served)
        assert all(per_comparison[c] == 2 for c in comparisons)  # exactly k each
        pairs = [(job.annotator, job.comparison_id) for job in served]
        assert len(pairs) == len(set(pairs))  # never the same comparison twice
        gold_served = [job for job in served if job.comparison_id in golds]
        assert 0.1 < len(gold_served) / len(served) < 0.45
        assert Counter(job.left for job in served).keys() == {"A", "B"}
        frame = store.judgments_frame()
        recorded = dict(zip(zip(frame.annotator, frame.comparison_id), frame["left"]))
        assert all(recorded[(j.annotator, j.comparison_id)] == j.left for j in served)
        table = store.table("assignments")
        assert len(table) == len(served)
        # a vote that contradicts the recorded display order is refused
        job = served[0]
        wrong = "B" if job.left == "A" else "A"
        with pytest.raises(ValueError, match="left"):
            store.record_judgment(job.comparison_id, job.annotator, 0, "quality", "A", wrong, blind=True)


def test_gold_is_never_served_alone(tmp_path):
    policy = AssignmentPolicy(overlap=1, gold_rate=1.0)
    store, comparisons, golds = build_store(tmp_path / "l.duckdb", n_sources=1, gold=2,
                                            policy=policy)
    with store:
        store.add_annotator("a")
        served = drain(store, ["a"])
        ids = [job.comparison_id for job in served]
        assert sorted(ids[:2]) == golds and ids[2:] == comparisons  # gold first at rate 1
        store.add_annotator("b")
        # the only ordinary comparison is full (overlap 1): nothing for b, gold or not
        assert store.next_assignment("b") is None


def test_abandoned_assignments_expire_and_free_their_slot(tmp_path):
    policy = AssignmentPolicy(overlap=1, gold_rate=0.0, ttl_s=0.3)
    store, comparisons, _ = build_store(tmp_path / "l.duckdb", n_sources=2, policy=policy)
    with store:
        for name in "xyz":
            store.add_annotator(name)
        first = store.next_assignment("x")  # x walks away without judging
        second = store.next_assignment("y")
        assert second.comparison_id != first.comparison_id
        assert store.next_assignment("z") is None  # both held
        time.sleep(0.4)
        again = store.next_assignment("z")
        assert again is not None and again.comparison_id in {first.comparison_id,
                                                             second.comparison_id}
        later = store.next_assignment("x")  # x's own assignment expired, and no repeats
        assert later is None or later.comparison_id != first.comparison_id


def test_policy_validation():
    for bad in (dict(overlap=0), dict(gold_rate=1.5), dict(ttl_s=0)):
        with pytest.raises(ValueError):
            AssignmentPolicy(**bad)


def add_arena_battles(store, n: int) -> list[int]:
    """``n`` arena battles (comparisons of kind 'arena'), as the arena stores votes."""
    from tests.test_labeling_store import tiny

    source = store.put_image(tiny(9000))
    outputs = [store.put_image(tiny(9001)), store.put_image(tiny(9002))]
    ids = []
    for k in range(n):
        sides = [store.add_session("mini", adapter, k, source,
                                   [{"instruction": "add a red circle", "output_sha": out}],
                                   {"origin": "arena", "arena_id": f"a{k}"})
                 for adapter, out in ((None, outputs[0]), ("lora:x", outputs[1]))]
        ids.append(store.add_comparison(*sides, kind="arena"))
    return ids


def test_the_queue_serves_labeling_items_never_arena_battles(tmp_path):
    policy = AssignmentPolicy(overlap=1, gold_rate=0.5, seed=1)
    store, comparisons, golds = build_store(tmp_path / "l.duckdb", n_sources=2, gold=1,
                                            policy=policy)
    with store:
        arena = add_arena_battles(store, 300)        # stored before and after the items
        store.add_annotator("ann")
        served = drain(store, ["ann"])
        ids = sorted(job.comparison_id for job in served)
        assert ids == sorted(comparisons + golds)
        assigned = set(store.table("assignments")["comparison_id"])
        assert not assigned & set(arena)             # no assignment row for any battle
        assert store.next_assignment("ann") is None


def test_a_released_item_frees_its_slot_and_never_returns(tmp_path):
    policy = AssignmentPolicy(overlap=1, gold_rate=0.0)
    store, comparisons, _ = build_store(tmp_path / "l.duckdb", n_sources=2, policy=policy)
    with store:
        for name in ("x", "y"):
            store.add_annotator(name)
        first = store.next_assignment("x")
        store.release_assignment("x", first.comparison_id)
        second = store.next_assignment("x")
        assert second.comparison_id != first.comparison_id
        assert store.next_assignment("y").comparison_id == first.comparison_id
        with pytest.raises(KeyError):
            store.release_assignment("nobody", first.comparison_id)


# ------------------------------------------------------------------ model-pair selection
def test_active_weight_is_chatbot_arenas_rule_on_the_bt_covariance():
    import numpy as np

    from labeling.active import pair_weights

    w = np.array([[0.0, 6.0], [4.0, 0.0]])             # 10 battles, 6–4
    weight = pair_weights(w, [0], [1])[0]
    p = 0.6                                             # the fitted P(0 beats 1)
    var_diff = 1.0 / (10 * p * (1 - p))                 # Var(θ̂₀ − θ̂₁)
    sigma = 10 * (p * (1 - p)) ** 2 * var_diff          # nₐ · Var(p̂₀₁): p(1−p) per battle
    assert weight == pytest.approx(np.sqrt(sigma / 10) - np.sqrt(sigma / 11), rel=1e-3)
    # more battles of the same balance: a smaller gain; a pair that never met: served first
    assert pair_weights(10 * w, [0], [1])[0] < weight
    three = np.zeros((3, 3))
    three[:2, :2] = w
    assert np.isinf(pair_weights(three, [0, 1], [2, 2])).all()
    # same number of battles: a close pair (5–5) is worth more than a lopsided one (9–1)
    close_lopsided = np.array([[0.0, 5.0, 9.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    close, lopsided = pair_weights(close_lopsided, [0, 0], [1, 2])
    assert close > 1.5 * lopsided


def _pair_store(tmp_path, selection):
    policy = AssignmentPolicy(overlap=3, gold_rate=0.0, seed=5, selection=selection)
    store, comparisons, _ = build_store(tmp_path / f"{selection}.duckdb", models=THREE_MODELS,
                                        n_sources=30, policy=policy)
    pair_of = {}
    for cid in comparisons:
        info = store.get_comparison(cid)
        pair_of[cid] = tuple(sorted((info["A"]["model"], info["B"]["model"])))
    return store, comparisons, pair_of


def _judge(store, name, cids, turns=(None, 0, 1)):
    """Even votes (A, B, tie in turn) on every turn of ``cids``."""
    store.add_annotator(name)
    for cid in cids:
        for turn, choice in zip(turns, ("A", "B", "tie")):
            store.record_judgment(cid, name, turn, "overall", choice, "A", blind=True)


def _draws(store, policy, annotator, n, seed=0):
    import datetime as dt
    import random

    from labeling.queue import pick_comparison

    store.add_annotator(annotator)
    aid = int(store.query("SELECT annotator_id FROM annotators WHERE name = ?",
                          [annotator])["annotator_id"].iloc[0])
    rng = random.Random(seed)
    expired = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    return [pick_comparison(store._cursor(), aid, policy, rng, expired) for _ in range(n)]


def test_active_queue_serves_unmet_pairs_first_then_the_most_uncertain(tmp_path):
    store, comparisons, pair_of = _pair_store(tmp_path, "active")
    with store:
        pairs = sorted(set(pair_of.values()))
        by_pair = {p: [c for c in comparisons if pair_of[c] == p] for p in pairs}
        busy, light, unmet = pairs
        _judge(store, "x", by_pair[busy][:20])            # 60 battles
        _judge(store, "y", by_pair[light][:1])            # 3 battles
        picks = _draws(store, store.policy, "fresh", 50)
        assert {pair_of[c] for c in picks} == {unmet}     # never met: first, whatever else
        served = store.next_assignment("fresh")
        assert pair_of[served.comparison_id] == unmet
        _judge(store, "z", by_pair[unmet][:1])            # now 3 battles there too
        picks = _draws(store, store.policy, "fresh2", 600)
        share = Counter(pair_of[c] for c in picks)
        assert share[busy] / 600 < 0.15                   # well measured: rarely asked
        assert share[light] / 600 > 0.3 and share[unmet] / 600 > 0.3


def test_uniform_queue_spreads_over_pairs_whatever_the_counts(tmp_path):
    store, comparisons, pair_of = _pair_store(tmp_path, "uniform")
    with store:
        pairs = sorted(set(pair_of.values()))
        busy = pairs[0]
        _judge(store, "x", [c for c in comparisons if pair_of[c] == busy][:20])
        picks = _draws(store, store.policy, "fresh", 600)
        share = Counter(pair_of[c] for c in picks)
        assert set(share) == set(pairs)
        assert all(0.25 < share[p] / 600 < 0.42 for p in pairs)


def test_one_pair_queue_order_is_the_same_under_both_rules(tmp_path):
    orders = {}
    for selection in ("active", "uniform"):
        policy = AssignmentPolicy(overlap=1, gold_rate=0.0, selection=selection)
        store, comparisons, _ = build_store(tmp_path / f"one-{selection}.duckdb", n_sources=6,
                                            policy=policy)
        with store:
            store.add_annotator("a")
            orders[selection] = [job.comparison_id for job in drain(store, ["a"])]
            assert orders[selection] == sorted(comparisons)
    assert orders["active"] == orders["uniform"]


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="selection"):
        AssignmentPolicy(selection="greedy")


def test_queue_selection_simulation_runs_and_reports(tmp_path, capsys):
    import json

    from bench import queue_selection

    out = tmp_path / "q.json"
    assert queue_selection.main(["--elo", "1000,1200,1250", "--reps", "3", "--budget", "3000",
                                 "--checkpoints", "100,200", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 1000, 1200, 1250 | uniform |" in table and "| 1000, 1200, 1250 | active |" in table
    data = json.loads(out.read_text())
    results = data["scenarios"][0]["results"]
    for rule in ("uniform", "active"):
        assert results[rule]["separated"] == 3           # 50 Elo apart: within 3,000 judgments
        assert 0 < results[rule]["median"] <= 3000
        assert set(results[rule]["half_width"]) == {"100", "200"}
