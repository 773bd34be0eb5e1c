"""Datasets with one row per turn (MagicBrush's layout and others named by flags): sessions, turn
inputs and references, splits, and the records that do not form a session, each skipped with its reason.

``write_magicbrush`` writes the MagicBrush-shaped fixture the trainer, the benchmark and the label
queue are run on (``tests/test_bench_data.py``): small photo-like images made here (sky and ground
gradients with noise, smooth noise textures, a shaded still life), each turn's target an edit of its
source, stored as the Hub stores images in Parquet (``{"bytes", "path"}``)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mteditlab.sessions_data import (SessionError, TurnColumns, add_column_arguments, columns_from, read_sessions,
                                     with_turns)
from training.session_sources import sessions_from

SIZE = 40


# ---- photo-like images and their edits --------------------------------------------------------------
def smooth_noise(rng: np.random.Generator, size: int, octaves: int = 3) -> np.ndarray:
    """[size, size] in [0, 1]: random grids of 2, 4, 8… cells upsampled bicubically, summed by 1/2^o."""
    total = np.zeros((size, size))
    for o in range(octaves):
        cells = 2 ** (o + 1)
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        total += np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=float) / 255 / 2 ** o
    return (total - total.min()) / (np.ptp(total) + 1e-9)


def photo(kind: str, seed: int) -> np.ndarray:
    """A [SIZE, SIZE, 3] float image in [0, 1]: ``landscape``, ``texture`` or ``still-life``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    noise = smooth_noise(rng, SIZE)[..., None]
    if kind == "landscape":
        sky = np.stack([0.45 + 0.4 * y, 0.6 + 0.3 * y, 0.95 - 0.1 * y], -1)
        ground = np.stack([0.25 + 0.2 * noise[..., 0], 0.45 + 0.25 * noise[..., 0], 0.15 + 0.1 * noise[..., 0]], -1)
        horizon = 0.6 + 0.05 * np.sin(x * 9 + seed)
        image = np.where((y > horizon)[..., None], ground, sky)
    elif kind == "texture":
        image = np.concatenate([0.3 + 0.5 * noise, 0.2 + 0.4 * noise ** 2, 0.5 - 0.3 * noise], -1)
    else:
        wall = np.stack([0.8 - 0.2 * y, 0.7 - 0.2 * y, 0.55 - 0.1 * y], -1)
        d = ((x - 0.5) ** 2 + (y - 0.55) ** 2) ** 0.5
        shade = np.clip(1 - d / 0.22, 0, 1)[..., None]
        image = np.where(shade > 0, np.array([0.85, 0.2, 0.15]) * (0.5 + 0.5 * shade), wall)
    return np.clip(image + 0.02 * rng.standard_normal(image.shape), 0, 1)


def recolour(image: np.ndarray, rows: slice, tint, only_red: bool = False) -> np.ndarray:
    out = image.copy()
    mix = 0.5 * out[rows] + 0.5 * np.asarray(tint)
    out[rows] = np.where((out[rows, :, 0] > out[rows, :, 1] + 0.3)[..., None], mix, out[rows]) if only_red else mix
    return out


def add_disc(image: np.ndarray, cx: float, cy: float, colour) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    alpha = np.clip(1 - (((x - cx) ** 2 + (y - cy) ** 2) ** 0.5) / 0.12, 0, 1)[..., None] ** 0.5
    return image * (1 - alpha) + np.asarray(colour) * alpha


SESSIONS = {  # img_id: (kind, seed, [(instruction, edit)])
    "327726": ("landscape", 1, [("make the sky orange", lambda im: recolour(im, slice(0, 22), (1.0, 0.55, 0.2))),
                                ("add a white cloud", lambda im: add_disc(im, 0.3, 0.2, (1, 1, 1))),
                                ("darken the grass", lambda im: recolour(im, slice(26, None), (0.05, 0.15, 0.05)))]),
    "138502": ("texture", 2, [("make it more purple", lambda im: recolour(im, slice(None), (0.5, 0.1, 0.6))),
                              ("put a yellow ball in the middle", lambda im: add_disc(im, 0.5, 0.5, (1, 0.9, 0.1)))]),
    "460211": ("still-life", 3, [("turn the apple green", lambda im: recolour(im, slice(None), (0.1, 0.8, 0.1), True)),
                                 ("add a blue plate on the left", lambda im: add_disc(im, 0.15, 0.8, (0.2, 0.3, 0.9)))]),
    "91077": ("landscape", 4, [("make it a night scene", lambda im: im * 0.35)]),
}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def magicbrush_rows(sessions: dict = SESSIONS) -> list[dict]:
    """One row per turn, as MagicBrush publishes them: the turn's input (the photo, then the previous
    gold output), the edited region's mask, the instruction and the gold output."""
    rows = []
    for img_id, (kind, seed, turns) in sessions.items():
        image = photo(kind, seed)
        for k, (instruction, edit) in enumerate(turns, 1):
            target = edit(image)
            mask = (np.abs(target - image).max(-1, keepdims=True) > 0.02).repeat(3, -1).astype(float)
            rows.append({"img_id": img_id, "turn_index": k, "instruction": instruction,
                         **{name: {"bytes": png(a), "path": f"{img_id}-{k}-{name}.png"}
                            for name, a in (("source_img", image), ("mask_img", mask), ("target_img", target))}})
            image = target
    return rows


def write_magicbrush(path: Path, rows: list[dict] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows or magicbrush_rows()), path)
    return path


def broken_rows() -> list[dict]:
    """The fixture's rows plus three sessions that do not form one: a missing turn, an unreadable
    image, a turn index that is not an integer (the column is text, as some exports write it)."""
    rows = [dict(r, turn_index=str(r["turn_index"])) for r in magicbrush_rows()]
    gap = [dict(r, img_id="gap") for r in rows if r["img_id"] == "327726" and r["turn_index"] != "2"]
    broken = [dict(r, img_id="broken") for r in rows if r["img_id"] == "138502"]
    broken[1] = dict(broken[1], target_img={"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "x.png"})
    odd = [dict(r, img_id="odd") for r in rows if r["img_id"] == "460211"]
    odd[1] = dict(odd[1], turn_index="2b")
    return rows + gap + broken + odd


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# ---- tests ---------------------------------------------------------------------------------------------
def test_magicbrush_rows_are_read_as_sessions_without_flags(tmp_path):
    rows = magicbrush_rows()
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    data = write_magicbrush(tmp_path / "dev.parquet", shuffled)
    sessions = read_sessions(data)
    assert sorted(s.id for s in sessions) == sorted(SESSIONS) and len(sessions) == 4
    for session in sessions:
        mine = sorted((r for r in rows if r["img_id"] == session.id), key=lambda r: r["turn_index"])
        assert session.instructions == [r["instruction"] for r in mine]   # ordered by turn_index
        assert (pixels(session.source) == pixels(Image.open(io.BytesIO(mine[0]["source_img"]["bytes"])))).all()
        for turn, row in zip(session.turns, mine):
            assert (pixels(turn.reference) == pixels(Image.open(io.BytesIO(row["target_img"]["bytes"])))).all()
            assert (pixels(turn.source) == pixels(Image.open(io.BytesIO(row["source_img"]["bytes"])))).all()
        assert session.turns[0].source is session.source and session.meta == {}
    small = sessions_from(data, resolution=32)   # the trainer's and the benchmark's one loader
    assert {s.source.size for s in small} == {(32, 32)} == {t.reference.size for s in small for t in s.turns}
    assert [len(s.turns) for s in with_turns(small, 2)] == [2, 2, 2]


def test_other_layouts_are_named_by_the_column_flags(tmp_path):
    rows = [{"episode": r["img_id"], "step": r["turn_index"] - 1, "before": r["source_img"], "prompt": r["instruction"]}
            for r in magicbrush_rows()]   # 0-based turns, no reference column
    write_magicbrush(tmp_path / "other.parquet", rows)
    with pytest.raises(ValueError, match=r"no column 'img_id', 'turn_index', 'source_img', 'instruction'.*--session-key"):
        read_sessions(tmp_path / "other.parquet")
    parser = argparse.ArgumentParser()
    add_column_arguments(parser)
    assert columns_from(parser.parse_args([])) is None
    columns = columns_from(parser.parse_args(["--session-key", "episode", "--turn-column", "step", "--image-column",
                                              "before", "--instruction-column", "prompt"]))
    assert columns == TurnColumns("episode", "step", "before", "prompt", "target_img")
    sessions = read_sessions(tmp_path / "other.parquet", columns=columns)
    assert [s.instructions for s in sessions] == [[t for t, _ in turns] for _, _, turns in SESSIONS.values()]
    assert all(t.reference is None for s in sessions for t in s.turns)
    assert sessions[0].turns[1].source is not None   # the data's own input of turn 2

    from training.config import parse_args
    from training.sampling import load_pool
    cfg = parse_args(["--lora", "--sessions-from", str(tmp_path / "other.parquet"), "--turns", "2", "--reward", "judge=1.0", "--session-key",
                      "episode", "--turn-column", "step", "--image-column", "before", "--instruction-column", "prompt"])
    assert sorted(s.id for s in load_pool(cfg)) == sorted(s.id for s in with_turns(sessions, 2))   # the trainer too


def test_records_that_do_not_form_a_session_are_skipped_with_their_reason(tmp_path):
    data = write_magicbrush(tmp_path / "broken.parquet", broken_rows())
    skipped = []
    sessions = read_sessions(data, skipped=skipped)
    assert sorted(s.id for s in sessions) == sorted(SESSIONS)   # text turn indices "1", "2" are integers
    reasons = {s["session"]: s["reason"] for s in skipped}
    assert reasons.keys() == {"gap", "broken", "odd"}
    assert reasons["gap"] == "missing turn 2 (has turns 1, 3)"
    assert reasons["broken"].startswith("image not readable")
    assert reasons["odd"] == "turn index '2b' (turn_index) is not an integer"
    assert [s.index for s in sessions] == [0, 1, 2, 3]   # row numbers of the sessions, skipped ones after
    with pytest.raises(SessionError, match="session 'gap': missing turn 2"):
        read_sessions(data)   # without a list to report in, the first one is an error
    twice = [r for r in magicbrush_rows() if r["img_id"] == "91077"] * 2
    write_magicbrush(tmp_path / "twice.parquet", twice)
    assert read_sessions(tmp_path / "twice.parquet", skipped=(found := [])) == []
    assert found == [{"session": "91077", "reason": "turn 1 appears 2 times"}]


def test_splits_pass_through_hub_shards_and_datasets(tmp_path):
    rows = magicbrush_rows()
    hub = tmp_path / "MagicBrush"
    train = [r for r in rows if r["img_id"] in ("327726", "138502")]
    write_magicbrush(hub / "data" / "train-00000-of-00001.parquet", train)
    write_magicbrush(hub / "data" / "dev-00000-of-00001-5ad7a9b2.parquet", [r for r in rows if r not in train])
    assert [s.id for s in read_sessions(hub, split="dev")] == ["460211", "91077"]
    assert [s.id for s in read_sessions(hub, split="train")] == ["327726", "138502"]
    with pytest.raises(FileNotFoundError, match="no 'test' split; its Parquet files hold dev, train: choose one with --split"):
        read_sessions(hub, split="test")
    image = datasets.Image()
    features = datasets.Features({"img_id": datasets.Value("string"), "turn_index": datasets.Value("int32"),
                                  "source_img": image, "mask_img": image, "instruction": datasets.Value("string"),
                                  "target_img": image})
    dataset = datasets.Dataset.from_list(rows, features=features)   # as load_dataset("osunlp/MagicBrush") gives it
    from_dataset, from_parquet = read_sessions(dataset), read_sessions(write_magicbrush(tmp_path / "all.parquet"))
    assert [s.instructions for s in from_dataset] == [s.instructions for s in from_parquet]
    assert all((pixels(a.reference) == pixels(b.reference)).all()
               for x, y in zip(from_dataset, from_parquet) for a, b in zip(x.turns, y.turns))


def test_a_session_per_row_feeds_each_turn_the_previous_reference(tmp_path):
    """Teacher forcing on the one-row-per-session layout: turn k's input is turn k − 1's reference,
    unless the record gives ``inputs``."""
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue", "white")]
    session = {"id": "s", "source": png(np.asarray(images[0]) / 255), "instructions": ["a", "b", "c"],
               "references": [png(np.asarray(i) / 255) for i in images[1:]]}
    pq.write_table(pa.Table.from_pylist([{**session, "inputs": None},
                                         {**session, "id": "t", "inputs": [None, None, session["source"]]}]),
                   tmp_path / "s.parquet")
    plain, given = read_sessions(tmp_path / "s.parquet")
    assert [pixels(t.source)[0, 0].tolist() for t in plain.turns] == [[255, 0, 0], [0, 128, 0], [0, 0, 255]]
    assert [pixels(t.source)[0, 0].tolist() for t in given.turns] == [[255, 0, 0], [0, 128, 0], [255, 0, 0]]
    assert "inputs" not in given.meta
