"""The multi-turn benchmark harness, checked with the two reference editors."""

import json

from mteditlab.bench import main


def test_oracle_succeeds_at_every_turn_and_writes_json_and_plot(tmp_path):
    result = main(["--editor", "oracle", "--sessions", "12", "--turns", "4", "--split", "val",
                   "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["editor"] == "oracle" and saved["split"] == "val" and saved["sessions"] == 12
    assert [r["turn"] for r in saved["per_turn"]] == [1, 2, 3, 4]
    for row in result["per_turn"]:
        assert row["overall"] == row["success"] == row["marginal"] == 1.0
        assert row["exposure_gap"] == 0.0
        assert row["quality"] > 0.99 and row["tint_255"] < 0.5   # clean renders on the palette
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_identity_never_follows_an_instruction():
    result = main(["--editor", "identity", "--sessions", "12", "--turns", "3"])
    assert all(row["if"] == 0.0 and row["cc"] == 1.0 and row["overall"] == 0.0 for row in result["per_turn"])


def test_a_saved_result_is_paired_without_running_it_again(tmp_path):
    saved = tmp_path / "identity.json"
    main(["--editor", "identity", "--sessions", "10", "--turns", "2", "--json", str(saved)])
    result = main(["--editor", "oracle", "--sessions", "10", "--turns", "2", "--against-result", str(saved)])
    assert result["against"]["editor"] == "identity"
    assert [row["delta_success"] for row in result["paired"]] == [1.0, 1.0]   # oracle passes, identity never
    try:
        main(["--editor", "oracle", "--sessions", "10", "--turns", "3", "--against-result", str(saved)])
    except ValueError as error:
        assert "same split, sessions, turns and seed" in str(error)
    else:
        raise AssertionError("a result over other turns was paired")


def test_without_the_teacher_forced_pass_the_rest_is_the_same():
    full = main(["--editor", "identity", "--sessions", "8", "--turns", "3", "--split", "val"])
    own = main(["--editor", "identity", "--sessions", "8", "--turns", "3", "--split", "val", "--no-teacher-forced"])
    assert "exposure_gap" not in own["per_session"] and "exposure_gap" not in own["per_turn"][0]
    assert own["per_session"] == {k: v for k, v in full["per_session"].items()
                                  if k not in ("teacher_forced_success", "exposure_gap")}
    assert [row["delta_overall"] for row in main(
        ["--editor", "identity", "--sessions", "8", "--turns", "3", "--split", "val", "--no-teacher-forced",
         "--against", "base"])["paired"]] == [0.0, 0.0, 0.0]
