"""``python app.py`` configuration: a fast --help, flags and environment, credentials, and the
documented editor fallbacks (never a crash on a fresh clone)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ui.config import (DEFAULT_ADAPTER, AppConfig, ConfigError, Credentials, SideSpec,
                                  config_from_args)

REPO = Path(__file__).resolve().parents[1]


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, app\ntry:\n    app.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('gradio', 'torch', 'duckdb', 'diffusers', "
            "'transformers', 'pandas') if m in sys.modules))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert "--editor-a" in out.stdout and "--annotators" in out.stdout and "--share" in out.stdout
    assert "--intent-a SPEC" in out.stdout and "MTEDITLAB_INTENT_B" in out.stdout
    assert "HEAVY []" in out.stdout
    assert elapsed < 10


def test_defaults_flags_and_environment(monkeypatch, tmp_path):
    for name in ("MTEDITLAB_EDITOR_A", "MTEDITLAB_EDITOR_B", "MTEDITLAB_ADAPTER_A", "MTEDITLAB_ADAPTER_B",
                 "MTEDITLAB_MODEL_A", "MTEDITLAB_MODEL_B", "MTEDITLAB_DATA", "MTEDITLAB_ANNOTATORS",
                 "MTEDITLAB_ADMIN", "MTEDITLAB_AUTH", "MTEDITLAB_ANONYMOUS", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    config = config_from_args([])
    assert config.side_a == SideSpec("mini", None, None)
    assert config.side_b == SideSpec("mini", DEFAULT_ADAPTER, None)
    assert config.anonymous and not config.share and config.resolved_data_dir() == Path("data")
    assert not config.annotators and not config.admins

    config = config_from_args(["--editor-b", "oracle", "--data-dir", str(tmp_path), "--port",
                               "7999", "--host", "0.0.0.0", "--share", "--no-anonymous",
                               "--annotators", "ann:pw", "--adapter-a", "none"])
    assert config.side_b == SideSpec("oracle", None, None)       # the mini adapter is mini's only
    assert (config.port, config.host, config.share, config.anonymous) == (7999, "0.0.0.0", True, False)
    assert config.resolved_data_dir() == tmp_path and config.annotators.check("ann", "pw")

    monkeypatch.setenv("MTEDITLAB_EDITOR_A", "identity")
    monkeypatch.setenv("MTEDITLAB_ADAPTER_B", "some/adapter")
    monkeypatch.setenv("MTEDITLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("MTEDITLAB_ADMIN", "root:toor")
    monkeypatch.setenv("MTEDITLAB_ANONYMOUS", "0")
    config = config_from_args([])
    assert config.side_a.editor == "identity" and config.side_b.lora == "some/adapter"
    assert config.resolved_data_dir() == tmp_path / "env" and config.admins.check("root", "toor")
    assert not config.anonymous
    assert config_from_args(["--editor-a", "oracle"]).side_a.editor == "oracle"  # flags win

    monkeypatch.setenv("MTEDITLAB_EDITOR_B", "photoshop")
    with pytest.raises(ConfigError, match="unknown editor"):
        config_from_args([])
    monkeypatch.delenv("MTEDITLAB_EDITOR_B")
    with pytest.raises(ConfigError, match="port"):
        config_from_args(["--port", "70000"])


@pytest.mark.parametrize("where", ["MTEDITLAB_DATA", "Space with storage", "Space without",
                                   "neither"])
def test_the_app_and_the_labeling_cli_use_one_data_directory(where, tmp_path, monkeypatch,
                                                             capsys):
    from labeling import cli, connection

    monkeypatch.chdir(tmp_path)
    for name in ("MTEDITLAB_DATA", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    storage = tmp_path / "persistent"                      # stands for a Space's /data
    monkeypatch.setattr(connection, "SPACE_STORAGE", storage, raising=False)
    if where != "Space without":
        storage.mkdir()
    if where.startswith("Space"):
        monkeypatch.setenv("SPACE_ID", "someone/arena")
    if where == "MTEDITLAB_DATA":
        monkeypatch.setenv("SPACE_ID", "someone/arena")    # the variable wins on a Space too
        monkeypatch.setenv("MTEDITLAB_DATA", str(tmp_path / "env"))
    expected = {"MTEDITLAB_DATA": tmp_path / "env", "Space with storage": storage / "mteditlab",
                "Space without": Path("data"), "neither": Path("data")}[where]
    assert config_from_args([]).resolved_data_dir() == expected
    assert cli.main(["init"]) == 0
    assert (tmp_path / expected / "labels.duckdb").is_file()
    assert len(list(tmp_path.rglob("labels.duckdb"))) == 1


def test_credentials(tmp_path):
    digest = hashlib.sha256(b"s3cret").hexdigest()
    creds = Credentials.parse(f"alice:pw1, bob:sha256:{digest}\n# comment\ncarol:a:b", "x")
    assert creds.names == ["alice", "bob", "carol"]
    assert creds.check("alice", "pw1") and not creds.check("alice", "pw2")
    assert creds.check("bob", "s3cret") and not creds.check("bob", digest)
    assert creds.check("carol", "a:b") and not creds.check("dave", "pw1")
    assert not creds.check(None, None)
    file = tmp_path / "annotators.txt"
    file.write_text("erin:one\nfrank:two\n")
    assert Credentials.parse(f"@{file}", "x").check("frank", "two")
    with pytest.raises(ConfigError, match="expected name:password"):
        Credentials.parse("just-a-name", "--annotators")
    with pytest.raises(ConfigError, match="cannot read"):
        Credentials.parse(f"@{tmp_path / 'missing'}", "--annotators")


def test_fallbacks_when_weights_are_missing(tmp_path):
    from ui.engine import load_sides

    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    config = AppConfig(side_a=SideSpec("mini", None, str(empty)),
                       side_b=SideSpec("mini", str(tmp_path / "no-adapter"), str(empty)))
    a, b, notices = load_sides(config)
    assert (a.model, b.model) == ("identity", "oracle") and len(notices) == 2
    assert all("could not be loaded" in n for n in notices)
    with pytest.raises(Exception, match="checkpoint"):
        load_sides(AppConfig(side_a=config.side_a, side_b=config.side_b, strict=True))
    a, b, notices = load_sides(AppConfig(side_a=SideSpec("oracle"), side_b=SideSpec("oracle")))
    assert (a.model, b.model) == ("oracle", "identity") and "same-model" in notices[0]


def test_missing_adapter_falls_back_to_the_oracle_on_side_b(tmp_path):
    from ui.build import _notice
    from ui.context import AppContext
    from ui.engine import load_sides
    from mteditlab.editors.mini import MiniEditor

    checkpoint = tmp_path / "mini"
    MiniEditor.from_config(seed=1).denoiser.save_pretrained(checkpoint)
    config = AppConfig(side_a=SideSpec("mini", None, str(checkpoint)),
                       side_b=SideSpec("mini", str(tmp_path / "grpo"), str(checkpoint)),
                       data_dir=tmp_path / "data")
    a, b, notices = load_sides(config)
    assert a.editor_name == f"mini@{checkpoint}" and a.adapter is None
    assert b.model == "oracle" and "oracle" in notices[0] and "LoRA" in notices[0]
    from ui.engine import Engine

    ctx = AppContext.create(config, engine=Engine(a, b, notices))
    try:
        text = _notice(ctx)
        assert "⚠️" in text and "could not be loaded" in text
        assert ctx.engine.size == 32 and ctx.engine.world
    finally:
        ctx.close()


def test_fresh_clone_default_config_builds(tmp_path):
    """The defaults build whether or not the trained checkpoints are present."""
    from ui.build import build_app

    demo = build_app(AppConfig(data_dir=tmp_path / "data"))
    ctx = demo.mteditlab_ctx
    try:
        models = {side.model for side in ctx.engine.sides.values()}
        base = (REPO / "checkpoints/mini/base/config.json").is_file()
        lora = (REPO / DEFAULT_ADAPTER / "pytorch_lora_weights.safetensors").is_file()
        if base and lora:
            assert models == {"mini", f"mini+lora:{DEFAULT_ADAPTER}"} and not ctx.engine.notices
        elif base:
            assert models == {"mini", "oracle"} and len(ctx.engine.notices) == 1
        else:
            assert models == {"identity", "oracle"} and ctx.engine.notices
        assert (tmp_path / "data" / "labels.duckdb").exists()
    finally:
        ctx.close()


def test_queue_selection_flag_environment_and_store_policy(monkeypatch, tmp_path):
    monkeypatch.delenv("MTEDITLAB_QUEUE_SELECTION", raising=False)
    assert config_from_args([]).queue_selection == "active"
    assert config_from_args(["--queue-selection", "uniform"]).queue_selection == "uniform"
    monkeypatch.setenv("MTEDITLAB_QUEUE_SELECTION", "uniform")
    assert config_from_args([]).queue_selection == "uniform"
    assert config_from_args(["--queue-selection", "active"]).queue_selection == "active"
    monkeypatch.setenv("MTEDITLAB_QUEUE_SELECTION", "greedy")
    with pytest.raises((ConfigError, SystemExit)):
        config_from_args([])
    from ui.context import AppContext
    from ui.testing import app_config, make_engine
    from mteditlab.editors.reference import IdentityEditor, OracleEditor

    ctx = AppContext.create(app_config(tmp_path / "d", queue_selection="uniform"),
                            engine=make_engine(OracleEditor(), IdentityEditor()))
    try:
        assert ctx.store.policy.selection == "uniform"
    finally:
        ctx.close()


def test_hub_dataset_flags(monkeypatch):
    monkeypatch.delenv("MTEDITLAB_HUB_DATASET", raising=False)
    monkeypatch.delenv("MTEDITLAB_HUB_EVERY", raising=False)
    config = config_from_args([])
    assert config.hub_dataset is None and config.hub_every == 5.0
    monkeypatch.setenv("MTEDITLAB_HUB_DATASET", "someone/arena-labels")
    monkeypatch.setenv("MTEDITLAB_HUB_EVERY", "2.5")
    config = config_from_args([])
    assert config.hub_dataset == "someone/arena-labels" and config.hub_every == 2.5
    assert config_from_args(["--hub-dataset", "file:/tmp/x"]).hub_dataset == "file:/tmp/x"
    assert config_from_args(["--hub-dataset", "none"]).hub_dataset is None
    for bad in (["--hub-dataset", "not a repo"], ["--hub-every", "0"]):
        with pytest.raises(ConfigError):
            config_from_args(bad)


def test_thread_policy_flags_and_wait_policy(monkeypatch):
    """--threads / MTEDITLAB_THREADS, --take-turns; app.py sets OMP_WAIT_POLICY=PASSIVE before
    torch loads (unless set) and the policy gives torch the threads asked for."""
    for name in ("MTEDITLAB_THREADS", "MTEDITLAB_TAKE_TURNS", "MTEDITLAB_IN_PROCESS_EDITORS"):
        monkeypatch.delenv(name, raising=False)
    config = config_from_args([])
    assert config.threads is None and config.take_turns is False
    assert config_from_args(["--threads", "3", "--take-turns"]).threads == 3
    assert config_from_args(["--take-turns"]).take_turns is True
    assert config_from_args(["--threads", "auto"]).threads is None
    monkeypatch.setenv("MTEDITLAB_THREADS", "1")
    monkeypatch.setenv("MTEDITLAB_TAKE_TURNS", "1")
    config = config_from_args([])
    assert config.threads == 1 and config.take_turns is True
    for bad in ("0.5", "-2", "many"):
        with pytest.raises(ConfigError):
            config_from_args(["--threads", bad])
    from ui.engine import editors_in_own_processes

    monkeypatch.delenv("MTEDITLAB_TAKE_TURNS")
    assert editors_in_own_processes(config_from_args([]))       # the default: a process per side
    assert not editors_in_own_processes(config_from_args(["--in-process-editors"]))
    assert not editors_in_own_processes(config_from_args(["--take-turns"]))
    monkeypatch.setenv("MTEDITLAB_IN_PROCESS_EDITORS", "1")
    assert config_from_args([]).in_process_editors is True
    code = ("import os, sys\nos.environ.pop('OMP_WAIT_POLICY', None)\nimport app\n"
            "from ui.threads import apply_thread_policy, auto_threads\n"
            "print('POLICY', os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)\n"
            "import torch\nprint('SET', apply_thread_policy(1), torch.get_num_threads(), "
            "sys.getswitchinterval() < 0.005, auto_threads() >= 1)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "POLICY PASSIVE False" in out.stdout
    assert "SET 1 1 True True" in out.stdout


# ---- each side's intent reconstructor (--intent-a/-b) --------------------------------------------
SERVED = "served:http://127.0.0.1:9/v1?model=qwen&timeout=5&retries=0"


def test_each_sides_intent_reconstructor_from_flags_and_environment(monkeypatch):
    for name in ("MTEDITLAB_INTENT_A", "MTEDITLAB_INTENT_B"):
        monkeypatch.delenv(name, raising=False)
    config = config_from_args([])
    assert config.side_a.intent == config.side_b.intent == "rule"      # today's world reading
    config = config_from_args(["--intent-a", SERVED, "--intent-b", "none"])
    assert (config.side_a.intent, config.side_b.intent) == (SERVED, "none")
    monkeypatch.setenv("MTEDITLAB_INTENT_A", " concat ")
    monkeypatch.setenv("MTEDITLAB_INTENT_B", "off")
    config = config_from_args([])
    assert (config.side_a.intent, config.side_b.intent) == ("concat", "none")
    assert config_from_args(["--intent-a", "rule"]).side_a.intent == "rule"       # flags win
    monkeypatch.setenv("MTEDITLAB_INTENT_A", "")
    assert config_from_args([]).side_a.intent == "rule"                           # empty: the default


@pytest.mark.parametrize("flag, spec, message", [
    ("--intent-a", "nope", "--intent-a: unknown reconstructor 'nope'; choose one of .*served"),
    ("--intent-b", "served", "--intent-b: reconstructor 'served' needs its url: write served:URL"),
    ("--intent-a", "rule:strict", "--intent-a: reconstructor 'rule' takes no argument"),
    ("--intent-b", "oracle", "--intent-b: the 'oracle' reconstructor reads the gold intents"),
])
def test_a_bad_intent_spec_is_refused_when_the_flags_are_read(flag, spec, message, capsys):
    import app

    with pytest.raises(ConfigError, match=message):
        config_from_args([flag, spec])
    assert app.main([flag, spec]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_reconstructor_that_cannot_be_built_stops_the_start(tmp_path):
    from ui.context import AppContext

    config = AppConfig(side_b=SideSpec("identity", intent="served:ftp://host/v1"), data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match=r"--intent-b served:ftp://host/v1: the reconstructor cannot be "
                                          r"built: .*not an http\(s\) URL"):
        AppContext.create(config)
    assert not (tmp_path / "data" / "labels.duckdb").exists()     # stopped before anything opened
    if not (REPO / "checkpoints/mini/intent/model.safetensors").is_file():
        with pytest.raises(ConfigError, match="--intent-a mini: .*No mini intent reconstructor checkpoint"):
            AppContext.create(AppConfig(side_a=SideSpec("identity", intent="mini"), data_dir=tmp_path / "data"))
    # the whole app: an error line and exit status 2, before the server starts
    out = subprocess.run([sys.executable, "app.py", "--editor-a", "identity", "--editor-b", "oracle",
                          "--in-process-editors", "--data-dir", str(tmp_path / "app"),
                          "--intent-a", "served:http://127.0.0.1:9/v1?colour=red"],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: --intent-a served:http://127.0.0.1:9/v1?colour=red: the reconstructor cannot be built" in out.stderr
    assert "unknown reconstructor URL option 'colour'" in out.stderr and "Running on" not in out.stdout


def test_a_sides_reconstructor_is_part_of_its_model_name():
    from ui.engine import _store_names, load_sides

    assert _store_names(SideSpec("mini", "ck/grpo")) == ("mini", "lora:ck/grpo")
    assert _store_names(SideSpec("mini", "ck/grpo", None, SERVED)) == ("mini", "lora:ck/grpo+intent:served(qwen)")
    assert _store_names(SideSpec("oracle", intent="mini:ck/intent")) == ("oracle", "intent:mini:ck/intent")
    # one editor with two reconstructors: two models, compared as they are
    a, b, notices = load_sides(AppConfig(side_a=SideSpec("identity"), side_b=SideSpec("identity", intent="none")))
    assert (a.model, b.model, notices) == ("identity", "identity+intent:none", [])
    a, b, notices = load_sides(AppConfig(side_a=SideSpec("identity", intent="none"),
                                         side_b=SideSpec("identity", intent="none")))
    assert b.model == "oracle+intent:none" and "same-model" in notices[0]   # the fallback keeps B's reconstructor


def test_sides_made_around_editors_are_named_for_the_configured_reconstructors(tmp_path):
    from mteditlab.editors.reference import IdentityEditor, OracleEditor
    from ui.context import AppContext
    from ui.testing import app_config, make_engine

    engine = make_engine(OracleEditor(), IdentityEditor(), names=(("oracle", "lora:x"), ("identity", None)))
    config = app_config(tmp_path / "data", side_a=SideSpec("oracle", intent="off"), side_b=SideSpec(intent=SERVED))
    ctx = AppContext.create(config, engine=engine)
    try:
        assert [s.model for s in engine.sides.values()] == ["oracle+lora:x+intent:none",
                                                            "identity+intent:served(qwen)"]
        engine.name_intents({"A": "rule", "B": "concat"})                  # renamed, never stacked
        assert [s.model for s in engine.sides.values()] == ["oracle+lora:x", "identity+intent:concat"]
        assert ctx.intents.specs == {"A": "none", "B": SERVED}
    finally:
        ctx.close()
