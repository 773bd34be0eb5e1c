"""Multi-turn RL of a LoRA adapter on a flow-matching editor: Flow-GRPO, DiffusionNFT and
reward-filtered self-training (RFT), with a supervised control (SFT).

    python -m training.grpo --lora                       # RFT on the mini editor, verifier (+ quality) reward
    python -m training.grpo --lora --algo grpo --learning-rate 3e-4 --reward judge=1.0
    python -m training.grpo --lora --algo sft            # the supervised control
    accelerate launch --num_processes 2 --multi_gpu -m training.grpo --lora   # data-parallel, gradients all-reduced
    python -m training.grpo --lora --algo nft --editor kontext --sessions-from data/sessions --reward qwen-vl=1.0 \
        --reward-paths qwen-vl=http://HOST:8000/v1 --hacking-reference calibrated
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m training.grpo --lora --algo nft --editor kontext ...

One iteration, top to bottom:

1. **Rollouts.** ``sessions_per_step`` training sessions × ``num_generations`` rollouts each: drawn
   from the world, or with ``--sessions-from`` from a pool of data sessions (files, ``hf://NAME``, the
   app's ``.duckdb`` label store) at the backend's ``--resolution``, one image size per iteration
   (aspect-ratio buckets). Every turn starts from the rollout's *own* previous output. Sampling is the
   ODE, except an SDE window of ``sde_window`` consecutive steps per turn where the Flow-GRPO step is a Gaussian policy:
   x' ~ N(mean_θ(x, σ), scale²) (``mteditlab.flow.sde_step_stats``), log-prob kept in fp32.
2. **Rewards.** Each registered reward model scores every turn (named sub-scores + overall); on
   world sessions the verifier always runs too, as the gold metric. Data sessions have no gold:
   no gold columns, no ``val`` evaluation, and the reward-hacking monitor watches a held-out reward
   term (``--hacking-reference``) instead.
3. **Credit.** ``training.credit.compute_advantages``: turn aggregation, reward/advantage fusion,
   broadcast vs per-turn, trajectory filtering, clamp.
4. **Update.** GRPO: for every SDE step of every turn, ratio = exp(logp_θ − logp_old) and
       L = mean(max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))) + β·‖mean_θ − mean_ref‖² / (2·scale²),
   the reference being the same model with its adapter disabled. NFT: on the forward process,
       r = clamp(A / (2·A_max) + ½, 0, 1),  v⁺ = β·v_θ + (1 − β)·v_old,  v⁻ = (1 + β)·v_old − β·v_θ,
       L = r·‖x̂0(v⁺) − x0‖² + (1 − r)·‖x̂0(v⁻) − x0‖²,  x̂0(v) = x_t − t·v,
   weighted by 1 / mean|x̂0(v_old) − x0| (adaptive), the old policy being an EMA copy of the adapter and
   (t, ε) shared by the G rollouts of a session; each sample is trained at ``timesteps_per_sample``
   forward-process times (fresh noise each), and rollouts may be drawn by the old adapter
   (``--sample-by-old``) as DiffusionNFT's authors do. RFT: every turn of a rollout whose turns so far
   all passed the reward (fused score ≥ ``rft_threshold``) enters a replay buffer as (the turn's own
   input, text, target), target = the rollout's output (``own``) or the verifier's clean re-render of
   the scene it shows (``render``, world only); the adapter is trained on the buffer by the plain
   flow-matching loss ‖v_θ(x_t) − (ε − x0)‖², and its Polyak average is exported. SFT (the control):
   the same loss and buffer filled with the world's gold pairs (teacher-forced), no rollouts.
5. **Operations.** JSONL metrics, plots, evaluation on ``val``, atomic checkpoints, exact resume. The
   real backends (``kontext``, ``qwen-edit``) go through ``accelerator.prepare`` (DDP, FSDP or DeepSpeed
   as ``accelerate launch`` configures; gradients accumulated over a minibatch's loss terms by
   ``accelerator.accumulate``), with ``--gradient-checkpointing`` and ``--mixed-precision``; the mini
   editor keeps its hand-averaged gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mteditlab.bench import run_benchmark
from mteditlab.editors import EDITORS, FlowPolicy, get_editor
from mteditlab.editors.flow_policy import OLD, TRAINED
from mteditlab.flow import gaussian_log_prob, ode_step, sde_step_stats
from mteditlab.intent import INTENT_MODES, turn_seed, turn_text
from mteditlab.rewards.base import EditSample
from mteditlab.rewards.features import parse_cached
from mteditlab.rewards.verifier import world_meta
from mteditlab.sessions_data import DataSession, with_turns
from mteditlab.world import Session, generate_session, render
from mteditlab.world import sessions as make_sessions
from training.credit import FUSIONS, TURN_AGGREGATIONS, compute_advantages
from training.session_sources import sessions_from

TRAIN_SESSIONS = 200_000  # size of the pool training sessions are drawn from
ALGOS = ("nft", "grpo", "rft", "sft")
GOLD = "gold_success"                     # the world's reward-hacking reference


@dataclass
class GRPOConfig:
    # model
    editor: str = "mini"
    editor_path: str | None = None
    algo: str = "rft"                     # rft | nft | grpo | sft (supervised control)
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_targets: str = "attention+conv"  # a named set of the editor's LoRA targets (mini: attention | attention+conv | all)
    # sampling
    num_generations: int = 4              # G rollouts per session (the group)
    sessions_per_step: int = 16
    turns: int = 5
    steps: int = 10                       # denoising steps per turn
    sde_window: int = 2                   # SDE (trained) steps per turn; ODE elsewhere
    noise_level: float = 0.7              # a in std = a·sqrt(σ / (1 − σ))
    intent: str = "reconstruct"           # none | concat | reconstruct
    sessions_from: str | None = None      # DATASET: .jsonl / .parquet / folder / hf://NAME / .duckdb label store (default: the world)
    resolution: str | None = None         # kontext | qwen-edit | INT (≈ INT² px): data images' size (default: the editor's)
    op_weights: str = "swap=3"            # OP=WEIGHT,...: oversample sessions with these operations (e.g. swap=3,move=2)
    # objective
    learning_rate: float = 1e-3
    clip_range: float = 2e-3
    beta: float = 0.01                    # GRPO: weight of the KL to the reference (adapter disabled)
    nft_beta: float = 1.0                 # NFT: guidance strength β of the implicit positive / negative policies
    adv_clip_max: float = 5.0
    num_minibatches: int = 1              # optimizer steps per batch of rollouts
    inner_epochs: int = 1                 # passes over each batch of rollouts
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9                # NFT old-policy EMA (constant --old-decay)
    old_decay: str = "constant"           # constant (ema_decay) | ramp: d = min(0.001·iteration, 0.5)
    timesteps_per_sample: int = 1         # NFT: forward-process times trained per sample
    sample_by_old: bool = False           # NFT: rollouts drawn by the old (EMA) adapter
    # reward-filtered self-training (rft) and its supervised control (sft)
    rft_target: str = "auto"              # own | render (world only) | auto: render on the world, own on data
    rft_threshold: float = 0.5            # a turn passes when its fused reward Σw·r/Σw ≥ this
    rft_share: bool = True                # failed on-track rollouts learn from a sibling that passed
    rft_mixed_only: bool = False          # keep only (session, turn) groups with both passes and failures
    replay_size: int = 2048
    rft_batch_size: int = 32
    rft_updates: int = 8                  # optimizer steps per iteration
    polyak: float = 0.95                  # exported adapter = Polyak average of the trained one (per iteration)
    # multi-turn credit
    reward: str = "verifier=1.0,verifier.quality=0.5"  # TERM=WEIGHT,...; TERM = a reward model's overall (NAME) or sub-score (NAME.SUB)
    reward_paths: str = ""                # NAME=DIR,...: where a reward model's artifact lives (e.g. calibrated=data/calibrated)
    turn_aggregation: str = "mean"
    fusion: str = "advantage"
    broadcast: bool = True
    trajectory_filter: bool = True
    discount: float = 0.8
    # operations
    iterations: int = 50                  # ≈ 30 min of training on one thread of a 2-core CPU
    max_minutes: float = 60.0             # stop after this much training time (0 = no limit)
    eval_every: int = 10
    eval_sessions: int = 100
    save_every: int = 10
    hacking_window: int = 20
    hacking_reference: str = ""           # TERM held out of --reward the monitor compares against (default: the world's gold)
    gradient_checkpointing: bool = False  # real backends: recompute activations in the backward pass
    mixed_precision: str | None = None    # no | bf16 | fp16 for the real backends (default: accelerate's config)
    seed: int = 0
    out: str = "runs/grpo"
    reward_weights: dict = field(default_factory=dict)
    reward_path_of: dict = field(default_factory=dict)
    op_weight_of: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"--algo must be one of {ALGOS}")
        if self.sample_by_old and self.algo != "nft":
            raise ValueError("--sample-by-old needs --algo nft (the old policy is NFT's)")
        if self.rft_target == "auto":
            self.rft_target = "own" if self.sessions_from else "render"
        policy = EDITORS[self.editor]
        if not issubclass(policy, FlowPolicy):
            raise ValueError(f"--editor {self.editor} is not a flow-matching policy: nothing to train")
        if policy.lora_presets and self.lora_targets not in policy.lora_presets or self.rft_target not in ("own", "render") \
                or self.old_decay not in ("constant", "ramp"):
            raise ValueError(f"bad --lora-targets ({sorted(policy.lora_presets)}), --rft-target (own, render) "
                             "or --old-decay (constant, ramp)")
        if self.turn_aggregation not in TURN_AGGREGATIONS or self.fusion not in FUSIONS or self.intent not in INTENT_MODES:
            raise ValueError("bad --turn-aggregation, --fusion or --intent")
        if not 1 <= self.sde_window <= self.steps - 1:
            raise ValueError("--sde-window must be in [1, steps − 1] (the σ = 1 step is always an ODE step)")
        self.reward_weights = {k: float(v) for k, v in (p.split("=") for p in self.reward.split(","))}
        self.reward_path_of = dict(p.split("=", 1) for p in self.reward_paths.split(",") if p)
        self.op_weight_of = {k: float(v) for k, v in (p.split("=") for p in self.op_weights.split(",") if p)}
        if self.hacking_reference in self.reward_weights:
            raise ValueError(f"--hacking-reference {self.hacking_reference} is trained (in --reward): it must be held out")
        if self.sessions_from:
            world_only = [t for t in self.reward_weights if t.partition(".")[0] == "verifier"]
            if world_only or self.algo == "sft" or (self.algo == "rft" and self.rft_target == "render"):
                raise ValueError("--sessions-from has no world to verify against: pass --reward without the "
                                 "verifier (e.g. qwen-vl=1.0), --rft-target own with --algo rft, and no --algo sft")
            parse_resolution(self.resolution)


# ---- 1. rollouts ----------------------------------------------------------------------------------

def draw_sessions(cfg: GRPOConfig, iteration: int, count_per_process: int = 1) -> list[Session]:
    """The iteration's training sessions, seeded by (seed, iteration). With ``op_weights`` a candidate
    session is kept with probability w(session) / max w, w(session) = the largest weight among its
    turns' operations (1 for operations not listed): sessions exercising weak operations come more often."""
    picker = random.Random(f"{cfg.seed}/sessions/{iteration}")
    top = max([1.0, *cfg.op_weight_of.values()])
    drawn = []
    while len(drawn) < cfg.sessions_per_step * count_per_process:
        session = generate_session("train", picker.randrange(TRAIN_SESSIONS), cfg.turns)
        weight = max(cfg.op_weight_of.get(t.edit.op, 1.0) for t in session.turns)
        if not cfg.op_weight_of or picker.random() * top < weight:   # unweighted: the plain seeded draw
            drawn.append(session)
    return drawn


def parse_resolution(text: str | None) -> str | int | None:
    """``--resolution``: ``kontext`` / ``qwen-edit`` (the backends' sizes), an int n (≈ n² pixels) or None."""
    if text is None or text in ("kontext", "qwen-edit"):
        return text
    if str(text).isdigit():
        return int(text)
    raise ValueError(f"--resolution must be kontext, qwen-edit or an integer, got {text!r}")


def load_pool(cfg: GRPOConfig) -> list[DataSession]:
    """The data sessions training draws from: ``--sessions-from`` at ``--resolution`` (default: the
    editor's own, e.g. Kontext's preferred sizes), those with at least ``turns`` turns cut to ``turns``."""
    resolution = parse_resolution(cfg.resolution) or EDITORS[cfg.editor].data_resolution
    pool = with_turns(sessions_from(cfg.sessions_from, resolution=resolution), cfg.turns)
    if not pool:
        raise ValueError(f"{cfg.sessions_from} holds no session with at least {cfg.turns} turns (--turns)")
    sizes = {s.source.size for s in pool}
    if cfg.algo == "rft" and len(sizes) > 1:
        raise ValueError(f"--algo rft replays examples across iterations, so its batches mix sessions: the data's "
                         f"sources must share one size at --resolution, got {sorted(sizes)}")
    return pool


def draw_data_sessions(pool: list[DataSession], cfg: GRPOConfig, iteration: int, count_per_process: int = 1) -> list[DataSession]:
    """The iteration's training sessions from ``pool``, seeded by (seed, iteration), all of one source
    size (a batch shares one image size): a first session drawn uniformly picks the size, the others
    are drawn without replacement among the pool's sessions of that size, cycling when there are too
    few; a repeated session gets a distinct ``index`` (index + k·len(pool)), so its rollouts draw
    their own noise."""
    picker = random.Random(f"{cfg.seed}/data-sessions/{iteration}")
    first = pool[picker.randrange(len(pool))]
    bucket = [s for s in pool if s.source.size == first.source.size and s is not first]
    picker.shuffle(bucket)
    order = [first, *bucket]
    picks = [(order[i % len(order)], i // len(order)) for i in range(cfg.sessions_per_step * count_per_process)]
    return [replace(session, index=session.index + repeat * len(pool)) for session, repeat in picks]


def source_image(session: Session | DataSession):
    """The image a session starts from: a data session's own, a world scene's render."""
    return session.source if isinstance(session, DataSession) else render(session.source)


@dataclass
class TurnRecord:
    """One turn of a batch of rollouts: its inputs, the SDE window and the outputs."""

    sigmas: torch.Tensor
    texts: list[tuple[str, str | None]]
    before: list
    after: list
    x0: torch.Tensor                       # final latents (NFT target)
    window: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # each: (step index, x, x_next, log_prob_old)


@torch.no_grad()
def rollout(editor: FlowPolicy, sessions: list[Session], cfg: GRPOConfig, iteration: int) -> list[TurnRecord]:
    """G rollouts of each session, turn by turn on their own outputs; items ordered session-major."""
    G = cfg.num_generations
    items = [(s, g) for s in sessions for g in range(G)]
    images = [source_image(s) for s, _ in items]
    records = []
    for k in range(cfg.turns):
        texts = [turn_text(s, k, cfg.intent) for s, _ in items]
        cond = editor.encode(images, [intent or text for text, intent in texts])
        seeds = [turn_seed(cfg.seed * 7919 + iteration, s.index * G + g, k) for s, g in items]
        x = editor.initial_noise(cond, seeds)
        sigmas = editor.sigmas(cfg.steps, cond)
        start = random.Random(f"{cfg.seed}/{iteration}/{k}").randint(1, cfg.steps - cfg.sde_window)
        generator = torch.Generator().manual_seed(seeds[0])
        record = TurnRecord(sigmas, texts, images, [], x)
        for i in range(cfg.steps):
            v = editor.velocity(x, sigmas[i].expand(len(x)), cond)
            if start <= i < start + cfg.sde_window:
                mean, scale = sde_step_stats(x, v, sigmas[i], sigmas[i + 1], cfg.noise_level)
                x_next = mean + scale * torch.randn(mean.shape, generator=generator)
                record.window.append((i, x, x_next, gaussian_log_prob(x_next, mean, scale)))
            else:
                x_next = ode_step(x, v, sigmas[i], sigmas[i + 1])
            x = x_next
        record.x0, record.after = x, editor.decode(x, cond)
        records.append(record)
        images = record.after
    return records


# ---- 2. rewards ------------------------------------------------------------------------------------

def score_rollouts(records: list[TurnRecord], sessions: list[Session | DataSession], cfg: GRPOConfig,
                   reward_models: dict, gold_model, iteration: int, tally: dict | None = None
                   ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None, dict]:
    """Per-reward-term scores ``[S, G, T]``, gold success ``[S, G, T]``, IF-passed mask and sub-score means.

    A term ``NAME`` is model ``NAME``'s overall; ``NAME.SUB`` its sub-score ``SUB``, where a sub-score
    that does not apply to a scored item (NaN, e.g. ``ga`` at turn 1) counts as satisfied (1.0); items
    the model failed on stay NaN. The terms are ``reward_weights``' and the held-out
    ``hacking_reference`` (when set). ``gold_model`` is the world's verifier; it scores each turn
    once, also when it is a reward; ``None`` (data sessions): no gold, ``None`` in its place. The
    IF-passed mask (for trajectory filtering) comes from the *trained* reward: the first reward model,
    in ``reward_weights`` order, with an ``if`` sub-score (IF ≥ ½; a failed score does not filter);
    ``None`` when no trained reward has one. Each sample's ``meta["group"]`` is (session index, turn),
    the group a pairwise judge compares within. ``tally`` (optional) accumulates per reward model
    ``failures/NAME`` (items failed) and ``endpoint/NAME/KEY`` (a served judge's request counts)."""
    S, G, T = len(sessions), cfg.num_generations, cfg.turns
    items = [(s, g) for s in sessions for g in range(G)]
    terms = [*cfg.reward_weights, *([cfg.hacking_reference] if cfg.hacking_reference else [])]
    scores = {term: np.zeros((S * G, T)) for term in terms}
    gold = np.zeros((S * G, T), dtype=bool)
    if_source = filter_source(cfg, reward_models)
    if_passed = np.ones((S * G, T), dtype=bool)
    sub_means: dict[str, list[float]] = {}
    for k, rec in enumerate(records):
        samples = [EditSample(b, a, t[0], [x.instruction for x in s.turns[:k]], t[1],
                              {**(world_meta(s, k) if isinstance(s, Session) else {"turn": k}), "group": (s.index, k)})
                   for (s, _), b, a, t in zip(items, rec.before, rec.after, rec.texts)]
        gold_out = gold_model.score(samples) if gold_model is not None else None
        if gold_out is not None:
            gold[:, k] = gold_out.overall == 1
        outputs = {name: gold_out if model is gold_model else model.score(samples, seed=cfg.seed * 100_003 + iteration * 31 + k)
                   for name, model in reward_models.items()}
        if tally is not None:
            count_failures(outputs, tally)
        if if_source:
            if_passed[:, k] = ~(outputs[if_source].scores["if"] < 0.5)   # NaN (failed score) passes
        for term in scores:
            name, _, sub = term.partition(".")
            out = outputs[name]
            if not sub:
                scores[term][:, k] = out.overall
            elif sub in out.scores:
                scores[term][:, k] = np.where(out.valid & np.isnan(out.scores[sub]), 1.0, out.scores[sub])
            else:
                raise ValueError(f"reward term {term!r}: {name} has no sub-score {sub!r} (it has {sorted(out.scores)})")
        for name, out in outputs.items():
            for sub, values in out.scores.items():
                if np.isfinite(values).any():
                    sub_means.setdefault(f"{name}/{sub}", []).append(float(np.nanmean(values)))
    shape = (S, G, T)
    return ({n: v.reshape(shape) for n, v in scores.items()}, gold.reshape(shape) if gold_model is not None else None,
            if_passed.reshape(shape) if if_source else None, {k: float(np.mean(v)) for k, v in sub_means.items()})


def count_failures(outputs: dict, tally: dict) -> None:
    """Add each reward model's failed items and its endpoint's request counts to ``tally``."""
    for name, out in outputs.items():
        tally[f"failures/{name}"] = tally.get(f"failures/{name}", 0) + out.n_failures
        for key, value in (out.details.get("endpoint") or {}).items():
            tally[f"endpoint/{name}/{key}"] = tally.get(f"endpoint/{name}/{key}", 0) + value


def filter_source(cfg: GRPOConfig, reward_models: dict) -> str | None:
    """Name of the trained reward whose IF sub-score drives trajectory filtering (None: no filter)."""
    for name in dict.fromkeys(t.partition(".")[0] for t in cfg.reward_weights):
        if "if" in getattr(reward_models[name], "sub_scores", ()):
            return name
    return None


def turn_passed(rewards: dict[str, np.ndarray], weights: dict[str, float], threshold: float) -> np.ndarray:
    """``[S, G, T]`` bool: the turn's fused reward Σ_m w_m·r_m / Σ_m w_m is ≥ ``threshold`` (failed = 0)."""
    fused = sum(w * np.nan_to_num(rewards[m], nan=0.0) for m, w in weights.items()) / sum(weights.values())
    return fused >= threshold


# ---- 4. update -------------------------------------------------------------------------------------

def grpo_loss(editor: FlowPolicy, rec: TurnRecord, cond, idx: torch.Tensor, adv: torch.Tensor, step: tuple,
              cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """Clipped-ratio policy loss (+ KL to the adapter-disabled reference) on one SDE step of one turn."""
    i, x, x_next, logp_old = step
    sigmas = rec.sigmas
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


def nft_loss(editor: FlowPolicy, rec: TurnRecord, cond, idx: torch.Tensor, adv: torch.Tensor, cfg: GRPOConfig,
             generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """DiffusionNFT's negative-aware loss on the forward process of the turn's final samples.

    The G rollouts of a session share their forward-process draw (t, ε) (common random numbers): the
    positive / negative pull between them then comes from their samples x0, not from the draw."""
    x0 = rec.x0[idx]
    r = torch.clamp(adv / (2 * cfg.adv_clip_max) + 0.5, 0, 1)
    group = idx // cfg.num_generations
    n_groups = rec.x0.shape[0] // cfg.num_generations
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


def flow_matching_loss(editor: FlowPolicy, batch: list[tuple], generator: torch.Generator) -> torch.Tensor:
    """Plain rectified-flow loss on (input image, text, target latents) examples:
    x_t = (1 − t)·x0 + t·ε with logit-normal t, L = ‖v_θ(x_t, t, cond) − (ε − x0)‖²."""
    cond = editor.encode([b[0] for b in batch], [b[1] for b in batch])
    x0 = torch.stack([b[2] for b in batch]).to(editor.device)
    t = torch.sigmoid(torch.randn(len(batch), generator=generator)).view(-1, *[1] * (x0.dim() - 1))
    noise = torch.randn(x0.shape, generator=generator)
    v = editor.velocity((1 - t) * x0 + t * noise, t.flatten(), cond)
    return torch.nn.functional.mse_loss(v.float(), noise - x0)


def rft_examples(editor: FlowPolicy, records: list[TurnRecord], passed: np.ndarray, target: str,
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
    for k, rec in enumerate(records):
        for s in range(S):
            ready = np.flatnonzero(on_track[s, :, k])
            winners = [g for g in ready if passed[s, g, k]]
            if mixed_only and len(winners) == len(ready):
                continue
            for j, g in enumerate(ready if share and winners else winners):
                w = s * G + (g if passed[s, g, k] else winners[j % len(winners)])
                if target == "own":
                    x0 = rec.x0[w]
                else:
                    clean = render(parse_cached(rec.after[w], rec.after[w].width), rec.after[w].width)
                    x0 = editor.encode_images([clean])[0]
                i = s * G + g
                examples.append((rec.before[i], rec.texts[i][1] or rec.texts[i][0], x0.cpu()))
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


def encode_subset(editor: FlowPolicy, rec: TurnRecord, idx: torch.Tensor):
    """Re-encode the condition of items ``idx`` of a turn (conditions are backend objects: not sliced)."""
    idx = idx.tolist()
    return editor.encode([rec.before[i] for i in idx], [rec.texts[i][1] or rec.texts[i][0] for i in idx])


def old_decay(cfg: GRPOConfig, iteration: int) -> float:
    """Decay of the old policy after ``iteration``: constant ``ema_decay``, or DiffusionNFT's ramp
    d = min(0.001·iteration, 0.5) (old ≈ current at first); for RFT / SFT the Polyak average with the
    usual warm-up, d = min(polyak, (1 + iteration) / (10 + iteration)), so it does not lag at the start."""
    if cfg.algo in ("rft", "sft"):
        return min(cfg.polyak, (1 + iteration) / (10 + iteration))
    return min(0.001 * iteration, 0.5) if cfg.old_decay == "ramp" else cfg.ema_decay


def sampling_policy(editor: FlowPolicy, cfg: GRPOConfig):
    """Context in which rollouts are drawn: the old (EMA) adapter with ``--sample-by-old``, else the trained one."""
    return editor.old_policy() if cfg.sample_by_old else contextlib.nullcontext()


# ---- 5. operations ---------------------------------------------------------------------------------

def hacking_alarm(history: list[dict], window: int, proxy_names: list[str], reference: str | None = GOLD) -> bool:
    """True when, over the last ``window`` iterations, a proxy reward rose while the reference (the
    gold, or a held-out reward's metrics column) fell (least-squares slopes of opposite sign, each
    moving by more than 0.02 across the window); never without a reference."""
    if len(history) < window or not proxy_names or reference is None:
        return False
    recent = history[-window:]
    xs = np.arange(window)

    def trend(key):
        return np.polyfit(xs, [h[key] for h in recent], 1)[0] * window

    return bool(trend(reference) < -0.02 and any(trend(f"reward/{n}") > 0.02 for n in proxy_names))


def save_state(out: Path, editor: FlowPolicy, optimizer, iteration: int, cfg: GRPOConfig, buffer: list, *,
               write: bool = True, with_optimizer: bool = True) -> None:
    """Atomically write the adapter(s), optimizer state, replay buffer and iteration to ``out/checkpoint``.
    Every process calls it (sharded adapters are gathered); the one with ``write`` writes. Without
    ``with_optimizer`` (sharded optimizer state) the optimizer's moments restart on resume."""
    lora = {n: full_tensor(p).detach().clone() for n, p in editor.adapter_parameters().items()}
    if not write:
        return
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"iteration": iteration, "lora": lora, "optimizer": optimizer.state_dict() if with_optimizer else None,
                "config": asdict(cfg), "buffer": buffer}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_state(out: Path, editor: FlowPolicy, optimizer, buffer: list) -> int:
    """Restore what ``save_state`` wrote (the buffer in place); the iteration to resume at (0: fresh)."""
    path = out / "checkpoint" / "state.pt"
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)
    params = editor.adapter_parameters()
    with torch.no_grad():
        for name, value in state["lora"].items():
            assign(params[name], value)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    buffer[:] = state.get("buffer", [])
    return state["iteration"]


def assign(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """``param ← value``; an FSDP2 shard takes its own part of the full ``value``."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    param.copy_(value)


def plot_metrics(metrics_path: Path, out_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    it = [r["iteration"] for r in train]
    for key in [k for k in train[0] if k.startswith(("reward/", "reference/")) or k == GOLD]:
        axes[0].plot(it, [r[key] for r in train], label=key, lw=0.9)
    if "loss" in train[0] and not axes[0].lines:   # the supervised control draws no rollouts: its loss instead
        axes[0].plot(it, [r["loss"] for r in train], label="loss", lw=0.9)
    axes[0].set(title="training rollouts", xlabel="iteration")
    axes[0].legend(fontsize=7)
    drift = [k for k in ("kl", "clip_frac") if k in train[0]]     # GRPO's; the other objectives show their loss
    for key in drift or ["loss"]:
        axes[1].plot(it, [r.get(key, np.nan) for r in train], label=key, lw=0.9)
    axes[1].set(title="policy drift" if drift else "training loss", xlabel="iteration")
    axes[1].legend(fontsize=7)
    for t in range(len(evals[0]["overall"]) if evals else 0):
        axes[2].plot([r["iteration"] for r in evals], [r["overall"][t] for r in evals], "o-", label=f"turn {t + 1}")
    axes[2].set(title="val overall success" if evals else "no val evaluation (data sessions)",
                xlabel="iteration", ylim=(0, 1))
    if evals:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def train(cfg: GRPOConfig) -> Path:
    from accelerate import Accelerator

    from mteditlab.rewards import get_reward

    real = EDITORS[cfg.editor].distributed
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **(accelerator_options(cfg) if real else {}))
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    editor = get_editor(cfg.editor, path=cfg.editor_path, device=str(accelerator.device))
    editor.denoiser.requires_grad_(False)
    editor.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.algo != "grpo":  # NFT's old policy / RFT's Polyak average: a second adapter tracking ``default`` by EMA
        editor.add_old_copy()
    trainable = editor.trainable_parameters()
    for p in trainable:
        p.requires_grad_(True)
    if real:
        ready_for_training(editor, cfg)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=1e-4)
    model = None   # the prepared (distributed) denoiser of the real backends
    if real:
        model, optimizer = accelerator.prepare(editor.denoiser, optimizer)
        if accelerator.gradient_accumulation_steps != loss_terms(cfg):
            raise ValueError(f"the accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}: "
                             f"leave it out, the trainer accumulates the {loss_terms(cfg)} loss terms of a minibatch")
        editor.forward_module = model
        trainable = editor.trainable_parameters()
    terms = [*cfg.reward_weights, *([cfg.hacking_reference] if cfg.hacking_reference else [])]
    reward_models = {name: get_reward(name, **({"path": cfg.reward_path_of[name]} if name in cfg.reward_path_of else {}))
                     for name in dict.fromkeys(t.partition(".")[0] for t in terms)}
    pool = load_pool(cfg) if cfg.sessions_from else None
    gold_model = None if pool else reward_models.get("verifier") or get_reward("verifier")
    reference = f"reference/{cfg.hacking_reference}" if cfg.hacking_reference else GOLD if gold_model else None
    proxies = [t for t in cfg.reward_weights if t.partition(".")[0] != "verifier"]
    buffer: list[tuple] = []   # RFT / SFT replay buffer of (input image, text, target latents)
    start = load_state(out, editor, optimizer, buffer)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        kept = [l for l in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if json.loads(l)["iteration"] <= start]
        metrics_path.write_text("".join(l + "\n" for l in kept))
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    history = [json.loads(l) for l in metrics_path.read_text().splitlines() if json.loads(l).get("kind") == "train"] \
        if metrics_path.exists() else []
    minutes = history[-1]["train_minutes"] if history else 0.0
    val = None if pool else make_sessions("val", cfg.eval_sessions, cfg.turns)   # data sessions: no verifier to evaluate by
    evaluated = editor.old_policy if cfg.algo in ("rft", "sft") else contextlib.nullcontext  # the exported adapter

    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"{cfg.algo}",
               disable=rank != 0)
    for iteration in bar:
        timings = {}
        t0 = time.time()
        sessions = (draw_data_sessions(pool, cfg, iteration, world) if pool else draw_sessions(cfg, iteration, world))[rank::world]
        editor.denoiser.eval()
        local: dict[str, float] = {}
        counts: dict[str, float] = {}   # summed over processes
        loss_stats: dict[str, list[float]] = {}
        if cfg.algo != "sft":
            with sampling_policy(editor, cfg):
                records = rollout(editor, sessions, cfg, iteration)
            timings["rollout_s"] = time.time() - t0

            t0 = time.time()
            rewards, gold, if_passed, sub_means = score_rollouts(records, sessions, cfg, reward_models, gold_model,
                                                                 iteration, tally=counts)
            held_out = {f"reference/{t}": rewards.pop(t) for t in terms if t not in cfg.reward_weights}
            local = {**{f"reward/{n}": float(np.nanmean(r)) for n, r in rewards.items()},
                     **{k: float(np.nanmean(r)) for k, r in held_out.items()},
                     **{f"sub/{k}": v for k, v in sub_means.items()},
                     **({GOLD: float(gold.mean()), "gold_overall_last": float(gold.all(-1).mean())} if gold is not None else {}),
                     "filtered": float(cfg.trajectory_filter and if_passed is not None)}
            timings["reward_s"] = time.time() - t0

        t0 = time.time()
        editor.denoiser.train()
        noise_gen = torch.Generator().manual_seed(cfg.seed * 17 + iteration)
        if cfg.algo in ("grpo", "nft"):
            advantages, credit_stats = compute_advantages(
                rewards, cfg.reward_weights, turn_aggregation=cfg.turn_aggregation, fusion=cfg.fusion,
                broadcast=cfg.broadcast, trajectory_filter=cfg.trajectory_filter, if_passed=if_passed,
                clip_max=cfg.adv_clip_max, gamma=cfg.discount)
            local.update(credit_stats)
            adv = torch.from_numpy(advantages.reshape(-1, cfg.turns)).float()   # [S·G, T]
            n_terms = loss_terms(cfg)
            for epoch in range(cfg.inner_epochs):
                order = torch.randperm(adv.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 31 + iteration * 7 + epoch))
                for minibatch in order.chunk(cfg.num_minibatches):
                    optimizer.zero_grad(set_to_none=True)
                    for k, rec in enumerate(records):
                        cond = encode_subset(editor, rec, minibatch)
                        for step in rec.window if cfg.algo == "grpo" else range(cfg.timesteps_per_sample):
                            with accumulating(accelerator, model):
                                if cfg.algo == "grpo":
                                    loss, stats = grpo_loss(editor, rec, cond, minibatch, adv[minibatch, k], step, cfg)
                                else:
                                    loss, stats = nft_loss(editor, rec, cond, minibatch, adv[minibatch, k], cfg, noise_gen)
                                backward(accelerator, model, loss, n_terms)
                            for key, value in {"loss": loss.item(), **stats}.items():
                                loss_stats.setdefault(key, []).append(value)
                    optimizer_step(accelerator, optimizer, trainable, cfg, model)
        else:
            new = (gold_examples(editor, sessions, cfg) if cfg.algo == "sft" else
                   rft_examples(editor, records, turn_passed(rewards, cfg.reward_weights, cfg.rft_threshold),
                                cfg.rft_target, cfg.rft_share, cfg.rft_mixed_only))
            buffer[:] = (buffer + new)[-cfg.replay_size:]
            local.update({"buffer_new": float(len(new)), "buffer_size": float(len(buffer))})
            sampler = random.Random(f"{cfg.seed}/replay/{iteration}")
            for _ in range(cfg.rft_updates if buffer else 0):
                optimizer.zero_grad(set_to_none=True)
                with accumulating(accelerator, model):
                    loss = flow_matching_loss(editor, sampler.sample(buffer, min(len(buffer), cfg.rft_batch_size)), noise_gen)
                    backward(accelerator, model, loss, 1)
                loss_stats.setdefault("loss", []).append(loss.item())
                optimizer_step(accelerator, optimizer, trainable, cfg, model)
        if cfg.algo != "grpo":
            editor.polyak_update(old_decay(cfg, iteration))
        timings["update_s"] = time.time() - t0
        minutes += sum(timings.values()) / 60

        checksums = accelerator.gather(torch.stack([full_tensor(p).detach().double().sum() for p in trainable]).sum().view(1))
        local.update({k: float(np.mean(v)) for k, v in loss_stats.items()})
        local["loss_terms"] = float(len(loss_stats.get("loss", [])))   # loss evaluations this iteration
        # mean over processes of what each could measure (a process whose rewards all failed counts as missing)
        averaged = accelerator.gather(torch.tensor([list(local.values())], dtype=torch.float64)).nanmean(0)
        summed = accelerator.reduce(torch.tensor(list(counts.values()), dtype=torch.float64), reduction="sum") \
            if counts else torch.zeros(0)
        row = {"kind": "train", "iteration": iteration + 1, **timings, "train_minutes": minutes,
               **dict(zip(local, averaged.tolist())), **{k: int(v) for k, v in zip(counts, summed.tolist())},
               "lora_in_sync": bool(torch.allclose(checksums, checksums[0]))}
        if cfg.algo != "sft":
            row["filter_source"] = filter_source(cfg, reward_models) if cfg.trajectory_filter else None
            row["hacking_reference"] = reference
        history.append(row)
        row["reward_hacking"] = cfg.algo != "sft" and hacking_alarm(history, cfg.hacking_window, proxies, reference)
        if row["reward_hacking"] and rank == 0:
            tqdm.write(f"warning: reward hacking suspected at iteration {iteration + 1}: proxy reward rising "
                       f"while {reference} falls over the last {cfg.hacking_window} iterations")
        bar.set_postfix(gold=f"{row.get('gold_success', float('nan')):.3f}", loss=f"{row.get('loss', 0):.3g}")
        out_of_time = bool(cfg.max_minutes) and minutes >= cfg.max_minutes
        last = iteration + 1 == cfg.iterations or out_of_time
        lines = [row]
        if val and ((iteration + 1) % cfg.eval_every == 0 or last):
            editor.denoiser.eval()
            with evaluated():
                result = run_benchmark(editor, val, seed=cfg.seed, intent=cfg.intent, progress=False)
            lines.append({"kind": "eval", "iteration": iteration + 1, "train_minutes": minutes,
                          "overall": [r["overall"] for r in result["per_turn"]],
                          "success": [r["success"] for r in result["per_turn"]]})
        if rank == 0:
            with metrics_path.open("a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
        if (iteration + 1) % cfg.save_every == 0 or last:
            save_state(out, editor, optimizer, iteration + 1, cfg, buffer, write=rank == 0,
                       with_optimizer=not sharded(accelerator))
        accelerator.wait_for_everyone()
        if out_of_time:
            tqdm.write(f"stopping after {minutes:.1f} training minutes (--max-minutes {cfg.max_minutes:g})")
            break

    exported = OLD if cfg.algo in ("rft", "sft") else TRAINED
    state = gathered_lora(editor, exported) if sharded(accelerator) else None   # every process takes part
    if rank == 0:
        editor.save_lora(out / "adapter", adapter_name=exported, state=state,
                         metadata={"config": asdict(cfg), "iterations": history[-1]["iteration"] if history else 0,
                                   "train_minutes": minutes})
        plot_metrics(metrics_path, out / "curves.png")
    accelerator.wait_for_everyone()
    return out / "adapter"


def optimizer_step(accelerator, optimizer, trainable: list[torch.nn.Parameter], cfg: GRPOConfig, model=None) -> None:
    """Clip the gradients' norm and step. The mini editor (``model`` None) averages its gradients over
    processes here; a prepared ``model`` had them synchronised by accelerate (DDP, FSDP, DeepSpeed)."""
    if model is not None:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        return
    for p in trainable:
        if p.grad is not None and accelerator.num_processes > 1:
            p.grad = accelerator.reduce(p.grad, reduction="mean")
    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
    optimizer.step()


# ---- the real backends through accelerate ------------------------------------------------------------

def loss_terms(cfg: GRPOConfig) -> int:
    """Backward passes per minibatch: one per turn and SDE step (GRPO) or forward-process time (NFT); 1 for RFT / SFT."""
    if cfg.algo == "grpo":
        return cfg.turns * cfg.sde_window
    return cfg.turns * cfg.timesteps_per_sample if cfg.algo == "nft" else 1


def accelerator_options(cfg: GRPOConfig) -> dict:
    """``Accelerator`` options for the real backends: one optimizer step per minibatch's loss terms
    (gradient accumulation), and ``--mixed-precision`` when given (else accelerate's config)."""
    options = {"gradient_accumulation_steps": loss_terms(cfg)}
    if cfg.mixed_precision:
        options["mixed_precision"] = cfg.mixed_precision
    return options


def ready_for_training(editor: FlowPolicy, cfg: GRPOConfig) -> None:
    """A real backend's denoiser before ``accelerator.prepare``: LoRA weights in fp32 whatever the base
    dtype (AdamW steps on bf16 weights lose small updates), gradient checkpointing when asked."""
    for p in editor.adapter_parameters().values():
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        editor.denoiser.enable_gradient_checkpointing()


def accumulating(accelerator, model):
    """Context of one loss term: ``accelerator.accumulate`` for a prepared model (gradients are
    synchronised only at the minibatch's last term), nothing for the mini editor."""
    return accelerator.accumulate(model) if model is not None else contextlib.nullcontext()


def backward(accelerator, model, loss: torch.Tensor, n_terms: int) -> None:
    """Backward of one of ``n_terms`` loss terms averaged into a minibatch's gradient (accelerate
    divides by its ``gradient_accumulation_steps`` == ``n_terms``)."""
    if model is not None:
        accelerator.backward(loss)
    else:
        (loss / n_terms).backward()


def sharded(accelerator) -> bool:
    """Parameters (and optimizer state) are split over processes: FSDP or DeepSpeed."""
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; a collective: every process must call), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered_lora(editor: FlowPolicy, adapter: str) -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s full state (peft names), gathered from the shards on every process."""
    return {k: full_tensor(v) for k, v in editor.adapter_state(adapter).items()}


def parse_args(argv: list[str] | None = None) -> GRPOConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (the only mode)")
    for f in fields(GRPOConfig):
        if f.name in ("reward_weights", "reward_path_of", "op_weight_of", "broadcast"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--broadcast", dest="broadcast", action="store_true", default=True,
                       help="one trajectory advantage on every turn and step (default)")
    group.add_argument("--per-turn", dest="broadcast", action="store_false", help="per-turn advantages")
    args = vars(parser.parse_args(argv))
    if not args.pop("lora"):
        parser.error("pass --lora: the trainer tunes a LoRA adapter on the editor")
    return GRPOConfig(**args)


if __name__ == "__main__":
    train(parse_args())
