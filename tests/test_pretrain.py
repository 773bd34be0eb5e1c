"""Pretraining the mini editor: the data pool, a short run with its val evaluation, and its resume."""

import json

import torch
from safetensors.torch import load_file

from training.pretrain import build_pool, main
from mteditlab.world import generate_session


def test_the_pool_holds_every_turn_with_its_operation():
    before, after, texts, ops = build_pool(3, 32, turns=10)
    turns = [t for i in range(3) for t in generate_session("train", i, 10).turns]
    assert before.shape[0] == after.shape[0] == len(texts) == len(ops) == 30
    assert ops == [t.edit.op for t in turns] and [intent for intent, _ in texts] == [t.intent for t in turns]


def test_a_short_run_evaluates_at_ten_turns_and_resumes(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--batch-size", "4", "--sessions", "4", "--session-turns", "10", "--warmup", "1", "--eval-every", "2",
            "--eval-sessions", "2", "--eval-turns", "10", "--op-weights", "swap=3", "--save-every", "2",
            "--threads", "1", "--work", str(work), "--out", str(out)]
    main(["--steps", "2", *args])
    main(["--steps", "4", *args])
    assert "resuming from step 2" in capsys.readouterr().out
    evals = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and all(len(e["overall"]) == 10 for e in evals)
    losses = [json.loads(line)["step"] for line in (work / "loss.jsonl").read_text().splitlines()]
    assert losses == [1, 2, 3, 4]
    assert (out / "config.json").exists() and (out / "loss.png").stat().st_size > 1000



def test_bf16_autocast_trains_float32_weights(tmp_path):
    def run(steps, name, *extra):
        main(["--steps", str(steps), *extra, "--batch-size", "4", "--sessions", "2", "--warmup", "1", "--threads", "1",
              "--seed", "3", "--export", "model", "--work", str(tmp_path / name), "--out", str(tmp_path / name / "out")])
        return load_file(tmp_path / name / "out" / "diffusion_pytorch_model.safetensors")

    initial, trained = run(0, "init"), run(3, "bf16", "--bf16")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "bf16" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
