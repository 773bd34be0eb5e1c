"""Resuming from a snapshot target that fails: a resume that cannot tell "no snapshot" from
"unreachable" never lets a push replace the remote's labels.  Against a Hub-like target
(:class:`bench.snapshot_faults.HubLikeTarget`: HubTarget's error handling, a folder as the
repo) with real label stores in tmp_path."""

from __future__ import annotations

import json

import httpx2
import pandas as pd
import pytest
from PIL import Image
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import hf_raise_for_status

from bench.label_store import setup
from bench.snapshot_faults import (HubLikeTarget, digest, labelled_store, snapshot_fault_rows,
                                   write_v3_snapshot)
from labeling.schema import SCHEMA_VERSION
from labeling.snapshots import HubTarget, SnapshotSync, hub_says_missing
from labeling.store import LabelStore

WAIT_S = 0.3


@pytest.fixture
def pushed(tmp_path):
    """A remote holding a pushed snapshot; returns (target, judgments frame pushed)."""
    target = HubLikeTarget(tmp_path / "remote")
    with labelled_store(tmp_path / "first" / "labels.duckdb") as store:
        SnapshotSync(store, target, every_min=60).start().stop()
        judgments = store.table("judgments")
    assert len(judgments) > 0 and target.pushes == 1
    return target, judgments


def start(data, target, wait_s=WAIT_S):
    """Open the store in ``data`` and do what the app does: resume, then start pushing."""
    store = LabelStore.open(data / "labels.duckdb")
    sync = SnapshotSync(store, target, every_min=60, resume_wait_s=wait_s)
    sync.resume()
    sync.start()
    return store, sync


def assert_resumes(target, data, judgments):
    """A restart on an empty disk at ``data`` resumes exactly ``judgments``."""
    store, sync = start(data, target)
    with store:
        assert sync.problem is None
        pd.testing.assert_frame_equal(store.table("judgments"), judgments)
        sync.stop(final_push=False)


@pytest.mark.parametrize("fault", ["5xx", "timeout"])
def test_an_unreachable_remote_is_never_overwritten(tmp_path, pushed, fault):
    target, judgments = pushed
    before = digest(target.root)
    target.fault = fault
    store, sync = start(tmp_path / "second", target)
    with store:
        assert store.counts()["judgments"] == 0
        assert target.fetches >= 3                          # retried with backoff
        assert "not backed up" in sync.problem and sync.scheduler is None
        sync.stop()                                         # no final push either
    assert target.pushes == 1 and digest(target.root) == before
    target.fault = None
    assert_resumes(target, tmp_path / "third", judgments)


def test_a_fault_that_passes_within_the_wait_resumes(tmp_path, pushed):
    target, judgments = pushed
    target.fault, target.failures = "5xx", 2
    store, sync = start(tmp_path / "second", target, wait_s=2)
    with store:
        assert sync.problem is None and target.fetches == 3
        pd.testing.assert_frame_equal(store.table("judgments"), judgments)
        sync.stop(final_push=False)


def label_while_unverified(data, target) -> None:
    """Start on ``data`` while ``target`` cannot be read (pushing is off), store one judgment, stop."""
    store, sync = start(data, target)
    with store:
        assert sync.problem
        cid = setup(store, 1)[0]
        store.add_annotator("late")
        store.record_judgment(cid, "late", None, "overall", "A", "A", blind=True)
        sync.stop()


def test_labels_given_while_unverified_never_replace_the_remote(tmp_path, pushed):
    """A persistent disk that started empty while the remote was unreachable: its labels are
    not pushed at the next start either, the remote's snapshot stays as it was."""
    target, judgments = pushed
    before = digest(target.root)
    target.fault = "5xx"
    label_while_unverified(tmp_path / "second", target)
    target.fault = None
    store, sync = start(tmp_path / "second", target)        # same disk, remote reachable
    with store:
        assert "replace" in sync.problem and store.counts()["judgments"] == 1
        sync.stop()
    assert digest(target.root) == before
    assert_resumes(target, tmp_path / "third", judgments)


def test_a_store_started_unverified_pushes_once_the_remote_is_known_empty(tmp_path):
    target = HubLikeTarget(tmp_path / "remote", fault="timeout")     # a repo not created yet
    label_while_unverified(tmp_path / "data", target)
    target.fault = None
    store, sync = start(tmp_path / "data", target)
    with store:
        assert sync.problem is None
        judgments = store.table("judgments")
        sync.stop()
    assert target.pushes == 1
    assert_resumes(target, tmp_path / "other", judgments)


def test_an_older_schema_snapshot_is_migrated(tmp_path):
    target = HubLikeTarget(tmp_path / "remote")
    with labelled_store(tmp_path / "first" / "labels.duckdb") as store:
        cid = int(store.table("comparisons")["comparison_id"].iloc[0])
        source = store.put_image(Image.new("RGB", (8, 8), (9, 9, 9)))
        edited = store.put_image(Image.new("RGB", (8, 8), (1, 2, 3)))
        sessions = [store.add_session("mini", None, seed, source,
                                      [{"instruction": "edit 0", "output_sha": edited}])
                    for seed in (0, 1)]
        gold = store.add_comparison(*sessions, gold="A")
        write_v3_snapshot(store, target.root / "snapshot")
        judgments, comparisons = store.table("judgments"), store.table("comparisons")
    assert json.loads((target.root / "snapshot" / "manifest.json").read_text())[
        "schema_version"] == 3 < SCHEMA_VERSION
    store, sync = start(tmp_path / "second", target)
    with store:
        assert sync.problem is None
        pd.testing.assert_frame_equal(store.table("judgments"), judgments)
        pd.testing.assert_frame_equal(store.table("comparisons"), comparisons)
        kinds = dict(zip(comparisons["comparison_id"], comparisons["kind"]))
        assert (kinds[cid], kinds[gold]) == ("item", "gold")
        sync.stop()                                          # pushes the migrated snapshot
    manifest = json.loads((target.root / "snapshot" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert_resumes(target, tmp_path / "third", judgments)


def test_a_newer_schema_snapshot_is_never_overwritten(tmp_path, pushed):
    target, _ = pushed
    manifest = target.root / "snapshot" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "schema_version": SCHEMA_VERSION + 1}))
    before = digest(target.root)
    store, sync = start(tmp_path / "second", target, wait_s=10)
    with store:
        assert "upgrade MT-EditLab" in sync.problem and target.fetches == 1   # not retried
        sync.stop()
    assert digest(target.root) == before


def test_a_missing_repo_is_no_snapshot(tmp_path):
    target = HubLikeTarget(tmp_path / "remote")
    store, sync = start(tmp_path / "data", target)
    with store:
        assert sync.problem is None and target.fetches == 1
        sync.stop()
    assert (tmp_path / "remote" / "snapshot" / "manifest.json").exists()


def test_the_app_serves_without_pushing_and_says_so(tmp_path, pushed):
    from mteditlab.editors.reference import IdentityEditor, OracleEditor
    from ui.build import _notice
    from ui.context import AppContext
    from ui.testing import app_config, make_engine

    target, _ = pushed
    before = digest(target.root)
    target.fault = "5xx"
    ctx = AppContext.create(app_config(tmp_path / "second"),
                            engine=make_engine(OracleEditor(), IdentityEditor()))
    try:
        ctx.start_snapshots(target, resume_wait_s=WAIT_S)
        assert ctx.snapshots.problem and ctx.snapshots.scheduler is None
        header = _notice(ctx)
        assert "Labels are not being backed up" in header
        assert str(target.root) not in header              # no server paths for visitors
    finally:
        ctx.close()
    assert digest(target.root) == before and target.pushes == 1


def _hub_error(status: int, error_code: str | None = None) -> Exception:
    request = httpx2.Request("GET", "https://huggingface.co/api/datasets/someone/labels")
    response = httpx2.Response(status, request=request,
                               headers={"X-Error-Code": error_code} if error_code else {})
    with pytest.raises(Exception) as caught:
        hf_raise_for_status(response)
    return caught.value


def test_only_the_hubs_404_means_no_snapshot():
    for code in ("RepoNotFound", "EntryNotFound", "RevisionNotFound"):
        assert hub_says_missing(_hub_error(404, code)), code
    unreachable = [_hub_error(503), _hub_error(500), _hub_error(502, "RepoNotFound"),
                   _hub_error(401, "RepoNotFound"), _hub_error(429),
                   LocalEntryNotFoundError("connection error or 5xx, nothing cached"),
                   httpx2.ReadTimeout("timed out"), httpx2.ConnectError("refused"),
                   OfflineModeIsEnabled("offline"), OSError("disk")]
    assert not any(hub_says_missing(exc) for exc in unreachable)


def test_the_hub_target_offline_cannot_tell_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(Exception) as caught:
        HubTarget("someone/labels").fetch(tmp_path)
    assert not hub_says_missing(caught.value)
    assert not list(tmp_path.iterdir())


def test_the_fault_bench_rows():
    rows = snapshot_fault_rows(wait_s=WAIT_S)
    assert [r["fault"] for r in rows] == ["hub 5xx at resume", "timeout at resume",
                                           "older schema snapshot"]
    for row in rows:
        assert row["judgments_after"] == row["judgments_before"] > 0, row
        assert row["bytes_elsewhere"] == 0 and row["peak_mb"] > 0 and row["seconds"] > 0
    assert all("remote unchanged" in r["outcome"] for r in rows[:2])
