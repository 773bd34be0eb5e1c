"""The recipe parts of the trainer as flags: NFT's timesteps per sample, sampling by the old adapter and
its decay schedule, the trajectory filter's source, reward-filtered self-training (RFT), the
supervised control (SFT, with degraded inputs) and the DAgger ceiling; and the paired benchmark that
compares them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mteditlab.bench import main as bench_main
from mteditlab.bench import pass_at_k, paired, run_benchmark
from mteditlab.editors import get_editor
from mteditlab.editors.mini import MiniEditor
from mteditlab.rewards import get_reward
from mteditlab.rewards.base import EditSample, RewardModel, RewardOutput
from mteditlab.rewards.features import image_features, parse_cached
from mteditlab.rewards.verifier import world_meta
from mteditlab.world import generate_session, render, sessions
from tests.chat_server import ChatServer, error
from training.config import GRPOConfig
from training.grpo import train
from training.objectives import OBJECTIVES
from training.objectives.dagger import dagger_examples
from training.objectives.rft import rft_examples
from training.objectives.sft import degrade, gold_examples
from training.sampling import WorldSessions, sample_turns
from training.scoring import RewardTerms, turn_passed

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "checkpoints" / "mini" / "base"
TINY = dict(editor_path=str(BASE), sessions_per_step=2, num_generations=4, turns=2, steps=3, sde_window=1,
            eval_every=1000, eval_sessions=2, save_every=1, lora_rank=2, lora_alpha=4)


def _rows(out, kind="train"):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_nft_trains_each_sample_at_the_requested_number_of_timesteps(tmp_path):
    for n in (1, 3):
        train(GRPOConfig(algo="nft", iterations=1, timesteps_per_sample=n, inner_epochs=2, num_minibatches=2,
                         out=str(tmp_path / f"t{n}"), **TINY))
        # turns × timesteps per sample × minibatches × inner epochs loss evaluations
        assert _rows(tmp_path / f"t{n}")[0]["loss_terms"] == 2 * n * 2 * 2
    assert len(_rows(tmp_path / "t1", "eval")) == 1   # the last iteration is evaluated


def test_eval_every_zero_never_evaluates(tmp_path):
    train(GRPOConfig(algo="nft", iterations=1, out=str(tmp_path), **{**TINY, "eval_every": 0}))
    assert len(_rows(tmp_path)) == 1 and _rows(tmp_path, "eval") == []


def test_a_run_whose_judge_is_down_warns_then_stops(tmp_path, capsys):
    out = tmp_path / "run"
    with ChatServer(lambda route, body, headers: error(500, "engine down")) as server:
        cfg = dict(algo="nft", reward_weights={"qwen-vl": 1.0}, reward_paths={"qwen-vl": f"{server.url}?model=m&retries=0"},
                   max_reward_failures=2, out=str(out), **TINY)
        with pytest.raises(RuntimeError, match="judge endpoint") as stopped:
            train(GRPOConfig(iterations=5, **cfg))
        rows = _rows(out)
        assert [r["iteration"] for r in rows] == [1, 2]
        assert all(r["reward_failed_frac"] == 1.0 and r["reward_failing"] is True for r in rows)
        assert "qwen-vl" in str(stopped.value) and server.url in str(stopped.value)
        assert "warning: 100% of the rewards failed at iteration 2" in capsys.readouterr().out
        with pytest.raises(RuntimeError, match="judge endpoint"):   # still down on resume: the streak goes on
            train(GRPOConfig(iterations=5, **cfg))
        assert [r["iteration"] for r in _rows(out)] == [1, 2, 3]


def test_old_policy_decay_schedules():
    ramp = GRPOConfig(algo="nft", old_decay="ramp")
    def old_decay(cfg, iteration):
        return OBJECTIVES[cfg.algo](cfg).decay(iteration)

    assert [old_decay(ramp, i) for i in (0, 100, 499, 2000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    assert old_decay(GRPOConfig(algo="nft", ema_decay=0.9), 1234) == 0.9
    polyak = GRPOConfig(algo="rft", polyak=0.97)
    assert [old_decay(polyak, i) for i in (0, 5, 1000)] == pytest.approx([0.1, 0.4, 0.97])   # warm-up, then constant
    with pytest.raises(ValueError, match="sample-by-old"):
        GRPOConfig(algo="grpo", sample_by_old=True)


@pytest.fixture()
def two_adapters():
    """The base editor with a ``default`` adapter that differs from its ``old`` copy."""
    editor = MiniEditor.from_pretrained(BASE)
    editor.denoiser.requires_grad_(False)
    editor.add_lora(2, 4)
    editor.add_old_copy()                             # old = default
    with torch.no_grad():
        for name, p in editor.denoiser.named_parameters():
            if "lora_B.default" in name:
                p.normal_(std=0.05)                   # now default ≠ old
    return editor


def test_rollouts_are_drawn_by_the_old_adapter_when_asked(two_adapters):
    editor, session = two_adapters, [generate_session("train", 3, 1)]
    cfg = GRPOConfig(algo="nft", num_generations=2, turns=1, steps=3, sde_window=1)
    by_default = sample_turns(editor, session, [render(s.source) for s in session], cfg, 0)[0].x0
    with editor.old_policy():
        by_old = sample_turns(editor, session, [render(s.source) for s in session], cfg, 0)[0].x0
    with OBJECTIVES["nft"](GRPOConfig(algo="nft", sample_by_old=True)).sampling_policy(editor):
        sampled = sample_turns(editor, session, [render(s.source) for s in session], cfg, 0)[0].x0
    with OBJECTIVES["nft"](cfg).sampling_policy(editor):
        unchanged = sample_turns(editor, session, [render(s.source) for s in session], cfg, 0)[0].x0
    assert not torch.allclose(by_default, by_old)
    assert torch.equal(sampled, by_old) and torch.equal(unchanged, by_default)
    editor.polyak_update(decay=0.5)                     # old ← ½·old + ½·default
    params = dict(editor.denoiser.named_parameters())
    name = next(n for n in params if "lora_B.default" in n)
    assert torch.allclose(params[name.replace(".default.", ".old.")], 0.5 * params[name])


class LooksOnly(RewardModel):
    """A reward with no IF sub-score: how clean the output looks."""

    sub_scores = ("quality",)

    def score(self, samples, *, seed=0):
        quality = np.array([image_features(s.edited, s.edited.width)["quality"] for s in samples])
        return RewardOutput.from_scores({"quality": quality}, [None] * len(samples))


def test_the_trajectory_filter_reads_the_trained_reward_not_the_gold(two_adapters):
    editor = two_adapters
    sessions_ = [generate_session("train", i, 2) for i in range(3)]
    verifier, judge = get_reward("verifier"), get_reward("judge")
    cfg = GRPOConfig(num_generations=2, turns=2, steps=3, sde_window=1, reward_weights={"judge": 1.0})
    records = sample_turns(editor, sessions_, [render(s.source) for s in sessions_], cfg, 0)
    if_passed = RewardTerms(cfg.reward_weights, {"judge": judge}, verifier).score(records, sessions_, 2, world_meta, seed=0).if_passed
    for k, rec in enumerate(records):
        samples = [_sample(rec, i, s, k) for i, s in _items(sessions_, 2)]
        judged = judge.score(samples, seed=cfg.seed * 100_003 + k).scores["if"] >= 0.5
        assert (if_passed.reshape(-1, 2)[:, k] == judged).all()
    none = RewardTerms({"looks": 1.0}, {"looks": LooksOnly()}, verifier).score(records, sessions_, 2, world_meta, seed=0).if_passed
    assert none is None                                # no IF in the trained reward: no filter


def _items(sessions_, G):
    return [(i, s) for i, s in enumerate(s for s in sessions_ for _ in range(G))]


def _sample(rec, i, s, k):
    return EditSample(rec.before[i], rec.after[i], rec.texts[i][0], [t.instruction for t in s.turns[:k]],
                      rec.texts[i][1], world_meta(s, k))


def test_rft_keeps_the_turns_that_passed_so_far_with_clean_targets(two_adapters):
    rewards = {"v": np.array([[[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]]), "q": np.full((1, 2, 3), 0.2)}
    assert turn_passed(rewards, {"v": 1.0, "q": 0.5}, threshold=0.5).tolist() == [[[True, False, True], [True, True, False]]]

    editor = two_adapters
    session = generate_session("train", 5, 2)
    cfg = GRPOConfig(num_generations=2, turns=2, steps=10, sde_window=1)
    records = sample_turns(editor, [session], [render(s.source) for s in [session]], cfg, 0)
    passed = np.array([[[True, True], [True, False]]])
    clean = rft_examples(editor, records, passed, "render")
    own = rft_examples(editor, records, passed, "own")
    assert len(clean) == len(own) == 3
    image, text, target = clean[1]
    assert image is records[0].before[1] and text == (records[0].texts[1][1] or records[0].texts[1][0])
    rendered = render(parse_cached(records[0].after[1], 32))
    assert torch.equal(target, editor.encode_images([rendered])[0])     # the verifier's clean re-render
    assert torch.equal(own[1][2], records[0].x0[1])                      # the rollout's own output
    assert clean[2][0] is records[1].before[0]                          # turn 2 starts from its own output

    # sharing: rollout 1 failed turn 2 while on track; it learns from rollout 0's output, from its own input
    shared = rft_examples(editor, records, passed, "own", share=True)
    assert len(shared) == 4
    assert shared[3][0] is records[1].before[1] and torch.equal(shared[3][2], records[1].x0[0])
    mixed = rft_examples(editor, records, passed, "own", share=True, mixed_only=True)   # turn 1: all passed
    assert [e[0] for e in mixed] == [records[1].before[0], records[1].before[1]]
    off_track = np.array([[[True, True], [False, True]]])               # rollout 1 failed turn 1: not on track at 2
    # turn 1: rollout 1 learns from rollout 0; turn 2: only rollout 0 is on track
    assert [e[0] for e in rft_examples(editor, records, off_track, "own", share=True)] == \
        [records[0].before[0], records[0].before[1], records[1].before[0]]
    gold = gold_examples(editor, [session], cfg)
    assert len(gold) == 2 and torch.equal(gold[1][2], editor.encode_images([render(session.turns[1].after)])[0])

    # DAgger: every rollout's own input that still shows the true scene, labelled with the true scene after
    records[1].before[1] = render(session.turns[1].after)             # an off-track state: left out
    on_track = [(k, x) for k in range(2) for x in records[k].before
                if parse_cached(x, 32) == session.turns[k].before]
    assert (1, records[1].before[1]) not in on_track and len(on_track) >= 2
    labelled = dagger_examples(editor, [session], records)
    assert [e[0] for e in labelled] == [x for _, x in on_track]
    assert all(torch.equal(e[2], gold[k][2]) for (k, _), e in zip(on_track, labelled))


def test_degraded_inputs_look_like_own_outputs_and_are_seeded():
    import random
    images = [render(t.after) for s in sessions("val", 30, 2) for t in s.turns]

    def looks(strength, seed=0):
        rng = random.Random(seed)
        spoiled = [degrade(image, strength, rng) for image in images]
        features = [image_features(x, 32) for x in spoiled]
        return spoiled, np.mean([f["quality"] for f in features])

    assert looks(0)[1] == pytest.approx(1.0, abs=0.01)
    spoiled, quality = looks(1.0)
    assert 0.88 < quality < 0.96                     # the base's own outputs: 0.93 at turn 1, 0.89 at turn 10
    assert looks(2.0)[1] < quality
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(spoiled, looks(1.0)[0]))
    assert [parse_cached(x, 32) for x in spoiled[:10]] == [parse_cached(x, 32) for x in images[:10]]   # content kept


@pytest.mark.parametrize("algo", ["rft", "sft", "dagger"])
def test_replay_runs_export_the_polyak_adapter_and_resume(tmp_path, algo):
    out = tmp_path / algo
    cfg = dict(algo=algo, rft_updates=2, rft_batch_size=4, polyak=0.5, lora_targets="attention+conv",
               out=str(out), **TINY, **({"input_degradation": 1.0} if algo == "sft" else {}))
    train(GRPOConfig(iterations=1, **cfg))
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert len(state["buffer"]) == _rows(out)[0]["buffer_size"] > 0
    assert any("conv1" in n for n in state["lora"])
    train(GRPOConfig(iterations=2, **cfg))                  # resumes at iteration 1 with its buffer
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [1, 2] and rows[1]["loss_terms"] == 2
    assert rows[1]["buffer_size"] == rows[0]["buffer_size"] + rows[1]["buffer_new"]
    assert ("gold_success" in rows[0]) == (algo != "sft")   # the control draws no rollouts
    from safetensors.torch import load_file
    exported = load_file(out / "adapter" / "pytorch_lora_weights.safetensors")
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)["lora"]
    key = next(k for k in state if "lora_B.old" in k)
    name = "unet." + key.replace(".old", "")
    assert torch.equal(exported[name], state[key]) and not torch.equal(state[key], state[key.replace(".old", ".default")])
    edited = get_editor("mini", lora=out / "adapter").edit(render(generate_session("val", 0, 1).source), "add a red circle")
    assert edited.size == (32, 32)


def test_paired_benchmark_and_headroom_with_the_reference_editors(tmp_path):
    val = sessions("val", 12, 3, start=40)
    assert [s.index for s in val] == list(range(40, 52))
    oracle = run_benchmark(get_editor("oracle"), val, progress=False)
    identity = run_benchmark(get_editor("identity"), val, progress=False)
    rows = paired(oracle, identity)
    assert [r["delta_overall"] for r in rows] == [1.0, 1.0, 1.0] and all(r["delta_overall_se"] == 0 for r in rows)
    assert oracle["per_turn"][0]["success_se"] == 0.0
    with pytest.raises(ValueError, match="same split"):
        paired(oracle, run_benchmark(get_editor("oracle"), val[:6], progress=False))
    head = pass_at_k(get_editor("oracle"), val, 2, progress=False)
    assert all(r["pass@1"] == r["pass@2"] == 1.0 for r in head["per_turn"])
    assert sum(r["n"] for r in head["per_op"].values()) == 36

    result = bench_main(["--editor", "mini", "--adapter", str(ROOT / "checkpoints" / "mini" / "grpo"), "--against", "base",
                         "--sessions", "6", "--turns", "2", "--split", "val", "--start", "100", "--json", str(tmp_path / "p.json")])
    assert result["start"] == 100 and result["against"]["lora"] is None and len(result["paired"]) == 2
    d = np.array(result["per_session"]["overall"]) - np.array(result["against"]["per_session"]["overall"])
    assert result["paired"][1]["delta_overall"] == pytest.approx(d[:, 1].mean())
    assert json.loads((tmp_path / "p.json").read_text())["paired"] == result["paired"]
    # split over two processes, both sides at once: the same numbers (outputs depend on session, turn, input)
    split = bench_main(["--editor", "mini", "--adapter", str(ROOT / "checkpoints" / "mini" / "grpo"), "--against", "base",
                        "--sessions", "6", "--turns", "2", "--split", "val", "--start", "100", "--workers", "2"])
    assert split["per_session"] == result["per_session"] and split["paired"] == result["paired"]
    assert split["against"]["per_session"] == result["against"]["per_session"] and split["per_turn"] == result["per_turn"]


def test_op_weights_oversample_sessions_with_weak_operations():
    def share(cfg):
        drawn = [s for it in range(12) for s in WorldSessions(cfg).draw(it)]
        return np.mean([any(t.edit.op == "swap" for t in s.turns) for s in drawn])

    plain = GRPOConfig(sessions_per_step=16, turns=3, op_weights={})
    assert [s.index for s in WorldSessions(plain).draw(3)] == [s.index for s in WorldSessions(plain).draw(3)]  # seeded
    assert share(GRPOConfig(sessions_per_step=16, turns=3, op_weights={"swap": 4.0})) > share(plain) + 0.15


def test_world_only_targets_need_a_world_editor():
    assert GRPOConfig().rft_target == "render" and GRPOConfig(editor="kontext").rft_target == "own"
    for bad in (dict(algo="sft"), dict(algo="dagger"), dict(algo="rft", rft_target="render")):
        with pytest.raises(ValueError, match="does not edit the world's scenes"):
            GRPOConfig(editor="kontext", **bad)


def test_the_judge_is_differentiable_and_agrees_with_its_scores():
    from mteditlab.rewards.mini_judge import MiniJudge, image_array, text_segments
    judge = MiniJudge.from_pretrained()
    session = generate_session("val", 3, 2)
    before, after = render(session.turns[1].before), render(session.turns[1].after)
    segments = [text_segments(session.turns[1].instruction, [session.turns[0].instruction], session.turns[1].intent)]
    source = np.stack([image_array(before)])
    edited = (torch.from_numpy(np.asarray(after, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1).requires_grad_()
    probs = judge.differentiable_probs(source, edited, segments)
    assert torch.allclose(probs.double(), torch.from_numpy(judge.predict(source, np.stack([image_array(after)]), segments)),
                          atol=1e-5)
    probs.sum().backward()
    assert edited.grad is not None and edited.grad.abs().sum() > 0


def test_draft_checks_its_reward_and_editor_and_raises_the_judges_score(tmp_path):
    with pytest.raises(ValueError, match="must be differentiable"):
        GRPOConfig(algo="draft", reward_weights={"verifier": 1.0})   # not differentiable
    with pytest.raises(ValueError, match="does not offer"):
        GRPOConfig(algo="draft", editor="kontext", reward_weights={"judge": 1.0})
    cfg = dict(TINY, algo="draft", reward_weights={"judge.quality": 1.0}, draft_k=2, draft_updates=3,
               draft_batch_size=4, learning_rate=3e-3, beta=0.0, steps=4, out=str(tmp_path / "draft"))
    train(GRPOConfig(iterations=2, **cfg))
    rows = _rows(tmp_path / "draft")
    assert [r["iteration"] for r in rows] == [1, 2] and rows[0]["anchor"] == 0.0
    assert rows[1]["draft_reward"] > rows[0]["draft_reward"]       # it climbs the judge's quality head
    assert (tmp_path / "draft" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    # the world's pixel quality, alone: differentiable too
    train(GRPOConfig(iterations=2, **{**cfg, "reward_weights": {"verifier.quality": 1.0}, "out": str(tmp_path / "q")}))
    rows = _rows(tmp_path / "q")
    assert rows[1]["draft_reward"] > rows[0]["draft_reward"]


def test_the_differentiable_quality_is_the_benchmarks_quality():
    import random
    import torch.nn.functional as F
    from mteditlab.editors.mini import images_to_tensor
    from mteditlab.rewards.features import differentiable_quality
    rng = random.Random(0)
    images = [degrade(render(t.after), 1.5, rng) for s in sessions("val", 6, 2) for t in s.turns]
    pixels = F.pixel_shuffle(images_to_tensor(images, 32), 2).requires_grad_()
    quality = differentiable_quality(pixels)
    assert quality.detach().numpy() == pytest.approx([image_features(x, 32)["quality"] for x in images], abs=1e-5)
    quality.sum().backward()
    assert pixels.grad.abs().sum() > 0
