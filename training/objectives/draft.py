"""DRaFT-K: direct reward fine-tuning through the last K sampling steps, from the editor's own states.

The iteration's rollouts give the states: every turn's input of every rollout (its own previous output,
so later turns carry the drift the base accumulates). For a batch of them, the edit is sampled again by
the ODE from fresh noise, the first ``steps − K`` steps without gradients and the last K with, and the
reward scores the result differentiably:

    r = (Σ_h w_h·p_h(x0) + w_q·quality(x0)) / (Σ_h w_h + w_q),    L = −mean(r) + β·mean‖v_θ − v_ref‖²,

the anchor over the K steps, the reference being the model with its adapter disabled. From ``--reward``:
``judge`` (its sub-scores weighed equally) or ``judge.SUB`` give the mini judge's head probabilities
p_h (:meth:`~mteditlab.rewards.mini_judge.MiniJudge.differentiable_probs`; global awareness has no
weight on a first turn), ``verifier.quality`` the world's pixel quality against the clean render of the
scene the output shows (:func:`~mteditlab.rewards.features.differentiable_quality`). The exported
adapter is the Polyak average of the trained one (``--polyak``, as RFT's). The reward must be differentiable, so only those terms are
accepted (the calibrated reward reads hand-made features; a served judge returns text), on an editor
with a differentiable decode to pixels (the mini editor's is a pixel shuffle).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from mteditlab.editors import EDITORS
from mteditlab.editors.flow_policy import FlowPolicy
from mteditlab.flow import ode_step
from mteditlab.rewards.base import GA
from mteditlab.rewards.features import differentiable_quality
from mteditlab.rewards.mini_judge import HEADS, MiniJudge, image_array, text_segments
from training.objectives.base import PolyakExport, needs_the_world, register_objective, require


@register_objective("draft")
class DRaFT(PolyakExport):
    """Back-propagate a differentiable reward through the last ``draft_k`` sampling steps; the Polyak
    average is exported (``--polyak 0``: the trained adapter)."""

    settings = (*PolyakExport.settings, "draft_k", "draft_batch_size", "draft_updates", "beta")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require(cfg, draft_k=(1 <= cfg.draft_k <= cfg.steps, f"in [1, --steps {cfg.steps}]"),
                draft_batch_size=(cfg.draft_batch_size >= 1, ">= 1"), draft_updates=(cfg.draft_updates >= 1, ">= 1"),
                beta=(cfg.beta >= 0, ">= 0"))
        if draft_weights(cfg.reward_weights)[1] > 0:
            needs_the_world(cfg, "the world's pixel quality (--reward verifier.quality)")
        if EDITORS[cfg.editor].decode_pixels is FlowPolicy.decode_pixels:
            raise ValueError(f"--algo draft back-propagates through the decode to pixels, which --editor {cfg.editor} "
                             "does not offer (FlowPolicy.decode_pixels); use grpo or nft")

    def setup(self, editor):
        super().setup(editor)
        self.heads, self.quality = draft_weights(self.cfg.reward_weights)
        self.judge = MiniJudge.from_pretrained(self.cfg.reward_paths.get("judge")) if self.heads.sum() > 0 else None
        if self.judge is not None:
            self.judge.net.requires_grad_(False)

    def update(self, editor, sessions, turns, scores, updater, iteration, generator):
        cfg = self.cfg
        states = [(k, i) for k in range(len(turns)) for i in range(len(turns[k].before))]
        sampler = random.Random(f"{cfg.seed}/draft/{iteration}")
        stats: dict[str, list[float]] = {}
        for _ in range(cfg.draft_updates):
            batch = sampler.sample(states, min(len(states), cfg.draft_batch_size))
            updater.zero_grad()
            with updater.term():
                reward, anchor = self.reward(editor, sessions, turns, batch, generator)
                loss = -reward.mean() + cfg.beta * anchor
                updater.backward(loss)
            updater.step()
            for key, value in {"loss": loss.item(), "draft_reward": reward.mean().item(), "anchor": anchor.item()}.items():
                stats.setdefault(key, []).append(value)
        return {}, stats

    def reward(self, editor, sessions, turns, batch, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The judge's differentiable reward of fresh edits of the ``batch`` states ``(turn, rollout)``,
        and the velocity anchor E‖v_θ − v_ref‖² over the steps with gradients."""
        cfg, group = self.cfg, len(turns[0].before) // len(sessions)
        befores = [turns[k].before[i] for k, i in batch]
        texts = [turns[k].texts[i] for k, i in batch]
        cond = editor.encode(befores, [intent or text for text, intent in texts])
        sigmas = editor.sigmas(cfg.steps, cond)
        x = torch.randn((len(batch), *editor.latent_shape(cond)), generator=generator).to(editor.device)
        anchor = torch.zeros(())
        for j, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            t = sigma.expand(len(x))
            if j < cfg.steps - cfg.draft_k:
                with torch.no_grad():
                    x = ode_step(x, editor.velocity(x, t, cond), sigma, sigma_next)
                continue
            v = editor.velocity(x, t, cond)
            if cfg.beta > 0:
                with torch.no_grad(), editor.adapter_disabled():
                    v_ref = editor.velocity(x, t, cond)
                anchor = anchor + ((v - v_ref) ** 2).mean() / cfg.draft_k
            x = ode_step(x, v, sigma, sigma_next)
        pixels = editor.decode_pixels(x, cond)
        total = self.quality * differentiable_quality(pixels)
        weight = torch.full((len(batch),), self.quality)
        if self.judge is not None:
            histories = [[turn.instruction for turn in sessions[i // group].turns[:k]] for k, i in batch]
            segments = [text_segments(text, history, intent, self.judge.max_history)
                        for (text, intent), history in zip(texts, histories)]
            sources = np.stack([image_array(image, self.judge.resolution) for image in befores])
            heads = self.heads.expand(len(batch), -1).clone()
            heads[[not history for history in histories], HEADS.index(GA)] = 0.0   # no earlier turn: no GA
            total = total + (self.judge.differentiable_probs(sources, pixels, segments) * heads).sum(1)
            weight = weight + heads.sum(1)
        return total / weight, anchor


def draft_weights(reward_weights: dict[str, float]) -> tuple[torch.Tensor, float]:
    """The mini judge's per-head weights ``[1, 4]`` (:data:`HEADS` order) and the weight of the world's
    pixel quality, from ``--reward`` terms: ``judge`` spreads its weight over the judge's sub-scores,
    ``judge.SUB`` weighs one, ``verifier.quality`` the quality; any other term is refused."""
    heads, quality = torch.zeros(1, len(HEADS)), 0.0
    for term, weight in reward_weights.items():
        name, _, sub = term.partition(".")
        if term == "verifier.quality":
            quality += weight
        elif name == "judge" and (not sub or sub in HEADS):
            for head in [sub] if sub else MiniJudge.sub_scores:
                heads[0, HEADS.index(head)] += weight / (1 if sub else len(MiniJudge.sub_scores))
        else:
            raise ValueError(f"--algo draft back-propagates through the reward, so every --reward term must be "
                             f"differentiable: judge, judge.SUB (SUB one of {', '.join(HEADS)}) or "
                             f"verifier.quality; got {term!r}")
    if not heads.sum() + quality > 0:
        raise ValueError("--algo draft needs a positive --reward weight, e.g. --reward judge=1")
    return heads, quality
