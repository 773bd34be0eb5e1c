"""``python -m labeling``: every subcommand on a real database, defaults, and the extension hook."""

from __future__ import annotations

import subprocess
import sys
import types

import datasets
import numpy as np
import pytest

from labeling import cli
from labeling.schema import SCHEMA_VERSION
from labeling.store import LabelStore
from tests.test_labeling_queue import THREE_MODELS
from tests.test_labeling_store import REPO, build_store, vote

STRENGTHS = {"mini": 0.0, "mini+lora:a": 1.0, "mini+lora:b": -1.0}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "labels.duckdb"
    store, comparisons, golds = build_store(path, models=THREE_MODELS, n_sources=3, gold=1)
    with store:
        rng = np.random.default_rng(9)
        vote(store, comparisons, ["ann1", "ann2", "ann3"], STRENGTHS, rng,
             criteria=("overall", "quality"), turns=(None, 0, 1))
        vote(store, comparisons, ["sim"], STRENGTHS, rng, simulated=True)
        store.record_judgment(golds[0], "ann1", None, "overall", "A", "B", blind=True)
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_init_uses_the_data_directory_flag_and_environment(tmp_path, monkeypatch, capsys):
    code, out, _ = run(capsys, "--data-dir", tmp_path / "d1", "init")
    assert code == 0 and (tmp_path / "d1" / "labels.duckdb").is_file() and f"schema v{SCHEMA_VERSION}" in out
    monkeypatch.setenv("MTEDITLAB_DATA", str(tmp_path / "d2"))
    assert run(capsys, "init")[0] == 0 and (tmp_path / "d2" / "labels.duckdb").is_file()
    monkeypatch.delenv("MTEDITLAB_DATA")
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "init")[0] == 0 and (tmp_path / "data" / "labels.duckdb").is_file()
    code, _, err = run(capsys, "--read-only", "init")
    assert code == 2 and "drop --read-only" in err


def test_stats_reports_human_and_simulated_separately(db, capsys):
    code, out, _ = run(capsys, "--db", db, "stats")
    assert code == 0
    assert "judgments: 163 human, 9 simulated" in out
    assert "annotators" in out and "sim" in out


def test_leaderboard_defaults_to_human_labels_and_writes_plots(db, tmp_path, capsys):
    code, out, _ = run(capsys, "--db", db, "leaderboard", "--bootstrap", 100,
                       "--plot-dir", tmp_path / "plots")
    assert code == 0
    assert "using the 163 human only" in out and "battles: 162 (gold items excluded)" in out
    lines = [line.split() for line in out.splitlines()]
    ranked = [words[0] for words in lines if words and words[0] in STRENGTHS]
    assert ranked[:3] == ["mini+lora:a", "mini", "mini+lora:b"]
    assert "win rate of row vs column" in out
    for name in ("ratings.png", "win_rate_by_turn.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run(capsys, "--db", db, "leaderboard", "--bootstrap", 50, "--by", "turn",
                       "--criterion", "quality", "--include-simulated")
    assert code == 0 and "MIXING" in out and "battles: 81" in out
    code, out, _ = run(capsys, "--db", db, "leaderboard", "--bootstrap", 50, "--turn", "0")
    assert code == 0 and "battles: 54" in out
    code, out, _ = run(capsys, "--db", db, "leaderboard", "--bootstrap", 50,
                       "--turn", "overall", "--no-include-simulated")
    assert code == 0 and "battles: 54" in out


def test_agreement_command(db, capsys):
    code, out, _ = run(capsys, "--db", db, "agreement")
    assert code == 0
    for heading in ("agreement per criterion", "gold accuracy", "improbable voters"):
        assert heading in out
    assert "ann1" in out and "fleiss_kappa" in out


def test_export_commands(db, tmp_path, capsys):
    code, out, _ = run(capsys, "--db", db, "export", "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0 and "wrote 163 rows" in out
    assert len(datasets.load_from_disk(str(tmp_path / "hf"))) == 163
    code, out, _ = run(capsys, "--db", db, "--read-only", "export", "--format", "parquet",
                       "--out", tmp_path / "pq", "--include-simulated")
    assert code == 0 and (tmp_path / "pq" / "labels.parquet").is_file()


def test_extension_modules_register_subcommands_with_one_line(db, monkeypatch, capsys):
    module = types.ModuleType("fake_simulate")

    def register(subparsers):
        parser = subparsers.add_parser("simulate", help="fake")
        parser.add_argument("--n", type=int, default=1)
        parser.set_defaults(handler=handler)

    def handler(args):
        with cli.open_store(args, writable=True) as store:
            for k in range(args.n):
                store.add_annotator(f"simulated-{k}", simulated=True)
            print(store.counts()["annotators"])
        return 0

    module.register = register
    monkeypatch.setitem(sys.modules, "fake_simulate", module)
    monkeypatch.setattr(cli, "EXTENSIONS", ["fake_simulate"])
    code, out, _ = run(capsys, "--db", db, "simulate", "--n", 2)
    assert code == 0 and out.strip() == "6"
    with LabelStore.open(db, read_only=True) as store:
        assert store.counts()["annotators"] == 6


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "labeling", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("init", "stats", "leaderboard", "agreement", "export"):
        assert command in done.stdout


def test_the_parser_with_its_extensions_does_not_load_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, labeling.cli; labeling.cli.build_parser(); "
                           "print(sorted({'torch', 'diffusers'} & set(sys.modules)))"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


READ_COMMANDS = (["stats"], ["leaderboard"], ["agreement"], ["export", "--format", "parquet"])


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_a_corrupt_database_is_one_line_on_stderr_not_a_traceback(tmp_path, capsys):
    db = tmp_path / "labels.duckdb"
    db.write_bytes(bytes(range(256)) * 64)
    done = subprocess.run([sys.executable, "-m", "labeling", "--db", str(db), "stats"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert str(db) in line and "not a readable label database" in line
    for command in READ_COMMANDS:
        code, _, err = run(capsys, "--db", db, *command)
        assert code != 0 and "not a readable label database" in one_error_line(err), command


def test_read_commands_never_create_a_missing_database(tmp_path, capsys):
    db = tmp_path / "nowhere" / "labels.duckdb"
    done = subprocess.run([sys.executable, "-m", "labeling", "--db", str(db), "stats"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    assert f"--db {db} init" in one_error_line(done.stderr)
    for command in READ_COMMANDS:
        code, out, err = run(capsys, "--db", db, *command)
        assert code != 0 and out == "", command
        assert f"no label database at {db}" in one_error_line(err), command
    assert not db.parent.exists()


@pytest.mark.parametrize("turn", ["abc", "-1", "1.5"])
def test_turn_is_checked_by_the_parser(db, capsys, turn):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--db", str(db), "leaderboard", "--turn", turn])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --turn: expected a turn index (0, 1, …) or 'overall', got {turn!r}" in err
