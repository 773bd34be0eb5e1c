"""The RL trainer: the SDE step's log-prob, ratio == 1 at unchanged weights, credit assignment,
NFT, resume after SIGKILL, and two-process data parallelism."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mteditlab.editors.mini import MiniEditor
from mteditlab.flow import gaussian_log_prob, sde_step, sde_step_stats
from mteditlab.world import generate_session, render
from training.credit import TURN_AGGREGATIONS, aggregate_turns, compute_advantages
from mteditlab.rewards import get_reward
from mteditlab.rewards.verifier import world_meta
from training.config import GRPOConfig, parse_args
from training.objectives import setting_owners
from training.objectives.base import encode_subset
from training.objectives.grpo import GRPO
from training.objectives.nft import NFT
from training.sampling import sample_turns
from training.scoring import RewardTerms, hacking_alarm

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--sessions-per-step", "2", "--num-generations", "4", "--turns", "2", "--steps", "3", "--sde-window", "1",
        "--eval-every", "1000", "--eval-sessions", "2", "--save-every", "1", "--lora-rank", "2", "--lora-alpha", "4",
        "--algo", "nft", "--lora-targets", "attention", "--op-weights", ""]


def test_sde_step_matches_the_design_formula():
    torch.manual_seed(0)
    x, v = torch.randn(4, 12, 16, 16), torch.randn(4, 12, 16, 16)
    sigma, sigma_next, a = torch.tensor([0.9, 0.7, 0.5, 0.2]), torch.tensor([0.8, 0.6, 0.3, 0.0]), 0.7
    mean, scale = sde_step_stats(x, v, sigma, sigma_next, a)
    for b in range(4):
        s, dt = sigma[b].item(), (sigma_next[b] - sigma[b]).item()
        std = a * math.sqrt(s / (1 - s))
        expected = x[b] * (1 + std**2 / (2 * s) * dt) + v[b] * (1 + std**2 * (1 - s) / (2 * s)) * dt
        assert torch.allclose(mean[b], expected, atol=1e-5)
        assert scale[b].item() == pytest.approx(std * math.sqrt(-dt), rel=1e-5)
    sample, logp, _, _ = sde_step(x, v, sigma, sigma_next, a, generator=torch.Generator().manual_seed(1))
    manual = torch.distributions.Normal(mean, scale.expand_as(mean)).log_prob(sample).flatten(1).mean(1)
    assert torch.allclose(logp, manual, atol=1e-5)
    assert torch.allclose(gaussian_log_prob(sample, mean, scale), logp)


@pytest.fixture(scope="module")
def tiny_editor():
    editor = MiniEditor.from_config(seed=0)
    editor.denoiser.requires_grad_(False)
    editor.add_lora(4, 8)
    for n, p in editor.denoiser.named_parameters():
        if "lora_B" in n:  # a non-trivial adapter, so the policy differs from the reference
            torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_("lora_" in n)
    return editor


def test_recomputed_log_prob_equals_the_rollouts(tiny_editor):
    cfg = GRPOConfig(num_generations=3, turns=2, steps=4, sde_window=2, beta=0.01)
    sessions = [generate_session("train", i, 2) for i in range(2)]
    records = sample_turns(tiny_editor, sessions, [render(s.source) for s in sessions], cfg, iteration=0)
    assert len(records) == 2 and all(len(r.window) == 2 for r in records)
    idx = torch.arange(6)
    for rec in records:
        cond = encode_subset(tiny_editor, rec, idx)
        for step in rec.window:
            loss, stats = GRPO(cfg).loss(tiny_editor, rec, cond, idx, torch.ones(6), step, None)
            assert abs(stats["ratio_mean"] - 1) < 1e-5 and abs(stats["ratio_max"] - 1) < 1e-5
            assert stats["clip_frac"] == 0.0 and stats["kl"] > 0
            loss.backward()
    grads = [p.grad for p in tiny_editor.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_editor.denoiser.zero_grad()


def test_the_sde_window_starts_where_it_is_told(tiny_editor):
    sessions = [generate_session("train", i, 3) for i in range(2)]
    sources = [render(s.source) for s in sessions]
    for spec, allowed in (("1-1", {1}), ("2-3", {2, 3}), ("", {1, 2, 3})):
        cfg = GRPOConfig(num_generations=1, turns=3, steps=5, sde_window=2, sde_window_starts=spec)
        starts = {turn.window[0][0] for it in range(4) for turn in sample_turns(tiny_editor, sessions, sources, cfg, it)}
        assert starts <= allowed and (len(allowed) > 1 or starts == allowed)
    for bad in ("0-2", "3-2", "2-4", "2", "a-b"):
        with pytest.raises(ValueError, match="--sde-window-starts"):
            GRPOConfig(steps=5, sde_window=2, sde_window_starts=bad)

def test_nft_loss_prefers_positive_samples(tiny_editor):
    cfg = GRPOConfig(algo="nft", num_generations=2, turns=1, steps=3, sde_window=1, nft_beta=1.0)
    if "old" not in tiny_editor.denoiser.peft_config:
        tiny_editor.add_old_copy()
    session = generate_session("train", 0, 1)
    records = sample_turns(tiny_editor, [session], [render(session.source)], cfg, iteration=0)
    idx = torch.arange(2)
    cond = encode_subset(tiny_editor, records[0], idx)
    losses = [NFT(cfg).loss(tiny_editor, records[0], cond, idx, torch.full((2,), a), None, torch.Generator().manual_seed(0))[1]
              for a in (5.0, -5.0, 0.0)]
    assert [l["nft_positive_weight"] for l in losses] == [1.0, 0.0, 0.5]

    # a session's rollouts share the forward-process draw: two identical samples with opposite
    # advantages pull equally both ways (zero gradient at θ = old); equal advantages do not
    tiny_editor.polyak_update(decay=0.0)
    records[0].x0 = records[0].x0[[0, 0]]
    grads = []
    for advantages in ([2.0, -2.0], [2.0, 2.0]):
        tiny_editor.denoiser.zero_grad()
        NFT(cfg).loss(tiny_editor, records[0], cond, idx, torch.tensor(advantages), None, torch.Generator().manual_seed(0))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_editor.trainable_parameters() if p.grad is not None]).norm())
    tiny_editor.denoiser.zero_grad()
    assert grads[0] < 1e-4 * grads[1] and grads[1] > 0


def test_reward_terms_address_overalls_and_sub_scores(tiny_editor):
    weights = {"verifier": 1.0, "verifier.quality": 0.5, "verifier.ga": 1.0}
    cfg = GRPOConfig(num_generations=2, turns=2, steps=3, sde_window=1, reward_weights=weights)
    sessions = [generate_session("train", i, 2) for i in range(2)]
    records = sample_turns(tiny_editor, sessions, [render(s.source) for s in sessions], cfg, iteration=0)
    verifier = get_reward("verifier")
    scored = RewardTerms(weights, {"verifier": verifier}, verifier).score(records, sessions, 2, world_meta, seed=0)
    scores, gold, subs = scored.trained, scored.gold, scored.sub_means
    assert set(scores) == {"verifier", "verifier.quality", "verifier.ga"}
    assert (scores["verifier"] == gold).all()
    assert (scores["verifier.ga"][..., 0] == 1.0).all()          # GA does not apply at turn 1: satisfied
    quality = scores["verifier.quality"]
    assert ((quality >= 0) & (quality <= 1)).all() and quality.mean() == pytest.approx(subs["verifier/quality"])
    with pytest.raises(ValueError, match="no sub-score 'style'"):
        RewardTerms({"verifier.style": 1.0}, {"verifier": verifier}, verifier).score(records, sessions, 2, world_meta, seed=0)


def test_scoring_overlapped_with_sampling_gives_the_serial_scores(tiny_editor):
    weights = {"judge": 1.0, "verifier.quality": 0.5}
    cfg = GRPOConfig(num_generations=2, turns=3, steps=3, sde_window=1, reward_weights=weights)
    sessions = [generate_session("train", i, 3) for i in range(2)]
    sources = [render(s.source) for s in sessions]
    verifier = get_reward("verifier")
    terms = RewardTerms(weights, {"judge": get_reward("judge"), "verifier": verifier}, verifier)
    scoring = terms.batch(sessions, 2, world_meta, seed=0, overlap=True)
    records = sample_turns(tiny_editor, sessions, sources, cfg, iteration=0, on_turn=scoring.add)
    overlapped, serial = scoring.result(), terms.score(records, sessions, 2, world_meta, seed=0)
    assert scoring.busy_s > 0 and overlapped.sub_means == serial.sub_means
    for name in ("judge", "verifier.quality"):
        np.testing.assert_array_equal(overlapped.trained[name], serial.trained[name])
    np.testing.assert_array_equal(overlapped.gold, serial.gold)
    np.testing.assert_array_equal(overlapped.if_passed, serial.if_passed)


def test_reward_hacking_alarm_fires_when_the_proxy_rises_and_the_gold_falls():
    def history(proxy_slope, gold_slope):
        return [{"reward/judge": 0.5 + proxy_slope * i, "gold_success": 0.7 + gold_slope * i} for i in range(20)]

    alarm = hacking_alarm(history(0.005, -0.005), window=20, proxy_names=["judge"])
    assert alarm is True and json.dumps({"reward_hacking": alarm})      # a plain bool, written to the JSONL
    assert hacking_alarm(history(0.005, 0.005), 20, ["judge"]) is False      # both rise: learning
    assert hacking_alarm(history(0.0, -0.005), 20, ["judge"]) is False       # gold falls alone: no proxy to blame
    assert hacking_alarm(history(0.005, -0.005)[:10], 20, ["judge"]) is False  # window not full yet
    assert hacking_alarm(history(0.005, -0.005), 20, []) is False            # verifier-only training
    gappy = history(0.005, -0.005)
    gappy[3]["reward/judge"] = gappy[7]["gold_success"] = float("nan")     # every reward failed there
    del gappy[12]["reward/judge"]
    assert hacking_alarm(gappy, 20, ["judge"]) is True                      # those rows are skipped
    assert hacking_alarm([{"reward/judge": float("nan"), "gold_success": 0.5}] * 20, 20, ["judge"]) is False


def test_turn_aggregations():
    r = np.array([[[1.0, 0.5, 0.0]]])
    assert aggregate_turns(r, "mean")[0, 0] == pytest.approx(0.5)
    assert aggregate_turns(r, "min")[0, 0] == 0.0 and aggregate_turns(r, "product")[0, 0] == 0.0
    assert aggregate_turns(r, "last")[0, 0] == 0.0
    assert aggregate_turns(r, "success_rate")[0, 0] == pytest.approx(2 / 3)
    assert aggregate_turns(r, "discounted", gamma=0.5)[0, 0] == pytest.approx((1 + 0.25) / 1.75)


def test_broadcast_filter_fusion_and_skipped_groups():
    # one session, 4 rollouts, 3 turns
    r = np.array([[[1, 1, 1], [1, 0, 1], [0, 1, 1], [0, 0, 0]]], dtype=float)
    if_passed = r > 0.5
    adv, _ = compute_advantages({"v": r}, {"v": 1.0}, broadcast=True, trajectory_filter=False)
    assert np.allclose(adv[0, :, 0], adv[0, :, 2])  # same advantage on every turn
    assert adv[0, 0, 0] > adv[0, 1, 0] > adv[0, 3, 0]
    filtered, _ = compute_advantages({"v": r}, {"v": 1.0}, broadcast=True, trajectory_filter=True, if_passed=if_passed)
    assert filtered[0, 1, 0] != 0 and filtered[0, 1, 1] != 0 and filtered[0, 1, 2] == 0  # after the failed turn 2
    assert filtered[0, 2, 1] == 0 and filtered[0, 3, 1] == 0
    per_turn, _ = compute_advantages({"v": r}, {"v": 1.0}, broadcast=False, trajectory_filter=False)
    assert np.allclose(per_turn[0, :, 2], [1 / np.sqrt(3)] * 3 + [-np.sqrt(3)], atol=1e-3)
    # reward vs advantage fusion differ when the rewards have different scales
    q = np.array([[[0.1], [0.2], [0.3], [0.4]]]) * np.ones((1, 4, 3))
    a_reward, _ = compute_advantages({"v": r, "q": q}, {"v": 1.0, "q": 1.0}, fusion="reward", trajectory_filter=False)
    a_adv, _ = compute_advantages({"v": r, "q": q}, {"v": 1.0, "q": 1.0}, fusion="advantage", trajectory_filter=False)
    assert not np.allclose(a_reward, a_adv)
    # a group with no spread is skipped
    flat, stats = compute_advantages({"v": np.ones((1, 4, 3))}, {"v": 1.0})
    assert np.all(flat == 0) and stats["skipped_groups"] == 1.0
    clipped, _ = compute_advantages({"v": np.array([[[1.0]] + [[0.0]] * 99])}, {"v": 1.0}, clip_max=5.0)
    assert clipped.max() == 5.0


@pytest.mark.parametrize("how", TURN_AGGREGATIONS)
def test_a_failed_reward_is_left_out_of_its_group(how):
    # the judge failed on rollout 2's turn 2; the turns it did score are equal: nothing separates the two
    adv, stats = compute_advantages({"v": np.array([[[0.5, 0.5], [0.5, np.nan]]])}, {"v": 1.0}, turn_aggregation=how)
    assert np.all(adv == 0) and stats["reward_failures"] == 1

    # rollout 3 is unscored: advantage 0, and its siblings get the advantages of the group without it
    r = np.array([[[0.9, 0.7], [0.2, 0.4], [0.1, np.nan]]])
    def credit(rewards, **kw):
        return compute_advantages(rewards, {"v": 1.0}, turn_aggregation=how, trajectory_filter=False, **kw)[0]
    adv = credit({"v": r})
    assert np.all(adv[0, 2] == 0) and np.all(adv[0, :2] != 0)
    np.testing.assert_allclose(adv[:, :2], credit({"v": r[:, :2]}))
    # per turn, only the unscored turn is left out of its turn's group
    per_turn, whole = credit({"v": r}, broadcast=False), credit({"v": np.nan_to_num(r, nan=0.3)}, broadcast=False)
    np.testing.assert_allclose(per_turn[..., 0], whole[..., 0])
    assert per_turn[0, 2, 1] == 0
    np.testing.assert_allclose(per_turn[:, :2, 1], credit({"v": r[:, :2]}, broadcast=False)[..., 1])


def test_a_failed_reward_is_left_out_at_its_fusion_level():
    v = np.array([[[1.0, 1.0], [0.0, 0.0], [1.0, np.nan]]])           # failed on rollout 3's turn 2
    q = np.array([[[0.2, 0.2], [0.6, 0.6], [0.9, 0.9]]])
    w = {"v": 1.0, "q": 0.5}
    def credit(rewards, weights, fusion):
        return compute_advantages(rewards, weights, fusion=fusion, trajectory_filter=False)[0]
    # reward fusion: rollout 3 has no fused reward, so no advantage; the others' as without it
    by_reward = credit({"v": v, "q": q}, w, "reward")
    assert np.all(by_reward[0, 2] == 0)
    np.testing.assert_allclose(by_reward[:, :2], credit({"v": v[:, :2], "q": q[:, :2]}, w, "reward"))
    # advantage fusion: rollout 3 misses v's advantage only; q's still counts
    only_v, only_q = credit({"v": v}, {"v": 1.0}, "advantage"), credit({"q": q}, {"q": 1.0}, "advantage")
    np.testing.assert_allclose(credit({"v": v, "q": q}, w, "advantage"), only_v + 0.5 * only_q)
    assert np.all(only_v[0, 2] == 0) and np.all(only_q[0, 2] > 0)
    np.testing.assert_allclose(only_v[:, :2], credit({"v": v[:, :2]}, {"v": 1.0}, "advantage"))


def test_flags_use_the_literature_names():
    cfg = parse_args(["--lora", "--num-generations", "4", "--beta", "0.02", "--clip-range", "1e-4", "--per-turn",
                      "--no-trajectory-filter", "--turn-aggregation", "min", "--fusion", "reward", "--intent", "concat",
                      "--reward", "verifier=0.7,judge=0.3", "--algo", "grpo"])
    assert (cfg.num_generations, cfg.beta, cfg.clip_range, cfg.broadcast, cfg.trajectory_filter) == (4, 0.02, 1e-4, False, False)
    assert cfg.reward_weights == {"verifier": 0.7, "judge": 0.3} and cfg.algo == "grpo"
    cfg = parse_args(["--lora", "--reward-failure-warn", "0.25", "--max-reward-failures", "0"])
    assert (cfg.reward_failure_warn, cfg.max_reward_failures) == (0.25, 0)
    with pytest.raises(SystemExit):
        parse_args([])
    with pytest.raises(ValueError, match="reward-failure-warn"):
        parse_args(["--lora", "--reward-failure-warn", "1.5"])


def test_help_shows_every_setting_with_its_help_text():
    env = {**ENV, "COLUMNS": "10000"}   # one line per flag: the help text is not wrapped
    shown = subprocess.run([sys.executable, "-m", "training.grpo", "--help"], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=True).stdout
    entries: dict[str, str] = {}   # first flag → its lines (the help goes below a long flag)
    for line in shown.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.startswith("    ") and entries:
            entries[flag] += " " + line.strip()
    for f in fields(GRPOConfig):
        assert f.metadata["help"] and f.metadata["help"] in entries[GRPOConfig.flag(f.name)], f.name
    assert "--lora" in entries and "training.grpo --lora" in shown   # the mode flag, and the docstring's commands
    assert "--algo {dagger,draft,grpo,nft,rft,sft}" in shown and "settings of --algo nft only:" in shown


def test_each_objective_checks_its_own_settings():
    assert set(setting_owners()) <= {f.name for f in fields(GRPOConfig)}
    assert setting_owners()["timesteps_per_sample"] == ["nft"] and setting_owners()["broadcast"] == ["grpo", "nft"]
    assert parse_args(["--lora", "--algo", "nft", "--timesteps-per-sample", "3"]).timesteps_per_sample == 3
    for argv, refusal in (
            (["--algo", "grpo", "--timesteps-per-sample", "3"],
             "--algo grpo does not use --timesteps-per-sample 3 (a setting of --algo nft)"),
            (["--per-turn", "--no-rft-share", "--algo", "nft"],
             "--algo nft does not use --no-rft-share (a setting of --algo rft)"),
            (["--per-turn"], "--algo rft does not use --per-turn (a setting of --algo grpo / nft)"),
            (["--algo", "nft", "--timesteps-per-sample", "0"], "--timesteps-per-sample must be >= 1, got 0"),
            (["--algo", "grpo", "--clip-range", "0"], "--clip-range must be > 0, got 0.0"),
            (["--algo", "sft", "--polyak", "1.5"], "--polyak must be in [0, 1], got 1.5")):
        with pytest.raises(ValueError) as refused:
            parse_args(["--lora", *argv])
        assert str(refused.value) == refusal
    with pytest.raises(SystemExit):   # --algo's choices are the registered objectives
        parse_args(["--lora", "--algo", "ppo"])


@pytest.fixture(scope="module")
def checkpoint():
    """The shipped base editor: its rollouts succeed sometimes, so advantages and losses are non-trivial."""
    return ROOT / "checkpoints" / "mini" / "base"


def _train_cmd(out, checkpoint, iterations, extra=()):
    return [sys.executable, "-m", "training.grpo", "--lora", "--editor-path", str(checkpoint), "--out", str(out),
            "--iterations", str(iterations), *TINY, *extra]


def _metric_lines(out):
    return [l for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"train"' in l]


def _metrics(out):
    return [json.loads(l) for l in _metric_lines(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_resume_after_sigkill_continues_and_matches_an_uninterrupted_run(tmp_path, checkpoint):
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, checkpoint, 4), cwd=ROOT, env=ENV, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, checkpoint, 4), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint" / "state.pt").exists() or len(_metrics(killed)) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_at = torch.load(killed / "checkpoint" / "state.pt", weights_only=False)["iteration"]
    before = _metric_lines(killed)[:saved_at]
    assert 1 <= saved_at < 4
    subprocess.run(_train_cmd(killed, checkpoint, 4), cwd=ROOT, env=ENV, check=True, capture_output=True)
    rows, reference = _metrics(killed), _metrics(straight)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    # the checkpointed iterations were not run again: their rows, wall-clock timings included, are the killed run's
    assert _metric_lines(killed)[:saved_at] == before
    assert any(r["loss"] != 0 for r in reference)  # real updates happened
    for a, b in zip(rows, reference):
        assert a["gold_success"] == b["gold_success"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    # it went on from the checkpoint's adapter and optimizer moments: it ends where the uninterrupted run ends
    resumed, whole = (load_file(out / "adapter" / "pytorch_lora_weights.safetensors") for out in (killed, straight))
    assert resumed.keys() == whole.keys() and all(torch.allclose(resumed[k], whole[k], atol=1e-6) for k in whole)
    assert any(v.abs().sum() > 0 for k, v in whole.items() if "lora_B" in k)   # trained, not the zero init
    assert (killed / "curves.png").exists()


def test_two_processes_with_accelerate_keep_the_adapter_in_sync(tmp_path, checkpoint):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu", "-m", "training.grpo",
           *_train_cmd(out, checkpoint, 2)[3:]]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["lora_in_sync"] for r in rows)
