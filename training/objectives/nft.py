"""DiffusionNFT: negative-aware fine-tuning on the forward process of the final samples.

With r = clamp(A / (2·A_max) + ½, 0, 1), v⁺ = β·v_θ + (1 − β)·v_old, v⁻ = (1 + β)·v_old − β·v_θ and
x̂0(v) = x_t − t·v at x_t = (1 − t)·x0 + t·ε,

    L = r·‖x̂0(v⁺) − x0‖² + (1 − r)·‖x̂0(v⁻) − x0‖²,

weighted by 1 / mean|x̂0(v_old) − x0| (adaptive), β = ``nft_beta``, A_max = ``adv_clip_max``. The old
policy is an EMA copy of the adapter, old ← d·old + (1 − d)·θ after each iteration; each sample is
trained at ``timesteps_per_sample`` forward-process times, and rollouts may be drawn by the old
adapter (``sample_by_old``), as DiffusionNFT's authors do.
"""

from __future__ import annotations

import contextlib

import torch

from training.objectives.base import PolicyGradient, register_objective, require


@register_objective("nft")
class NFT(PolicyGradient):
    """DiffusionNFT's negative-aware objective at ``timesteps_per_sample`` forward-process times per sample."""

    settings = (*PolicyGradient.settings, "nft_beta", "ema_decay", "old_decay", "timesteps_per_sample", "sample_by_old")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require(cfg, nft_beta=(cfg.nft_beta > 0, "> 0"), ema_decay=(0 <= cfg.ema_decay <= 1, "in [0, 1]"),
                timesteps_per_sample=(cfg.timesteps_per_sample >= 1, ">= 1"))

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
