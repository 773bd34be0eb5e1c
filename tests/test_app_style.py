"""The leaderboard shows style-controlled ratings beside the plain ones (gradio_client against
a launched app whose store holds votes swayed by appearance; see tests/test_labeling_style.py)."""

from __future__ import annotations

import pytest

from ui.testing import app_config, make_engine, running_app
from mteditlab.editors.reference import IdentityEditor, OracleEditor
from tests.test_labeling_style import build_style_store

gradio_client = pytest.importorskip("gradio_client")

PLAIN, STYLE, STYLE_NOTE = 3, 8, 9


def test_leaderboard_shows_style_controlled_ratings_beside_the_plain_ones(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    build_style_store(data / "labels.duckdb", n_sources=40).close()
    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(app_config(data, min_battles=1), engine=engine) as (url, demo, ctx):
        client = gradio_client.Client(url, verbose=False)
        out = client.predict("all human votes", True, "all criteria", api_name="/leaderboard")
    plain = [row[0] for row in out[PLAIN]["data"]]
    style = out[STYLE]
    header = style["headers"]
    assert {"plain rating", "style-controlled", "Δ"} <= set(header)
    rows = {row[0]: dict(zip(header, row)) for row in style["data"]}
    assert set(rows) == set(plain)
    assert plain[0] == "mini+lora:polished"                       # on top of the plain board
    ordered = sorted(rows, key=lambda m: rows[m]["style-controlled"])
    assert ordered[0] == "mini+lora:polished"                     # last once appearance counts
    assert rows["mini+lora:polished"]["Δ"] < 0
    assert "Style control" in out[STYLE_NOTE] and "quality +" in out[STYLE_NOTE]
