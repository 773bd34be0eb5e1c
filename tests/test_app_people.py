"""The app as people meet it: an annotator facing a store full of arena battles, voters whose
ids must not leak their session, blind votes, user text shown as text, what the header tells
a visitor.  ``gradio_client`` against a launched app (oracle vs identity) on a real store."""

from __future__ import annotations

import pytest

from mteditlab.app.testing import app_config, make_engine, running_app
from mteditlab.editors.reference import IdentityEditor, OracleEditor
from tests.test_labeling_queue import add_arena_battles

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

STATUS, TURN = 7, 8


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(app_config(data), engine=engine) as (url, demo, ctx):
        yield url, ctx


def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def test_an_annotator_gets_a_labeling_item_among_hundreds_of_arena_battles(app):
    from mteditlab.app.label import populate_queue

    url, ctx = app
    battles = set(add_arena_battles(ctx.store, 300))
    made = populate_queue(ctx, n_sessions=2, n_turns=2, gold_every=0, start=200)
    assert made == {"comparisons": 2, "gold": 0}
    c = client(url)
    out = c.predict("alice", "wonderland", api_name="/label_sign_in")
    assert "Item loaded: 2 turns" in out[-1] and "item **1 of 2**" in out[0], (out[0], out[-1])
    assigned = set(ctx.store.table("assignments")["comparison_id"])
    assert len(assigned) == 1 and not assigned & battles
