"""Pretrain the ``mini`` editor with the plain flow-matching loss on single-turn edits (teacher forcing).

    python -m training.pretrain --steps 6000 --out checkpoints/mini/base

Loss (rectified flow): x_σ = (1 − σ)·x0 + σ·ε, σ ~ logit-normal, L = ‖v_θ(x_σ, σ, source, text) − (ε − x0)‖².
Each example is one turn of a ``train``-split session: input = the true scene before the turn, target =
the true scene after it, text = the explicit intent or (for non-referential turns, ``--phrasing-rate`` of
the time, half by default) the instruction as phrased. Resumable: rerun the same command and it continues from ``--work``.

Continue a released checkpoint to convergence (weights and EMA start from ``--init-from``, the learning
rate warms up again and decays on a cosine to ``--min-lr``; every ``--eval-every`` steps the EMA is
scored on ``val`` sessions, ``--eval-turns`` turns on its own outputs, into ``eval.jsonl``):

    python -m training.pretrain --init-from checkpoints/mini/base --steps 12000 --schedule cosine --lr 1e-4 \
        --min-lr 1e-6 --eval-every 3000 --eval-turns 10 --sessions 8000 --session-turns 10 --threads 2 --bf16 \
        --work runs/base10 --out runs/base10/final

(how the shipped base's last stage was made: its ``MODEL_CARD.md``). Run it on a quiet machine: two
OpenMP threads that share their cores with another process slow down many times over.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mteditlab.bench import run_benchmark
from mteditlab.editors.mini import MiniEditor, images_to_tensor
from mteditlab.registry import mapping
from mteditlab.world import generate_session, render, sessions
from training.logs import restore, truncate_log
from training.schedules import warmup_cosine


def build_pool(num_sessions: int, resolution: int, turns: int = 5
               ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str | None]], list[str]]:
    """Every turn of the first ``num_sessions`` ``turns``-turn train sessions: before, after,
    (intent, phrasing) and the operation."""
    before, after, texts, ops = [], [], [], []
    for index in tqdm(range(num_sessions), desc="building data", leave=False):
        for turn in generate_session("train", index, turns).turns:
            before.append(render(turn.before, resolution))
            after.append(render(turn.after, resolution))
            texts.append((turn.intent, None if turn.referential else turn.instruction))
            ops.append(turn.edit.op)
    return images_to_tensor(before, resolution), images_to_tensor(after, resolution), texts, ops


def save_checkpoint(path: Path, step: int, editor: MiniEditor, ema, optimizer) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": editor.denoiser.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                "py_rng": random.getstate()}, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or a cosine from ``lr`` down to ``min_lr``."""
    if args.schedule == "constant":
        return args.lr * min(1.0, (step + 1) / args.warmup)
    return warmup_cosine(step, steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup)


def evaluate(editor: MiniEditor, denoiser, num_sessions: int, turns: int = 3) -> dict:
    """Turn-k success and overall of ``denoiser`` on the first ``num_sessions`` ``val`` sessions."""
    trained = editor.denoiser
    editor.denoiser = denoiser
    try:
        result = run_benchmark(editor, sessions("val", num_sessions, turns), progress=False)
    finally:
        editor.denoiser = trained
    rows = result["per_turn"]
    return {"success": [r["success"] for r in rows], "overall": [r["overall"] for r in rows],
            "exposure_gap": [r["exposure_gap"] for r in rows]}


def plot_losses(log_path: Path, out_path: Path, eval_path: Path | None = None) -> None:
    """Loss vs step (log scale); beside it, when ``eval_path`` exists, val overall success and the
    exposure gap vs step, at turns 1, 5 and 10 (every turn for evaluations of up to 3 turns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    evals = [json.loads(line) for line in eval_path.read_text().splitlines()] if eval_path and eval_path.exists() else []
    fig, axes = plt.subplots(1, 3 if evals else 1, figsize=(15 if evals else 6, 3.5), squeeze=False)
    axes[0, 0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.5)
    axes[0, 0].set(yscale="log", xlabel="step", ylabel="flow-matching loss", title="mini editor pretraining")
    if evals:
        n = len(evals[-1]["overall"])
        shown = range(n) if n <= 3 else sorted({0, min(4, n - 1), n - 1})
        steps = [e["step"] for e in evals]
        for k in shown:
            axes[0, 1].plot(steps, [e["overall"][k] for e in evals], "o-", label=f"turn {k + 1}")
            axes[0, 2].plot(steps, [e["exposure_gap"][k] for e in evals], "o-", label=f"turn {k + 1}")
        axes[0, 1].set(xlabel="step", ylabel="val overall success", title="EMA on val (own outputs)")
        axes[0, 2].set(xlabel="step", ylabel="exposure gap", title="fed the true scene − fed its own output")
        for ax in axes[0, 1:]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine schedule")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--init-from", type=Path, help="start model and EMA from this checkpoint directory")
    parser.add_argument("--eval-every", type=int, default=0, help="score the EMA on val every N steps (0 = never)")
    parser.add_argument("--eval-sessions", type=int, default=300)
    parser.add_argument("--eval-turns", type=int, default=3, help="turns per val session in the evaluation")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--sessions", type=int, default=4000, help="train sessions in the data pool")
    parser.add_argument("--session-turns", type=int, default=5, help="turns per train session in the data pool")
    parser.add_argument("--phrasing-rate", type=float, default=0.5,
                        help="how often a non-referential turn is conditioned on its instruction as phrased "
                             "instead of its explicit intent (default: %(default)s)")
    parser.add_argument("--op-weights", type=mapping(float), default={}, metavar="OP=WEIGHT,...",
                        help="draw turns of these operations WEIGHT times as often (e.g. swap=3; default: uniform)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--work", type=Path, default=Path("runs/pretrain"), help="resumable checkpoint + logs")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/mini/base"), help="final EMA weights")
    parser.add_argument("--export", choices=["ema", "model"], default="ema",
                        help="weights written to --out: the EMA (default) or the raw model")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for the training forward and backward (weights, optimizer and "
                             "evaluation stay float32); about 1.3x faster on CPUs with AMX/AVX-512 bf16")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    editor = (MiniEditor.from_pretrained(args.init_from) if args.init_from
              else MiniEditor.from_config(args.resolution, seed=args.seed))
    model = editor.denoiser.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path, eval_path = args.work / "checkpoint.pt", args.work / "loss.jsonl", args.work / "eval.jsonl"
    start = 0
    if ckpt_path.exists():
        start = restore(torch.load(ckpt_path, weights_only=False), model=model, ema=ema, optimizer=optimizer)
    for path in (log_path, eval_path):
        truncate_log(path, "step", start)

    before, after, texts, ops = build_pool(args.sessions, args.resolution, args.session_turns)
    draw = torch.tensor([args.op_weights.get(op, 1.0) for op in ops])   # example weights: --op-weights
    started = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="pretrain")
    for step in bar:
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = (torch.multinomial(draw, args.batch_size, replacement=True) if args.op_weights
               else torch.randint(len(texts), (args.batch_size,)))
        prompts = [texts[i][1] if texts[i][1] and random.random() < args.phrasing_rate else texts[i][0]
                   for i in idx.tolist()]
        text, mask = editor.text_encoder(prompts)
        x0, source = after[idx], before[idx]
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(args.batch_size)).view(-1, 1, 1, 1)  # logit-normal
        x_sigma = (1 - sigma) * x0 + sigma * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            v = model(torch.cat([x_sigma, source], 1), sigma.flatten() * 1000, encoder_hidden_states=text,
                      encoder_attention_mask=mask).sample
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        with log_path.open("a") as log:
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr,
                                  "seconds": time.time() - started}) + "\n")
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            scores = evaluate(editor, ema, args.eval_sessions, args.eval_turns)
            ema.save_pretrained(args.work / "snapshots" / f"step-{step + 1}")
            with eval_path.open("a") as log:
                log.write(json.dumps({"step": step + 1, "seconds": time.time() - started, **scores}) + "\n")
            bar.write(f"step {step + 1}: val success {scores['success']} overall {scores['overall']}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_path, step + 1, editor, ema, optimizer)

    args.out.mkdir(parents=True, exist_ok=True)
    (ema if args.export == "ema" else model).save_pretrained(args.out)
    plot_losses(log_path, args.out / "loss.png", eval_path)
    print(f"saved {args.export} weights to {args.out}")


if __name__ == "__main__":
    main()
