"""The trainer's objectives, one class each: how a batch of rollouts (or gold pairs) updates the adapter.

* :class:`GRPO` (Flow-GRPO): for every SDE step of every turn, ratio = exp(logp_θ − logp_old) and
      L = mean(max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))) + β·‖mean_θ − mean_ref‖² / (2·scale²),
  the reference being the same model with its adapter disabled.
* :class:`NFT` (DiffusionNFT): on the forward process of the final samples,
      r = clamp(A / (2·A_max) + ½, 0, 1),  v⁺ = β·v_θ + (1 − β)·v_old,  v⁻ = (1 + β)·v_old − β·v_θ,
      L = r·‖x̂0(v⁺) − x0‖² + (1 − r)·‖x̂0(v⁻) − x0‖²,  x̂0(v) = x_t − t·v,
  weighted by 1 / mean|x̂0(v_old) − x0|, the old policy being an EMA copy of the adapter.
* :class:`RFT` (reward-filtered self-training): turns that passed fill a replay buffer trained on by
  the flow-matching loss ‖v_θ(x_t) − (ε − x0)‖²; the Polyak average is exported.
* :class:`SFT` (the supervised control): the same loss and buffer, filled with the world's gold pairs.

Each has ``setup`` (its adapters), ``update`` (one iteration's optimisation) and ``after_step``
(the old / Polyak adapter's EMA step).
"""

from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from mteditlab.editors.flow_policy import FlowPolicy
from mteditlab.editors.flow_policy import OLD, TRAINED
from mteditlab.flow import gaussian_log_prob, sde_step_stats
from mteditlab.intent import turn_text
from mteditlab.rewards.features import parse_cached
from mteditlab.world import Session, render
from training.credit import compute_advantages
from training.distributed import Updater
from training.sampling import TurnSamples
from training.scoring import Scores, turn_passed

if TYPE_CHECKING:
    from training.grpo import GRPOConfig


class Algorithm:
    """An objective. ``samples``: it draws rollouts; ``keeps_old``: it keeps an ``old`` EMA adapter;
    ``exports``: the adapter saved and evaluated; ``buffer``: its replay buffer (checkpointed)."""

    samples = True
    keeps_old = True
    exports = TRAINED

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.buffer: list[tuple] = []

    def setup(self, editor: FlowPolicy) -> None:
        """Adapters beyond the trained ``default``: the ``old`` copy when ``keeps_old``."""
        if self.keeps_old:
            editor.add_old_copy()

    def loss_terms(self) -> int:
        """Backward passes per optimizer step."""
        return 1

    def sampling_policy(self, editor: FlowPolicy):
        """Context in which rollouts are drawn (default: the trained adapter)."""
        return contextlib.nullcontext()

    def exported_policy(self, editor: FlowPolicy):
        """Context running the adapter this objective exports."""
        return editor.old_policy() if self.exports == OLD else contextlib.nullcontext()

    def update(self, editor: FlowPolicy, sessions: list, turns: list[TurnSamples] | None, scores: Scores | None,
               updater: Updater, iteration: int, generator: torch.Generator) -> tuple[dict, dict[str, list[float]]]:
        """One iteration's optimisation: ``(metrics, per-term loss statistics)``."""
        raise NotImplementedError

    def decay(self, iteration: int) -> float:
        """Decay of the old adapter's EMA after ``iteration``."""
        raise NotImplementedError

    def after_step(self, editor: FlowPolicy, iteration: int) -> None:
        if self.keeps_old:
            editor.polyak_update(self.decay(iteration))


class PolicyGradient(Algorithm):
    """GRPO and NFT: credit from the rewards (``training.credit``), then ``inner_epochs`` passes of
    ``num_minibatches`` optimizer steps over the rollouts, one loss term per turn and ``steps`` entry."""

    def steps(self, turn: TurnSamples) -> list:
        raise NotImplementedError

    def loss(self, editor: FlowPolicy, turn: TurnSamples, cond, idx: torch.Tensor, adv: torch.Tensor, step,
             generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def update(self, editor, sessions, turns, scores, updater, iteration, generator):
        cfg = self.cfg
        advantages, stats = compute_advantages(
            scores.trained, cfg.reward_weights, turn_aggregation=cfg.turn_aggregation, fusion=cfg.fusion,
            broadcast=cfg.broadcast, trajectory_filter=cfg.trajectory_filter, if_passed=scores.if_passed,
            clip_max=cfg.adv_clip_max, gamma=cfg.discount)
        adv = torch.from_numpy(advantages.reshape(-1, cfg.turns)).float()   # [S·G, T]
        loss_stats: dict[str, list[float]] = {}
        for epoch in range(cfg.inner_epochs):
            order = torch.randperm(adv.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 31 + iteration * 7 + epoch))
            for minibatch in order.chunk(cfg.num_minibatches):
                updater.zero_grad()
                for k, turn in enumerate(turns):
                    cond = encode_subset(editor, turn, minibatch)
                    for step in self.steps(turn):
                        with updater.term():
                            loss, term_stats = self.loss(editor, turn, cond, minibatch, adv[minibatch, k], step, generator)
                            updater.backward(loss)
                        for key, value in {"loss": loss.item(), **term_stats}.items():
                            loss_stats.setdefault(key, []).append(value)
                updater.step()
        return stats, loss_stats


class GRPO(PolicyGradient):
    """Flow-GRPO's clipped-ratio objective on the SDE window (no old adapter: the ratio's old
    log-probs were recorded while sampling)."""

    keeps_old = False

    def loss_terms(self) -> int:
        return self.cfg.turns * self.cfg.sde_window

    def steps(self, turn):
        return turn.window

    def loss(self, editor, turn, cond, idx, adv, step, generator):
        """Clipped-ratio policy loss (+ KL to the adapter-disabled reference) on one SDE step of one turn."""
        cfg = self.cfg
        i, x, x_next, logp_old = step
        sigmas = turn.sigmas
        v = editor.velocity(x[idx], sigmas[i].expand(len(idx)), cond)
        mean, scale = sde_step_stats(x[idx], v, sigmas[i], sigmas[i + 1], cfg.noise_level)
        logp = gaussian_log_prob(x_next[idx], mean, scale)
        ratio = torch.exp(logp - logp_old[idx])
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        kl = torch.zeros(())
        if cfg.beta > 0:
            with torch.no_grad(), editor.adapter_disabled():
                v_ref = editor.velocity(x[idx], sigmas[i].expand(len(idx)), cond)
            mean_ref, _ = sde_step_stats(x[idx], v_ref, sigmas[i], sigmas[i + 1], cfg.noise_level)
            kl = (((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * scale.flatten() ** 2)).mean()
            loss = loss + cfg.beta * kl
        return loss, {"kl": kl.item(), "clip_frac": ((ratio - 1).abs() > cfg.clip_range).float().mean().item(),
                      "ratio_mean": ratio.mean().item(), "ratio_max": ratio.max().item()}


class NFT(PolicyGradient):
    """DiffusionNFT's negative-aware objective at ``timesteps_per_sample`` forward-process times per sample."""

    def loss_terms(self) -> int:
        return self.cfg.turns * self.cfg.timesteps_per_sample

    def steps(self, turn):
        return range(self.cfg.timesteps_per_sample)

    def sampling_policy(self, editor):
        """The old (EMA) adapter with ``--sample-by-old`` (as DiffusionNFT's authors do), else the trained one."""
        return editor.old_policy() if self.cfg.sample_by_old else contextlib.nullcontext()

    def decay(self, iteration: int) -> float:
        """Constant ``ema_decay``, or DiffusionNFT's ramp d = min(0.001·iteration, 0.5) (old ≈ current at first)."""
        return min(0.001 * iteration, 0.5) if self.cfg.old_decay == "ramp" else self.cfg.ema_decay

    def loss(self, editor, turn, cond, idx, adv, step, generator):
        """The G rollouts of a session share their forward-process draw (t, ε) (common random numbers):
        the positive / negative pull between them then comes from their samples x0, not from the draw."""
        cfg = self.cfg
        x0 = turn.x0[idx]
        r = torch.clamp(adv / (2 * cfg.adv_clip_max) + 0.5, 0, 1)
        group = idx // cfg.num_generations
        n_groups = turn.x0.shape[0] // cfg.num_generations
        t = torch.rand(n_groups, generator=generator)[group].view(-1, *[1] * (x0.dim() - 1))
        noise = torch.randn((n_groups, *x0.shape[1:]), generator=generator)[group]
        x_t = (1 - t) * x0 + t * noise
        v_theta = editor.velocity(x_t, t.flatten(), cond)
        with torch.no_grad(), editor.old_policy():
            v_old = editor.velocity(x_t, t.flatten(), cond)
        v_pos = cfg.nft_beta * v_theta + (1 - cfg.nft_beta) * v_old
        v_neg = (1 + cfg.nft_beta) * v_old - cfg.nft_beta * v_theta
        err_pos = ((x_t - t * v_pos - x0) ** 2).flatten(1).mean(1)
        err_neg = ((x_t - t * v_neg - x0) ** 2).flatten(1).mean(1)
        weight = 1 / ((x_t - t * v_old - x0).abs().flatten(1).mean(1) + 1e-3)   # adaptive, no gradient
        loss = (weight * (r * err_pos + (1 - r) * err_neg)).mean()
        return loss, {"nft_positive_weight": r.mean().item()}


class Replay(Algorithm):
    """RFT and SFT: new (input image, text, target latents) examples join a replay buffer of
    ``replay_size``; ``rft_updates`` optimizer steps on batches of ``rft_batch_size`` drawn from it;
    the exported adapter is the Polyak average d = min(polyak, (1 + iteration) / (10 + iteration))
    (the usual warm-up, so it does not lag at the start)."""

    exports = OLD

    def examples(self, editor, sessions, turns, scores) -> list[tuple]:
        raise NotImplementedError

    def decay(self, iteration: int) -> float:
        return min(self.cfg.polyak, (1 + iteration) / (10 + iteration))

    def update(self, editor, sessions, turns, scores, updater, iteration, generator):
        cfg = self.cfg
        new = self.examples(editor, sessions, turns, scores)
        self.buffer[:] = (self.buffer + new)[-cfg.replay_size:]
        sampler = random.Random(f"{cfg.seed}/replay/{iteration}")
        loss_stats: dict[str, list[float]] = {}
        for _ in range(cfg.rft_updates if self.buffer else 0):
            updater.zero_grad()
            with updater.term():
                loss = flow_matching_loss(editor, sampler.sample(self.buffer, min(len(self.buffer), cfg.rft_batch_size)), generator)
                updater.backward(loss)
            loss_stats.setdefault("loss", []).append(loss.item())
            updater.step()
        return {"buffer_new": float(len(new)), "buffer_size": float(len(self.buffer))}, loss_stats


class RFT(Replay):
    """Every turn of a rollout whose turns so far all passed the reward (fused score ≥ ``rft_threshold``)
    is an example (:func:`rft_examples`)."""

    def examples(self, editor, sessions, turns, scores):
        cfg = self.cfg
        passed = turn_passed(scores.trained, cfg.reward_weights, cfg.rft_threshold)
        return rft_examples(editor, turns, passed, cfg.rft_target, cfg.rft_share, cfg.rft_mixed_only)


class SFT(Replay):
    """The supervised control: the world's gold pairs, teacher-forced; no rollouts."""

    samples = False

    def examples(self, editor, sessions, turns, scores):
        return gold_examples(editor, sessions, self.cfg)


ALGORITHMS: dict[str, type[Algorithm]] = {"rft": RFT, "nft": NFT, "grpo": GRPO, "sft": SFT}


def flow_matching_loss(editor: FlowPolicy, batch: list[tuple], generator: torch.Generator) -> torch.Tensor:
    """Plain rectified-flow loss on (input image, text, target latents) examples:
    x_t = (1 − t)·x0 + t·ε with logit-normal t, L = ‖v_θ(x_t, t, cond) − (ε − x0)‖²."""
    cond = editor.encode([b[0] for b in batch], [b[1] for b in batch])
    x0 = torch.stack([b[2] for b in batch]).to(editor.device)
    t = torch.sigmoid(torch.randn(len(batch), generator=generator)).view(-1, *[1] * (x0.dim() - 1))
    noise = torch.randn(x0.shape, generator=generator)
    v = editor.velocity((1 - t) * x0 + t * noise, t.flatten(), cond)
    return torch.nn.functional.mse_loss(v.float(), noise - x0)


def rft_examples(editor: FlowPolicy, turns: list[TurnSamples], passed: np.ndarray, target: str,
                 share: bool = False, mixed_only: bool = False) -> list[tuple]:
    """(input image, text, target latents) from a batch of rollouts; ``passed`` is ``[S, G, T]``.

    A rollout is *on track* at turn k when its turns before k all passed. Every on-track rollout that
    passed turn k is an example with its own output as target; with ``share``, every on-track rollout
    that failed turn k learns from a sibling that passed it (same session, same turn: its input shows
    the same scene), its own input paired with the sibling's target (best-of-G distillation). With
    ``mixed_only``, only (session, turn) groups whose on-track rollouts both passed and failed give
    examples (what every rollout already gets right teaches little; DAPO's dynamic-sampling idea).
    ``own``: the winner's output latents; ``render``: the latents of the clean render of the scene the
    verifier reads in the winner's output (world only)."""
    S, G, T = passed.shape
    on_track = np.concatenate([np.ones((S, G, 1), bool), np.cumprod(passed, -1)[..., :-1].astype(bool)], -1)
    examples = []
    for k, turn in enumerate(turns):
        for s in range(S):
            ready = np.flatnonzero(on_track[s, :, k])
            winners = [g for g in ready if passed[s, g, k]]
            if mixed_only and len(winners) == len(ready):
                continue
            for j, g in enumerate(ready if share and winners else winners):
                w = s * G + (g if passed[s, g, k] else winners[j % len(winners)])
                if target == "own":
                    x0 = turn.x0[w]
                else:
                    clean = render(parse_cached(turn.after[w], turn.after[w].width), turn.after[w].width)
                    x0 = editor.encode_images([clean])[0]
                i = s * G + g
                examples.append((turn.before[i], turn.texts[i][1] or turn.texts[i][0], x0.cpu()))
    return examples


def gold_examples(editor: FlowPolicy, sessions: list[Session], cfg: GRPOConfig) -> list[tuple]:
    """Teacher-forced (true scene before, text, latents of the true scene after) for every turn."""
    examples = []
    for s in sessions:
        for k in range(cfg.turns):
            text, intent = turn_text(s, k, cfg.intent)
            examples.append((render(s.turns[k].before), intent or text,
                             editor.encode_images([render(s.turns[k].after)])[0].cpu()))
    return examples


def encode_subset(editor: FlowPolicy, turn: TurnSamples, idx: torch.Tensor):
    """Re-encode the condition of items ``idx`` of a turn (conditions are backend objects: not sliced)."""
    idx = idx.tolist()
    return editor.encode([turn.before[i] for i in idx], [turn.texts[i][1] or turn.texts[i][0] for i in idx])
