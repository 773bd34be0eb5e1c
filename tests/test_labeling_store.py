"""LabelStore on real DuckDB files: schema, validation, images, concurrency, locks, crashes.

Also home of the small builders the other labeling tests share (``build_store``,
``vote``)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from labeling.cli import describe_selection, main
from labeling.errors import (AssignmentError, DuplicateJudgmentError, ReadOnlyStoreError,
                             SchemaVersionError, StoreError, StoreLockedError)
from labeling.queue import AssignmentPolicy
from labeling.schema import MIGRATIONS, SCHEMA_VERSION
from labeling.selection import LabelSelection
from labeling.store import LabelStore, model_name

REPO = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ["add a red square", "move it left", "make it blue"]


def tiny(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value % 256, value // 256 % 256, 7))


def build_store(path: Path, models=(("mini", None), ("mini", "lora:ck/grpo")), n_sources=4,
                n_turns=2, gold=0, policy: AssignmentPolicy | None = None):
    """A store with one session per (model, source) and a comparison for every model pair on
    every source; ``gold`` extra gold comparisons (correct edit vs. no-op, answer 'A').
    Returns (store, comparison ids, gold comparison ids)."""
    store = LabelStore.open(path, policy=policy)
    counter = iter(range(10_000))
    comparisons, golds = [], []
    for s in range(n_sources):
        source = store.put_image(tiny(next(counter)))
        sessions = []
        for editor, adapter in models:
            turns = [{"instruction": INSTRUCTIONS[t % 3], "intent": f"intent {t}",
                      "output_sha": store.put_image(tiny(next(counter))), "seconds": 0.1}
                     for t in range(n_turns)]
            sessions.append(store.add_session(editor, adapter, s, source, turns, {"k": s}))
        for i in range(len(sessions)):
            for j in range(i + 1, len(sessions)):
                comparisons.append(store.add_comparison(sessions[i], sessions[j]))
    for g in range(gold):
        source = store.put_image(tiny(5000 + g))
        good = store.add_session("oracle", None, g, source, [
            {"instruction": INSTRUCTIONS[t % 3],
             "output_sha": store.put_image(tiny(6000 + g * 10 + t))} for t in range(n_turns)])
        noop = store.add_session("noop", None, g, source, [
            {"instruction": INSTRUCTIONS[t % 3], "output_sha": source} for t in range(n_turns)])
        golds.append(store.add_comparison(good, noop, gold="A"))
    return store, comparisons, golds


def vote(store: LabelStore, comparisons, annotators, strengths: dict, rng, criteria=("overall",),
         turns=(None,), simulated=False, tie_rate=0.1):
    """Every annotator judges every comparison by a BT draw from ``strengths``."""
    models = {}
    for cid in comparisons:
        info = store.get_comparison(cid)
        models[cid] = (info["A"]["model"], info["B"]["model"])
    for name in annotators:
        store.add_annotator(name, simulated=simulated)
        for cid in comparisons:
            a, b = models[cid]
            for turn in turns:
                for criterion in criteria:
                    p = 1 / (1 + np.exp(strengths[b] - strengths[a]))
                    u = rng.random()
                    choice = "tie" if u < tie_rate else ("A" if rng.random() < p else "B")
                    store.record_judgment(cid, name, turn, criterion, choice,
                                          rng.choice(["A", "B"]), float(rng.integers(500, 5000)), blind=True)


@pytest.fixture
def populated(tmp_path):
    store, comparisons, golds = build_store(tmp_path / "labels.duckdb", gold=1)
    yield store, comparisons, golds
    store.close()


def test_images_are_content_addressed_and_paths_never_come_from_clients(tmp_path):
    with LabelStore.open(tmp_path / "db" / "labels.duckdb") as store:
        img = Image.new("RGBA", (5, 3), (10, 20, 30, 255))
        sha = store.put_image(img)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1, pnginfo=None, dpi=(300, 300))
        assert store.put_image(buf.getvalue()) == sha  # same pixels, other encoding
        assert store.get_image(sha).tobytes() == img.tobytes()
        assert (tmp_path / "db" / "images" / sha[:2] / f"{sha}.png").is_file()
        assert store.counts()["images"] == 1
        for bad in ["../../etc/passwd", "/etc/passwd", sha.upper(), sha[:-1]]:
            with pytest.raises(ValueError):
                store.get_image(bad)
        with pytest.raises(TypeError):
            store.put_image("/etc/passwd")
        (tmp_path / "db" / "images" / sha[:2] / f"{sha}.png").write_bytes(b"tampered")
        with pytest.raises(StoreError, match="corrupt"):
            store.get_image(sha)


def test_sessions_and_comparisons_are_validated(populated):
    store, comparisons, golds = populated
    info = store.get_comparison(comparisons[0])
    assert info["instructions"] == INSTRUCTIONS[:2]
    assert (info["A"]["model"], info["B"]["model"]) == ("mini", "mini+lora:ck/grpo")
    assert model_name("mini", "lora:checkpoints/mini/grpo") == "mini+lora:checkpoints/mini/grpo"
    src = info["source_sha"]
    out = store.put_image(tiny(9999))
    with pytest.raises(KeyError, match="not in the store"):
        store.add_session("mini", None, 0, src, [{"instruction": "x", "output_sha": "0" * 64}])
    with pytest.raises(ValueError, match="previous output"):
        store.add_session("mini", None, 0, src, [{"instruction": "x", "output_sha": out},
                                                 {"instruction": "y", "input_sha": src,
                                                  "output_sha": out}])
    with pytest.raises(ValueError, match="sha256"):
        store.add_session("mini", None, 0, "../x", [{"instruction": "x", "output_sha": out}])
    s1 = store.add_session("big", None, 0, src, [{"instruction": "add a red square",
                                                  "output_sha": out}])
    s2 = store.add_session("small", None, 0, src, [{"instruction": "other", "output_sha": out}])
    s3 = store.add_session("small", None, 1, src, [{"instruction": "add a red square",
                                                    "output_sha": out}])
    s4 = store.add_session("big", None, 2, src, [{"instruction": "add a red square",
                                                  "output_sha": out}])
    other_src = store.put_image(tiny(8888))
    s5 = store.add_session("small", None, 0, other_src, [{"instruction": "add a red square",
                                                          "output_sha": out}])
    with pytest.raises(ValueError, match="different instructions"):
        store.add_comparison(s1, s2)
    with pytest.raises(ValueError, match="different source"):
        store.add_comparison(s1, s5)
    with pytest.raises(ValueError, match="two models"):
        store.add_comparison(s1, s4)
    cid = store.add_comparison(s1, s3)
    assert store.add_comparison(s1, s3) == cid
    with pytest.raises(ValueError, match="already pairs"):
        store.add_comparison(s3, s1)
    assert store.add_comparison(s1, s4, gold={"instruction": "tie", "*": "A"}) > cid


def test_judgments_append_only_idempotent_and_validated(populated):
    store, comparisons, golds = populated
    cid = comparisons[0]
    store.add_annotator("ann")
    store.add_annotator("bot", simulated=True)
    assert store.add_annotator("ann") == store.add_annotator("ann")
    with pytest.raises(ValueError):
        store.add_annotator("ann", simulated=True)
    jid = store.record_judgment(cid, "ann", 0, "overall", "A", "B", 900, blind=True)
    assert store.record_judgment(cid, "ann", 0, "overall", "A", "B", 950, blind=True) == jid
    with pytest.raises(DuplicateJudgmentError):
        store.record_judgment(cid, "ann", 0, "overall", "B", "B", 900, blind=True)
    bad = [dict(choice="C"), dict(left="left"), dict(turn=2), dict(turn=-1),
           dict(criterion="Bad Criterion"), dict(annotator="nobody"), dict(comparison_id=999),
           dict(simulated=True), dict(latency_ms=-1)]
    for override in bad:
        kwargs = dict(comparison_id=cid, annotator="ann", turn=1, criterion="quality",
                      choice="A", left="A", latency_ms=10.0, simulated=None,
                      blind=True) | override
        with pytest.raises((ValueError, KeyError)):
            store.record_judgment(**kwargs)
    store.record_judgment(cid, "bot", None, "overall", "tie", "A", None, blind=True)
    frame = store.judgments_frame(include_simulated=True)
    assert len(frame) == 2 and frame["turn"].isna().sum() == 1
    assert set(frame["model_a"]) == {"mini"} and set(frame["model_b"]) == {"mini+lora:ck/grpo"}
    assert store.counts()["judgments"] == 2


def test_simulated_labels_are_never_mixed_silently(populated):
    store, comparisons, _ = populated
    store.add_annotator("bot", simulated=True)
    store.add_annotator("ann")
    store.record_judgment(comparisons[0], "bot", None, "overall", "A", "A", blind=True)
    sel = store.label_selection()
    assert (sel.human, sel.simulated, sel.include_simulated) == (0, 1, True)
    assert "no human labels" in sel.describe()
    assert store.judgments_frame()["simulated"].all()
    store.record_judgment(comparisons[0], "ann", None, "overall", "B", "A", blind=True)
    sel = store.label_selection()
    assert (sel.human, sel.simulated, sel.include_simulated) == (1, 1, False)
    assert "human only" in sel.describe() and "--include-simulated" in describe_selection(sel)
    assert not store.judgments_frame()["simulated"].any()
    assert len(store.judgments_frame(include_simulated=True)) == 2
    assert "MIXING" in store.label_selection(True).describe()
    assert LabelSelection.resolve(3, 0, None).describe().endswith("human only")


def test_many_threads_lose_and_duplicate_nothing_and_ids_persist(tmp_path):
    path = tmp_path / "labels.duckdb"
    store, comparisons, _ = build_store(path, n_sources=5, n_turns=3)
    names = [f"w{k}" for k in range(16)]
    for name in names:
        store.add_annotator(name)
    acked: dict[tuple, int] = {}
    lock = threading.Lock()

    def work(name):
        for cid in comparisons:
            for turn in (None, 0, 1, 2):
                for criterion in ("overall", "quality"):
                    jid = store.record_judgment(cid, name, turn, criterion, "A", "A", 1.0, blind=True)
                    with lock:
                        acked[(cid, name, turn, criterion)] = jid

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(acked) == 16 * 5 * 4 * 2 and len(set(acked.values())) == len(acked)
    store.close()
    with LabelStore.open(path) as again:
        frame = again.judgments_frame()
        assert sorted(frame["judgment_id"]) == sorted(acked.values())
        next_id = again.record_judgment(comparisons[0], "w0", None, "extra", "B", "A", blind=True)
        assert next_id == max(acked.values()) + 1


def test_schema_version_and_migrations(tmp_path):
    path = tmp_path / "labels.duckdb"
    con = duckdb.connect(str(path))  # a database from before any migration: meta only
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.close()
    with pytest.raises(SchemaVersionError, match="migrate"):
        LabelStore.open(path, read_only=True)
    with LabelStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        assert store.counts() == {t: 0 for t in store.counts()}
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(SchemaVersionError, match="newer"):
        LabelStore.open(path)


def test_read_only_and_one_store_per_file_per_process(populated, tmp_path):
    store, _, _ = populated
    with pytest.raises(StoreLockedError, match="already open"):
        LabelStore.open(store.path)
    store.close()
    with LabelStore.open(store.path, read_only=True) as reader:
        assert reader.snapshot_of is None and reader.counts()["comparisons"] == 5
        with pytest.raises(ReadOnlyStoreError):
            reader.add_annotator("x")
        with pytest.raises(ReadOnlyStoreError):
            reader.put_image(tiny(1))
    with pytest.raises(FileNotFoundError):
        LabelStore.open(tmp_path / "missing.duckdb", read_only=True)


HOLDER = """
import time
from labeling.store import LabelStore
store = LabelStore.open({path!r})
store.add_annotator("holder")
print("ready", flush=True)
time.sleep(60)
"""


def test_second_process_gets_a_clear_message_and_can_read_a_snapshot(populated, capsys):
    store, comparisons, _ = populated
    path = store.path
    store.add_annotator("ann")
    store.record_judgment(comparisons[0], "ann", None, "overall", "A", "A", blind=True)
    has_cursor, finish = threading.Event(), threading.Event()

    def reader():  # a live thread keeps its read cursor while the store closes
        store.counts()
        has_cursor.set()
        finish.wait()

    live = threading.Thread(target=reader)
    live.start()
    has_cursor.wait()
    store.close()  # releases the file anyway, or the holder below could not open it
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(path=str(path))], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError) as err:
            LabelStore.open(path)
        assert err.value.pid == holder.pid
        assert f"process {holder.pid}" in str(err.value) and "read-only" in str(err.value)
        with LabelStore.open(path, read_only=True) as snap:
            assert snap.snapshot_of == holder.pid
            assert snap.counts()["annotators"] == 2  # includes the holder's own commit
            assert len(snap.judgments_frame()) == 1
        capsys.readouterr()
        assert main(["--db", str(path), "stats"]) == 2
        captured = capsys.readouterr()
        assert str(holder.pid) in captured.err and "--read-only" in captured.err
        assert "Traceback" not in captured.err
        assert main(["--db", str(path), "--read-only", "stats"]) == 0
        captured = capsys.readouterr()
        assert "snapshot" in captured.err and "annotators" in captured.out
    finally:
        holder.kill()
        holder.wait()
        finish.set()
        live.join()


WRITER = """
import sys, threading
from labeling.store import LabelStore
store = LabelStore.open({path!r})
lock = threading.Lock()
def work(k):
    name = f"w{{k}}"
    store.add_annotator(name)
    for i in range(100000):
        jid = store.record_judgment({cid}, name, None, f"c{{i}}", "A", "B", 1.0, blind=True)
        with lock:
            sys.stdout.write(f"{{jid}}\\n")
            sys.stdout.flush()
threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
for t in threads: t.start()
for t in threads: t.join()
"""


def test_acknowledged_judgments_survive_sigkill(populated):
    store, comparisons, _ = populated
    path = store.path
    store.close()
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(path=str(path), cid=comparisons[0])], cwd=REPO,
        stdout=subprocess.PIPE, text=True)
    acked = []
    while len(acked) < 1500:
        line = child.stdout.readline()
        assert line, "writer died early"
        acked.append(int(line))
    os.kill(child.pid, signal.SIGKILL)
    rest = child.stdout.read()
    child.wait()
    assert child.returncode == -signal.SIGKILL
    acked += [int(line) for line in rest.split("\n")[:-1]]  # complete lines only
    with LabelStore.open(path) as reopened:
        present = set(reopened.judgments_frame()["judgment_id"])
        assert set(acked) <= present
        assert len(present) == len(reopened.judgments_frame())
        # the store keeps working after recovery
        reopened.add_annotator("after")
        after = reopened.record_judgment(comparisons[0], "after", None, "overall", "A", "A", blind=True)
        assert after > max(present)


def test_judgments_record_blind_and_version_1_databases_are_migrated(tmp_path):
    path = tmp_path / "labels.duckdb"
    con = duckdb.connect(str(path))  # a version-1 database with one label and two arena votes
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    now = "2026-01-01 00:00:00+00"
    con.execute(f"INSERT INTO annotators VALUES (1, 'ann', false, '{now}')")
    sessions = [(1, '{"k": 1}'), (2, '{"k": 1}'), (3, '{"origin": "arena", "blind": true}'),
                (4, '{"origin": "arena", "blind": true}'), (5, '{"origin": "arena", "blind": false}'),
                (6, '{"origin": "arena", "blind": false}')]
    for sid, meta in sessions:
        con.execute("INSERT INTO sessions VALUES (?, 'mini', ?, 'm' || ?, 0, 's', 1, ?, ?)",
                    [sid, None, sid % 2, meta, now])
    for cid, (a, b) in enumerate([(1, 2), (3, 4), (5, 6)], start=1):
        con.execute(f"INSERT INTO comparisons VALUES (?, ?, ?, 's', 1, false, '{now}')",
                    [cid, a, b])
        con.execute(f"INSERT INTO judgments VALUES (?, ?, 1, 0, 'overall', 'A', 'A', 1.0, "
                    f"'{now}', false)", [cid, cid])
    con.close()
    with LabelStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        frame = store.judgments_frame()
        assert list(frame["blind"]) == [True, True, False]
        store.add_annotator("voter")
        store.record_judgment(3, "voter", 0, "overall", "B", "A", blind=False)
        store.record_judgment(2, "voter", 0, "overall", "B", "A", blind=True)
        frame = store.judgments_frame().set_index("judgment_id")
        assert frame.loc[4, "blind"] == False and frame.loc[5, "blind"] == True  # noqa: E712
        with pytest.raises(TypeError, match="blind"):
            store.record_judgment(1, "voter", 0, "overall", "B", "A", blind="no")


def test_voter_exclusions_are_recorded_and_reversible(populated):
    store, comparisons, _ = populated
    store.add_annotator("spammer")
    assert store.excluded_voters() == set()
    store.set_voter_excluded("spammer", True, admin="root", reason="always votes left")
    assert store.excluded_voters() == {"spammer"}
    store.set_voter_excluded("spammer", False, admin="root", reason="cleared on review")
    assert store.excluded_voters() == set()
    store.set_voter_excluded("spammer", True, admin="root2")
    log = store.table("voter_exclusions")
    assert list(log["excluded"]) == [True, False, True]
    assert list(log["admin"]) == ["root", "root", "root2"]
    assert store.excluded_voters() == {"spammer"}
    with pytest.raises(KeyError):
        store.set_voter_excluded("nobody", True, admin="root")


def _assigned(tmp_path, annotators=("ann",)):
    """A store of two 2-turn labeling items (no gold) and the annotators, each holding one."""
    store, comparisons, _ = build_store(tmp_path / "labels.duckdb", n_sources=2,
                                        policy=AssignmentPolicy(gold_rate=0.0))
    for name in annotators:
        store.add_annotator(name)
    return store, comparisons, [store.next_assignment(name) for name in annotators]


def test_a_submission_is_stored_all_or_nothing(tmp_path):
    store, _, (job,) = _assigned(tmp_path)
    with store:
        broken = [(0, "overall", "A", 10.0), (1, "overall", "B", 10.0), (5, "overall", "tie", 10.0)]
        with pytest.raises(ValueError, match="turn 5 out of range"):
            store.record_submission("ann", job.comparison_id, job.left, broken, blind=True)
        assert store.table("judgments").empty
        assert store.next_assignment("ann") == job                   # still the open item
        fixed = [(0, "overall", "B", 10.0), (1, "overall", "tie", 12.0),
                 (None, "overall", "B", 15.0)]
        ids = store.record_submission("ann", job.comparison_id, job.left, fixed, blind=True)
        stored = store.judgments_frame()
        assert list(stored["judgment_id"]) == ids and list(stored["choice"]) == ["B", "tie", "B"]
        assert stored["blind"].all() and (stored["comparison_id"] == job.comparison_id).all()


def test_a_submission_is_refused_unless_it_is_the_annotators_open_assignment(tmp_path):
    store, comparisons, (job, other) = _assigned(tmp_path, ("ann", "bob"))
    votes = [(0, "overall", "A", 1.0), (1, "overall", "A", 1.0), (None, "overall", "A", 1.0)]
    with store:
        never = next(c for c in comparisons if c != job.comparison_id)
        with pytest.raises(AssignmentError,
                           match=f"comparison {never} is not open to 'ann': never assigned"):
            store.record_submission("ann", never, "A", votes, blind=True)
        store.record_submission("ann", job.comparison_id, job.left, votes, blind=True)
        with pytest.raises(AssignmentError, match="already judged"):
            store.record_submission("ann", job.comparison_id, job.left, votes, blind=True)
        store.release_assignment("bob", other.comparison_id)
        with pytest.raises(AssignmentError, match="given back"):
            store.record_submission("bob", other.comparison_id, other.left, votes, blind=True)
        assert len(store.table("judgments")) == 3


def test_reasons_with_lone_surrogates_are_stored_with_replacement_characters(tmp_path):
    store, _, (job,) = _assigned(tmp_path)
    with store:
        store.release_assignment("ann", job.comparison_id, flag="broken\ud800  image\n\udfff")
        store.set_voter_excluded("ann", True, admin="root", reason="spam \udc80bot")
        assert list(store.skips()["reason"]) == ["broken\ufffd image \ufffd"]
        assert list(store.exclusion_log()["reason"]) == ["spam \ufffdbot"]
        assert store.excluded_voters() == {"ann"}


def test_a_skip_or_flag_is_refused_unless_it_is_the_annotators_open_assignment(tmp_path):
    store, comparisons, (job, other) = _assigned(tmp_path, ("ann", "bob"))
    with store:
        store.release_assignment("ann", job.comparison_id)
        with pytest.raises(AssignmentError, match="given back"):          # a second tab's skip
            store.release_assignment("ann", job.comparison_id, flag="again")
        store.record_submission("bob", other.comparison_id, other.left,
                                [(0, "overall", "A", 1.0), (None, "overall", "A", 1.0)], blind=True)
        with pytest.raises(AssignmentError, match="already judged"):
            store.release_assignment("bob", other.comparison_id)
        never = next(c for c in comparisons if c not in (job.comparison_id, other.comparison_id))
        with pytest.raises(AssignmentError, match="never assigned"):
            store.release_assignment("ann", never)
        assert len(store.skips()) == 1
