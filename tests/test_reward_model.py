"""``python -m training.reward_model`` and the ``calibrated`` reward it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import labeling.simulate as sim
from labeling.store import LabelStore
from mteditlab.rewards import get_reward
from mteditlab.rewards.base import EditSample
from mteditlab.rewards.calibrated import ARTIFACT, CalibratedReward
from mteditlab.simulation import TINTS, tint_image
from mteditlab.rewards.verifier import world_meta
from mteditlab.world import generate_session, render
from training import reward_model

REPORT_KEYS = {"heldout_accuracy", "judge_heldout_accuracy", "log_loss", "judge_log_loss", "ece", "n_train",
               "n_test", "simulated"}


@pytest.fixture(scope="module")
def sim_db(tmp_path_factory):
    """The default (tint-biased) scenario, small: 50 world sessions x 4 turns, 3 annotators each."""
    path = tmp_path_factory.mktemp("rm") / "labels.duckdb"
    with LabelStore.open(path) as store:
        sim.simulate(store, sessions=50, turns=4, seed=0)
    return path


@pytest.fixture(scope="module")
def fitted(sim_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "rm"
    report = out.parent / "report.json"
    code = reward_model.main(["--db", str(sim_db), "--out", str(out), "--report", str(report),
                              "--test-fraction", "0.5"])
    assert code == 0
    return out, json.loads(report.read_text())


def test_calibrated_model_beats_the_raw_judge_on_the_biased_scenario(fitted, capsys):
    out, report = fitted
    assert REPORT_KEYS <= set(report)
    assert report["simulated"] is True and report["judge"] == "verifier"
    assert report["n_train"] > 100 and report["n_test"] > 100
    assert report["heldout_accuracy"] >= report["judge_heldout_accuracy"] + 0.05
    assert report["log_loss"] < report["judge_log_loss"]
    assert 0 <= report["ece"] < 0.2
    assert report["weights"]["overall"] > 0  # success still matters most
    assert (out / ARTIFACT).is_file()
    spec = json.loads((out / ARTIFACT).read_text())
    assert spec["features"] == report["features"] and spec["judge"] == "verifier"


def test_the_split_is_by_session_source():
    groups = np.array([f"sha{i % 40}" for i in range(400)])
    test = reward_model.split_by_source(groups, 0.3, seed=0)
    assert 0 < test.mean() < 1
    assert not set(groups[test]) & set(groups[~test])


def _samples_for_turn(session, k, images):
    before = render(session.turns[k].before)
    return [EditSample(before, im, session.turns[k].instruction,
                       [t.instruction for t in session.turns[:k]], session.turns[k].intent,
                       world_meta(session, k)) for im in images]


def test_calibrated_reward_loads_the_artifact_and_scores_edit_samples(fitted):
    out, _ = fitted
    reward = get_reward("calibrated", path=out)
    assert isinstance(reward, CalibratedReward) and reward.name == "calibrated"
    session = generate_session("val", 2, 3)
    k = 1
    before = render(session.turns[k].before)
    clean = render(session.turns[k].after)
    tinted = tint_image(clean, TINTS[session.turns[k].after.background][0])
    samples = _samples_for_turn(session, k, [clean, tinted, before])  # correct, tinted, no-op
    samples.append(EditSample(before, clean, "no ground truth"))
    result = reward.score(samples)
    assert result.failures[:3] == [None, None, None] and isinstance(result.failures[3], str)
    assert np.isnan(result.overall[3])
    o = result.overall[:3]
    assert ((o >= 0) & (o <= 1)).all()
    assert o[0] > o[1] > o[2]  # the annotators' taste: clean > tinted (the verifier: equal) > wrong
    assert {"if", "cc", "quality", "ga"} <= set(result.scores)
    verifier = get_reward("verifier").score(samples[:2])
    assert verifier.overall[0] == verifier.overall[1] == 1.0


def _fails(capsys, tmp_path, db, needle):
    out = tmp_path / "never"
    code = reward_model.main(["--db", str(db), "--out", str(out), "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "nothing written" in err
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_missing_and_empty_databases_are_refused(tmp_path, capsys):
    _fails(capsys, tmp_path, tmp_path / "absent.duckdb", "no label database")
    LabelStore.open(tmp_path / "empty.duckdb").close()
    _fails(capsys, tmp_path, tmp_path / "empty.duckdb", "no per-turn judgments")


def test_too_few_judgments_are_refused(tmp_path, capsys):
    with LabelStore.open(tmp_path / "few.duckdb") as store:
        sim.simulate(store, sessions=3, turns=2)
    _fails(capsys, tmp_path, tmp_path / "few.duckdb", "too few judgments")


def test_one_sided_data_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sim, "decide", lambda *args: "A")
    with LabelStore.open(tmp_path / "one.duckdb") as store:
        sim.simulate(store, sessions=24, turns=2)
    _fails(capsys, tmp_path, tmp_path / "one.duckdb", "one-sided")
