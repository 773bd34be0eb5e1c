"""Exports: Hugging Face dataset with image columns (save/load round trip) and Parquet."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from labeling import export
from tests.test_labeling_store import INSTRUCTIONS, build_store, vote


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "labels.duckdb"
    store, comparisons, golds = build_store(path, n_sources=2, n_turns=3, gold=1)
    rng = np.random.default_rng(4)
    vote(store, comparisons, ["ann1", "ann2"], {"mini": 0.0, "mini+lora:ck/grpo": 1.0}, rng,
         turns=(None, 0, 1, 2))
    vote(store, comparisons, ["bot"], {"mini": 0.0, "mini+lora:ck/grpo": 1.0}, rng,
         turns=(None, 2), simulated=True)
    store.record_judgment(golds[0], "ann1", None, "overall", "both_bad", "A", 100.0, blind=True)
    yield store, comparisons, golds
    store.close()


def same_image(feature_value, store, sha):
    return np.array_equal(np.asarray(feature_value), np.asarray(store.get_image(sha)))


def test_dataset_rows_show_what_was_judged(labelled):
    store, comparisons, golds = labelled
    ds = export.to_dataset(store)
    assert ds.features == export.FEATURES
    assert len(ds) == 2 * 2 * 4 + 1 and not any(ds["simulated"])  # human only by default
    assert all(ds["blind"])  # every judgment records whether the judge saw the names
    info = {cid: store.get_comparison(cid) for cid in comparisons + golds}
    turns = store.table("turns").set_index(["session_id", "turn_index"])
    for row in ds:
        comp = info[row["comparison_id"]]
        a, b = comp["A"], comp["B"]
        if row["turn"] is None:
            t = len(comp["instructions"]) - 1
            assert same_image(row["input_image_a"], store, comp["source_sha"])
            assert same_image(row["input_image_b"], store, comp["source_sha"])
        else:
            t = row["turn"]
            assert same_image(row["input_image_a"], store,
                              turns.loc[(a["session_id"], t), "input_sha"])
            assert same_image(row["input_image_b"], store,
                              turns.loc[(b["session_id"], t), "input_sha"])
        assert row["instructions"] == INSTRUCTIONS[: t + 1]
        assert same_image(row["source_image"], store, comp["source_sha"])
        assert same_image(row["image_a"], store, a["outputs"][t])
        assert same_image(row["image_b"], store, b["outputs"][t])
        expected = export.LABELS[row["choice"]]
        assert (row["label_a"], row["label_b"]) == expected
        assert row["both_bad"] == (row["choice"] == "both_bad")
    gold_row = ds.filter(lambda r: r["gold"])[0]
    assert (gold_row["label_a"], gold_row["label_b"], gold_row["both_bad"]) == (0.5, 0.5, True)
    assert gold_row["kind"] == "gold" and set(ds["kind"]) == {"item", "gold"}
    ties = [r for r in ds if r["choice"] == "tie"]
    assert all(r["label_a"] == r["label_b"] == 0.5 for r in ties)


def test_dataset_round_trips_through_disk(labelled, tmp_path):
    store, _, _ = labelled
    ds = export.to_dataset(store, include_simulated=True)
    assert sum(ds["simulated"]) == 2 * 2 and len(ds) == 17 + 4
    ds.save_to_disk(str(tmp_path / "hf"))
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert loaded.features == ds.features and len(loaded) == len(ds)
    plain = [c for c in ds.column_names if not isinstance(ds.features[c], datasets.Image)]
    pd.testing.assert_frame_equal(loaded.select_columns(plain).to_pandas(),
                                  ds.select_columns(plain).to_pandas())
    for before, after in zip(ds, loaded):
        for column in ("source_image", "input_image_a", "input_image_b", "image_a", "image_b"):
            assert np.array_equal(np.asarray(before[column]), np.asarray(after[column]))


def test_parquet_export(labelled, tmp_path):
    store, _, _ = labelled
    written = export.to_parquet(store, tmp_path / "pq")
    labels = pq.read_table(written["labels"]).to_pandas()
    assert len(labels) == 17 and not labels.simulated.any()
    assert {"label_a", "label_b", "both_bad", "instructions", "output_a_sha"} <= set(labels)
    assert set(labels["kind"]) == {"item", "gold"} and labels["gold"].eq(labels["kind"] == "gold").all()
    raw = pq.read_table(written["judgments"]).to_pandas()
    assert len(raw) == 21 and raw.simulated.sum() == 4  # the raw snapshot keeps every row
    for name in ("sessions", "turns", "comparisons", "annotators", "gold_items", "images", "skips"):
        assert pq.read_table(written[name]).num_rows == store.counts()[name]
