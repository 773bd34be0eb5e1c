"""Sessions from data (JSONL, Parquet, ``datasets``), backend resolutions, and arena sessions read
back from the app's DuckDB label store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mteditlab.intent import TurnIntents
from mteditlab.sessions_data import (KONTEXT_RESOLUTIONS, area_size, fit_image, read_sessions, target_size,
                                     with_turns)
from training.session_sources import fold_prefixes, sessions_from

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sessions"


# ---- resolutions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size, expected", [((320, 192), (1328, 800)), ((256, 256), (1024, 1024)),
                                            ((192, 256), (880, 1184)), ((100, 400), (672, 1568))])
def test_kontext_size_is_the_preferred_resolution_of_closest_aspect(size, expected):
    assert target_size("kontext", *size) == expected
    ratio = size[0] / size[1]
    assert all(abs(ratio - expected[0] / expected[1]) <= abs(ratio - w / h) for w, h in KONTEXT_RESOLUTIONS)


def test_area_sizes_keep_the_aspect_in_multiples():
    w, h = area_size(320, 192, 512 * 512)
    assert (w, h) == (656, 400) and w % 16 == h % 16 == 0
    assert abs(w / h / (320 / 192) - 1) < 0.02 and abs(w * h / (512 * 512) - 1) < 0.01
    w, h = target_size("qwen-edit", 1600, 900)
    assert w % 32 == h % 32 == 0 and abs(w * h - 1024 ** 2) / 1024 ** 2 < 0.03 and abs(w / h - 16 / 9) < 0.02
    assert target_size(None, 37, 21) == (37, 21) and target_size((64, 48), 320, 192) == (64, 48)
    assert area_size(4000, 10, 256) == (320, 16)  # never below one multiple
    with pytest.raises(ValueError, match="resolution"):
        target_size("sdxl", 10, 10)


# ---- files and datasets ----------------------------------------------------------------------------
def test_example_dataset_reads_with_intents_references_and_resizing():
    sessions = read_sessions(EXAMPLES)
    assert [s.id for s in sessions] == ["world-3", "world-11", "landscape", "still-life"]
    world, landscape, still = sessions[0], sessions[2], sessions[3]
    assert world.source.size == (256, 256) and len(world.turns) == 3
    assert all(t.intent and t.reference.size == (256, 256) for t in world.turns)
    assert landscape.source.size == (320, 192) and all(t.intent is None and t.reference is None for t in landscape.turns)
    assert [t.intent for t in still.turns] == [None, "remove the blue ball", "make the blue mug bigger"]
    assert world.meta == {"origin": "world"} and still.instructions[0] == "make the mug blue"
    told = TurnIntents("oracle")   # the data's intents column, None where it has none
    assert [told(k, [still.source], [still]) for k in range(3)] == [
        [("make the mug blue", None)], [("remove the ball", "remove the blue ball")],
        [("make it bigger", "make the blue mug bigger")]]
    small = read_sessions(EXAMPLES / "sessions.jsonl", resolution=128, limit=3)
    assert len(small) == 3 and small[2].source.size == (160, 96)  # 320×192 at ~128² px, multiples of 16
    assert small[0].turns[0].reference.size == small[0].source.size == (128, 128)
    assert sum(f.stat().st_size for f in EXAMPLES.rglob("*") if f.is_file()) < 200_000


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image: Image.Image) -> list:
    return np.asarray(image.convert("RGB")).tolist()


def test_parquet_and_datasets_give_the_same_sessions_as_jsonl(tmp_path):
    expected = read_sessions(EXAMPLES)
    records = [json.loads(line) for line in (EXAMPLES / "sessions.jsonl").read_text().splitlines()]
    rows = []
    for r in records:  # images as {"bytes", "path"} structs, the way datasets stores them in Parquet
        image = lambda p: None if p is None else {"bytes": (EXAMPLES / p).read_bytes(), "path": p}  # noqa: E731
        rows.append({"id": r["id"], "source": image(r["source"]), "instructions": r["instructions"],
                     "intents": r.get("intents"), "references": [image(p) for p in r.get("references") or []] or None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    from_parquet = read_sessions(tmp_path)
    features = datasets.Features({"id": datasets.Value("string"), "source": datasets.Image(),
                                  "instructions": datasets.Sequence(datasets.Value("string")),
                                  "intents": datasets.Sequence(datasets.Value("string"))})
    dataset = datasets.Dataset.from_list(
        [{"id": r["id"], "source": str(EXAMPLES / r["source"]), "instructions": r["instructions"],
          "intents": r.get("intents")} for r in records], features=features)
    from_dataset = read_sessions(dataset)
    for got in (from_parquet, from_dataset):
        assert [s.instructions for s in got] == [s.instructions for s in expected]
        assert [[t.intent for t in s.turns] for s in got] == [[t.intent for t in s.turns] for s in expected]
        assert [pixels(s.source) for s in got] == [pixels(s.source) for s in expected]
    assert [pixels(t.reference) for t in from_parquet[0].turns] == [pixels(t.reference) for t in expected[0].turns]


@pytest.mark.parametrize("record, message", [
    ({"source": "a.png", "instructions": []}, "non-empty list"),
    ({"source": "a.png", "instructions": ["x", " "]}, "non-empty list"),
    ({"instructions": ["x"]}, "no 'source'"),
    ({"source": "a.png", "instructions": ["x", "y"], "intents": ["x"]}, "1 intents for 2 instructions"),
    ({"source": "missing.png", "instructions": ["x"]}, "image not readable"),
    ({"source": "a.png", "instructions": ["x"], "intents": [3]}, "strings or nulls"),
])
def test_invalid_records_name_the_session_and_field(tmp_path, record, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "sessions.jsonl").write_text(json.dumps({"id": "bad", **record}) + "\n")
    with pytest.raises(ValueError, match=f"session 'bad': .*{message}"):
        read_sessions(tmp_path / "sessions.jsonl")


def test_bad_json_line_and_unknown_format(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"source": "a.png"\n')
    with pytest.raises(ValueError, match="s.jsonl:1: not JSON"):
        read_sessions(tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match="cannot read sessions"):
        read_sessions(tmp_path / "s.csv")


def test_with_turns_keeps_long_enough_sessions_cut_to_length():
    sessions = read_sessions(EXAMPLES)
    three = with_turns(sessions, 3)
    assert [s.id for s in three] == ["world-3", "landscape", "still-life"]
    assert [len(with_turns(sessions, 1)[i].turns) for i in range(4)] == [1, 1, 1, 1]


# ---- the arena's DuckDB store ---------------------------------------------------------------------
def test_fold_prefixes_keeps_the_longest_per_source():
    def s(src, *texts):
        return {"source_sha": src, "turns": [(t, None) for t in texts]}

    folded = fold_prefixes([(1, s("a", "x")), (2, s("a", "x")), (3, s("a", "x", "y")), (4, s("a", "z")),
                            (5, s("b", "x"))])
    assert [(ids, [t for t, _ in kept["turns"]]) for ids, kept in folded] == [
        ([1, 2, 3], ["x", "y"]), ([4], ["z"]), ([5], ["x"])]


def test_arena_sessions_made_by_the_app_read_back_as_training_sessions(tmp_path):
    from ui.arena import Arena
    from ui.arena_state import ArenaState
    from ui.context import AppContext
    from ui.testing import app_config, make_engine
    from mteditlab.editors.reference import IdentityEditor, OracleEditor

    ctx = AppContext.create(app_config(tmp_path / "data"), engine=make_engine(OracleEditor(), IdentityEditor()))
    try:
        arena = Arena(ctx)
        typed = [["make it bigger", "remove the red square"], ["add a blue circle at the top left"]]
        for instructions in typed:
            state = ArenaState()
            arena.start_random(state)
            for k, text in enumerate(instructions, 1):
                arena.edit(state, text, 0, None)
                arena.vote(state, "tie", k, "overall", "voter-1")  # stores both sides, up to turn k
            arena.finish(state)
        db = ctx.store.path
        sources = {sha: fit_image(ctx.store.get_image(sha), 64) for sha in ctx.store.table("sessions").source_sha}
        sessions = sessions_from(ctx.store, resolution=64)  # the app's own store, while it runs
    finally:
        ctx.close()
    reread = sessions_from(db, resolution=64)  # the file, opened read-only
    assert [(s.instructions, pixels(s.source)) for s in reread] == [(s.instructions, pixels(s.source)) for s in sessions]
    assert sorted(s.instructions for s in sessions) == sorted(typed)
    assert all(s.source.size == (64, 64) and s.meta["origin"] == "arena" for s in sessions)
    assert len(sessions[0].meta["session_ids"]) == 4  # A and B at turn 1, A and B at turn 2: one session
    assert all(pixels(s.source) == pixels(sources[s.meta["source_sha"]]) for s in sessions)
    assert sessions_from(db, origins=("world-test",)) == []
