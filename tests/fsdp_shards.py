"""One process of the FSDP2 test (``python -m torch.distributed.run --nproc_per_node 2 -m tests.fsdp_shards OUT DATA``).

Shards a tiny random-weight Kontext transformer with LoRA over the processes (``fully_shard`` per
transformer block and at the root, gloo on CPUs: what accelerate's FSDP2 plugin does on GPUs) and runs
the trainer's own pieces on the shards: rollouts of each process's own data sessions, two NFT
updates with the EMA old policy, a checkpoint, a resume into a fresh adapter, and the adapter's
export. Rank 0 writes ``OUT/result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from mteditlab.editors.kontext import KontextEditor
from tests.tiny_pipelines import tiny_kontext
from training.config import GRPOConfig
from training.distributed import full_tensor, gathered_lora
from training.objectives.base import encode_subset
from training.objectives.nft import NFT
from training.operations import load_state, save_state
from training.sampling import DataSessions, sample_turns


def sharded_editor(mesh) -> KontextEditor:
    """Tiny Kontext with the trained ``default`` and the EMA ``old`` adapters, its transformer sharded."""
    torch.manual_seed(0)
    editor = KontextEditor(tiny_kontext(), max_sequence_length=16)
    editor.denoiser.requires_grad_(False)
    editor.add_lora(2, 4)
    editor.add_old_copy()
    for p in editor.trainable_parameters():
        p.requires_grad_(True)
    model = editor.denoiser
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return editor


def trained(editor) -> list[torch.nn.Parameter]:
    return editor.trainable_parameters()


def checksum(editor) -> float:
    return float(sum(full_tensor(p).detach().double().sum() for n, p in editor.denoiser.named_parameters() if "lora_" in n))


def main(out: Path, data: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    cfg = GRPOConfig(editor="kontext", algo="nft", sessions_from=str(data), resolution="32", reward_weights={"qwen-vl": 1.0},
                     sessions_per_step=1, num_generations=2, turns=2, steps=3, sde_window=1, learning_rate=1e-2)
    editor = sharded_editor(mesh)
    optimizer = torch.optim.AdamW(trained(editor), lr=cfg.learning_rate)
    source, sizes = DataSessions(cfg), []
    for iteration in range(2):
        sessions = source.draw(iteration, world)[rank::world]
        sizes.append(sessions[0].source.size)
        records = sample_turns(editor, sessions, [source.image(s) for s in sessions], cfg, iteration)
        generator = torch.Generator().manual_seed(iteration)
        idx = torch.arange(cfg.num_generations)
        optimizer.zero_grad(set_to_none=True)
        for k, rec in enumerate(records):   # advantages +1 / −1: the second rollout is the better one
            loss, _ = NFT(cfg).loss(editor, rec, encode_subset(editor, rec, idx), idx, torch.tensor([-1.0, 1.0]), None, generator)
            (loss / cfg.turns).backward()
        optimizer.step()
        editor.polyak_update(0.5)
    trained_sum = checksum(editor)
    save_state(out, editor, optimizer, 2, cfg, [], write=rank == 0, with_optimizer=False)
    dist.barrier()
    fresh = sharded_editor(mesh)
    resumed_at = load_state(out, fresh, torch.optim.AdamW(trained(fresh)), [])
    state = gathered_lora(fresh, "default")
    if rank == 0:
        fresh.save_lora(out / "adapter", state=state)
    sums = [None] * world
    dist.all_gather_object(sums, (trained_sum, checksum(fresh), [tuple(p.to_local().shape) for p in trained(editor)[:1]]))
    full_shape = list(full_tensor(trained(editor)[0]).shape)   # a collective: every process
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "trained": [s[0] for s in sums], "resumed": [s[1] for s in sums], "local_shapes": [s[2] for s in sums],
            "full_shape": full_shape, "resumed_at": resumed_at, "sizes": sizes}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
