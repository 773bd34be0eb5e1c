"""The ``verifier`` reward: exact IF/CC/GA under the reward protocol, quality, failures, registry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mteditlab.editors.reference import IdentityEditor, OracleEditor
from mteditlab.rewards import REWARDS, get_reward
from mteditlab.rewards.base import EditSample, RewardOutput
from mteditlab.rewards.features import image_features
from mteditlab.rewards.verifier import VerifierReward, world_meta
from mteditlab.world import generate_session, render, score_turn


def rollout_samples(n_sessions=4, turns=3):
    """Oracle rollouts on their own outputs, plus the identity editor's output at every turn."""
    oracle, identity = OracleEditor(), IdentityEditor()
    samples = []
    for i in range(n_sessions):
        session = generate_session("val", i, turns)
        image = render(session.source)
        for k, turn in enumerate(session.turns):
            history = [t.instruction for t in session.turns[:k]]
            meta = world_meta(session, k)
            good = oracle.edit(image, turn.instruction, intent=turn.intent)
            same = identity.edit(image, turn.instruction)
            samples.append(EditSample(image, good, turn.instruction, history, turn.intent, dict(meta)))
            samples.append(EditSample(image, same, turn.instruction, history, turn.intent, dict(meta)))
            image = good
    return samples


def test_sub_scores_match_score_turn_on_oracle_and_identity_outputs():
    samples = rollout_samples()
    out = get_reward("verifier").score(samples)
    assert isinstance(out, RewardOutput) and out.n_failures == 0
    assert set(out.scores) == {"if", "cc", "ga", "quality", "match"}
    for i, sample in enumerate(samples):
        k = sample.meta["turn"]
        truth = score_turn(generate_session(**sample.meta["world"]), k, sample.source, sample.edited)
        assert out.scores["if"][i] == float(truth.if_)
        assert out.scores["cc"][i] == float(truth.cc)
        if k == 0:
            assert np.isnan(out.scores["ga"][i])  # no earlier constraint: not applicable
        else:
            assert out.scores["ga"][i] == float(truth.ga)
        assert out.overall[i] == float(truth.success)
    oracle, identity = out.overall[0::2], out.overall[1::2]
    assert oracle.mean() == 1.0 and identity.mean() == 0.0  # the oracle passes, a no-op fails IF
    assert (out.scores["match"][0::2] > 0.99).all() and (out.scores["match"][1::2] < 0.99).all()  # dense success
    assert (out.scores["cc"][1::2] == 1.0).all()


def test_quality_is_one_for_clean_renders_and_lower_for_blur_and_tint():
    session = generate_session("val", 1, 2)
    clean = render(session.turns[0].after)
    blurred = clean.filter(ImageFilter.GaussianBlur(0.6))
    shift = np.array([0, 0, 24] if session.turns[0].after.background in ("gray", "black", "beige")
                     else [0, 0, -24])
    tinted = Image.fromarray(np.clip(np.asarray(clean, dtype=int) + shift, 0, 255).astype(np.uint8))
    meta = world_meta(session, 0)
    src = render(session.source)
    out = VerifierReward().score([EditSample(src, im, "x", meta=meta) for im in (clean, blurred)])
    assert out.scores["quality"][0] > 0.99 > 0.95 > out.scores["quality"][1] > 0.5
    assert out.overall.tolist() == [1.0, 1.0]  # blur does not change the verdict
    feats = image_features(tinted)
    assert feats["tint"] > 0.3 and feats["quality"] < 0.9
    assert image_features(clean)["tint"] < 0.01 and image_features(blurred)["sharpness"] < 0.8


def test_samples_without_ground_truth_are_reported_failures_not_numbers():
    good = rollout_samples(1, 2)[0]
    world = good.meta["world"]
    bad = [
        EditSample(good.source, good.edited, good.instruction),  # no meta
        EditSample(good.source, good.edited, good.instruction, meta={"world": world}),  # no turn
        EditSample(good.source, good.edited, good.instruction, meta={"world": world, "turn": 7}),
        EditSample(good.source, good.edited, good.instruction, meta={"world": {"split": "s"}, "turn": 0}),
        EditSample(good.source, "not an image", good.instruction, meta={"world": world, "turn": 0}),
    ]
    out = VerifierReward().score([good] + bad)
    assert out.failures[0] is None and out.overall[0] == 1.0
    assert all(isinstance(f, str) and f for f in out.failures[1:])
    assert np.isnan(out.overall[1:]).all() and out.n_failures == len(bad)
    for name in ("if", "cc", "quality", "ga"):
        assert np.isnan(out.scores[name][1:]).all()
    assert "meta['world']" in out.failures[1] and "meta['turn']" in out.failures[2]
    assert "out of range" in out.failures[3] and "names no world session" in out.failures[4]


def test_registry():
    assert set(REWARDS) == {"verifier", "judge", "qwen-vl", "calibrated"}
    assert isinstance(get_reward("verifier"), VerifierReward) and get_reward("verifier").name == "verifier"
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(TypeError):
        get_reward("verifier", path="x")
    with pytest.raises(FileNotFoundError, match="training.reward_model"):
        get_reward("calibrated", path="/nonexistent/dir")


def test_samples_are_plain_data_scored_alike_in_another_process():
    """A sample pickles, its ``meta`` round-trips through JSON, and a fresh process scores it alike."""
    import json
    import pickle
    import subprocess
    import sys

    samples = rollout_samples(2, 2)
    assert [json.loads(json.dumps(s.meta)) for s in samples] == [s.meta for s in samples]
    code = ("import pickle, sys\nfrom mteditlab.rewards import get_reward\n"
            "out = get_reward('verifier').score(pickle.load(sys.stdin.buffer))\n"
            "sys.stdout.buffer.write(pickle.dumps((out.scores, out.overall, out.failures)))")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(samples), capture_output=True, check=True)
    scores, overall, failures = pickle.loads(done.stdout)
    here = get_reward("verifier").score(samples)
    assert failures == here.failures and np.array_equal(overall, here.overall)
    assert all(np.array_equal(scores[k], here.scores[k], equal_nan=True) for k in here.scores)
