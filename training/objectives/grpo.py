"""Flow-GRPO: the clipped-ratio policy gradient on the SDE window of every turn.

For every SDE step x → x' of every turn, ratio = exp(logp_θ(x') − logp_old(x')) and

    L = mean(max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))) + β·‖mean_θ − mean_ref‖² / (2·scale²),

ε = ``clip_range``, β = ``beta``, the reference being the same model with its adapter disabled. The
old log-probs were recorded while sampling, so no old adapter is kept.
"""

from __future__ import annotations

import torch

from mteditlab.flow import gaussian_log_prob, sde_step_stats
from training.objectives.base import PolicyGradient, register_objective, require


@register_objective("grpo")
class GRPO(PolicyGradient):
    """Flow-GRPO's clipped-ratio objective on the SDE window."""

    keeps_old = False
    settings = (*PolicyGradient.settings, "clip_range", "beta")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require(cfg, clip_range=(cfg.clip_range > 0, "> 0"), beta=(cfg.beta >= 0, ">= 0"))

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
