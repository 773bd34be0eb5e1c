"""Multi-turn editing sessions from data: local JSONL / Parquet files with images, or a Hugging Face
``datasets`` dataset, in either of two layouts, told apart by their columns.

**One record (row) per session:**

==============  =========================================================================================
``source``      the image the session starts from: a path (relative to the file's folder), PNG/JPEG
                bytes, ``{"bytes": …, "path": …}`` (how ``datasets`` and Parquet store images) or an image
``instructions`` the turns' instructions as the user typed them, in order (a non-empty list of strings)
``intents``     optional: per turn, the explicit intent ("make the red mug on the left bigger") or null
``references``  optional: per turn, a reference output image (same forms as ``source``) or null
``inputs``      optional: per turn, the data's own input image of that turn, or null (default: the
                source at turn 1, then the previous turn's reference)
``id``          optional: a name for the session (default: its row number)
==============  =========================================================================================

Other columns are kept in ``DataSession.meta``.

**One row per turn** (:class:`TurnColumns`; the defaults are MagicBrush's, ``osunlp/MagicBrush``):
``img_id`` names the session, ``turn_index`` orders its turns (integers from 1, or from 0 when the
data has a turn 0), ``source_img`` is the turn's input (turn 1's is the session's source; later ones,
the previous gold output, are the data's inputs), ``instruction`` the turn's instruction and
``target_img`` its reference output (optional column). Other columns (MagicBrush's ``mask_img``) are
not read.

Images are converted to RGB and, given a ``resolution``, resized to the backend's size with the aspect
ratio kept (:func:`target_size`); a session's other images are fitted to its source's size. Records
that do not form a session (a missing or repeated turn, a turn index that is not an integer, an
unreadable image, …) raise :class:`SessionError`, or, given a ``skipped`` list, are left out and
listed there with the reason. A :class:`DataSession` reads like
the world's ``Session`` where the trainer needs it: ``index`` and ``turns[k].instruction`` /
``turns[k].intent`` (``mteditlab.intent.TurnIntents`` works on both).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

# FLUX.1 Kontext's preferred (width, height) resolutions, the published list its pipeline snaps to.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672))
QWEN_EDIT_AREA = 1024 * 1024  # Qwen-Image-Edit's working area (its pipelines resize to ~1 MP, multiple of 32)
HF_PREFIX = "hf://"
HUB_SHARD = re.compile(r"(?P<split>[^-]+)-\d{5}-of-\d{5}")  # a Hub Parquet shard: SPLIT-00000-of-00003….parquet


class SessionError(ValueError):
    """A record that does not form a session: ``session`` names it, ``reason`` says why."""

    def __init__(self, session: str, reason: str):
        super().__init__(f"session {session!r}: {reason}")
        self.session, self.reason = session, reason


@dataclass(frozen=True)
class TurnColumns:
    """The columns of a dataset with one row per turn; the defaults are MagicBrush's. A dataset without
    ``reference_column`` has no references."""

    session_key: str = "img_id"
    turn_column: str = "turn_index"
    image_column: str = "source_img"
    instruction_column: str = "instruction"
    reference_column: str = "target_img"

    @property
    def required(self) -> tuple[str, ...]:
        return self.session_key, self.turn_column, self.image_column, self.instruction_column


@dataclass(frozen=True)
class DataTurn:
    instruction: str
    intent: str | None = None
    reference: Image.Image | None = None  # a reference output for this turn, when the data has one
    source: Image.Image | None = None  # the data's input to this turn (teacher forcing), when known


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
    """Validate one record of the per-session layout (module docstring) and load its images; a
    :class:`SessionError` names the session and the field at fault. Turn k's ``source``: the
    record's ``inputs[k]``, else the session's source (k = 0) or turn k − 1's reference."""
    name = str(record.get("id") if record.get("id") is not None else index)

    def fail(message: str):
        raise SessionError(name, message)

    instructions = _as_list(record.get("instructions"))
    if not instructions or not all(isinstance(t, str) and t.strip() for t in instructions):
        fail("'instructions' must be a non-empty list of non-empty strings")
    per_turn = {}
    for key in ("intents", "references", "inputs"):
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
        references, inputs = [[None if image is None else fit_image(load_image(image, root), source.size)
                               for image in per_turn[key]] for key in ("references", "inputs")]
    except (OSError, ValueError) as err:
        fail(f"image not readable: {err}")
    if not all(i is None or isinstance(i, str) for i in per_turn["intents"]):
        fail("'intents' must hold strings or nulls")
    inputs = [given if given is not None else source if k == 0 else references[k - 1]
              for k, given in enumerate(inputs)]
    turns = [DataTurn(text, intent or None, ref, given)
             for text, intent, ref, given in zip(instructions, per_turn["intents"], references, inputs)]
    meta = {k: v for k, v in record.items()
            if k not in ("id", "source", "instructions", "intents", "references", "inputs")}
    return DataSession(index, name, source, turns, meta)


def _as_list(value) -> list | None:
    """A list from a list, tuple or array column value (Parquet gives numpy arrays); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def group_turns(rows: Iterable[dict], columns: TurnColumns) -> Iterator[dict | SessionError]:
    """Rows of the per-turn layout as per-session records, in the order of each session's first row;
    a group of rows that does not form a session gives a :class:`SessionError` instead. Turn indices
    count from 1, or from 0 when some row has turn 0; they must be integers (``3``, ``"3"``, ``3.0``)
    with none missing or repeated."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(columns.session_key)), []).append(row)
    indices = {name: [_turn_number(r.get(columns.turn_column)) for r in group] for name, group in groups.items()}
    first = 0 if any(0 in turns for turns in indices.values()) else 1
    for name, group in groups.items():
        turns = indices[name]
        if None in turns:
            bad = group[turns.index(None)].get(columns.turn_column)
            yield SessionError(name, f"turn index {bad!r} ({columns.turn_column}) is not an integer")
            continue
        order = sorted(range(len(group)), key=turns.__getitem__)
        have = [turns[i] for i in order]
        if have != list(range(first, first + len(group))):
            repeated = sorted({t for t in have if have.count(t) > 1})
            missing = sorted(set(range(first, max(have) + 1)) - set(have))
            yield SessionError(name, f"turn {repeated[0]} appears {have.count(repeated[0])} times" if repeated else
                               f"missing turn {', '.join(map(str, missing))} (has turns {', '.join(map(str, have))})")
            continue
        ordered = [group[i] for i in order]
        yield {"id": name, "source": ordered[0].get(columns.image_column),
               "instructions": [r.get(columns.instruction_column) for r in ordered],
               "inputs": [None] + [r.get(columns.image_column) for r in ordered[1:]],
               "references": ([r.get(columns.reference_column) for r in ordered]
                              if columns.reference_column in ordered[0] else None)}


def _turn_number(value) -> int | None:
    """``value`` as an integer turn index (an int, an integral float, a string of digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def read_sessions(location, *, resolution: str | int | tuple[int, int] | None = None, split: str = "train",
                  limit: int | None = None, columns: TurnColumns | None = None,
                  skipped: list[dict] | None = None) -> list[DataSession]:
    """Sessions from ``location``: a ``.jsonl`` or ``.parquet`` file, a folder holding
    ``sessions.jsonl`` or ``*.parquet`` files (searched in subfolders too; files named as Hub shards,
    ``SPLIT-00000-of-00001….parquet``, are those of ``split``), ``hf://NAME``
    (``datasets.load_dataset(NAME, split=split)``, local cache or hub), or an already loaded
    ``datasets.Dataset``. Image paths are relative to the file's folder. The layout is one row per
    session when the rows have ``instructions``, else one row per turn with ``columns`` (default:
    MagicBrush's). ``limit``: the first n sessions only. A record that does not form a session raises
    :class:`SessionError`, or with a ``skipped`` list is left out and appended to it as
    ``{"session": id, "reason": …}``. A session's ``index`` is its position in the data, skipped records
    counted, so its sampling seeds do not depend on which records were skipped."""
    records, root = _records(location, split)
    first = next(records, None)
    if first is None:
        return []
    records = itertools.chain([first], records)
    if columns is not None or "instructions" not in first:
        columns = columns or TurnColumns()
        if missing := [c for c in columns.required if c not in first]:
            raise ValueError(
                f"{location}: no column {', '.join(map(repr, missing))} (it has {', '.join(map(repr, first))}). "
                "One row per session needs 'source' and 'instructions'; one row per turn needs its columns "
                "named (TurnColumns; on the command line --session-key, --turn-column, --image-column, "
                "--instruction-column and --reference-column), whose defaults are MagicBrush's")
        records = group_turns(records, columns)
    sessions = []
    for index, record in enumerate(records):
        if limit is not None and len(sessions) >= limit:
            break
        try:
            if isinstance(record, SessionError):
                raise record
            sessions.append(session_from_record(record, index, root=root, resolution=resolution))
        except SessionError as err:
            if skipped is None:
                raise
            skipped.append({"session": err.session, "reason": err.reason})
    return sessions


def describe_skipped(location, skipped: Sequence[dict]) -> str:
    """One line per skipped session under a count, for a command's output."""
    return f"{location}: skipped {len(skipped)} session(s) that do not form one:" + "".join(
        f"\n  {s['session']}: {s['reason']}" for s in skipped)


def _records(location, split: str) -> tuple[Iterator[dict], Path | None]:
    if not isinstance(location, (str, os.PathLike)):  # a datasets.Dataset (or any iterable of dicts)
        return iter(_undecoded(location)), None
    text = str(location)
    if text.startswith(HF_PREFIX):
        import datasets
        return iter(_undecoded(datasets.load_dataset(text[len(HF_PREFIX):], split=split))), None
    path = Path(text)
    if path.is_dir():
        if (path / "sessions.jsonl").is_file():
            path = path / "sessions.jsonl"
        else:
            files = _split_files(path, split)
            return (r for f in files for r in _parquet_rows(f)), path
    if path.suffix == ".jsonl":
        return _jsonl_rows(path), path.parent
    if path.suffix == ".parquet":
        return _parquet_rows(path), path.parent
    raise ValueError(f"cannot read sessions from {location!r}: expected .jsonl, .parquet, a folder or {HF_PREFIX}NAME")


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err})") from None


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq
    yield from pq.read_table(path).to_pylist()


def _split_files(folder: Path, split: str) -> list[Path]:
    """The folder's Parquet files (subfolders included); when some are named as Hub shards, those of ``split``."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds neither sessions.jsonl nor *.parquet files")
    splits = {f: m["split"] for f in files if (m := HUB_SHARD.match(f.name))}
    if not splits:
        return files
    if chosen := [f for f in files if splits.get(f) == split]:
        return chosen
    raise FileNotFoundError(f"{folder} has no {split!r} split; its Parquet files hold "
                            f"{', '.join(sorted(set(splits.values())))}: choose one with --split")


def _undecoded(dataset):
    """A ``datasets.Dataset`` with its image columns left as ``{"bytes", "path"}`` (decoded only for
    the sessions kept); anything else as it is."""
    features = getattr(dataset, "features", None)
    if features is None:
        return dataset
    import datasets
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def with_turns(sessions: Sequence[DataSession], turns: int) -> list[DataSession]:
    """The sessions that have at least ``turns`` turns, cut to exactly ``turns`` (a training batch
    rolls a fixed number of turns)."""
    return [DataSession(s.index, s.id, s.source, s.turns[:turns], s.meta) for s in sessions if len(s.turns) >= turns]


def parse_resolution(text: str | None) -> str | int | None:
    """``--resolution``: ``kontext`` / ``qwen-edit`` (the backends' sizes), an int n (≈ n² pixels) or None."""
    if text is None or text in ("kontext", "qwen-edit"):
        return text
    if str(text).isdigit():
        return int(text)
    raise ValueError(f"--resolution must be kontext, qwen-edit or an integer, got {text!r}")


def data_resolution(editor: str, text: str | None = None) -> str | int | None:
    """The size data images are fitted to for editor ``editor``: ``--resolution`` (:func:`parse_resolution`)
    when given, else the editor's ``data_resolution`` (None: as stored)."""
    from mteditlab.editors import EDITORS

    return parse_resolution(text) or getattr(EDITORS[editor], "data_resolution", None)


def add_column_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--session-key`` … ``--reference-column`` flags of :class:`TurnColumns` (read back by :func:`columns_from`)."""
    group = parser.add_argument_group("datasets with one row per turn (default: MagicBrush's columns, recognised "
                                      "without these flags)")
    for f in fields(TurnColumns):
        group.add_argument("--" + f.name.replace("_", "-"), metavar="COLUMN", help=f"default: {f.default}")


def columns_from(args) -> TurnColumns | None:
    """The :class:`TurnColumns` that ``args`` (parsed flags, or the trainer's config) name, the others at
    their defaults; None when none is given (the layout is then recognised by the columns)."""
    given = {f.name: getattr(args, f.name) for f in fields(TurnColumns) if getattr(args, f.name) is not None}
    return TurnColumns(**given) if given else None
