"""The world's learned ``judge``: the committed checkpoint through the reward protocol, ranking, failure
reporting, the training data's labels, and a two-step end-to-end training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mteditlab.rewards.base import EditSample, RewardOutput, combine_overall
from mteditlab.rewards.mini_judge import DEFAULT_CHECKPOINT, MiniJudge, text_segments
from mteditlab.world import generate_session, render, score_turn

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def judge() -> MiniJudge:
    return MiniJudge.from_pretrained()


def _sample(session, k, edited=None) -> EditSample:
    turn = session.turns[k]
    return EditSample(source=render(turn.before), edited=edited or render(turn.after), instruction=turn.instruction,
                      history=[t.instruction for t in session.turns[:k]], intent=turn.intent)


def test_committed_checkpoint_is_small_and_documented():
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir() if p.is_file())
    assert size < 5 * 2**20
    card = (DEFAULT_CHECKPOINT / "MODEL_CARD.md").read_text()
    assert "python -m training.judge --eval-only" in card and "AUC" in card


def test_committed_judge_scores_a_batch_through_the_protocol(judge):
    sessions = [generate_session("test", i) for i in range(6)]
    samples = [_sample(s, k) for s in sessions for k in (0, 2)]
    samples.append(_sample(sessions[0], 3, edited=render(sessions[0].turns[3].after, 64)))  # other size: resized
    out = judge.score(samples)
    assert isinstance(out, RewardOutput) and out.n_failures == 0
    assert set(out.scores) == {"if", "cc", "ga", "quality"}
    for name, values in out.scores.items():
        finite = values[np.isfinite(values)]
        assert ((finite >= 0) & (finite <= 1)).all(), name
    has_history = np.array([bool(s.history) for s in samples])
    assert np.isnan(out.scores["ga"][~has_history]).all() and np.isfinite(out.scores["ga"][has_history]).all()
    for name in ("if", "cc", "quality"):
        assert np.isfinite(out.scores[name]).all()
    np.testing.assert_allclose(out.overall, combine_overall(out.scores, "mean"))
    again = judge.score(samples, seed=7)  # deterministic, seed unused
    np.testing.assert_array_equal(out.overall, again.overall)
    from mteditlab.rewards import get_reward
    assert get_reward("judge").name == "judge"


def test_judge_ranks_the_correct_edit_above_the_identity(judge):
    correct, identity = [], []
    for i in range(16):
        session = generate_session("test", 100 + i)
        k = i % 5
        correct.append(_sample(session, k))
        identity.append(_sample(session, k, edited=render(session.turns[k].before)))
    a, b = judge.score(correct).overall, judge.score(identity).overall
    assert (a > b).mean() >= 0.8, (a, b)
    assert judge.score(correct).scores["if"].mean() > 0.6 > judge.score(identity).scores["if"].mean()


def test_failures_are_reported_not_numbers(judge):
    session = generate_session("test", 0)
    good = _sample(session, 1)
    bad = [
        EditSample(source=good.source, edited="not an image", instruction="remove it"),
        EditSample(source=None, edited=good.edited, instruction="remove it"),
        EditSample(source=good.source, edited=good.edited, instruction="   "),
        EditSample(source=good.source, edited=good.edited, instruction="remove it", history="add a circle"),
        EditSample(source=good.source, edited=Image.new("RGB", (0, 0)), instruction="remove it"),
        "not a sample",
    ]
    out = judge.score([good, *bad])
    assert out.failures[0] is None and np.isfinite(out.overall[0])
    assert all(isinstance(f, str) for f in out.failures[1:]), out.failures
    assert "edited is not a PIL image" in out.failures[1] and "source" in out.failures[2]
    assert np.isnan(out.overall[1:]).all()
    for values in out.scores.values():
        assert np.isnan(values[1:]).all()
    empty = judge.score([])
    assert empty.overall.shape == (0,)


def test_missing_checkpoint_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m training.judge"):
        MiniJudge.from_pretrained(tmp_path / "nowhere")


def test_text_segments():
    history = ["add a red circle at the top left", "make it bigger"]
    assert text_segments("move it up", history, "move the large red circle at the top left down") == [
        (0, "move it up"), (1, "move the large red circle at the top left down"),
        (2, "make it bigger"), (3, "add a red circle at the top left")]
    concat = "; ".join(history + ["move it up"])  # the ``concat`` intent mode: history is read separately
    assert text_segments("move it up", history, concat) == text_segments("move it up", history, None)
    assert len(text_segments("x", [f"h{i}" for i in range(20)], None, max_history=8)) == 9


def test_training_labels_are_the_verifiers():
    from training.judge_data import synthetic_examples

    examples = synthetic_examples("train", 2, branches=4, forced=("identity",), seed=3)
    assert len(examples) == 2 * 5 * 4
    assert {m["defect"] for m in examples.meta} >= {"identity"}
    for i, m in enumerate(examples.meta):
        session = generate_session("train", m["session"])
        verdict = score_turn(session, m["turn"], Image.fromarray(examples.source[i]),
                             Image.fromarray(examples.edited[i]))
        expected = [verdict.if_, verdict.cc, verdict.ga if m["turn"] else np.nan]
        np.testing.assert_array_equal(examples.labels[i, :3], np.array(expected, dtype=np.float32))
        assert 0 <= examples.labels[i, 3] <= 1


def test_training_runs_two_steps_end_to_end(tmp_path):
    from training.judge import main

    out = tmp_path / "judge"
    report = main(["--sessions", "2", "--branches", "3", "--steps", "2", "--batch-size", "4", "--val-sessions", "1",
                   "--eval-sessions", "1", "--eval-editor", "none", "--eval-every", "1", "--work", str(tmp_path),
                   "--out", str(out), "--no-progress"])
    assert report["overall"]["n"] == 5 * 4
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert {"if", "cc", "ga", "quality", "success"} <= set(saved["overall"])
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 2
    trained = MiniJudge.from_pretrained(out)
    result = trained.score([_sample(generate_session("val", 0), 1)])
    assert result.n_failures == 0 and trained.info["steps"] == 2


def test_editor_outputs_are_labelled_by_the_verifier(tmp_path):
    from mteditlab.editors import get_editor
    from training.judge import main
    from training.judge_data import editor_examples

    examples = editor_examples(get_editor("identity"), "train", 2, progress=False)
    assert len(examples) == 10 and {m["origin"] for m in examples.meta} == {"identity"}
    assert (examples.labels[:, 0] == 0).all() and (examples.labels[:, 1] == 1).all()  # no change: IF fails, CC holds
    with pytest.raises(SystemExit, match="python -m training.pretrain"):
        main(["--editor-outputs", "3", "--editor-path", str(tmp_path / "no-editor"), "--work", str(tmp_path)])
