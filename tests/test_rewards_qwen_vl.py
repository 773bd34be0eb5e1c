"""Reward protocol, score parsing and the ``qwen-vl`` judge on tiny random-weight Qwen-VL models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mteditlab.rewards.base import RewardOutput, combine_overall
from mteditlab.rewards.parsing import ScoreParseError, parse_score
from mteditlab.rewards.qwen_vl import JUDGE_ID_ENV, QwenVLJudge
from tests.tiny_qwen_vl import ARCHS, build_model, build_processor, build_tokenizer, judge_samples



# ---- protocol -----------------------------------------------------------------------------------
def test_reward_output_overall_rules_and_failures():
    scores = {"if": np.array([0.5, np.nan, 1.0]), "cc": np.array([1.0, 0.2, 0.5]),
              "quality": np.array([0.25, 1.0, 1.0]), "ga": np.array([np.nan, np.nan, 0.0])}
    out = RewardOutput.from_scores(scores, [None, "if: empty reply", None])
    np.testing.assert_allclose(out.overall, [(0.5 + 1 + 0.25) / 3, np.nan, 2.5 / 4])
    assert out.valid.tolist() == [True, False, True] and out.n_failures == 1
    np.testing.assert_allclose(combine_overall(scores, "viescore"), [np.sqrt(0.5 * 0.25), np.sqrt(0.2), 0.0])
    tensor_out = RewardOutput(scores={"if": torch.tensor([0.5])}, overall=torch.tensor([0.5]), failures=[None])
    assert isinstance(tensor_out.scores["if"], np.ndarray)
    with pytest.raises(ValueError, match="NaN exactly"):
        RewardOutput(scores={}, overall=np.array([np.nan]), failures=[None])  # a NaN needs a reason
    with pytest.raises(ValueError, match="NaN exactly"):
        RewardOutput(scores={}, overall=np.array([0.3]), failures=["oops"])  # a failure is never a number
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RewardOutput(scores={"if": np.array([1.5])}, overall=np.array([0.5]), failures=[None])


# ---- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, expected", [
    ("Score: 7", 7 / 9),
    ("The red circle is now blue, nothing else moved.\nScore: 9", 1.0),
    ("**Score:** 6.", 6 / 9),
    ("score = 4/9", 4 / 9),
    ("Score: 5 out of 9!", 5 / 9),
    ("Score: 0", 0.0),
    ("Score: 4.5", 0.5),
    ("<think>maybe Score: 2</think>\nScore: 8", 8 / 9),
])
def test_parse_score_accepts(reply, expected):
    assert parse_score(reply, 9) == pytest.approx(expected)


@pytest.mark.parametrize("reply, reason", [
    ("score: 11", "outside"),
    ("Score: -3", "outside"),
    ("Score: ten", "malformed"),
    ("Score: 7 or 8", "malformed"),
    ("Score:", "malformed"),
    ("Score: ٧", "malformed"),  # a non-ASCII digit
    ("Score: 3\nScore: 5", "2 score statements"),
    ("Score: 4/10", "out of 10"),
    ("It looks good to me.", "no 'Score: N'"),
    ("", "empty"),
    ("  \n ", "empty"),
    (None, "empty"),
])
def test_parse_score_rejects(reply, reason):
    with pytest.raises(ScoreParseError, match=reason):
        parse_score(reply, 9)


# ---- the judge ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def parts(request, tokenizer):
    processor = build_processor(request.param, tokenizer)
    return build_model(request.param, tokenizer), processor


@pytest.fixture(scope="module")
def samples():
    return judge_samples()


def n_spans(row: torch.Tensor, token_id: int) -> int:
    hits = (row == token_id).int()
    return int((hits[1:] > hits[:-1]).sum() + hits[0])


def test_prompt_holds_source_then_edited_image(parts, samples):
    model, processor = parts
    judge = QwenVLJudge(model, processor)
    jobs = [(samples[0], "if"), (samples[1], "quality"), (samples[2], "ga")]
    inputs = judge.prepare(jobs)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert [n_spans(row, pad_id) for row in inputs["input_ids"]] == [2, 2, 2]
    assert inputs["image_grid_thw"].shape[0] == 2 * len(jobs)
    per_image = int(inputs["image_grid_thw"][0].prod())
    assert inputs["pixel_values"].shape[0] == 2 * len(jobs) * per_image
    source_alone = processor.image_processor(images=[samples[0].source], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"][:per_image], source_alone)
    texts = processor.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=False)
    for text in texts:
        user = text[text.index("<|im_start|>user"):]
        first_image, second_image = user.index("<|image_pad|>"), user.rindex("<|image_pad|>")
        assert user.index("SOURCE image") < first_image < user.index("EDITED image") < second_image
        assert text.endswith("<|im_start|>assistant\nScore: ")  # direct-mode prefill, left padding
    assert "make it bigger" in texts[0] and "make the big square green" in texts[0]
    assert "remove the blue circle" not in texts[1]  # quality is judged without the instruction


def test_direct_scores_are_expected_values_of_digit_probabilities(parts, samples):
    model, processor = parts
    judge = QwenVLJudge(model, processor, min_score_mass=0.0, batch_size=4)
    out = judge.score(samples)
    assert out.n_failures == 0 and out.valid.all()
    assert np.isnan(out.scores["ga"][1]) and not np.isnan(out.scores["ga"][[0, 2]]).any()  # ga needs history
    digits = [processor.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    for i, sample in enumerate(samples):
        for crit in ("if", "cc", "quality", "ga"):
            if crit == "ga" and not sample.history:
                continue
            with torch.no_grad():  # one chat alone (no padding) vs. the batched, left-padded call
                logits = model(**judge.prepare([(sample, crit)])).logits[0, -1]
            p = logits.softmax(-1)[digits].double()
            expected = float((p * torch.arange(10)).sum() / p.sum() / 9)
            assert 0.0 <= out.scores[crit][i] <= 1.0
            assert out.scores[crit][i] == pytest.approx(expected, abs=1e-5)
            assert out.details["score_mass"][crit][i] == pytest.approx(float(p.sum()), abs=1e-6)
    np.testing.assert_allclose(out.overall, combine_overall(out.scores, "mean"))


def test_direct_low_score_mass_is_a_reported_failure(parts, samples):
    out = QwenVLJudge(*parts, sub_scores=("if", "cc")).score(samples[:2])  # random model: ~1.7% mass on digits
    assert out.n_failures == 2 and np.isnan(out.overall).all() and np.isnan(out.scores["if"]).all()
    assert all("if: score tokens hold" in f and "cc: score tokens hold" in f for f in out.failures)


def scripted_generate(model, tokenizer, replies):
    """``model.generate`` forced (through ``prefix_allowed_tokens_fn``) to write ``replies[row]``."""
    generate = model.generate
    scripts = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in replies]

    def forced(**kwargs):
        prompt_len = kwargs["input_ids"].shape[1]

        def allowed(row, ids):
            script = scripts[row]
            return [script[min(ids.shape[-1] - prompt_len, len(script) - 1)]]

        return generate(**kwargs, prefix_allowed_tokens_fn=allowed)

    return forced


def test_thinking_votes_average_valid_replies_and_count_failures(tokenizer, samples, monkeypatch):
    model, processor = build_model("qwen2_5_vl", tokenizer), build_processor("qwen2_5_vl", tokenizer)
    replies = [  # chats in order (sample, sub-score), each repeated `votes` = 3 times in a row
        "Looks right.\nScore: 9", "Score: 6", "Score: 11",  # sample 0, if: 1 bad vote
        "Score: 3", "Score: 3", "Score: 3",  # sample 0, cc
        "", "ten", "Score: 2\nScore: 4",  # sample 1, if: all votes fail
        "Score: -1", "Score: 0", "Score: 4.5",  # sample 1, cc
    ]
    monkeypatch.setattr(model, "generate", scripted_generate(model, tokenizer, replies))
    judge = QwenVLJudge(model, processor, mode="thinking", votes=3, max_new_tokens=16, sub_scores=("if", "cc"))
    out = judge.score(samples[:2], seed=3)
    np.testing.assert_allclose(out.scores["if"], [(1 + 6 / 9) / 2, np.nan])
    np.testing.assert_allclose(out.scores["cc"], [3 / 9, 0.25])
    np.testing.assert_allclose(out.overall, [((1 + 6 / 9) / 2 + 3 / 9) / 2, np.nan])
    assert out.failures[0] is None and out.n_failures == 1
    assert out.failures[1].startswith("if: all 3 votes failed: empty reply; no 'Score: N' statement; 2 score")
    assert out.details["failed_votes"]["if"].tolist() == [1, 3]
    assert out.details["failed_votes"]["cc"].tolist() == [0, 1]
    assert out.details["replies"]["if"][0] == replies[:3]


def test_thinking_end_to_end_generation_is_seeded(parts, samples):
    model, processor = parts
    judge = QwenVLJudge(model, processor, mode="thinking", votes=2, max_new_tokens=6, sub_scores=("if", "ga"))
    inputs = judge.prepare([(samples[0], "if")])
    assert not processor.tokenizer.decode(inputs["input_ids"][0]).endswith("Score: ")  # no prefill
    first, again, other = (judge.score(samples[:2], seed=s) for s in (0, 0, 1))
    assert first.details["replies"] == again.details["replies"]
    assert first.details["replies"] != other.details["replies"]
    assert all(len(r) == 2 for r in first.details["replies"]["if"])
    for i in range(2):  # random weights: each item is a number or a counted, reported failure
        assert (first.failures[i] is None) == np.isfinite(first.overall[i])
        assert 0 <= first.details["failed_votes"]["if"][i] <= 2
        if first.details["failed_votes"]["if"][i] == 2:
            assert "if: all 2 votes failed" in first.failures[i]


def test_judge_rejects_invalid_settings(parts):
    with pytest.raises(ValueError, match="votes"):
        QwenVLJudge(*parts, mode="direct", votes=3)
    with pytest.raises(ValueError, match="scale"):
        QwenVLJudge(*parts, mode="direct", scale=10)
    with pytest.raises(ValueError, match="sub-scores"):
        QwenVLJudge(*parts, sub_scores=("if", "aesthetics"))


def test_from_pretrained_missing_weights_says_how_to_get_them(monkeypatch):
    monkeypatch.setenv(JUDGE_ID_ENV, "mteditlab-test/absent-judge")
    with pytest.raises(RuntimeError) as err:
        QwenVLJudge.from_pretrained()
    message = str(err.value)
    assert "'mteditlab-test/absent-judge'" in message and "HF_HOME=" in message
    assert "hf download mteditlab-test/absent-judge" in message


def test_from_pretrained_loads_a_local_directory(tokenizer, samples, tmp_path):
    model, processor = build_model("qwen2_5_vl", tokenizer), build_processor("qwen2_5_vl", tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = QwenVLJudge.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, min_score_mass=0.0,
                                         sub_scores=("if",))
    expected = QwenVLJudge(model, processor, min_score_mass=0.0, sub_scores=("if",)).score(samples)
    np.testing.assert_allclose(loaded.score(samples).overall, expected.overall, rtol=1e-6)
