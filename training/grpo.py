"""Multi-turn RL of a LoRA adapter on a flow-matching editor: Flow-GRPO, DiffusionNFT and
reward-filtered self-training (RFT), with a supervised control (SFT).

    python -m training.grpo --lora                       # RFT on the mini editor, verifier (+ quality) reward
    python -m training.grpo --lora --algo grpo --learning-rate 3e-4 --reward judge=1.0
    python -m training.grpo --lora --algo sft            # the supervised control
    accelerate launch --num_processes 2 --multi_gpu -m training.grpo --lora   # data-parallel, gradients all-reduced
    python -m training.grpo --lora --algo nft --editor kontext --sessions-from data/sessions --reward qwen-vl=1.0 \
        --reward-paths qwen-vl=http://HOST:8000/v1 --hacking-reference calibrated
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m training.grpo --lora --algo nft --editor kontext ...

The settings are :class:`training.config.GRPOConfig`'s fields, one flag each (``--help`` lists them with
their help and defaults, an objective's own settings under its name).

One iteration, top to bottom:

1. **Rollouts** (``training.sampling``). ``sessions_per_step`` training sessions × ``num_generations``
   rollouts each, from the session source: the world, or with ``--sessions-from`` a pool of data
   sessions (files, ``hf://NAME``, the app's ``.duckdb`` label store) at the backend's
   ``--resolution``, one image size per iteration (aspect-ratio buckets). Every turn starts from the rollout's *own* previous output. Sampling is the
   ODE, except an SDE window of ``sde_window`` consecutive steps per turn where the Flow-GRPO step is a Gaussian policy:
   x' ~ N(mean_θ(x, σ), scale²) (``mteditlab.flow.sde_step_stats``), log-prob kept in fp32.
2. **Rewards** (``training.scoring``). Each reward model named in ``reward_weights`` scores every
   turn (named sub-scores + overall), turn k while turn k + 1 samples (``--overlap-scoring``, on by
   default: same scores, less waiting when the judge is served); on world sessions the verifier always runs too, as the gold metric. Data sessions have no gold:
   no gold columns, no ``val`` evaluation, and the reward-hacking monitor watches a held-out reward
   term (``--hacking-reference``) instead.
3. **Credit.** ``training.credit.compute_advantages``: turn aggregation, reward/advantage fusion,
   broadcast vs per-turn, trajectory filtering, clamp.
4. **Update** (``training.objectives``: ``--algo`` picks a registered objective, one module each, that
   declares and checks its own settings). GRPO: for every SDE step of every
   turn, ratio = exp(logp_θ − logp_old) and
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
5. **Operations** (``training.operations``, ``training.distributed``). JSONL metrics, plots, evaluation
   on ``val``, atomic checkpoints, exact resume; a warning (``reward_failing``) when more than
   ``--reward-failure-warn`` of an iteration's rewards failed, a stop after ``--max-reward-failures``
   such iterations in a row. The real backends (``kontext``, ``qwen-edit``: their class is
   ``distributed``) go through ``accelerator.prepare`` (DDP, FSDP or DeepSpeed as ``accelerate launch``
   configures; gradients accumulated over a minibatch's loss terms by ``accelerator.accumulate``), with
   ``--gradient-checkpointing`` and ``--mixed-precision``; the mini editor keeps its hand-averaged
   gradients.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mteditlab.bench import run_benchmark
from mteditlab.editors import EDITORS, get_editor
from training.config import GRPOConfig, parse_args
from training.distributed import Updater, accelerator_options, full_tensor, gathered_lora, ready_for_training
from training.logs import truncate_log
from training.objectives import OBJECTIVES
from training.operations import load_state, plot_metrics, save_state
from training.sampling import sample_turns, session_source
from training.scoring import RewardTerms, hacking_alarm


def train(cfg: GRPOConfig) -> Path:
    """Train for ``cfg.iterations`` iterations (resuming from ``cfg.out/checkpoint``); the exported adapter's directory."""
    from accelerate import Accelerator

    algo = OBJECTIVES[cfg.algo](cfg)
    distributed = EDITORS[cfg.editor].distributed
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              **(accelerator_options(cfg, algo.loss_terms()) if distributed else {}))
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    editor = get_editor(cfg.editor, path=cfg.editor_path, device=str(accelerator.device))
    editor.denoiser.requires_grad_(False)
    editor.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    algo.setup(editor)
    for p in editor.trainable_parameters():
        p.requires_grad_(True)
    if distributed:
        ready_for_training(editor, cfg)
    optimizer = torch.optim.AdamW(editor.trainable_parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    updater = Updater(accelerator, editor, optimizer, cfg.max_grad_norm, algo.loss_terms())
    source = session_source(cfg)
    rewards = RewardTerms.build(cfg.reward_weights, cfg.reward_paths, held_out=cfg.hacking_reference, gold=source.gold)
    start = load_state(out, editor, updater.optimizer, algo.buffer)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        truncate_log(metrics_path, "iteration", start)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    history = [json.loads(l) for l in metrics_path.read_text().splitlines() if json.loads(l).get("kind") == "train"] \
        if metrics_path.exists() else []
    minutes = history[-1]["train_minutes"] if history else 0.0
    val = source.evaluation()

    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"{cfg.algo}",
               disable=rank != 0)
    for iteration in bar:
        timings = {}
        t0 = time.time()
        sessions = source.draw(iteration, world)[rank::world]
        editor.denoiser.eval()
        local: dict[str, float] = {}
        counts: dict[str, float] = {}   # summed over processes
        turns = scores = None
        if algo.samples:
            scoring = rewards.batch(sessions, cfg.num_generations, source.meta, seed=cfg.seed * 100_003 + iteration * 31,
                                    tally=counts, overlap=cfg.overlap_scoring)
            with algo.sampling_policy(editor):
                turns = sample_turns(editor, sessions, [source.image(s) for s in sessions], cfg, iteration,
                                     on_turn=scoring.add)
            timings["rollout_s"] = time.time() - t0

            t0 = time.time()
            scores = scoring.result()   # with overlap: waits for the last turn only
            local = {**rewards.metrics(scores, cfg.trajectory_filter), "reward_busy_s": scoring.busy_s}
            timings["reward_s"] = time.time() - t0

        t0 = time.time()
        editor.denoiser.train()
        noise_gen = torch.Generator().manual_seed(cfg.seed * 17 + iteration)
        stats, loss_stats = algo.update(editor, sessions, turns, scores, updater, iteration, noise_gen)
        local.update(stats)
        algo.after_step(editor, iteration)
        timings["update_s"] = time.time() - t0
        minutes += sum(timings.values()) / 60

        checksums = accelerator.gather(torch.stack([full_tensor(p).detach().double().sum() for p in updater.trainable]).sum().view(1))
        local.update({k: float(np.mean(v)) for k, v in loss_stats.items()})
        local["loss_terms"] = float(len(loss_stats.get("loss", [])))   # loss evaluations this iteration
        # mean over processes of what each could measure (a process whose rewards all failed counts as missing)
        averaged = accelerator.gather(torch.tensor([list(local.values())], dtype=torch.float64)).nanmean(0)
        summed = accelerator.reduce(torch.tensor(list(counts.values()), dtype=torch.float64), reduction="sum") \
            if counts else torch.zeros(0)
        row = {"kind": "train", "iteration": iteration + 1, **timings, "train_minutes": minutes,
               **dict(zip(local, averaged.tolist())), **{k: int(v) for k, v in zip(counts, summed.tolist())},
               "lora_in_sync": bool(torch.allclose(checksums, checksums[0]))}
        if algo.samples:
            row["filter_source"] = rewards.filter_source if cfg.trajectory_filter else None
            row["hacking_reference"] = rewards.reference
            row["reward_failing"] = row["reward_failed_frac"] > cfg.reward_failure_warn
        history.append(row)
        row["reward_hacking"] = algo.samples and hacking_alarm(history, cfg.hacking_window, rewards.proxies, rewards.reference)
        if row["reward_hacking"] and rank == 0:
            tqdm.write(f"warning: reward hacking suspected at iteration {iteration + 1}: proxy reward rising "
                       f"while {rewards.reference} falls over the last {cfg.hacking_window} iterations")
        # iterations in a row, this one included, over the failure threshold (from the metrics, so resumes count)
        failing = next((n for n, h in enumerate(reversed(history)) if not h.get("reward_failing")), len(history))
        if failing and rank == 0:
            tqdm.write(f"warning: {row['reward_failed_frac']:.0%} of the rewards failed at iteration {iteration + 1} "
                       f"({failing} iteration(s) in a row over --reward-failure-warn {cfg.reward_failure_warn:g})")
        bar.set_postfix(gold=f"{row.get('gold_success', float('nan')):.3f}", loss=f"{row.get('loss', 0):.3g}")
        out_of_time = bool(cfg.max_minutes) and minutes >= cfg.max_minutes
        last = iteration + 1 == cfg.iterations or out_of_time
        lines = [row]
        if val and cfg.eval_every and ((iteration + 1) % cfg.eval_every == 0 or last):
            editor.denoiser.eval()
            with algo.exported_policy(editor):
                result = run_benchmark(editor, val, seed=cfg.seed, intent=cfg.intent, progress=False)
            lines.append({"kind": "eval", "iteration": iteration + 1, "train_minutes": minutes,
                          "overall": [r["overall"] for r in result["per_turn"]],
                          "success": [r["success"] for r in result["per_turn"]]})
        if rank == 0:
            with metrics_path.open("a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
        if (iteration + 1) % cfg.save_every == 0 or last:
            save_state(out, editor, updater.optimizer, iteration + 1, cfg, algo.buffer, write=rank == 0,
                       with_optimizer=not updater.sharded)
        accelerator.wait_for_everyone()
        if cfg.max_reward_failures and failing >= cfg.max_reward_failures:
            judges = ", ".join(f"{n} at {cfg.reward_paths[n]}" if n in cfg.reward_paths else n for n in rewards.models)
            raise RuntimeError(
                f"stopping: more than {cfg.reward_failure_warn:.0%} of the rewards failed in each of the last {failing} "
                f"iterations (--max-reward-failures {cfg.max_reward_failures}). Check that the judge endpoint is up "
                f"and answering ({judges}) and read its logs; the failures/NAME and endpoint/NAME/... columns of "
                f"{metrics_path} count the failed items and requests. Rerunning resumes from the last checkpoint.")
        if out_of_time:
            tqdm.write(f"stopping after {minutes:.1f} training minutes (--max-minutes {cfg.max_minutes:g})")
            break

    state = gathered_lora(editor, algo.exports) if updater.sharded else None   # every process takes part
    if rank == 0:
        editor.save_lora(out / "adapter", adapter_name=algo.exports, state=state,
                         metadata={"config": asdict(cfg), "iterations": history[-1]["iteration"] if history else 0,
                                   "train_minutes": minutes})
        plot_metrics(metrics_path, out / "curves.png")
    accelerator.wait_for_everyone()
    return out / "adapter"


if __name__ == "__main__":
    train(parse_args(description=__doc__))
