"""The trainer on data sessions with a real backend and a served judge: tiny random-weight FLUX.1
Kontext (saved as a diffusers pipeline directory and loaded the way ``--editor kontext`` loads it), a
dataset written here, a tiny Qwen-VL answering chat completions over HTTP on 127.0.0.1; arena
sessions made by the app's own code; two processes through ``accelerator.prepare``; FSDP2 shards;
tiny Qwen-Image-Edit, saved as its published repositories lay it out, with small VL and context
areas (its pipelines' ~1 MP defaults would take tens of seconds per call on a CPU)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from mteditlab.sessions_data import DataSession, DataTurn
from tests.chat_server import ChatServer, completion, error, text_choice
from tests.tiny_pipelines import tiny_kontext
from tests.tiny_qwen_vl import served_tiny_judge
from training.config import GRPOConfig, parse_args
from training.grpo import train
from training.sampling import DataSessions

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--editor", "kontext", "--sessions-per-step", "2", "--num-generations", "2", "--turns", "2", "--steps", "3",
        "--sde-window", "1", "--save-every", "1", "--lora-rank", "2", "--lora-alpha", "4", "--resolution", "32",
        "--algo", "nft"]


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-kontext")
    tiny_kontext().save_pretrained(path)
    return path


def drawn(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, (235, 230, 220))
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    return image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three sessions, two wide (96×32 → 48×16 at ``--resolution 32``) and one tall (32×64 → 16×48)."""
    root = tmp_path_factory.mktemp("sessions")
    (root / "images").mkdir()
    rows = []
    for name, size, colour in (("wide-red", (96, 32), (200, 40, 40)), ("wide-blue", (96, 32), (40, 40, 200)),
                               ("tall-green", (32, 64), (40, 160, 40))):
        drawn(size, colour).save(root / "images" / f"{name}.png")
        rows.append({"id": name, "source": f"images/{name}.png",
                     "instructions": ["make the ball yellow", "make it smaller"],
                     "intents": [None, "make the yellow ball smaller"]})
    (root / "sessions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def tiny_judge():
    with served_tiny_judge() as served:
        yield served


def rows_of(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_data_batches_share_one_size_and_repeat_sessions_with_their_own_index():
    def session(i, size):
        return DataSession(i, f"s{i}", Image.new("RGB", size), [DataTurn("x")])

    pool = [session(0, (48, 16)), session(1, (16, 48)), session(2, (48, 16))]
    source = DataSessions(GRPOConfig(sessions_per_step=3, sessions_from="unused", reward_weights={"judge": 1.0}), pool)
    for iteration in range(6):
        drawn_ = source.draw(iteration)
        assert len({s.source.size for s in drawn_}) == 1 and len(drawn_) == 3
        assert len({s.index for s in drawn_}) == 3
        assert all(pool[s.index % 3].source.size == s.source.size for s in drawn_)   # a repeat of its own session
        assert [s.index for s in drawn_] == [s.index for s in source.draw(iteration)]  # seeded
    with pytest.raises(ValueError, match="without the verifier"):
        GRPOConfig(sessions_from="x")  # the default reward is the world's verifier
    with pytest.raises(ValueError, match="held out"):
        GRPOConfig(reward_weights={"judge": 1.0}, hacking_reference="judge")


def test_kontext_trains_on_data_sessions_with_the_served_judge_and_resumes(tmp_path, kontext_dir, dataset, tiny_judge):
    server, vocab = tiny_judge
    judge = f"{server.url}?model=tiny-qwen-vl&top_logprobs={vocab}&min_score_mass=0&sub_scores=if+cc+quality"
    out = tmp_path / "run"
    args = ["--lora", *TINY, "--editor-path", str(kontext_dir), "--sessions-from", str(dataset),
            "--reward", "qwen-vl.if=1.0,qwen-vl.cc=0.5", "--reward-paths", f"qwen-vl={judge}",
            "--hacking-reference", "qwen-vl.quality", "--out", str(out)]
    train(parse_args([*args, "--iterations", "2"]))
    first = rows_of(out)
    train(parse_args([*args, "--iterations", "3"]))   # resumes from the checkpoint at iteration 2
    rows = rows_of(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3] and rows[:2] == first
    straight = tmp_path / "straight"
    train(parse_args([*args[:-1], str(straight), "--iterations", "3"]))
    for a, b in zip(rows, rows_of(straight)):   # the resumed run continues exactly
        assert a["reward/qwen-vl.if"] == b["reward/qwen-vl.if"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    resumed, whole = (load_file(o / "adapter" / "pytorch_lora_weights.safetensors") for o in (out, straight))
    assert all(torch.allclose(resumed[k], whole[k], atol=1e-6) for k in whole)   # optimizer moments restored too
    for row in rows:
        assert "gold_success" not in row and "gold_overall_last" not in row
        assert row["hacking_reference"] == "reference/qwen-vl.quality" and row["filter_source"] == "qwen-vl"
        assert 0 <= row["reference/qwen-vl.quality"] <= 1 and 0 <= row["reward/qwen-vl.if"] <= 1
        assert row["failures/qwen-vl"] == 0 and row["endpoint/qwen-vl/requests"] >= 2 * 2 * 2 * 3  # items × subs
        assert row["lora_in_sync"] and math.isfinite(row["loss"]) and row["loss_terms"] == 2
    assert rows_of(out, "eval") == []   # no world to evaluate by
    assert (out / "curves.png").exists()

    from diffusers import FluxKontextPipeline

    saved = resumed
    pipe = FluxKontextPipeline.from_pretrained(kontext_dir)
    pipe.load_lora_weights(out / "adapter")   # diffusers' own loader
    loaded = dict(pipe.transformer.named_parameters())
    key = next(k for k in saved if "lora_B" in k)
    name = key.removeprefix("transformer.").replace("lora_B.weight", "lora_B.default_0.weight")
    assert torch.equal(loaded[name], saved[key]) and saved[key].abs().sum() > 0   # trained, not the zero init


def test_qwen_image_edit_trains_on_data_sessions_with_the_served_judge_and_resumes(tmp_path, dataset, tiny_judge,
                                                                                 monkeypatch):
    """The same path on Qwen-Image-Edit, saved as its published repository lays it out (small VL and
    context areas, so that the tiny model's context is a few tokens)."""
    from diffusers import QwenImageEditPlusPipeline

    from mteditlab.editors.qwen_edit import AREAS_ENV, QwenEditEditor
    from tests.tiny_pipelines import save_as_published, tiny_qwen_edit

    monkeypatch.setenv(AREAS_ENV, f"{56 * 56},{64 * 64}")
    pipe_dir = save_as_published(tiny_qwen_edit(), tmp_path / "tiny-qwen-edit")
    server, vocab = tiny_judge
    judge = f"{server.url}?model=tiny-qwen-vl&top_logprobs={vocab}&min_score_mass=0&sub_scores=if+quality"
    out = tmp_path / "run"
    args = ["--lora", *TINY, "--editor", "qwen-edit", "--editor-path", str(pipe_dir), "--sessions-from", str(dataset),
            "--reward", "qwen-vl=1.0", "--reward-paths", f"qwen-vl={judge}", "--out", str(out)]
    train(parse_args([*args, "--iterations", "1"]))
    first = rows_of(out)
    train(parse_args([*args, "--iterations", "2"]))   # resumes from the checkpoint at iteration 1
    rows = rows_of(out)
    assert [r["iteration"] for r in rows] == [1, 2] and rows[:1] == first
    for row in rows:
        assert "gold_success" not in row and row["failures/qwen-vl"] == 0 and 0 <= row["reward/qwen-vl"] <= 1
        assert row["lora_in_sync"] and math.isfinite(row["loss"])

    saved = load_file(out / "adapter" / "pytorch_lora_weights.safetensors")
    pipe = QwenImageEditPlusPipeline.from_pretrained(pipe_dir, **QwenEditEditor.pipeline_components(pipe_dir))
    pipe.load_lora_weights(out / "adapter")   # diffusers' own loader
    loaded = dict(pipe.transformer.named_parameters())
    key = next(k for k in saved if "lora_B" in k)
    name = key.removeprefix("transformer.").replace("lora_B.weight", "lora_B.default_0.weight")
    assert torch.equal(loaded[name], saved[key]) and saved[key].abs().sum() > 0


def scripted_judge(fail_every: int = 3):
    """A served judge: the digit probabilities depend on the request; every ``fail_every``-th chat fails (HTTP 500)."""
    calls = itertools.count(1)

    def respond(route, body, headers):
        if route == "models":
            return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}
        if next(calls) % fail_every == 0:
            return error(500, "engine overloaded")
        p = 0.2 + 0.6 * (len(json.dumps(body)) % 7) / 6
        top = [{"token": "9", "logprob": math.log(p)}, {"token": "0", "logprob": math.log(1 - p)}]
        return completion([text_choice("9", logprobs=[{**top[0], "top_logprobs": top}])], "scripted")
    return respond


def scripted_url(server: ChatServer) -> str:
    return f"{server.url}?model=scripted&retries=0&sub_scores=if+quality"


def test_failed_judgments_are_counted_and_the_run_goes_on(tmp_path, kontext_dir, dataset):
    out = tmp_path / "run"
    with ChatServer(scripted_judge()) as server:
        train(parse_args(["--lora", *TINY, "--editor-path", str(kontext_dir), "--sessions-from", str(dataset),
                          "--reward", "qwen-vl=1.0", "--reward-paths", f"qwen-vl={scripted_url(server)}",
                          "--iterations", "1", "--out", str(out)]))
    row = rows_of(out)[0]
    assert row["failures/qwen-vl"] > 0 and row["endpoint/qwen-vl/failed_requests"] > 0
    assert row["reward_failures"] == row["failures/qwen-vl"]   # NaN rewards: left out of their groups, counted
    assert 0 < row["reward_failed_frac"] < 1 and row["reward_failing"] == (row["reward_failed_frac"] > 0.5)
    assert row["hacking_reference"] is None and not row["reward_hacking"]   # no gold, no held-out term
    assert math.isfinite(row["reward/qwen-vl"]) and (tmp_path / "run" / "adapter").is_dir()


def test_arena_sessions_from_the_app_store_train_one_iteration(tmp_path, kontext_dir):
    from ui.arena import Arena
    from ui.arena_state import ArenaState
    from ui.context import AppContext
    from ui.testing import app_config, make_engine
    from mteditlab.editors.reference import IdentityEditor, OracleEditor

    ctx = AppContext.create(app_config(tmp_path / "data"), engine=make_engine(OracleEditor(), IdentityEditor()))
    try:
        arena = Arena(ctx)
        for text in ("make it bigger", "add a blue circle at the top left"):
            state = ArenaState()
            arena.start_random(state)
            arena.edit(state, text, 0, None)
            arena.vote(state, "left", 1, "overall", "voter-1")
            arena.finish(state)
        db = ctx.store.path
    finally:
        ctx.close()
    out = tmp_path / "run"
    with ChatServer(scripted_judge()) as server:
        train(parse_args(["--lora", *TINY, "--turns", "1", "--editor-path", str(kontext_dir), "--sessions-from", str(db),
                          "--reward", "qwen-vl=1.0", "--reward-paths", f"qwen-vl={scripted_url(server)}",
                          "--iterations", "1", "--out", str(out)]))
    (row,) = rows_of(out)
    assert "gold_success" not in row and row["loss_terms"] == 1
    assert json.loads((out / "config.json").read_text())["sessions_from"] == str(db)


def test_two_processes_prepare_the_real_backend_and_keep_the_adapter_in_sync(tmp_path, kontext_dir, dataset):
    out = {n: tmp_path / f"p{n}" for n in (1, 2)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # exactly one chat in 16 fails: every iteration keeps fully scored groups to learn from
    with ChatServer(scripted_judge(fail_every=16)) as server:
        common = ["--lora", *TINY, "--editor-path", str(kontext_dir), "--sessions-from", str(dataset),
                  "--reward", "qwen-vl=1.0", "--reward-paths", f"qwen-vl={scripted_url(server)}", "--iterations", "2",
                  "--gradient-checkpointing"]
        train(parse_args([*common, "--out", str(out[1])]))
        # --multi_gpu starts one process each (gloo on a CPU-only machine); --cpu would start only one
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m",
               "training.grpo", *common, "--out", str(out[2])]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = rows_of(out[1]), rows_of(out[2])
    assert [r["iteration"] for r in two] == [1, 2] and all(r["lora_in_sync"] for r in two)
    assert two[0]["loss"] != one[0]["loss"]   # each process rolled its own sessions (4 in all, not 2)
    assert [sorted(r) for r in two] == [sorted(r) for r in one]   # same columns as one process
    assert all(math.isfinite(r["loss"]) for r in two)
    assert not [k for r in two for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
    assert trained(out[2] / "adapter") and trained(out[1] / "adapter")   # gradients flow through checkpointing


def trained(adapter: Path) -> bool:
    """Some LoRA B matrix moved off its zero initialisation."""
    return any(v.abs().sum() > 0 for k, v in load_file(adapter / "pytorch_lora_weights.safetensors").items() if "lora_B" in k)


def test_fsdp2_shards_train_checkpoint_resume_and_export_the_adapter(tmp_path, kontext_dir, dataset):
    """accelerate shards only on accelerator devices (on CPUs it turns an FSDP config into DDP), so the
    sharded path runs here under ``fully_shard`` itself, as accelerate's FSDP2 plugin applies it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tests.fsdp_shards",
           str(tmp_path), str(dataset)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["local_shapes"] == [[[1, 32]], [[1, 32]]] and got["full_shape"] == [2, 32]   # each holds half
    assert got["trained"][0] == got["trained"][1] == pytest.approx(got["resumed"][0]) == pytest.approx(got["resumed"][1])
    assert got["resumed_at"] == 2 and trained(tmp_path / "adapter")

    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(kontext_dir)
    pipe.load_lora_weights(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    loaded = dict(pipe.transformer.named_parameters())
    for key, value in saved.items():
        name = key.removeprefix("transformer.").replace(".weight", ".default_0.weight")
        assert torch.equal(loaded[name], value)
