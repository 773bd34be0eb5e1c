"""The learned ``mini`` intent reconstructor: its tokenizer, its grammar check, a short training run
(loss falls, resume continues), save → load through the registry, and the missing-checkpoint error."""

import json

import pytest
import torch

from mteditlab.reconstructors import IntentQuery, Reconstruction, ReconstructorError, build_reconstructor
from mteditlab.reconstructors.mini import (EOS, MiniIntentModel, MiniReconstructor, build_tokenizer, cell_pooling,
                                           encoder_text, is_canonical, model_config, world_vocabulary)
from mteditlab.world import generate_session, render
from training.intent import build_pool, main


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(world_vocabulary(500))


def test_the_tokenizer_round_trips_every_intent_and_instruction_without_unknown_words(tokenizer):
    texts = [text for split in ("val", "test") for i in range(200)
             for turn in generate_session(split, i, 10).turns for text in (turn.intent, turn.instruction)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]) == text
    history = encoder_text(["add a small red circle in the center", "make it bigger"],
                           ["add a small red circle in the center"], history_turns=1)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(history)["input_ids"])
    assert tokens[0] == "<said>" and "<meant>" in tokens and "<now>" in tokens and tokens[-1] == EOS
    assert tokenizer.convert_ids_to_tokens(tokenizer("Make it RED, please!")["input_ids"])[:3] == ["make", "it", "red"]


def test_the_grammar_check_accepts_the_worlds_intents_only():
    intents = [turn.intent for i in range(100) for turn in generate_session("val", i, 10).turns]
    assert all(is_canonical(intent) for intent in intents)
    for text in ["make it bigger", "remove the red circle", "add a red circle at the top left",
                 "move the red circle at the top left to the left", "", "make the red circle at the center blue"]:
        assert not is_canonical(text)


def test_cell_pooling_averages_inside_each_cell():
    pool = cell_pooling(32, 2)
    assert pool.shape == (36, 1024) and torch.allclose(pool.sum(1), torch.ones(36))
    assert torch.equal((pool > 0).sum(0), torch.ones(1024, dtype=torch.long))  # the 36 regions tile the image


def test_generations_are_checked_not_trusted(tokenizer):
    reconstructor = MiniReconstructor.from_model(MiniIntentModel(model_config("tiny", len(tokenizer))), tokenizer)

    def decode(text, end=True):
        ids = [0] + tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if end else [])
        return reconstructor._decode(torch.tensor(ids))

    good = decode("make the red circle at the top left bigger")
    assert good.intent == "make the red circle at the top left bigger" and good.failure is None
    for result in [decode("make the red circle at the top left bigger", end=False), decode(""), decode("make it bigger")]:
        assert result.intent is None and result.failure
    session = generate_session("val", 0, 3)
    queries = [IntentQuery([t.instruction for t in session.turns[:k + 1]], [None] * k, render(session.turns[k].before),
                           render(session.source)) for k in range(3)]
    results = reconstructor.reconstruct(queries)  # an untrained model: failures, never exceptions
    assert len(results) == 3 and all(isinstance(r, Reconstruction) for r in results)


def test_a_short_run_lowers_the_loss_resumes_and_loads_through_the_registry(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--size", "tiny", "--batch-size", "16", "--sessions", "20", "--vocab-sessions", "300", "--lr", "3e-3",
            "--warmup", "5", "--eval-every", "25", "--eval-sessions", "2", "--save-every", "25", "--threads", "1",
            "--work", str(work), "--out", str(out)]
    main(["--steps", "25", *args])
    main(["--steps", "50", *args])
    assert "resuming from step 25" in capsys.readouterr().out
    losses = [json.loads(line) for line in (work / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses] == list(range(1, 51))
    first, last = (sum(row["loss"] for row in rows) / 5 for rows in (losses[:5], losses[-5:]))
    assert last < 0.8 * first
    evals = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [25, 50]
    assert all(e["referential"]["n"] + e["explicit"]["n"] == 20 for e in evals)
    assert (out / "training.png").stat().st_size > 1000 and (out / "tokenizer.json").exists()

    reconstructor = build_reconstructor(f"mini:{out}")
    assert isinstance(reconstructor, MiniReconstructor) and reconstructor.name == "mini"
    session = generate_session("test", 1, 4)
    queries = [IntentQuery([t.instruction for t in session.turns[:k + 1]], [t.intent for t in session.turns[:k]],
                           render(session.turns[k].before), render(session.source)) for k in range(4)]
    results = reconstructor.reconstruct(queries)
    assert len(results) == 4 and all(isinstance(r, Reconstruction) for r in results)
    assert all((r.intent is None) == bool(r.failure) for r in results)
    # the saved weights are the trained ones
    trained = torch.load(work / "checkpoint.pt", weights_only=False)["model"]
    loaded = reconstructor.model.state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_the_pool_holds_every_turn_of_ten_turn_sessions():
    images, cells, texts, targets, referential = build_pool(2, 32)
    turns = [t for i in range(2) for t in generate_session("train", i, 10).turns]
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert targets == [t.intent for t in turns] and referential == [t.referential for t in turns]
    assert [len(intents) for _, intents in texts[:10]] == list(range(10))


def test_a_missing_checkpoint_says_how_to_train_one(tmp_path):
    with pytest.raises(ReconstructorError, match="python -m training.intent"):
        build_reconstructor(f"mini:{tmp_path / 'nothing-here'}")
