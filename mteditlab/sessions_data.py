"""Multi-turn editing sessions from data: local JSONL / Parquet files with images, or a Hugging Face
``datasets`` dataset.

One record (row) is one session:

==============  =========================================================================================
``source``      the image the session starts from: a path (relative to the file's folder), PNG/JPEG
                bytes, ``{"bytes": …, "path": …}`` (how ``datasets`` and Parquet store images) or an image
``instructions`` the turns' instructions as the user typed them, in order (a non-empty list of strings)
``intents``     optional: per turn, the explicit intent ("make the red mug on the left bigger") or null
``references``  optional: per turn, a reference output image (same forms as ``source``) or null
``id``          optional: a name for the session (default: its row number)
==============  =========================================================================================

Other columns are kept in ``DataSession.meta``. Images are converted to RGB and, given a
``resolution``, resized to the backend's size with the aspect ratio kept (:func:`target_size`).
A :class:`DataSession` reads like the world's ``Session`` where the trainer needs it: ``index`` and
``turns[k].instruction`` / ``turns[k].intent`` (``mteditlab.intent.turn_text`` works on both).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

# FLUX.1 Kontext's preferred (width, height) resolutions, the published list its pipeline snaps to.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672))
QWEN_EDIT_AREA = 1024 * 1024  # Qwen-Image-Edit's working area (its pipelines resize to ~1 MP, multiple of 32)
HF_PREFIX = "hf://"


@dataclass(frozen=True)
class DataTurn:
    instruction: str
    intent: str | None = None
    reference: Image.Image | None = None  # a reference output for this turn, when the data has one


@dataclass
class DataSession:
    index: int
    id: str
    source: Image.Image
    turns: list[DataTurn]
    meta: dict = field(default_factory=dict)

    @property
    def instructions(self) -> list[str]:
        return [t.instruction for t in self.turns]


def area_size(width: int, height: int, area: int, multiple: int = 16) -> tuple[int, int]:
    """``(w, h)`` with the aspect ratio of ``width × height`` and about ``area`` pixels:
    ``w = round(sqrt(area · r) / multiple) · multiple``, ``h = round(sqrt(area / r) / multiple) · multiple``,
    ``r = width / height``, each at least ``multiple``."""
    ratio = width / height
    w = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
    h = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
    return w, h


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The Kontext preferred resolution whose aspect ratio is closest to ``width / height``."""
    ratio = width / height
    return min(KONTEXT_RESOLUTIONS, key=lambda wh: abs(ratio - wh[0] / wh[1]))


def target_size(resolution: str | int | tuple[int, int] | None, width: int, height: int) -> tuple[int, int]:
    """The size an image of ``width × height`` is fed at:

    * ``None``: unchanged;
    * ``"kontext"``: :func:`kontext_size`; ``"qwen-edit"``: :data:`QWEN_EDIT_AREA`, multiple of 32;
    * an int ``n``: about ``n²`` pixels, multiple of 16 (:func:`area_size`); ``(w, h)``: exactly that.
    """
    if resolution is None:
        return width, height
    if resolution == "kontext":
        return kontext_size(width, height)
    if resolution == "qwen-edit":
        return area_size(width, height, QWEN_EDIT_AREA, multiple=32)
    if isinstance(resolution, int):
        return area_size(width, height, resolution * resolution)
    if isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        return int(resolution[0]), int(resolution[1])
    raise ValueError(f"resolution must be None, 'kontext', 'qwen-edit', an int or (w, h); got {resolution!r}")


def fit_image(image: Image.Image, resolution: str | int | tuple[int, int] | None) -> Image.Image:
    """``image`` in RGB at :func:`target_size` (Lanczos), unchanged when the size already matches."""
    image = image.convert("RGB")
    size = target_size(resolution, *image.size)
    return image if size == image.size else image.resize(size, Image.LANCZOS)


def load_image(value: Any, root: Path | None = None) -> Image.Image:
    """An image from a path (relative to ``root``), bytes, ``{"bytes", "path"}`` or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        image = Image.open(path if path.is_absolute() or root is None else root / path)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    image.load()
    return image


def session_from_record(record: dict, index: int, *, root: Path | None = None,
                        resolution: str | int | tuple[int, int] | None = None) -> DataSession:
    """Validate one record of the schema (module docstring) and load its images; ``ValueError`` names
    the session and the field at fault."""
    name = str(record.get("id") if record.get("id") is not None else index)

    def fail(message: str):
        raise ValueError(f"session {name!r}: {message}")

    instructions = _as_list(record.get("instructions"))
    if not instructions or not all(isinstance(t, str) and t.strip() for t in instructions):
        fail("'instructions' must be a non-empty list of non-empty strings")
    per_turn = {}
    for key in ("intents", "references"):
        values = _as_list(record.get(key))
        if values is None:
            values = [None] * len(instructions)
        if len(values) != len(instructions):
            fail(f"{len(values)} {key} for {len(instructions)} instructions")
        per_turn[key] = values
    if record.get("source") is None:
        fail("no 'source' image")
    try:
        source = fit_image(load_image(record["source"], root), resolution)
        references = [None if r is None else fit_image(load_image(r, root), source.size)
                      for r in per_turn["references"]]
    except (OSError, ValueError) as err:
        fail(f"image not readable: {err}")
    if not all(i is None or isinstance(i, str) for i in per_turn["intents"]):
        fail("'intents' must hold strings or nulls")
    turns = [DataTurn(text, intent or None, ref)
             for text, intent, ref in zip(instructions, per_turn["intents"], references)]
    meta = {k: v for k, v in record.items() if k not in ("id", "source", "instructions", "intents", "references")}
    return DataSession(index, name, source, turns, meta)


def _as_list(value) -> list | None:
    """A list from a list, tuple or array column value (Parquet gives numpy arrays); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def read_sessions(location, *, resolution: str | int | tuple[int, int] | None = None, split: str = "train",
                  limit: int | None = None) -> list[DataSession]:
    """Sessions from ``location``: a ``.jsonl`` or ``.parquet`` file, a folder holding
    ``sessions.jsonl`` (or ``*.parquet`` files), ``hf://NAME`` (``datasets.load_dataset(NAME,
    split=split)``, local cache or hub), or an already loaded ``datasets.Dataset``. Image paths are
    relative to the file's folder. ``limit``: the first n sessions only."""
    records, root = _records(location, split)
    sessions = []
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            break
        sessions.append(session_from_record(record, index, root=root, resolution=resolution))
    return sessions


def _records(location, split: str) -> tuple[Iterable[dict], Path | None]:
    if not isinstance(location, (str, os.PathLike)):  # a datasets.Dataset (or any iterable of dicts)
        return iter(location), None
    text = str(location)
    if text.startswith(HF_PREFIX):
        import datasets
        return iter(datasets.load_dataset(text[len(HF_PREFIX):], split=split)), None
    path = Path(text)
    if path.is_dir():
        if (path / "sessions.jsonl").is_file():
            path = path / "sessions.jsonl"
        else:
            files = sorted(path.glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{path} holds neither sessions.jsonl nor *.parquet files")
            return (r for f in files for r in _parquet_rows(f)), path
    if path.suffix == ".jsonl":
        return _jsonl_rows(path), path.parent
    if path.suffix == ".parquet":
        return _parquet_rows(path), path.parent
    raise ValueError(f"cannot read sessions from {location!r}: expected .jsonl, .parquet, a folder or {HF_PREFIX}NAME")


def _jsonl_rows(path: Path) -> Iterable[dict]:
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err})") from None


def _parquet_rows(path: Path) -> Iterable[dict]:
    import pyarrow.parquet as pq
    yield from pq.read_table(path).to_pylist()


def with_turns(sessions: Sequence[DataSession], turns: int) -> list[DataSession]:
    """The sessions that have at least ``turns`` turns, cut to exactly ``turns`` (a training batch
    rolls a fixed number of turns)."""
    return [DataSession(s.index, s.id, s.source, s.turns[:turns], s.meta) for s in sessions if len(s.turns) >= turns]
