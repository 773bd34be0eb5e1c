"""Style control: a model that wins only by looking cleaner drops once appearance (the image
features quality and tint of the judged outputs) enters the Bradley–Terry model as covariates.

Real images in a real store: every model draws the correct scene; what differs is how much
noise its outputs carry.  Votes follow σ(θ_A − θ_B + β·(quality_A − quality_B)) with a strong
β: people prefer the clean picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from labeling.store import LabelStore
from labeling.style import (battle_features, fit_contextual_bt, log_likelihood,
                            style_controlled)
from mteditlab.rewards.features import image_features
from mteditlab.world import generate_session, render

# (true strength, noise range): "polished" follows instructions worst but looks cleanest
MODELS = {"polished": (0.0, (0.0, 0.01)), "grainy": (0.6, (0.03, 0.09)),
          "mixed": (0.3, (0.0, 0.09))}
BETA = 25.0   # logit per unit of quality difference


def _noisy(image: Image.Image, sigma: float, rng) -> Image.Image:
    array = np.asarray(image, dtype=float) / 255.0
    array = np.clip(array + rng.normal(0.0, sigma, array.shape), 0, 1)
    return Image.fromarray((array * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = build_style_store(tmp_path_factory.mktemp("style") / "labels.duckdb")
    yield store
    store.close()


def build_style_store(path, n_sources: int = 60) -> LabelStore:
    """A store with real world images from the three :data:`MODELS` and votes swayed by
    appearance (see the module docstring); returned open."""
    rng = np.random.default_rng(0)
    store = LabelStore.open(path)
    names = list(MODELS)
    store.add_annotator("voter")
    for s in range(n_sources):
        session = generate_session("test", s, turns=1)
        source = render(session.source)
        target = render(session.turns[0].after)
        source_sha = store.put_image(source)
        ids, quality = {}, {}
        for name in names:
            lo, hi = MODELS[name][1]
            out = _noisy(target, rng.uniform(lo, hi), rng)
            sha = store.put_image(out)
            quality[name] = image_features(store.get_image(sha))["quality"]
            ids[name] = store.add_session("mini", f"lora:{name}", s, source_sha,
                                          [{"instruction": session.turns[0].instruction,
                                            "output_sha": sha}])
        for a in range(3):
            for b in range(a + 1, 3):
                na, nb = names[a], names[b]
                cid = store.add_comparison(ids[na], ids[nb])
                z = MODELS[na][0] - MODELS[nb][0] + BETA * (quality[na] - quality[nb])
                for turn, criterion in ((0, "overall"), (None, "overall"), (0, "quality")):
                    choice = "A" if rng.random() < 1 / (1 + np.exp(-z)) else "B"
                    store.record_judgment(cid, "voter", turn, criterion, choice, "A", blind=True)
    return store


def test_a_model_that_wins_by_looking_cleaner_drops_under_style_control(store):
    frame = store.judgments_frame()
    feats = battle_features(store, frame)
    assert feats.notna().all().all()
    table, coefficients = style_controlled(frame, feats, n_boot=100)
    rows = table.set_index("model")
    polished, grainy = "mini+lora:polished", "mini+lora:grainy"
    # plain ratings: the clean-looking model is on top
    assert rows.loc[polished, "rating"] > rows.loc[grainy, "rating"]
    # controlled: the model that follows instructions better is on top, the other drops
    assert rows.loc[grainy, "controlled"] > rows.loc[polished, "controlled"]
    assert rows.loc[polished, "change"] < -100
    assert table["model"].iloc[-1] == polished        # first on the plain board, last here
    assert rows.loc[polished, "rating"] == rows["rating"].max()
    quality = coefficients.set_index("feature").loc["quality"]
    assert quality["lower"] > 0          # appearance sways votes, clearly


def test_features_of_whole_session_votes_are_the_turn_means(tmp_path):
    rng = np.random.default_rng(0)
    with LabelStore.open(tmp_path / "labels.duckdb") as store:
        store.add_annotator("voter")
        for s in range(3):       # three-turn sessions, each turn's output noisier than the last
            session = generate_session("test", s, turns=3)
            source_sha = store.put_image(render(session.source))
            ids = [store.add_session("mini", f"lora:{name}", s, source_sha, [
                {"instruction": turn.instruction,
                 "output_sha": store.put_image(_noisy(render(turn.after), sigma, rng))}
                for turn, sigma in zip(session.turns, np.array([0.0, 0.04, 0.08]) + shift)])
                for name, shift in (("a", 0.0), ("b", 0.01))]
            cid = store.add_comparison(*ids)
            for turn in (None, 0, 1, 2):
                store.record_judgment(cid, "voter", turn, "overall", "A", "A", blind=True)
        frame = store.judgments_frame()
        feats = battle_features(store, frame)
    for _, votes in frame.groupby("comparison_id"):
        whole, turns = votes.index[votes["turn"].isna()], votes.index[votes["turn"].notna()]
        for column in feats.columns:
            per_turn = feats.loc[turns, column].to_numpy()
            assert feats.loc[whole, column].item() == pytest.approx(per_turn.mean())
            if column.startswith("quality"):     # the mean is neither the first nor the last turn's
                assert per_turn.mean() not in (pytest.approx(per_turn[0]), pytest.approx(per_turn[-1]))


def test_contextual_fit_recovers_known_parameters():
    rng = np.random.default_rng(1)
    n, m = 6000, 3
    theta_true = np.array([-0.5, 0.0, 0.5])
    gamma_true = np.array([0.8, -0.3])
    i = rng.integers(m, size=n)
    j = (i + rng.integers(1, m, size=n)) % m
    x = rng.normal(size=(n, 2))
    z = theta_true[i] - theta_true[j] + x @ gamma_true
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    theta, gamma = fit_contextual_bt(i, j, y, x, m)
    assert np.allclose(theta, theta_true, atol=0.1)
    assert np.allclose(gamma, gamma_true, atol=0.1)
    assert abs(theta.sum()) < 1e-9
    # the joint fit is the likelihood maximum: moving any parameter lowers it
    best = log_likelihood(i, j, y, x, theta, gamma)
    for k in range(2):
        nudged = gamma.copy()
        nudged[k] += 0.05
        assert log_likelihood(i, j, y, x, theta, nudged) < best
