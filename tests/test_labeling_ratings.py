"""Bradley–Terry leaderboard: against an independent fit, interval coverage, ranks, slices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from labeling import ratings


def simulate(theta, n, rng, tie_rate=0.0, models=None):
    """Battles between random model pairs under P(a beats b) = σ(θa − θb)."""
    m = len(theta)
    models = models or [f"m{k}" for k in range(m)]
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    p = 1 / (1 + np.exp(theta[b] - theta[a]))
    choice = np.where(rng.random(n) < p, "A", "B")
    choice = np.where(rng.random(n) < tie_rate, "tie", choice)
    names = np.array(models)
    return pd.DataFrame({"model_a": names[a], "model_b": names[b], "choice": choice})


def independent_fit(frame, models):
    """Plain (unpenalised) MLE by scipy on the raw rows; ties enter as two half-weight rows;
    θ of the first model pinned to 0, then centred."""
    idx = {m: k for k, m in enumerate(models)}
    a = frame.model_a.map(idx).to_numpy()
    b = frame.model_b.map(idx).to_numpy()
    won = frame.choice.map({"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}).to_numpy()

    def nll(free):
        theta = np.concatenate([[0.0], free])
        d = theta[a] - theta[b]
        value = -(won * -np.logaddexp(0, -d) + (1 - won) * -np.logaddexp(0, d)).sum()
        g_row = -(won - 1 / (1 + np.exp(-d)))
        grad = np.bincount(a, g_row, len(models)) - np.bincount(b, g_row, len(models))
        return value, grad[1:]

    res = minimize(nll, np.zeros(len(models) - 1), jac=True, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10_000})
    theta = np.concatenate([[0.0], res.x])
    return theta - theta.mean()


def test_fit_matches_independent_scipy_mle():
    rng = np.random.default_rng(7)
    truth = rng.normal(0, 0.7, 8)
    frame = simulate(truth, 6000, rng, tie_rate=0.15)
    frame.loc[frame.index[:200], "choice"] = "both_bad"
    pc = ratings.pair_counts(frame)
    ours = ratings.fit_ratings(pc.win_matrix())
    theirs = independent_fit(frame, list(pc.models))
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert abs(ours.sum()) < 1e-9  # centred, as the ridge implies
    table = ratings.ratings_table(frame, n_boot=50)
    by_model = table.set_index("model").loc[list(pc.models)]
    np.testing.assert_allclose(by_model.rating, ratings.to_elo(theirs),
                               atol=1e-3 * ratings.ELO_SCALE)
    assert by_model.battles.sum() == 2 * len(frame)


def test_bootstrap_intervals_cover_the_truth():
    truth = np.array([-0.8, -0.3, 0.0, 0.4, 0.7])
    truth_elo = ratings.to_elo(truth - truth.mean())
    rng = np.random.default_rng(11)
    hits, total = 0, 0
    for sim in range(120):
        table = ratings.ratings_table(simulate(truth, 600, rng), n_boot=300, seed=sim)
        table = table.set_index("model").loc[[f"m{k}" for k in range(5)]]
        hits += ((table.lower <= truth_elo) & (truth_elo <= table.upper)).sum()
        total += 5
    assert 0.90 <= hits / total <= 0.99, hits / total


def test_bootstrap_is_seeded_and_vectorised():
    rng = np.random.default_rng(0)
    frame = simulate(np.linspace(-1, 1, 6), 2000, rng, tie_rate=0.1)
    first = ratings.leaderboard(frame, n_boot=200, seed=5)
    pd.testing.assert_frame_equal(first, ratings.leaderboard(frame, n_boot=200, seed=5))
    assert not first.lower.equals(ratings.leaderboard(frame, n_boot=200, seed=6).lower)
    boots = ratings.bootstrap_ratings(ratings.pair_counts(frame), 200, 5)
    assert boots.shape == (200, 6)
    np.testing.assert_allclose(boots.mean(1), ratings.ELO_BASE)


def test_ties_count_half_and_both_bad_is_a_tie():
    frame = pd.DataFrame({"model_a": ["x"] * 3, "model_b": ["y"] * 3,
                          "choice": ["A", "tie", "both_bad"]})
    theta = ratings.fit_ratings(ratings.pair_counts(frame).win_matrix(), l2=1e-9)
    assert theta[0] - theta[1] == pytest.approx(np.log(2.0), abs=1e-6)  # 2 wins vs 1
    table = ratings.ratings_table(frame, n_boot=20).set_index("model")
    assert table.loc["x", ["wins", "ties", "both_bad", "losses"]].tolist() == [1, 1, 1, 0]
    assert table.loc["x", "win_rate"] == pytest.approx(2 / 3)
    swapped = frame.assign(model_a="y", model_b="x",
                           choice=frame.choice.replace({"A": "B"}))
    pd.testing.assert_frame_equal(ratings.ratings_table(swapped, n_boot=20),
                                  ratings.ratings_table(frame, n_boot=20))


def test_rank_counts_models_whose_lower_bound_beats_my_upper_bound():
    lower = np.array([10.0, 5.0, 4.0, 0.0])
    upper = np.array([12.0, 11.0, 6.0, 4.5])
    assert ratings.rank_by_intervals(lower, upper).tolist() == [1, 1, 2, 3]


def test_slices_win_rates_gold_and_plots(tmp_path):
    rng = np.random.default_rng(2)
    parts = []
    for turn in (None, 0, 1, 2):
        part = simulate(np.array([0.5, 0.0, -0.5]), 300, rng, tie_rate=0.1,
                        models=["good", "mid", "bad"])
        parts.append(part.assign(turn=turn, criterion=rng.choice(["overall", "quality"], 300)))
    frame = pd.concat(parts, ignore_index=True)
    frame["turn"] = frame["turn"].astype("Int32")
    frame["gold"] = False
    planted = frame.iloc[:5].assign(model_b=frame.iloc[:5].model_a, gold=True)
    frame = pd.concat([frame, planted], ignore_index=True)
    by_turn = ratings.leaderboard(frame, by="turn", n_boot=50)
    assert list(by_turn.turn.cat.categories) == ["overall", "0", "1", "2"]
    assert (by_turn.groupby("turn", observed=True).battles.sum() == 600).all()
    assert (by_turn.groupby("turn", observed=True).model.first() == "good").all()
    by_crit = ratings.leaderboard(frame, by="criterion", n_boot=50)
    assert set(by_crit.criterion) == {"overall", "quality"}
    with pytest.raises(ValueError):
        ratings.leaderboard(frame, by="annotator")
    with pytest.raises(ValueError, match="itself"):
        ratings.pair_counts(planted.drop(columns="gold"))
    rates, counts = ratings.win_rate_matrix(frame)
    both = rates.loc["good", "bad"] + rates.loc["bad", "good"]
    assert both == pytest.approx(1.0) and np.isnan(rates.loc["good", "good"])
    assert counts.loc["good", "bad"] == counts.loc["bad", "good"] > 0
    by_turn_rates = ratings.win_rate_by_turn(frame)
    assert set(by_turn_rates.turn) == {0, 1, 2}
    assert by_turn_rates.battles.sum() == 2 * 900
    ratings.plot_ratings(ratings.ratings_table(frame, n_boot=50), tmp_path / "r.png")
    ratings.plot_win_rate_by_turn(frame, tmp_path / "t.png")
    for name in ("r.png", "t.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disconnected_models_warn():
    frame = pd.DataFrame({"model_a": ["a", "c"], "model_b": ["b", "d"], "choice": ["A", "B"]})
    with pytest.warns(UserWarning, match="connected"):
        ratings.ratings_table(frame, n_boot=10)


def test_provisional_models_are_set_apart_and_open_intervals_marked(tmp_path):
    rng = np.random.default_rng(4)
    frame = simulate(np.array([0.4, 0.0, -0.4]), 300, rng, tie_rate=0.1,
                     models=["a", "b", "c"])
    lucky = pd.DataFrame({"model_a": ["new"], "model_b": ["c"], "choice": ["A"]})
    plain = ratings.ratings_table(frame, n_boot=50).set_index("model")
    table = ratings.ratings_table(pd.concat([frame, lucky]), n_boot=50, min_battles=20)
    assert list(table["provisional"]) == [False, False, False, True]
    new = table.set_index("model").loc["new"]
    assert pd.isna(new["rating"]) and pd.isna(new["rank"]) and new["battles"] == 1
    assert "provisional" in new["note"]
    ranked = table[~table["provisional"]].set_index("model")
    # the one-vote model moves nobody: the ranked fit is the fit without it
    np.testing.assert_allclose(ranked.loc[plain.index, "rating"], plain["rating"])
    assert ranked.loc["c", "battles"] == plain.loc["c", "battles"] + 1   # counts: all battles
    # 40-0: no finite MLE; the interval is open on that side and the note says so
    sweep = pd.DataFrame({"model_a": ["x"] * 40, "model_b": ["y"] * 40, "choice": ["A"] * 40})
    board = ratings.ratings_table(sweep, n_boot=50, min_battles=20).set_index("model")
    assert board.loc["x", "upper"] == np.inf and "never lost" in board.loc["x", "note"]
    assert board.loc["y", "lower"] == -np.inf and "never won" in board.loc["y", "note"]
    assert board.loc["x", "rank"] == 1 and board.loc["y", "rank"] == 2
    ratings.plot_ratings(board.reset_index(), tmp_path / "open.png")
    ratings.plot_ratings(table, tmp_path / "prov.png")
    by_turn = ratings.leaderboard(pd.concat([frame, lucky]).assign(turn=pd.NA), by="turn",
                                  n_boot=20, min_battles=20)
    assert by_turn["provisional"].tolist() == [False, False, False, True]
