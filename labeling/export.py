"""Exports: a Hugging Face ``datasets.Dataset`` with image columns, and a Parquet snapshot.

One row per judgment (:func:`label_rows`).  What was judged:

* per-turn judgment (``turn`` = t): the instruction history up to and including turn t, each
  side's input at turn t (its own previous output; the source at t = 0) and output at turn t;
* whole-session judgment (``turn`` = None): every instruction, the source as both inputs and
  each side's final output.

Labels follow Pick-a-Pic: ``label_a``/``label_b`` = 1/0 for A, 0/1 for B and 0.5/0.5 for a tie;
``both_bad`` is also 0.5/0.5 (no preference, as in the ratings) with ``both_bad`` = True.
Every row carries ``simulated``, ``blind``, the comparison's ``kind`` ('item', 'gold', 'arena')
and ``gold``; which labels are exported follows :class:`labeling.selection.LabelSelection`
(human only unless asked, or unless there are none).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from labeling.schema import SCORES, TABLES
from labeling.store import LabelStore

LABELS = {choice: (score, 1.0 - score) for choice, score in SCORES.items()}  # (label_a, label_b)
IMAGE_COLUMNS = ("source", "input_a", "input_b", "output_a", "output_b")
FEATURES = datasets.Features({
    "judgment_id": datasets.Value("int64"),
    "comparison_id": datasets.Value("int32"),
    "turn": datasets.Value("int32"),
    "criterion": datasets.Value("string"),
    "choice": datasets.Value("string"),
    "label_a": datasets.Value("float32"),
    "label_b": datasets.Value("float32"),
    "both_bad": datasets.Value("bool"),
    "left": datasets.Value("string"),
    "annotator": datasets.Value("string"),
    "simulated": datasets.Value("bool"),
    "blind": datasets.Value("bool"),
    "kind": datasets.Value("string"),
    "gold": datasets.Value("bool"),
    "model_a": datasets.Value("string"),
    "model_b": datasets.Value("string"),
    "latency_ms": datasets.Value("float64"),
    "instructions": datasets.List(datasets.Value("string")),
    "source_image": datasets.Image(),
    "input_image_a": datasets.Image(),
    "input_image_b": datasets.Image(),
    "image_a": datasets.Image(),
    "image_b": datasets.Image(),
})


def label_rows(store: LabelStore, include_simulated: bool | None = None) -> pd.DataFrame:
    """Judgments with labels, instruction history and the sha256 of every image involved
    (columns ``<name>_sha`` for ``name`` in :data:`IMAGE_COLUMNS`)."""
    frame = store.judgments_frame(include_simulated)
    turns = store.table("turns").sort_values(["session_id", "turn_index"]).groupby("session_id")
    instructions, inputs, outputs = (turns[c].agg(list).to_dict()
                                     for c in ("instruction", "input_sha", "output_sha"))
    source = store.table("sessions").set_index("session_id")["source_sha"].to_dict()
    records = []
    for a, b, turn in zip(frame["session_a"], frame["session_b"], frame["turn"]):
        overall = pd.isna(turn)
        t = len(outputs[a]) - 1 if overall else int(turn)
        records.append({
            "instructions": instructions[a][: t + 1],
            "source_sha": source[a],
            "input_a_sha": source[a] if overall else inputs[a][t],
            "input_b_sha": source[b] if overall else inputs[b][t],
            "output_a_sha": outputs[a][t],
            "output_b_sha": outputs[b][t],
        })
    extra = pd.DataFrame.from_records(
        records, columns=["instructions"] + [f"{c}_sha" for c in IMAGE_COLUMNS])
    labels = frame["choice"].map(LABELS)
    out = frame.reset_index(drop=True).assign(
        label_a=[pair[0] for pair in labels], label_b=[pair[1] for pair in labels],
        both_bad=(frame["choice"] == "both_bad").to_numpy())
    return pd.concat([out, extra], axis=1)


def to_dataset(store: LabelStore, include_simulated: bool | None = None) -> datasets.Dataset:
    """The labels as a ``datasets.Dataset`` with image columns (see :data:`FEATURES`)."""
    rows = label_rows(store, include_simulated)
    cache: dict[str, dict] = {}

    def images(column: str) -> list[dict]:
        out = []
        for sha in rows[f"{column}_sha"]:
            if sha not in cache:
                cache[sha] = {"bytes": store.image_bytes(sha), "path": None}
            out.append(cache[sha])
        return out

    data = {name: rows[name].tolist() for name in FEATURES
            if name in rows.columns and name != "turn"}
    data["turn"] = [None if pd.isna(t) else int(t) for t in rows["turn"]]
    for column, feature in zip(IMAGE_COLUMNS, ("source_image", "input_image_a",
                                               "input_image_b", "image_a", "image_b")):
        data[feature] = images(column)
    return datasets.Dataset.from_dict(data, features=FEATURES)


def to_parquet(store: LabelStore, out_dir: str | Path,
               include_simulated: bool | None = None) -> dict[str, Path]:
    """Write ``labels.parquet`` (the selected label rows, images as sha256 columns) and a raw
    snapshot of every table under ``tables/`` (all rows, each with its ``simulated`` flag
    where it has one).  Returns the written paths by name."""
    out_dir = Path(out_dir)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    written = {"labels": out_dir / "labels.parquet"}
    pq.write_table(pa.Table.from_pandas(label_rows(store, include_simulated),
                                        preserve_index=False), written["labels"])
    for name in TABLES:
        written[name] = out_dir / "tables" / f"{name}.parquet"
        pq.write_table(pa.Table.from_pandas(store.table(name), preserve_index=False),
                       written[name])
    return written
