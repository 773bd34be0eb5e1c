"""What the objectives share: the registry, the base class, the policy-gradient update loop (GRPO, NFT),
and the replay buffer with its flow-matching loss (RFT, SFT).

An objective is a class registered with ``@register_objective("NAME")`` in its own module of this
package; ``--algo`` chooses among the registered names. It declares the settings only it reads
(``settings``: :class:`~training.config.GRPOConfig` fields, inherited settings included) and checks
them in ``check``: a setting that only other objectives read is refused when given a value.
"""

from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING

import torch

from mteditlab.editors import EDITORS
from mteditlab.editors.flow_policy import OLD, TRAINED, FlowPolicy
from mteditlab.registry import Registry
from training.credit import compute_advantages
from training.distributed import Updater
from training.sampling import TurnSamples
from training.scoring import Scores

if TYPE_CHECKING:
    from training.config import GRPOConfig

OBJECTIVES = Registry("objective", "training.objectives", missing=ValueError)
register_objective = OBJECTIVES.register


class Objective:
    """How a batch of rollouts (or gold pairs) updates the adapter. ``samples``: it draws rollouts;
    ``keeps_old``: it keeps an ``old`` EMA adapter; ``exports``: the adapter saved and evaluated;
    ``buffer``: its replay buffer (checkpointed); ``settings``: the config fields only it reads."""

    name: str
    samples = True
    keeps_old = True
    exports = TRAINED
    settings: tuple[str, ...] = ()

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.buffer: list[tuple] = []

    @classmethod
    def check(cls, cfg: GRPOConfig) -> None:
        """Raise ValueError when ``cfg`` gives a value to a setting that only other objectives read
        (it would be silently ignored); subclasses extend it to check their own settings' values."""
        changed, owners = cfg.changed(), setting_owners()
        foreign = [s for s in owners if s not in cls.settings and s in changed]
        if foreign:
            raise ValueError(f"--algo {cls.name} does not use " + ", ".join(
                f"{cfg.as_flag(s)} (a setting of --algo {' / '.join(owners[s])})" for s in foreign))

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


def require(cfg: GRPOConfig, **rules: tuple[bool, str]) -> None:
    """Raise ValueError naming each setting whose rule does not hold: ``name=(holds, "must be ...")``."""
    broken = [f"{cfg.flag(name)} must be {rule}, got {getattr(cfg, name)}" for name, (holds, rule) in rules.items()
              if not holds]
    if broken:
        raise ValueError("; ".join(broken))


def setting_owners() -> dict[str, list[str]]:
    """Each setting an objective declares → the names of the objectives that read it."""
    owners: dict[str, list[str]] = {}
    for name, objective in OBJECTIVES.items():
        for setting in objective.settings:
            owners.setdefault(setting, []).append(name)
    return owners


class PolicyGradient(Objective):
    """GRPO and NFT: credit from the rewards (:func:`training.credit.compute_advantages`), then
    ``inner_epochs`` passes of ``num_minibatches`` optimizer steps over the rollouts, one loss term per
    turn and ``steps`` entry."""

    settings = ("turn_aggregation", "fusion", "broadcast", "discount", "adv_clip_max", "num_minibatches", "inner_epochs")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require(cfg, adv_clip_max=(cfg.adv_clip_max > 0, "> 0"), num_minibatches=(cfg.num_minibatches >= 1, ">= 1"),
                inner_epochs=(cfg.inner_epochs >= 1, ">= 1"))

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


class PolyakExport(Objective):
    """The exported adapter is the Polyak average of the trained one, old ← d·old + (1 − d)·θ after
    every iteration with d = min(polyak, (1 + iteration) / (10 + iteration)) (the usual warm-up, so it
    does not lag at the start): it averages out the random walk that noisy updates leave in the weights."""

    exports = OLD
    settings = ("polyak",)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require(cfg, polyak=(0 <= cfg.polyak <= 1, "in [0, 1]"))

    def decay(self, iteration: int) -> float:
        return min(self.cfg.polyak, (1 + iteration) / (10 + iteration))


class Replay(PolyakExport):
    """RFT and SFT: new (input image, text, target latents) examples join a replay buffer of
    ``replay_size``; ``rft_updates`` optimizer steps of :func:`flow_matching_loss` on batches of
    ``rft_batch_size`` drawn from it; the Polyak average is exported (:class:`PolyakExport`)."""

    settings = (*PolyakExport.settings, "replay_size", "rft_batch_size", "rft_updates")

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        require(cfg, replay_size=(cfg.replay_size >= 1, ">= 1"), rft_batch_size=(cfg.rft_batch_size >= 1, ">= 1"),
                rft_updates=(cfg.rft_updates >= 0, ">= 0"))

    def examples(self, editor, sessions, turns, scores) -> list[tuple]:
        raise NotImplementedError

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


def flow_matching_loss(editor: FlowPolicy, batch: list[tuple], generator: torch.Generator) -> torch.Tensor:
    """Plain rectified-flow loss on (input image, text, target latents) examples:
    x_t = (1 − t)·x0 + t·ε with logit-normal t, L = ‖v_θ(x_t, t, cond) − (ε − x0)‖²."""
    cond = editor.encode([b[0] for b in batch], [b[1] for b in batch])
    x0 = torch.stack([b[2] for b in batch]).to(editor.device)
    t = torch.sigmoid(torch.randn(len(batch), generator=generator)).view(-1, *[1] * (x0.dim() - 1))
    noise = torch.randn(x0.shape, generator=generator)
    v = editor.velocity((1 - t) * x0 + t * noise, t.flatten(), cond)
    return torch.nn.functional.mse_loss(v.float(), noise - x0)


def encode_subset(editor: FlowPolicy, turn: TurnSamples, idx: torch.Tensor):
    """Re-encode the condition of items ``idx`` of a turn (conditions are backend objects: not sliced)."""
    idx = idx.tolist()
    return editor.encode([turn.before[i] for i in idx], [turn.texts[i][1] or turn.texts[i][0] for i in idx])


def needs_the_world(cfg: GRPOConfig, what: str) -> None:
    """Raise ValueError unless ``cfg`` trains a world editor on the world's sessions, where ``what``
    (the world's gold pairs, its clean re-renders) exists."""
    if not EDITORS[cfg.editor].world:
        raise ValueError(f"--editor {cfg.editor} does not edit the world's scenes, so it cannot learn from {what}; "
                         "use --algo rft --rft-target own, nft or grpo")
    if cfg.sessions_from:
        raise ValueError(f"--sessions-from has no world, so nothing to learn from {what}; "
                         "use --algo rft --rft-target own, nft or grpo")
