"""The benchmark on data sessions, and the world's figures unchanged.

On a MagicBrush-shaped Parquet file (``tests/test_sessions_data.py``): a tiny random-weight FLUX.1
Kontext (a diffusers pipeline directory) is trained one iteration against a tiny Qwen-VL judge served
over HTTP on 127.0.0.1 (on a copy with three broken sessions added, which it lists and leaves out),
benchmarked with its adapter against the base (paired, teacher-forced, judged by the same served
judge), and the paired sessions go to the label queue; a served judge that fails
on some turns is counted and never scored; records that do not form a session are skipped with their
reason; the mini editor and the world's small judge run the same on photos, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labeling.cli import main as labeling_main
from labeling.store import LabelStore
from mteditlab.bench import main, paired
from tests.chat_server import ChatServer, digit_reply, error
from tests.test_sessions_data import SESSIONS, broken_rows, photo, write_magicbrush
from tests.tiny_pipelines import tiny_kontext
from tests.tiny_qwen_vl import served_tiny_judge
from training.config import parse_args
from training.grpo import train

ROOT = Path(__file__).resolve().parents[1]
WORLD_REFERENCE = Path(__file__).parent / "data" / "bench_mini_val40.json"
TRAIN = ["--lora", "--editor", "kontext", "--sessions-per-step", "2", "--num-generations", "2", "--turns", "2",
         "--steps", "3", "--sde-window", "1", "--lora-rank", "2", "--lora-alpha", "4", "--resolution", "32",
         "--algo", "nft", "--iterations", "1"]
TURNS = {name: len(turns) for name, (_, _, turns) in SESSIONS.items()}


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-kontext")
    tiny_kontext().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def magicbrush(tmp_path_factory) -> Path:
    return write_magicbrush(tmp_path_factory.mktemp("magicbrush") / "magicbrush.parquet")


@pytest.fixture(scope="module")
def tiny_judge():
    with served_tiny_judge() as (server, vocab):
        yield f"{server.url}?model=tiny-qwen-vl&top_logprobs={vocab}&min_score_mass=0&sub_scores=if+cc+ga"


def test_kontext_trained_on_magicbrush_is_benchmarked_against_base_and_labelled(tmp_path, kontext_dir, magicbrush,
                                                                                tiny_judge, capsys):
    run, with_broken = tmp_path / "run", write_magicbrush(tmp_path / "with-broken.parquet", broken_rows())
    train(parse_args([*TRAIN, "--editor-path", str(kontext_dir), "--sessions-from", str(with_broken),
                      "--reward", "qwen-vl=1.0", "--reward-paths", f"qwen-vl={tiny_judge}", "--out", str(run)]))
    logged = capsys.readouterr().err   # the trainer reads the same way: what does not form a session is listed
    assert "skipped 3 session(s)" in logged and "gap: missing turn 2 (has turns 1, 3)" in logged
    assert "odd: turn index '2b' (turn_index) is not an integer" in logged and "broken: image not readable" in logged
    out, db = tmp_path / "bench.json", tmp_path / "labels" / "labels.duckdb"
    assert labeling_main(["--db", str(db), "queue-bench", "--editor", "kontext", "--editor-path", str(kontext_dir),
                          "--adapter", str(run / "adapter"), "--sessions-from", str(magicbrush), "--resolution", "32",
                          "--steps", "2", "--reward", "qwen-vl", "--reward-paths", f"qwen-vl={tiny_judge}",
                          "--against", "base", "--teacher-forced", "--json", str(out),
                          "--plot", str(tmp_path / "bench.png")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["sessions"] == 4 and saved["skipped"] == [] and saved["turns"] == 3 and saved["reward"] == "qwen-vl"
    assert saved["session_ids"] == list(SESSIONS) and saved["failures"] == []
    assert [row["n"] for row in saved["per_turn"]] == [4, 3, 1]   # each session up to its last turn
    for side in (saved, saved["against"]):
        for row in side["per_turn"]:
            assert row["failures"] == 0 and row["overall_n"] == row["n"]
            for key in ("if", "cc", "score", "success", "overall", "l1", "psnr", "exposure_gap"):
                assert row[key] is not None and row[f"{key}_se"] >= 0
            assert 0 <= row["if"] <= 1 and 0 < row["l1"] < 1 and row["psnr"] > 0
        assert side["per_turn"][0]["ga"] is None and side["per_turn"][1]["ga"] is not None   # GA needs history
        assert side["per_turn"][0]["exposure_gap"] == 0   # turn 1 is fed the data's source either way
        ga = np.array(side["per_session"]["ga"], dtype=float)
        assert np.isnan(ga[:, 0]).all() and np.isnan(ga[3, 1:]).all()   # the one-turn session has no turn 2
    assert saved["paired"] == paired(saved, saved["against"])   # the JSON holds both sides
    assert any(row["delta_l1"] for row in saved["paired"])   # the trained adapter changes the outputs
    assert {"delta_if_se", "delta_overall", "delta_exposure_gap", "delta_psnr"} <= set(saved["paired"][0])
    assert saved["lora"] == str(run / "adapter") and saved["against"]["lora"] is None
    assert "| turn | n | failures | if | cc | ga | score |" in printed and "Δ = this − base" in printed
    assert (tmp_path / "bench.png").stat().st_size > 1000

    with LabelStore.open(db) as store:   # the paired sessions are the annotators' queue's items
        assert "4 labeling items" in printed and store.counts()["comparisons"] == 4
        store.add_annotator("annotator-1")
        served = []
        while (assignment := store.next_assignment("annotator-1")) is not None:
            item = store.get_comparison(assignment.comparison_id)
            served.append(item["instructions"])
            assert {item["A"]["model"], item["B"]["model"]} == {f"kontext+{run / 'adapter'}", "kontext"}
            store.record_submission("annotator-1", assignment.comparison_id, assignment.left,
                                    [(k, "overall", "A", 900.0) for k in range(len(item["instructions"]))]
                                    + [(None, "overall", "tie", 1200.0)], blind=True)
        assert sorted(served) == sorted([t for t, _ in turns] for _, _, turns in SESSIONS.values())
        assert len(store.judgments_frame(include_simulated=False)) == sum(TURNS.values()) + 4


def judge_failing_on(instruction: str):
    """A served judge scoring by the request's size (so scores vary), answering HTTP 500 to every chat
    about ``instruction``, whatever the turn's input or output."""
    def respond(route, body, headers):
        if route == "models":
            return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
        if f"Current instruction: {instruction}" in json.dumps(body):
            return error(500, "engine overloaded")
        p = 0.1 + 0.8 * (len(json.dumps(body)) % 11) / 10
        return digit_reply({"9": p, "0": 1 - p})
    return respond


def test_failed_judgments_are_counted_and_never_scored(tmp_path, magicbrush, capsys):
    with ChatServer(judge_failing_on("add a white cloud")) as server:   # session 327726, turn 2
        result = main(["--editor", "identity", "--sessions-from", str(magicbrush), "--reward", "qwen-vl",
                       "--reward-paths", f"qwen-vl={server.url}?model=scripted&retries=0&sub_scores=if+cc",
                       "--teacher-forced", "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))   # NaN written as null
    assert {(f["session"], f["turn"], f["fed"]) for f in result["failures"]} == {("327726", 2, "own"), ("327726", 2, "data")}
    assert "HTTP 500" in result["failures"][0]["reason"] and "session 327726, turn 2" in printed
    assert [row["failures"] for row in result["per_turn"]] == [0, 1, 0]
    cells = {k: np.array(v, dtype=float) for k, v in result["per_session"].items()}
    landscape = list(SESSIONS).index("327726")
    assert np.isnan(cells["score"][landscape, 1]) and not np.isnan(cells["score"][landscape, 2])   # only that turn
    assert np.isnan(cells["overall"][landscape, 1:]).all() and not np.isnan(cells["overall"][landscape, 0])
    assert [row["overall_n"] for row in result["per_turn"]] == [4, 2, 0]   # left out from the failed turn on
    second = result["per_turn"][1]
    assert second["score"] == pytest.approx(np.nanmean(cells["score"][:, 1]))   # mean of the 2 scored, not 3
    assert second["overall"] == pytest.approx(np.nanmean(cells["overall"][:, 1]))
    assert result["per_turn"][2]["overall"] is None and result["per_turn"][2]["marginal"] == 0.0
    assert cells["l1"][landscape, 0] > 0 and np.isnan(cells["exposure_gap"][landscape, 1])   # failed on both feeds


def test_broken_records_are_skipped_and_mini_is_judged_offline_on_photos(tmp_path, capsys):
    """The mini editor with the world's small judge on photos, no network: a missing turn, an unreadable
    image and a non-integer turn index are each skipped with their reason, and the run completes; the
    result pairs with a saved one as on the world."""
    data = write_magicbrush(tmp_path / "broken.parquet", broken_rows())
    base = tmp_path / "base.json"
    main(["--editor", "mini", "--sessions-from", str(data), "--reward", "judge", "--json", str(base)])
    result = main(["--editor", "mini", "--adapter", str(ROOT / "checkpoints" / "mini" / "grpo"), "--sessions-from",
                   str(data), "--reward", "judge", "--against-result", str(base), "--plot", str(tmp_path / "p.png")])
    printed = capsys.readouterr().out
    reasons = {s["session"]: s["reason"] for s in result["skipped"]}
    assert reasons["gap"] == "missing turn 2 (has turns 1, 3)" and reasons["odd"].startswith("turn index '2b'")
    assert reasons["broken"].startswith("image not readable") and len(reasons) == 3
    assert "skipped 3 session(s) that do not form one" in printed and "gap: missing turn 2" in printed
    assert result["sessions"] == 4 and result["failures"] == [] and result["reward"] == "judge"
    assert [row["n"] for row in result["per_turn"]] == [4, 3, 1]
    assert all(0 <= row["score"] <= 1 and row["quality"] is not None for row in result["per_turn"])
    assert [row["turn"] for row in result["paired"]] == [1, 2, 3] and "delta_score" in result["paired"][0]
    assert (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="these differ: session_ids"):
        paired(result, {**result["against"], "session_ids": ["other"]})


def test_data_and_world_options_are_not_mixed(magicbrush, capsys):
    for argv, message in ((["--reward", "judge"], "--reward: for data sessions"),
                          (["--sessions-from", str(magicbrush)], "data sessions have no verifier"),
                          (["--sessions-from", str(magicbrush), "--reward", "judge", "--pass-at", "2"], "--teacher-forced"),
                          (["--sessions-from", "labels.duckdb", "--reward", "judge"], "read by the trainer"),
                          (["--sessions-from", str(magicbrush), "--reward", "judge", "--split", "dev",
                            "--session-key", "episode"], "no column 'episode'")):
        with pytest.raises(SystemExit):
            main(["--editor", "identity", *argv])
        assert message in capsys.readouterr().err


def test_queue_bench_needs_a_paired_run_on_data(tmp_path, magicbrush, capsys):
    db = tmp_path / "labels.duckdb"
    assert labeling_main(["--db", str(db), "queue-bench", "--editor", "identity", "--sessions-from", str(magicbrush),
                          "--reward", "judge"]) == 2
    assert "give --sessions-from DATA and --against" in capsys.readouterr().err and not db.exists()


def test_the_worlds_figures_are_unchanged():
    """The mini editor with the shipped GRPO adapter against the base on val sessions 40–55 × 4 turns:
    the same JSON, number for number, as the world's benchmark gave before data sessions were added."""
    expected = json.loads(WORLD_REFERENCE.read_text())
    result = main(["--editor", "mini", "--adapter", str(ROOT / "checkpoints" / "mini" / "grpo"), "--against", "base",
                   "--sessions", "16", "--turns", "4", "--split", "val", "--start", "40"])
    result = {k: v for k, v in result.items() if k != "seconds"}      # wall time, not a figure
    assert json.loads(json.dumps({**result, "lora": expected["lora"]})) == expected
    assert not any(isinstance(v, float) and math.isnan(v) for row in result["per_turn"] for v in row.values())


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight DINOv2 and CLIP, each saved with its image processor as a local folder."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    root, small = tmp_path_factory.mktemp("vision"), dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    crop = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    Dinov2Model(Dinov2Config(**small, num_hidden_layers=2, image_size=28, patch_size=14)).save_pretrained(root / "dino")
    BitImageProcessor(**crop).save_pretrained(root / "dino")
    CLIPModel(CLIPConfig(text_config=dict(**small, num_hidden_layers=1, vocab_size=99), projection_dim=16,
                         vision_config=dict(**small, num_hidden_layers=1, image_size=28, patch_size=14))
              ).save_pretrained(root / "clip")
    CLIPImageProcessor(**crop).save_pretrained(root / "clip")
    return {"dino": root / "dino", "clip": root / "clip"}


def test_outputs_are_compared_with_their_references_in_a_vision_models_space(tmp_path, magicbrush, vision_models):
    from mteditlab.similarity import ImageSimilarity

    images = [Image.fromarray((photo(kind, seed) * 255).astype(np.uint8)) for kind, seed in (("landscape", 1),
                                                                                                ("texture", 2))]
    for path in vision_models.values():
        cos = ImageSimilarity(path)(images, [images[0], images[0]])
        assert cos[0] == pytest.approx(1.0, abs=1e-5) and -1 <= cos[1] < 0.999
    base = tmp_path / "base.json"
    main(["--editor", "identity", "--sessions-from", str(magicbrush), "--reward", "judge", "--json", str(base),
          "--similarity-model", str(vision_models["dino"])])
    result = main(["--editor", "mini", "--sessions-from", str(magicbrush), "--reward", "judge", "--against-result",
                   str(base), "--similarity-model", str(vision_models["dino"])])
    assert all(-1 <= row["similarity"] <= 1 and row["similarity_se"] >= 0 for row in result["per_turn"])
    assert all("delta_similarity" in row for row in result["paired"])
    with pytest.raises(FileNotFoundError, match="no model here"):
        ImageSimilarity(tmp_path / "nowhere")
