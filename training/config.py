"""The trainer's settings: :class:`GRPOConfig`, one field per flag, each carrying its help text, and the
command line built from it (:func:`build_parser`, :func:`parse_args`).

A field's flag is ``--NAME`` with dashes (``num_generations`` → ``--num-generations``) unless its
metadata names another (``flag``); booleans get ``--NAME`` / ``--no-NAME`` (or the ``off`` flag),
``dict`` fields take ``NAME=VALUE,...``. The settings an objective alone reads are declared by the
objective (:mod:`training.objectives`), which checks them; ``--help`` lists them under its name.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from mteditlab.editors import EDITORS
from mteditlab.editors.flow_policy import FlowPolicy
from mteditlab.reconstructors import reconstructor_class
from mteditlab.registry import mapping
from mteditlab.sessions_data import TurnColumns, parse_resolution
from training.credit import FUSIONS, TURN_AGGREGATIONS
from training.objectives import OBJECTIVES, setting_owners
from training.sampling import WorldSessions


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A config field: its ``default``, its ``--help`` text and how its flag departs from ``--NAME``
    (``flag``: another name; ``choices``; ``metavar``; ``off``, ``off_help``: a boolean's flag that
    turns it off, instead of ``--no-NAME``)."""
    metadata = {"help": help, **flag}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def mapping_text(values: dict) -> str:
    """``{NAME: VALUE}`` as the ``NAME=VALUE,...`` a dict field's flag takes."""
    return ",".join(f"{k}={v}" for k, v in values.items())


COLUMN_DEFAULTS = {f.name: f.default for f in fields(TurnColumns)}


def column(name: str) -> Any:
    """A column flag of datasets with one row per turn (``--session-key``, ``--turn-column``, ...)."""
    return setting(None, f"datasets with one row per turn: their {name.replace('_', ' ')} "
                         f"(default: MagicBrush's '{COLUMN_DEFAULTS[name]}', recognised without this flag)")


@dataclass
class GRPOConfig:
    """Everything a training run reads; ``config.json`` in the run's directory records it."""

    # model
    editor: str = setting("mini", "the flow-matching editor to tune", choices=EDITORS)
    editor_path: str | None = setting(None, "the editor's base weights: a mini checkpoint directory, or a model id "
                                            "or local pipeline directory for the real backends (default: the editor's)")
    algo: str = setting("rft", "the objective (training/objectives): rft reward-filtered self-training, nft "
                               "DiffusionNFT, grpo Flow-GRPO, sft the supervised control on gold pairs, dagger the "
                               "privileged ceiling (own states, the world's next scene as label), draft DRaFT-K "
                               "(the mini judge back-propagated through the last K steps)",
                        choices=OBJECTIVES)
    lora_rank: int = setting(32, "rank r of the LoRA adapter")
    lora_alpha: float = setting(32.0, "LoRA scale alpha (the update is alpha / r times B·A)")
    lora_targets: str = setting("attention+conv", "a named set of the editor's LoRA target modules "
                                                  "(mini: attention, attention+conv or all)")
    # sampling
    num_generations: int = setting(4, "G: rollouts per session (the group whose rewards are compared)")
    sessions_per_step: int = setting(16, "training sessions per iteration (per process)")
    turns: int = setting(5, "turns per session, each fed the rollout's own previous output")
    steps: int = setting(10, "denoising steps per turn")
    sde_window: int = setting(2, "consecutive SDE (stochastic, log-prob recorded) steps per turn at a random "
                                 "place; the other steps are ODE steps; in [1, steps - 1]")
    sde_window_starts: str = setting("", "the steps the SDE window may start at, LO-HI: e.g. 1-3 keeps it early, where "
                                         "the ODE steps after it denoise what it adds before the output becomes the next "
                                         "turn's input (default: any, 1 to steps − sde_window)", metavar="LO-HI")
    noise_level: float = setting(0.7, "a in the SDE step's std = a·sqrt(σ / (1 − σ))")
    intent: str = setting("oracle", "the intent reconstructor that tells the editor each turn's explicit intent: "
                                    "oracle (the gold; on data the intents column), rule (the world's resolver on the "
                                    "images), mini[:DIR], served:URL, none (the instruction alone) or concat (the "
                                    "history joined)", metavar="SPEC")
    sessions_from: str | None = setting(None, "train on data sessions: .jsonl / .parquet / folder / hf://NAME / "
                                              "the app's .duckdb label store (default: the world's sessions)",
                                        metavar="DATASET")
    resolution: str | None = setting(None, "the data images' size: kontext, qwen-edit or INT (about INT² pixels) "
                                           "(default: the editor's)")
    session_key: str | None = column("session_key")
    turn_column: str | None = column("turn_column")
    image_column: str | None = column("image_column")
    instruction_column: str | None = column("instruction_column")
    reference_column: str | None = column("reference_column")
    op_weights: dict[str, float] = setting({"swap": 3.0}, "oversample world sessions with these operations: a "
                                                         "session is kept with probability w / max w (1 for the "
                                                         "others; empty: the plain draw)", metavar="OP=WEIGHT,...")
    overlap_scoring: bool = setting(True, "score turn k on a background thread while turn k + 1 samples "
                                          "(same scores, less waiting for a served judge)")
    # objective
    learning_rate: float = setting(1e-3, "AdamW learning rate of the adapter")
    clip_range: float = setting(2e-3, "ε of GRPO's clipped ratio clip(ratio, 1 − ε, 1 + ε)")
    beta: float = setting(0.01, "β: weight of GRPO's KL (DRaFT: of E‖v_θ − v_ref‖²) to the reference (the adapter "
                                "disabled)")
    nft_beta: float = setting(1.0, "β of NFT's implicit policies v⁺ = β·v_θ + (1 − β)·v_old, "
                                   "v⁻ = (1 + β)·v_old − β·v_θ")
    adv_clip_max: float = setting(5.0, "advantages are clamped to ± this (NFT's A_max)")
    num_minibatches: int = setting(1, "optimizer steps per pass over a batch of rollouts")
    inner_epochs: int = setting(1, "passes over each batch of rollouts")
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm")
    ema_decay: float = setting(0.9, "d of NFT's old policy, old ← d·old + (1 − d)·θ, with --old-decay constant")
    old_decay: str = setting("constant", "NFT's old-policy decay: constant (--ema-decay) or ramp "
                                         "(d = min(0.001·iteration, 0.5), old ≈ current at first)",
                             choices=("constant", "ramp"))
    timesteps_per_sample: int = setting(1, "NFT: forward-process times each sample is trained at (fresh noise each)")
    sample_by_old: bool = setting(False, "NFT: rollouts drawn by the old (EMA) adapter, as DiffusionNFT's authors do")
    # direct reward fine-tuning (draft)
    draft_k: int = setting(1, "DRaFT-K: the last K sampling steps of each edit are back-propagated through")
    draft_batch_size: int = setting(16, "DRaFT: own states (turn inputs of the rollouts) per optimizer step")
    draft_updates: int = setting(4, "DRaFT: optimizer steps per iteration")
    # reward-filtered self-training (rft) and its supervised control (sft)
    rft_target: str = setting("auto", "RFT's target: own (the rollout's output), render (the verifier's clean "
                                      "re-render of the scene it shows; world editors only) or auto (render for a "
                                      "world editor on the world, else own)", choices=("auto", "own", "render"))
    rft_threshold: float = setting(0.5, "RFT: a turn passes when its fused reward Σw·r / Σw is at least this")
    rft_share: bool = setting(True, "RFT: on-track rollouts that failed a turn learn from a sibling that passed it")
    rft_mixed_only: bool = setting(False, "RFT: keep only (session, turn) groups with both passes and failures")
    input_degradation: float = setting(0.0, "SFT: degrade the gold inputs as own outputs look (blur, tint, speckle "
                                            "drawn up to this strength; 1 ≈ the base's own outputs at turn 10; 0: none)")
    replay_size: int = setting(2048, "examples the replay buffer holds (the newest)")
    rft_batch_size: int = setting(32, "examples per optimizer step drawn from the replay buffer")
    rft_updates: int = setting(8, "optimizer steps on the replay buffer per iteration")
    polyak: float = setting(0.95, "RFT, SFT, DAgger, DRaFT: the exported adapter is the Polyak average of the trained "
                                  "one with this decay per iteration (after a warm-up)")
    # multi-turn credit
    reward_weights: dict[str, float] = setting(
        {"verifier": 1.0, "verifier.quality": 0.5}, "the trained reward: weighted terms, each a reward model's "
        "overall (NAME) or sub-score (NAME.SUB)", flag="--reward", metavar="TERM=WEIGHT,...")
    reward_paths: dict[str, str] = setting({}, "a reward model's artifact or served URL "
                                               "(e.g. calibrated=data/calibrated, qwen-vl=http://HOST:8000/v1)",
                                           metavar="NAME=PATH,...")
    turn_aggregation: str = setting("mean", "per-turn scores → one trajectory score", choices=TURN_AGGREGATIONS)
    fusion: str = setting("advantage", "how several reward terms combine: reward (weighted sum, then normalised "
                                       "in the group) or advantage (each normalised, then summed)", choices=FUSIONS)
    broadcast: bool = setting(True, "one trajectory advantage on every turn and step", off="--per-turn",
                              off_help="per-turn advantages: each turn normalised in its own group")
    trajectory_filter: bool = setting(True, "after a turn whose IF failed (by the trained reward's IF sub-score), "
                                            "the rollout's later turns get advantage 0")
    discount: float = setting(0.8, "γ of --turn-aggregation discounted")
    # operations
    iterations: int = setting(50, "training iterations (about 30 minutes on one thread of a 2-core CPU)")
    max_minutes: float = setting(60.0, "stop after this many training minutes (0: no limit)")
    eval_every: int = setting(10, "evaluate on the world's val split every N iterations and after the last (0: never)")
    eval_sessions: int = setting(100, "val sessions per evaluation")
    save_every: int = setting(10, "checkpoint every N iterations (and after the last)")
    hacking_window: int = setting(20, "iterations the reward-hacking monitor looks back over")
    hacking_reference: str = setting("", "a reward TERM held out of --reward that the reward-hacking monitor "
                                         "compares against (default: the world's gold)", metavar="TERM")
    reward_failure_warn: float = setting(0.5, "warn (reward_failing in the metrics) when more than this fraction "
                                              "of an iteration's rewards failed")
    max_reward_failures: int = setting(3, "stop with an error after this many such iterations in a row, e.g. when "
                                          "the judge endpoint is down (0: never)")
    gradient_checkpointing: bool = setting(False, "real backends: recompute activations in the backward pass")
    mixed_precision: str | None = setting(None, "real backends' precision (default: accelerate's config)",
                                          choices=("no", "bf16", "fp16"))
    seed: int = setting(0, "seed of the sessions, the sampling noise and the updates")
    out: str = setting("runs/grpo", "the run's directory: metrics, checkpoint, adapter; rerunning resumes from it")

    def __post_init__(self):
        policy = EDITORS[self.editor]
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{self.flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        try:
            reconstructor_class(self.intent)   # an unknown name or a missing argument fails here, not mid-run
        except ValueError as err:
            raise ValueError(f"--intent: {err}") from None
        if not issubclass(policy, FlowPolicy):
            raise ValueError(f"--editor {self.editor} is not a flow-matching policy: nothing to train")
        OBJECTIVES[self.algo].check(self)
        if self.rft_target == "auto":
            self.rft_target = "render" if policy.world and not self.sessions_from else "own"
        if policy.lora_presets and self.lora_targets not in policy.lora_presets:
            raise ValueError(f"--lora-targets must be one of {', '.join(policy.lora_presets)}")
        if not 1 <= self.sde_window <= self.steps - 1:
            raise ValueError("--sde-window must be in [1, steps − 1] (the σ = 1 step is always an ODE step)")
        self.window_starts()
        if not 0 <= self.reward_failure_warn <= 1 or self.max_reward_failures < 0:
            raise ValueError("--reward-failure-warn must be in [0, 1] and --max-reward-failures >= 0")
        if self.hacking_reference in self.reward_weights:
            raise ValueError(f"--hacking-reference {self.hacking_reference} is trained (in --reward): it must be held out")
        if self.sessions_from:
            if any(t.partition(".")[0] == WorldSessions.gold for t in self.reward_weights):
                raise ValueError("--sessions-from has no world to verify against: pass --reward without the "
                                 "verifier (e.g. qwen-vl=1.0)")
            parse_resolution(self.resolution)

    def window_starts(self) -> tuple[int, int]:
        """``(lo, hi)``: the steps the SDE window may start at (``--sde-window-starts``), checked."""
        last = self.steps - self.sde_window
        if not self.sde_window_starts:
            return 1, last
        lo, _, hi = self.sde_window_starts.partition("-")
        if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= last):
            raise ValueError(f"--sde-window-starts must be LO-HI with 1 <= LO <= HI <= steps − sde-window = {last}, "
                             f"got {self.sde_window_starts!r}")
        return int(lo), int(hi)

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of field ``name``."""
        f = next(f for f in fields(GRPOConfig) if f.name == name)
        return f.metadata.get("flag", "--" + name.replace("_", "-"))

    def as_flag(self, name: str) -> str:
        """The flag (with its value) that gives field ``name`` its present value: ``--per-turn``,
        ``--no-rft-share``, ``--timesteps-per-sample 3``."""
        value, meta = getattr(self, name), next(f for f in fields(self) if f.name == name).metadata
        if isinstance(value, bool):
            return self.flag(name) if value else meta.get("off", "--no-" + self.flag(name)[2:])
        if isinstance(value, dict):
            return f"{self.flag(name)} {mapping_text(value)}"
        return f"{self.flag(name)} {value}"

    def changed(self) -> set[str]:
        """The fields given a value other than their default."""
        return {f.name for f in fields(self)
                if getattr(self, f.name) != (f.default_factory() if f.default is MISSING else f.default)}


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """``--lora`` (the mode: train a LoRA adapter) and one flag per :class:`GRPOConfig` field, with its
    help and default; an objective's own settings are listed under its name."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter on the editor (required: the only mode)")
    owners, groups = setting_owners(), {}
    for f in fields(GRPOConfig):
        names = tuple(owners.get(f.name, ()))
        if names not in groups:
            groups[names] = parser.add_argument_group(f"settings of --algo {' / '.join(names)} only") if names else parser
        target, meta, kind = groups[names], f.metadata, str(f.type)
        if kind == "bool" and "off" in meta:
            pair = target.add_mutually_exclusive_group()
            pair.add_argument(GRPOConfig.flag(f.name), dest=f.name, action="store_true", default=f.default,
                              help=meta["help"] + " (default)" * f.default)
            pair.add_argument(meta["off"], dest=f.name, action="store_false",
                              help=meta["off_help"] + " (default)" * (not f.default))
            continue
        options: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if "metavar" in meta:
            options["metavar"] = meta["metavar"]
        if kind == "bool":
            options.update(action=argparse.BooleanOptionalAction, default=f.default)
            options["help"] += f" (default: {'on' if f.default else 'off'})"
        elif kind.startswith("dict"):
            default = f.default_factory()
            options.update(type=mapping(str if kind == "dict[str, str]" else float), default=default)
            options["help"] += f" (default: {mapping_text(default) or 'none'})"
        else:
            options.update(type={"int": int, "float": float}.get(kind, str), default=f.default,
                           choices=meta.get("choices"))
            if f.default is not None and "(default" not in meta["help"]:
                options["help"] += " (default: %(default)s)"
        target.add_argument(GRPOConfig.flag(f.name), **options)
    return parser


def parse_args(argv: list[str] | None = None, description: str = "") -> GRPOConfig:
    """The configuration of the command line ``argv`` (``--lora`` required)."""
    parser = build_parser(description)
    args = vars(parser.parse_args(argv))
    if not args.pop("lora"):
        parser.error("pass --lora: the trainer tunes a LoRA adapter on the editor")
    return GRPOConfig(**args)
