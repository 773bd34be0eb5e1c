"""Agreement coefficients against textbook values; gold accuracy; improbable-voter test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from labeling import agreement
from tests.test_labeling_queue import THREE_MODELS
from tests.test_labeling_store import build_store, vote

# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", example C: 4 observers,
# 12 units, values 1..5, missing data; nominal alpha = 0.743.
KRIPPENDORFF = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]
# Fleiss (1971) worked example as on Wikipedia: 10 subjects, 14 raters, 5 categories; 0.210.
FLEISS = np.array([
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
])


def test_krippendorff_alpha_textbook_example_with_missing_data():
    rows = [(unit, coder, value) for coder, values in enumerate(KRIPPENDORFF)
            for unit, value in enumerate(values) if value is not None]
    frame = pd.DataFrame(rows, columns=["unit", "annotator", "value"])
    counts = agreement.category_counts(frame, ["unit"], "value", [1, 2, 3, 4, 5])
    assert counts.shape == (12, 5)
    assert agreement.krippendorff_alpha_nominal(counts) == pytest.approx(0.743, abs=5e-4)


def test_fleiss_kappa_textbook_example():
    assert agreement.fleiss_kappa(FLEISS) == pytest.approx(0.210, abs=5e-4)


def test_cohen_kappa_textbook_example_and_from_a_judgments_frame():
    # Wikipedia: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o .7, p_e .5, kappa .4
    assert agreement.cohen_kappa([[20, 5], [10, 15]]) == pytest.approx(0.4)
    pairs = [("A", "A")] * 20 + [("A", "B")] * 5 + [("B", "A")] * 10 + [("B", "B")] * 15
    frame = pd.DataFrame(
        [(unit, name, pair[k], 0, "overall") for unit, pair in enumerate(pairs)
         for k, name in enumerate(["r1", "r2"])],
        columns=["comparison_id", "annotator", "choice", "turn", "criterion"])
    kappa, n_pairs = agreement.mean_pairwise_cohen(frame)
    assert (kappa, n_pairs) == (pytest.approx(0.4), 1)


def test_degenerate_cases():
    assert agreement.krippendorff_alpha_nominal(np.array([[3, 0], [0, 2]])) == 1.0
    assert agreement.fleiss_kappa(np.array([[3, 0], [0, 3]])) == 1.0
    assert np.isnan(agreement.krippendorff_alpha_nominal(np.array([[3, 0], [2, 0]])))
    assert np.isnan(agreement.krippendorff_alpha_nominal(np.array([[1, 0], [0, 1]])))
    with pytest.raises(ValueError, match="outside"):
        agreement.category_counts(pd.DataFrame({"u": [1], "v": ["maybe"]}), ["u"], "v")


def test_agreement_table_and_gold_accuracy_on_a_store(tmp_path):
    store, comparisons, golds = build_store(tmp_path / "l.duckdb", models=THREE_MODELS,
                                            n_sources=2, gold=2)
    with store:
        rng = np.random.default_rng(0)  # which side should win varies across units
        vote(store, comparisons, [f"h{k}" for k in range(4)],
             {"mini": 1.5, "mini+lora:a": -1.5, "mini+lora:b": 0.0}, rng,
             criteria=("overall", "quality"), turns=(None, 0, 1))
        for name, answer in (("h0", "A"), ("h1", "A"), ("h2", "B")):
            for cid in golds:
                for criterion in ("overall", "quality"):
                    store.record_judgment(cid, name, None, criterion, answer, "A", blind=True)
        frame = store.judgments_frame()
        table = agreement.agreement_table(frame).set_index("criterion")
        assert list(table.index) == ["overall", "quality"]
        assert (table.units == 6 * 3).all() and (table.annotators == 4).all()  # gold left out
        assert table.alpha.between(0.05, 1).all() and (table.cohen_pairs == 6).all()
        gold = agreement.gold_accuracy(frame[frame.gold], store.table("gold_items"))
        assert gold.set_index("annotator").accuracy.to_dict() == {"h2": 0.0, "h0": 1.0,
                                                                  "h1": 1.0}
    specific = pd.DataFrame({"comparison_id": [1, 1], "criterion": ["*", "quality"],
                             "answer": ["A", "tie"]})
    votes = pd.DataFrame({"annotator": ["x", "x"], "comparison_id": [1, 1],
                          "criterion": ["overall", "quality"], "choice": ["A", "tie"]})
    assert agreement.gold_accuracy(votes, specific).accuracy.tolist() == [1.0]


def crowd(n_honest=12, n_comparisons=60, contrarian=True, seed=0):
    rng = np.random.default_rng(seed)
    strengths = {"x": 1.2, "y": 0.0, "z": -1.2}
    pairs = [("x", "y"), ("y", "z"), ("x", "z")]
    rows = []
    names = [f"h{k}" for k in range(n_honest)] + (["contrarian"] if contrarian else [])
    for c in range(n_comparisons):
        a, b = pairs[c % 3]
        if rng.random() < 0.5:
            a, b = b, a
        p = 1 / (1 + np.exp(strengths[b] - strengths[a]))
        for name in names:
            if name == "contrarian":
                choice = "B" if strengths[a] > strengths[b] else "A"
            else:
                choice = "tie" if rng.random() < 0.1 else ("A" if rng.random() < p else "B")
            rows.append((len(rows), c, name, a, b, choice))
    return pd.DataFrame(rows, columns=["judgment_id", "comparison_id", "annotator", "model_a",
                                       "model_b", "choice"]).assign(criterion="overall")


def test_improbable_voter_is_flagged_and_honest_ones_are_not():
    result = agreement.flag_annotators(crowd()).set_index("annotator")
    assert result.loc["contrarian", "flagged"]
    assert result.loc["contrarian", "flagged_at"] <= 40  # looks at 10, 20, 40 votes
    assert not result.drop(index="contrarian").flagged.any()
    assert (result.votes == 60).all()
    false_alarms = sum(agreement.flag_annotators(crowd(contrarian=False, seed=s)).flagged.sum()
                       for s in range(1, 6))
    assert false_alarms == 0


def test_vote_p_values_use_only_other_annotators():
    frame = pd.DataFrame({"annotator": ["a", "b", "c"], "model_a": ["x", "y", "x"],
                          "model_b": ["y", "x", "y"], "choice": ["A", "B", "B"],
                          "criterion": "overall"})
    p = agreement.vote_p_values(frame)
    # a's vote (x wins) against b (x wins) and c (y wins): q = (2, 2, 1, 1)/6 -> p = 1
    assert p.iloc[0] == pytest.approx(1.0)
    # c's vote (y wins) against two x-wins: q = (3, 1, 1, 1)/6 -> p = 3/6
    assert p.iloc[2] == pytest.approx(0.5)
