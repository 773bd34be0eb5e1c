"""Train and evaluate the world's learned ``judge`` (:mod:`mteditlab.rewards.mini_judge`).

    python -m training.judge                               # train on synthetic rollouts, evaluate on test
    python -m training.judge --editor-outputs 300          # + the mini editor's own rollouts (needs its checkpoint)
    python -m training.judge --steps 3000 --max-cpu-minutes 11 --editor-outputs 300 --editor-path DIR
                                                           # how the committed judge was trained (see its card)
    python -m training.judge --eval-only [--eval-editor none]   # evaluate the committed judge: table + JSON

Caches (data, editor rollouts keyed by the checkpoint's fingerprint, MiniLM token states) live in
``--work`` (``runs/judge``); reruns reuse them.

**Data** (:mod:`training.judge_data`): every example is one turn labelled by the exact verifier
(``if``, ``cc``, ``ga``, ``quality``), from sessions rolled out by a *defective oracle* whose output
kinds (correct, perturbed, identity, wrong object / value, extra change, undone earlier edit, blend,
partial, ...) are :mod:`training.judge_defects`' (training draws them with ``TRAIN_DEFECTS``, which
has more binding errors). With ``--editor-outputs N``, N train sessions rolled out by the mini editor
(own outputs, reconstructed intents) are added, labelled the same way (``origin = mini``).

**Model / loss.** See the judge module. Binary cross-entropy on ``if``, ``cc``, ``ga`` (masked at turn 0)
and on the soft ``quality`` target; the intent is dropped for 40% of the samples of each batch, so the
judge also works on raw (possibly referential) instructions with history only. AdamW, warm-up, cosine
decay. ``val`` sessions monitor training; ``test`` sessions are only evaluated.

**Evaluation** (``--eval-only`` or after training): ``test`` sessions rolled out the same way (plus
forced ``correct`` and ``identity`` branches at each turn) and, when its checkpoint exists, by the mini
editor; agreement with the verifier per sub-score, error slices and within-turn ranking
(:mod:`training.judge_metrics`). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mteditlab.rewards.mini_judge import CELL_HEADS, DEFAULT_CHECKPOINT, JudgeNet, MiniJudge, default_config
from training.judge_data import (DATA_VERSION, Examples, all_strings, cached, editor_examples, load_text_cache,
                                 save_text_cache, synthetic_examples)
from training.judge_defects import DEFECTS, TRAIN_DEFECTS
from training.judge_metrics import evaluate_probs, full_report, table

REPO_ROOT = Path(__file__).resolve().parents[1]
MINI_EDITOR_CHECKPOINT = REPO_ROOT / "checkpoints" / "mini" / "base"


def recorded_path(path: Path) -> str:
    """``path`` as a report records it: relative to the repository when inside it (reports ship)."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


# ---- training -----------------------------------------------------------------------------------
def predict_examples(judge: MiniJudge, examples: Examples, with_intent: bool = True) -> np.ndarray:
    """The judge's probabilities ``[N, 4]`` (``HEADS`` order) for ``examples``, with or without their intents."""
    segs = [examples.segments(i, with_intent) for i in range(len(examples))]
    return judge.predict(examples.source, examples.edited, segs)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, cell_logits: torch.Tensor | None = None,
            cell_labels: torch.Tensor | None = None, quality_weight: float = 1.0, cell_weight: float = 0.5) -> torch.Tensor:
    """Mean BCE over the available sub-scores (``ga`` masked where NaN; soft ``quality`` target weighted
    ``quality_weight``) plus ``cell_weight`` × the mean BCE of the per-cell auxiliary targets."""
    target = torch.nan_to_num(labels, nan=0.0)
    weight = torch.isfinite(labels).float()
    weight[:, 3] *= quality_weight
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    loss = per.sum() / weight[:, :3].sum().clamp(min=1)
    if cell_logits is not None and cell_weight:
        loss = loss + cell_weight * F.binary_cross_entropy_with_logits(cell_logits, cell_labels) * len(CELL_HEADS)
    return loss


def train(judge: MiniJudge, data: Examples, *, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
          intent_dropout: float = 0.4, cell_weight: float = 0.5, editor_weight: float = 1.0,
          val: Examples | None = None, eval_every: int = 500,
          max_minutes: float | None = None, max_cpu_minutes: float | None = None, log_path: Path | None = None,
          progress: bool = True) -> dict:
    net = judge.net.train()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    labels, cell_labels = torch.from_numpy(data.labels), torch.from_numpy(data.cells)
    # sampling weights: editor rollouts (origin other than "synthetic") count ``editor_weight`` times
    weights = torch.tensor([1.0 if m["origin"] == "synthetic" else editor_weight for m in data.meta], dtype=torch.double)
    started, cpu_started, history = time.time(), time.process_time(), []
    bar = tqdm(range(steps), desc="train judge", disable=not progress)
    for step in bar:
        # schedule progress: steps done, or the share of the CPU / wall budget spent, whichever is ahead,
        # so a budget-capped run still anneals its learning rate before it stops
        done = max(step / max(1, steps),
                   (time.process_time() - cpu_started) / (60 * max_cpu_minutes) if max_cpu_minutes else 0.0,
                   (time.time() - started) / (60 * max_minutes) if max_minutes else 0.0)
        scale = min(1.0, (step + 1) / max(1, warmup)) * (0.5 * (1 + math.cos(math.pi * min(1.0, done))) * 0.95 + 0.05)
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen).numpy()
        segs = [data.segments(int(i), with_intent=rng.random() >= intent_dropout) for i in idx]
        logits, cell_logits = judge.logits(data.source[idx], data.edited[idx], segs, cells=True)
        loss = loss_fn(logits, labels[idx].to(judge.device), cell_logits, cell_labels[idx].to(judge.device),
                       cell_weight=cell_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {"step": step + 1, "loss": loss.item(), "lr": lr * scale, "seconds": round(time.time() - started, 1)}
        last = step + 1 == steps or done >= 1.0
        if val is not None and len(val) and ((step + 1) % eval_every == 0 or last):
            metrics = evaluate_probs(val, predict_examples(judge, val))
            net.train()
            row["val"] = {h: {"acc": metrics[h].get("accuracy"), "auc": metrics[h].get("auc")} for h in ("if", "cc", "ga")}
            row["val"]["quality_mae"] = metrics["quality"]["mae"]
            print(json.dumps(row["val"]), flush=True)
        history.append(row)
        if log_path:
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if last:
            break
    net.eval()
    return {"steps": len(history), "seconds": round(time.time() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "final_loss": float(np.mean([r["loss"] for r in history[-50:]]))}


# ---- CLI ----------------------------------------------------------------------------------------
def editor_fingerprint(path: Path) -> str:
    """Short content hash of a mini editor checkpoint (its config and weight files), so cached rollouts of
    one checkpoint are never reused for another."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:10]


def evaluation_set(args, work: Path, editor_available: bool) -> Examples:
    parts = [cached(work / f"v{DATA_VERSION}-test-synthetic-{args.eval_sessions}-s{args.seed}.npz",
                    lambda: synthetic_examples("test", args.eval_sessions, branches=6,
                                               forced=("correct", "identity"), seed=args.seed + 1))]
    if editor_available:
        from mteditlab.editors import get_editor  # the editor stack (diffusers) loads only when rollouts are made
        path = Path(args.editor_path or MINI_EDITOR_CHECKPOINT)
        tag = editor_fingerprint(path) + (f"-lora{editor_fingerprint(args.eval_editor_adapter)}" if args.eval_editor_adapter else "")
        parts.append(cached(work / f"v{DATA_VERSION}-test-mini-{tag}-{args.eval_editor_sessions}-s{args.seed}.npz",
                            lambda: editor_examples(get_editor("mini", path=path, lora=args.eval_editor_adapter), "test",
                                                    args.eval_editor_sessions, seed=args.seed)))
    return Examples.concat(parts)


def run_eval(judge: MiniJudge, examples: Examples, json_path: Path | None, extra: dict | None = None) -> dict:
    probs = predict_examples(judge, examples, with_intent=True)
    report = full_report(examples, probs, predict_examples(judge, examples, with_intent=False))
    report.update(extra or {})
    print(table(report))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1500, help="train sessions of synthetic rollouts")
    parser.add_argument("--branches", type=int, default=4, help="outputs scored per turn")
    parser.add_argument("--train-mix", choices=("binding", "eval"), default="binding",
                        help="output kinds of training branches: TRAIN_DEFECTS (more wrong-object / wrong-value "
                             "outputs) or the evaluation mix DEFECTS")
    parser.add_argument("--editor-outputs", type=int, default=0,
                        help="also roll out the mini editor over this many train sessions (needs its checkpoint)")
    parser.add_argument("--extra-examples", type=Path, nargs="*", default=[],
                        help="more training examples: .npz files written by this script (e.g. cached rollouts of "
                             "an earlier editor checkpoint from <work>/v2-train-mini-<fingerprint>-*.npz)")
    parser.add_argument("--editor-weight", type=float, default=4.0,
                        help="sampling weight of an editor-rollout example relative to a synthetic one")
    parser.add_argument("--editor-path", type=Path, default=None, help="mini editor checkpoint (default checkpoints/mini/base)")
    parser.add_argument("--val-sessions", type=int, default=100)
    parser.add_argument("--eval-sessions", type=int, default=300, help="test sessions of synthetic rollouts")
    parser.add_argument("--eval-editor", choices=("auto", "mini", "none"), default="auto",
                        help="add mini-editor rollouts to the test set (auto: when its checkpoint exists)")
    parser.add_argument("--eval-editor-sessions", type=int, default=200)
    parser.add_argument("--eval-editor-adapter", type=Path, default=None,
                        help="evaluate on rollouts of the mini editor with this LoRA adapter (e.g. checkpoints/mini/grpo)")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--cell-weight", type=float, default=0.5, help="weight of the per-cell auxiliary loss")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--max-minutes", type=float, default=None, help="training wall-time budget (minutes)")
    parser.add_argument("--max-cpu-minutes", type=float, default=None,
                        help="training CPU-time budget (minutes of this process's CPU time); the learning-rate "
                             "schedule follows whichever of steps / CPU / wall budget runs out first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=Path("runs/judge"), help="data / text caches and logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="where the trained judge is saved")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the judge at --judge (default --out)")
    parser.add_argument("--judge", type=Path, default=None, help="judge checkpoint to evaluate with --eval-only")
    parser.add_argument("--json", type=Path, default=None, help="evaluation JSON (default <work>/eval.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, progress = args.work, not args.no_progress
    work.mkdir(parents=True, exist_ok=True)
    text_cache = work / "text_cache.pt"
    editor_path = Path(args.editor_path or MINI_EDITOR_CHECKPOINT)
    from mteditlab.editors.mini import MiniEditor  # the editor stack (diffusers) loads only past --help

    editor_available = args.eval_editor == "mini" or (args.eval_editor == "auto" and MiniEditor.available(editor_path))
    json_path = args.json or work / "eval.json"
    started = time.time()

    if args.editor_outputs and not args.eval_only and not MiniEditor.available(editor_path):
        raise SystemExit(f"--editor-outputs needs the mini editor checkpoint at {editor_path}; "
                         "train it with `python -m training.pretrain` first (or pass --editor-path).")
    if args.eval_only:
        judge = MiniJudge.from_pretrained(args.judge or args.out)
        load_text_cache(judge.text_encoder, text_cache)
        examples = evaluation_set(args, work, editor_available)
        report = run_eval(judge, examples, json_path, {
            "judge": recorded_path(Path(args.judge or args.out)), "command": " ".join(["python -m training.judge", *(sys.argv[1:] if argv is None else argv)]),
            "editor": {"path": recorded_path(editor_path), "fingerprint": editor_fingerprint(editor_path),
                       "lora": str(args.eval_editor_adapter) if args.eval_editor_adapter else None} if editor_available else None})
        save_text_cache(judge.text_encoder, text_cache)
        return report

    from mteditlab.editors.mini import TextEncoder

    encoder = TextEncoder()
    load_text_cache(encoder, text_cache)
    weights = TRAIN_DEFECTS if args.train_mix == "binding" else DEFECTS
    tag = "" if args.train_mix == "eval" else f"-{args.train_mix}"
    parts = [cached(work / f"v{DATA_VERSION}-train-synthetic-{args.sessions}-b{args.branches}-s{args.seed}{tag}.npz",
                    lambda: synthetic_examples("train", args.sessions, branches=args.branches, seed=args.seed,
                                               weights=weights))]
    if args.editor_outputs:
        from mteditlab.editors import get_editor
        parts.append(cached(work / f"v{DATA_VERSION}-train-mini-{editor_fingerprint(editor_path)}-{args.editor_outputs}"
                                   f"-s{args.seed}.npz",
                            lambda: editor_examples(get_editor("mini", path=editor_path), "train",
                                                    args.editor_outputs, seed=args.seed, progress=progress)))
    for path in args.extra_examples:
        parts.append(Examples.load(path))
    data = Examples.concat(parts)
    val = cached(work / f"v{DATA_VERSION}-val-synthetic-{args.val_sessions}-s{args.seed}.npz",
                 lambda: synthetic_examples("val", args.val_sessions, branches=args.branches, seed=args.seed + 2))
    data_seconds = time.time() - started
    print(f"{len(data)} training examples, {len(val)} val examples ({data_seconds:.0f} s)", flush=True)
    strings = all_strings(Examples.concat([data, val]))
    encoder(strings)  # fills the cache (already-cached strings are skipped)
    save_text_cache(encoder, text_cache)
    text_seconds = time.time() - started - data_seconds
    print(f"{len(strings)} strings encoded ({text_seconds:.0f} s)", flush=True)

    torch.manual_seed(args.seed)
    judge = MiniJudge(JudgeNet(**default_config()), encoder)
    log_path = work / "train_log.jsonl"
    log_path.write_text("")
    stats = train(judge, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                  seed=args.seed, cell_weight=args.cell_weight, editor_weight=args.editor_weight, val=val, eval_every=args.eval_every, max_minutes=args.max_minutes,
                  max_cpu_minutes=args.max_cpu_minutes,
                  log_path=log_path, progress=progress)
    origins = sorted({m["origin"] for m in data.meta})
    info = {"trained_with": " ".join(["python -m training.judge", *(sys.argv[1:] if argv is None else argv)]),
            "train_examples": len(data), "origins": origins, "sessions": args.sessions,
            "editor_outputs": args.editor_outputs, "editor_weight": args.editor_weight,
            "extra_examples": [p.name for p in args.extra_examples],
            "editor": ({"path": recorded_path(editor_path), "fingerprint": editor_fingerprint(editor_path)}
                       if args.editor_outputs else None), "parameters": sum(p.numel() for p in judge.net.parameters()),
            **stats, "data_seconds": round(data_seconds, 1), "text_seconds": round(text_seconds, 1)}
    judge.save_pretrained(args.out, info)
    print(f"saved judge to {args.out}: {json.dumps(info)}", flush=True)
    examples = evaluation_set(args, work, editor_available)
    save_text_cache(encoder, text_cache)
    report = run_eval(judge, examples, json_path, {"judge": str(args.out), "train": info})
    save_text_cache(encoder, text_cache)
    report["wall_seconds"] = round(time.time() - started, 1)
    return report


if __name__ == "__main__":
    main()
