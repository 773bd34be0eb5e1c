"""A run's files: atomic checkpoints with exact resume, and the metrics plot."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mteditlab.editors.flow_policy import FlowPolicy
from training.distributed import full_tensor
from training.scoring import GOLD

if TYPE_CHECKING:
    from training.config import GRPOConfig


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
