"""Train the ``mini`` intent reconstructor (``mteditlab/reconstructors/mini.py``) from scratch.

    python -m training.intent --threads 2          # 9000 steps of batch 64, val every 1000 → checkpoints/mini/intent

Data: every turn of the first ``--sessions`` 10-turn ``train`` sessions of the world. Input = the true
scene before the turn (rendered 32×32, plus light pixel noise and a colour shift so that the editor's own
imperfect outputs look familiar) and the text history with the *gold* earlier intents (each replaced by
``<none>`` ``--drop-intent`` of the time, as after a failed reconstruction); target = the turn's gold intent.

Loss: token cross-entropy of the intent followed by ``</s>``, teacher-forced, averaged over target
tokens (``loss`` in ``loss.jsonl``), plus ``--cell-loss`` × an auxiliary cross-entropy: a linear head
(training only, not shipped) reads each of the nine image cell tokens and names its cell's colour, shape
and size (or empty) — dense supervision that teaches the image encoder to ground "the red circle" in a cell.
AdamW, linear warm-up then a cosine to ``--min-lr``, gradient clipping at 1.

Every ``--eval-every`` steps (and at the end) the model reconstructs ``--eval-sessions`` 10-turn ``val``
sessions turn by turn on the true images, each turn seeing *its own* earlier intents (as deployed); exact
match and parse-equivalence (:func:`mteditlab.reconstructors.metrics.intent_agreement`) split by
referential / explicit turns go to ``eval.jsonl``. Resumable: rerun the same command and it continues
from ``--work``. The weights and tokenizer go to ``--out`` with ``training.png`` (loss and eval curves).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mteditlab.reconstructors import IntentQuery
from mteditlab.reconstructors.metrics import intent_agreement
from mteditlab.reconstructors.mini import (MiniIntentModel, MiniReconstructor, build_tokenizer,
                                           model_config, world_vocabulary)
from mteditlab.world import COLOURS, SHAPES, SIZES, Obj, Scene, generate_session, render, render_array
from training.logs import restore, truncate_log
from training.schedules import warmup_cosine

TURNS = 10
CELL_CLASSES = {"colour": ["empty", *COLOURS], "shape": ["empty", *SHAPES], "size": ["empty", *SIZES]}


def cell_labels(scene: Scene) -> list[list[int]]:
    """Per grid cell: (colour, shape, size) class indices, 0 = empty — the auxiliary loss's targets."""
    return [[CELL_CLASSES[kind].index(getattr(obj, kind)) if isinstance(obj, Obj) else 0 for kind in CELL_CLASSES]
            for obj in scene.cells]


def build_pool(num_sessions: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple], list[str], list[bool]]:
    """Every turn of the first ``num_sessions`` train sessions: the image before it (uint8 ``[N, 3, R, R]``),
    its cells' labels (``[N, 9, 3]``), its text ``(instructions so far, gold earlier intents)``, its gold
    intent, whether it is referential."""
    images, cells, texts, targets, referential = [], [], [], [], []
    for index in tqdm(range(num_sessions), desc="building data", leave=False):
        turns = generate_session("train", index, TURNS).turns
        instructions, intents = [t.instruction for t in turns], [t.intent for t in turns]
        for k, turn in enumerate(turns):
            images.append(torch.from_numpy((render_array(turn.before, resolution) * 255).round()).to(torch.uint8))
            cells.append(cell_labels(turn.before))
            texts.append((instructions[: k + 1], intents[:k]))
            targets.append(turn.intent)
            referential.append(turn.referential)
    return (torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(cells, dtype=torch.uint8), texts,
            targets, referential)


def augment(images: torch.Tensor, noise: float) -> torch.Tensor:
    """uint8 images → [-1, 1], plus per-image Gaussian pixel noise (std uniform in [0, ``noise``]) and a
    small per-image colour shift."""
    x = images.float() / 127.5 - 1
    batch = len(x)
    x = x + torch.randn_like(x) * torch.rand(batch, 1, 1, 1) * noise + torch.randn(batch, 3, 1, 1) * noise / 3
    return x.clamp(-1, 1)


def evaluate(reconstructor: MiniReconstructor, val: list, renders: list[list]) -> dict:
    """Closed-loop scores on ``val`` sessions: turn k sees the true image and the model's own intents of
    turns < k. Exact / parse-equivalent rates split by referential and explicit turns."""
    counts = {kind: {"n": 0, "exact": 0, "equivalent": 0} for kind in ("referential", "explicit")}
    own = [[] for _ in val]
    failures = 0
    for k in range(TURNS):
        queries = [IntentQuery([t.instruction for t in s.turns[: k + 1]], own[i], renders[i][k], renders[i][0], s)
                   for i, s in enumerate(val)]
        for i, (session, result) in enumerate(zip(val, reconstructor.reconstruct(queries))):
            exact, equivalent = intent_agreement(result.intent, session, k)
            row = counts["referential" if session.turns[k].referential else "explicit"]
            row["n"] += 1
            row["exact"] += exact
            row["equivalent"] += equivalent
            failures += result.intent is None
            own[i].append(result.intent)
    scores = {kind: {"n": c["n"], "exact": c["exact"] / max(1, c["n"]), "equivalent": c["equivalent"] / max(1, c["n"])}
              for kind, c in counts.items()}
    return {**scores, "failures": failures}


def plot(log_path: Path, eval_path: Path, out_path: Path) -> None:
    """Loss vs step (log scale) and, when there are evaluations, val exact / equivalent rates vs step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    evals = [json.loads(line) for line in eval_path.read_text().splitlines()] if eval_path.exists() else []
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 3.5), squeeze=False)
    axes[0, 0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.5, label="intent tokens")
    axes[0, 0].plot([r["step"] for r in rows], [r["cell_loss"] for r in rows], lw=0.5, alpha=0.6, label="cells (aux)")
    axes[0, 0].set(yscale="log", xlabel="step", ylabel="cross-entropy", title="mini intent reconstructor")
    axes[0, 0].legend(fontsize=7)
    if evals:
        steps = [e["step"] for e in evals]
        for kind, marker in (("referential", "o"), ("explicit", "s")):
            for metric, line in (("equivalent", "-"), ("exact", ":")):
                axes[0, 1].plot(steps, [e[kind][metric] for e in evals], marker=marker, ms=3, ls=line,
                                label=f"{kind} {metric}")
        axes[0, 1].set(xlabel="step", ylabel="rate on val", title="val, own earlier intents", ylim=(0, 1.02))
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def save_checkpoint(path: Path, step: int, model: MiniIntentModel, cell_head, optimizer) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "config": model.config, "model": model.state_dict(), "cell_head": cell_head.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "py_rng": random.getstate()}, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=9000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=2e-5, help="end of the cosine schedule")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--size", choices=["small", "tiny"], default="small", help="model size (tiny: tests)")
    parser.add_argument("--sessions", type=int, default=6000, help="10-turn train sessions in the data pool")
    parser.add_argument("--noise", type=float, default=0.1, help="max pixel-noise std on the [-1, 1] scale")
    parser.add_argument("--cell-loss", type=float, default=0.5,
                        help="weight of the auxiliary loss: each cell token predicts its cell's colour, shape and "
                             "size (training only; teaches the image encoder fast; 0 = off)")
    parser.add_argument("--drop-intent", type=float, default=0.05, help="rate of earlier intents shown as <none>")
    parser.add_argument("--eval-every", type=int, default=1000, help="score on val every N steps (0 = never)")
    parser.add_argument("--eval-sessions", type=int, default=200, help="10-turn val sessions per evaluation")
    parser.add_argument("--vocab-sessions", type=int, default=2000, help="train sessions read for the vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--work", type=Path, default=Path("runs/intent"), help="resumable checkpoint + logs")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/mini/intent"), help="final weights + tokenizer")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(world_vocabulary(args.vocab_sessions))
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path, eval_path = args.work / "checkpoint.pt", args.work / "loss.jsonl", args.work / "eval.jsonl"
    state = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    model = MiniIntentModel(state["config"] if state else model_config(args.size, len(tokenizer))).train()
    cell_head = torch.nn.Linear(model.config["t5"]["d_model"], sum(len(c) for c in CELL_CLASSES.values()))
    optimizer = torch.optim.AdamW([*model.parameters(), *cell_head.parameters()], lr=args.lr,
                                  weight_decay=args.weight_decay)
    start = 0
    if state:
        start = restore(state, model=model, cell_head=cell_head, optimizer=optimizer)
    for path in (log_path, eval_path):
        truncate_log(path, "step", start)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")

    images, cells, texts, targets, _ = build_pool(args.sessions, model.config["resolution"])
    reconstructor = MiniReconstructor.from_model(model, tokenizer)
    val = [generate_session("val", i, TURNS) for i in range(args.eval_sessions)] if args.eval_every else []
    renders = [[render(scene, model.config["resolution"]) for scene in s.scenes[:TURNS]] for s in val]
    started = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="intent")
    for step in bar:
        lr = warmup_cosine(step, steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(targets), (args.batch_size,)).tolist()
        instructions = [texts[i][0] for i in idx]
        intents = [[None if random.random() < args.drop_intent else t for t in texts[i][1]] for i in idx]
        inputs = reconstructor.inputs(instructions, intents, augment(images[idx], args.noise))
        labels = tokenizer([targets[i] for i in idx], padding=True, return_tensors="pt")
        labels = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        model.train()
        intent_loss, image_tokens = model(**inputs, labels=labels)
        # auxiliary: each of the nine cell tokens names its cell's colour, shape and size
        logits = cell_head(image_tokens[:, :9]).split([len(c) for c in CELL_CLASSES.values()], -1)
        target = cells[idx].long()
        cell_loss = sum(torch.nn.functional.cross_entropy(part.flatten(0, 1), target[..., j].flatten())
                        for j, part in enumerate(logits)) / len(logits)
        loss = intent_loss + args.cell_loss * cell_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(intent=f"{intent_loss.item():.4f}", cells=f"{cell_loss.item():.3f}")
        with log_path.open("a") as log:
            log.write(json.dumps({"step": step + 1, "loss": intent_loss.item(), "cell_loss": cell_loss.item(), "lr": lr,
                                  "seconds": time.time() - started}) + "\n")
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            scores = evaluate(reconstructor, val, renders)
            with eval_path.open("a") as log:
                log.write(json.dumps({"step": step + 1, "seconds": time.time() - started, **scores}) + "\n")
            bar.write(f"step {step + 1}: val equivalent referential {scores['referential']['equivalent']:.3f} "
                      f"explicit {scores['explicit']['equivalent']:.3f} (failures {scores['failures']})")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_path, step + 1, model, cell_head, optimizer)

    model.eval().save_pretrained(args.out)
    tokenizer.save_pretrained(str(args.out))
    if eval_path.exists() and eval_path.read_text():
        shutil.copyfile(eval_path, args.out / "eval.jsonl")
    plot(log_path, eval_path, args.out / "training.png")
    print(f"saved the intent reconstructor to {args.out}")


if __name__ == "__main__":
    main()
