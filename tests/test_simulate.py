"""``python -m labeling simulate``: synthetic editors, simulated annotators, flagged judgments."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from labeling import cli
from labeling.simulate import simulate
from labeling.store import LabelStore
from mteditlab.rewards.features import image_features
from mteditlab.simulation import (BIASES, DEFAULT_BIAS, PROFILES, Profile, SyntheticEditor, decide, make_annotators,
                                  turn_utility)
from mteditlab.world import TurnScore, generate_session, render, score_turn


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "labels.duckdb"
    assert cli.main(["simulate", "--db", str(path), "--sessions", "20"]) == 0
    return path


def test_simulate_writes_flagged_judgments_through_the_store(small_db, capsys):
    with LabelStore.open(small_db, read_only=True) as store:
        annotators = store.table("annotators")
        judgments = store.judgments_frame(include_simulated=True)
        comparisons = store.table("comparisons")
        sessions = store.table("sessions")
        assert store.label_selection().human == 0
        store.get_image(comparisons.source_sha.iloc[0])  # images are really stored
    assert len(annotators) == 5 and annotators.simulated.all()
    assert all(name.startswith(f"sim-{DEFAULT_BIAS}-") for name in annotators.name)
    assert len(comparisons) == 20 and (comparisons.kind == "item").all()
    assert len(judgments) == 20 * 3 * (3 + 1)  # overlap 3 x (3 turns + overall)
    assert judgments.simulated.all() and set(judgments.criterion) == {"overall"}
    assert set(judgments.turn.dropna().astype(int)) == {0, 1, 2} and judgments.turn.isna().sum() == 60
    assert (judgments.groupby(["comparison_id", "turn"], dropna=False).annotator.nunique() == 3).all()
    assert (judgments.model_a != judgments.model_b).all()
    assert set(judgments.model_a) | set(judgments.model_b) <= set(PROFILES)
    assert set(judgments.left) == {"A", "B"}
    meta = json.loads(sessions.meta.iloc[0])
    assert meta["world"]["split"] == "train" and len(meta["defects"]) == 3 and meta["simulated"]
    assert {"tie", "both_bad"} <= set(judgments.choice)  # they occur naturally
    code = cli.main(["--db", str(small_db), "--read-only", "stats"])
    assert code == 0 and "0 human, 240 simulated" in capsys.readouterr().out


def test_default_scenario_penalises_background_tint_which_the_verifier_ignores():
    rng = np.random.default_rng(0)
    biased = make_annotators(5, DEFAULT_BIAS, 0, rng)
    assert DEFAULT_BIAS == "tint" and all(a.tint >= 0.6 for a in biased)
    assert all(a.tint == 0 for a in make_annotators(5, "none", 0, rng))
    ok = TurnScore(True, True, True, None)
    clean_votes = []
    for annotator in biased:
        u_clean, u_tint = turn_utility(ok, "correct", annotator), turn_utility(ok, "tint", annotator)
        clean_votes += [decide(u_clean, u_tint, 0.1, rng) for _ in range(200)]
    assert np.mean([v == "A" for v in clean_votes]) > 0.75  # the clean side wins
    unbiased = make_annotators(1, "none", 0, rng)[0]
    votes = [decide(turn_utility(ok, "correct", unbiased), turn_utility(ok, "tint", unbiased), 0.1, rng)
             for _ in range(200)]
    assert np.mean([v == "tie" for v in votes]) > 0.8
    fail = TurnScore(False, True, True, None)
    assert decide(turn_utility(fail, "wrong", unbiased), turn_utility(fail, "wrong", unbiased), 0.0, rng) == "both_bad"


def test_synthetic_editor_defects_are_what_they_claim():
    for i in range(3):
        session = generate_session("train", i, 2)
        source, intent = render(session.source), session.turns[0].intent
        correct, _ = SyntheticEditor("c", Profile(0, 0, 0)).edit_turn(session, 0, source, random.Random(i), intent)
        tinted, d_tint = SyntheticEditor("t", Profile(0, 1, 0)).edit_turn(session, 0, source, random.Random(i), intent)
        blurred, d_blur = SyntheticEditor("b", Profile(0, 0, 1)).edit_turn(session, 0, source, random.Random(i), intent)
        wrong, d_wrong = SyntheticEditor("w", Profile(1, 0, 0)).edit_turn(session, 0, source, random.Random(i), intent)
        assert score_turn(session, 0, source, correct).success
        assert d_tint == "tint" and score_turn(session, 0, source, tinted).success  # objects intact
        assert image_features(tinted)["tint"] > 0.3 > image_features(correct)["tint"]
        assert d_blur == "blur" and score_turn(session, 0, source, blurred).success
        assert image_features(blurred)["sharpness"] < 0.8
        assert d_wrong == "wrong" and not score_turn(session, 0, source, wrong).success


def test_bad_arguments_and_the_test_split_are_refused(tmp_path, capsys):
    with LabelStore.open(tmp_path / "labels.duckdb") as store:
        with pytest.raises(ValueError, match="reporting only"):
            simulate(store, sessions=1, split="test")
        with pytest.raises(ValueError, match="bias"):
            simulate(store, sessions=1, bias="nope")
    code = cli.main(["simulate", "--db", str(tmp_path / "labels.duckdb"), "--overlap", "9"])
    assert code == 2 and "overlap" in capsys.readouterr().err
    assert set(BIASES) == {"tint", "none", "blur", "left"}


def test_same_seed_same_judgments(tmp_path):
    runs = []
    for name in ("a", "b"):
        with LabelStore.open(tmp_path / name / "labels.duckdb") as store:
            simulate(store, sessions=3, turns=2, seed=5)
            frame = store.judgments_frame(include_simulated=True)
            runs.append(sorted(zip(frame.comparison_id, frame.annotator, frame.turn.fillna(-1), frame.choice,
                                   frame.left)))
    assert runs[0] == runs[1] and len(runs[0]) == 3 * 3 * (2 + 1)   # written: overlap 3 × (2 turns + overall)
