"""Cost of multi-turn RL at real size on one GPU: random-weight FLUX.1-Kontext-dev and Qwen-Image-Edit
transformers (the published ``transformer/config.json`` values, written below) with a LoRA adapter.

    python -m bench.gpu_real_size [--backends kontext qwen-edit] [--resolution 1024] [--batch 2] \\
        [--steps 10] [--lora-rank 64] [--no-gradient-checkpointing] [--json out/bench/gpu_real_size.json]
    python -m bench.gpu_real_size --tiny      # the tests' tiny configs on the CPU: checks the script only

Random weights cost the same compute as real ones; nothing is downloaded. Per backend, in bf16 with
fp32 LoRA weights (rank ``--lora-rank`` on the editors' LoRA targets, plus the second ``old``
adapter NFT keeps):

* **rollout turn**: ``--steps`` transformer calls without gradients on a batch of ``--batch`` rollouts
  (target and context-image tokens at ``--resolution``², the text at the pipelines' length);
* **GRPO term**: one SDE step of the update: the policy's call with gradients, the reference's call
  (adapter disabled) and the backward pass; **NFT term**: the policy's call, the old (EMA) adapter's
  call and the backward pass. An update is ``turns × sde_window`` GRPO terms or ``turns`` NFT terms
  (the trainer's defaults: 3 × 2 and 3);

each as median seconds over ``--repeats`` timed runs after a warm-up, peak GPU memory, FLOPs counted
by ``torch.utils.flop_counter`` on one run and MFU = FLOPs / seconds / the GPU's dense bf16 peak
(``--peak-tflops``, else looked up by device name). The VAE and text encoders are left out: the
transformer's calls dominate a turn. Prints a markdown table and writes JSON. Without a CUDA device
(and without ``--tiny``) it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


# transformer/config.json of black-forest-labs/FLUX.1-Kontext-dev
KONTEXT_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                      guidance_embeds=True, axes_dims_rope=[16, 56, 56])
# transformer/config.json of Qwen/Qwen-Image-Edit-2509 (the same as Qwen/Qwen-Image-Edit's)
QWEN_EDIT_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                        axes_dims_rope=[16, 56, 56])
TEXT_TOKENS = {"kontext": 512,     # FluxKontextPipeline's max_sequence_length (T5)
               "qwen-edit": 256}   # Qwen2.5-VL states of a 384² condition image (~190 tokens) and the prompt
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.1, "L40": 181.0, "A6000": 154.8}   # dense, no sparsity


def build(backend: str, tiny: bool, device: torch.device, lora_rank: int) -> torch.nn.Module:
    """The backend's transformer with random weights in bf16 (fp32 on the CPU) and two fp32 LoRA
    adapters, ``default`` (trained) and ``old`` (NFT's EMA policy)."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
    from peft import LoraConfig

    from mteditlab.editors.kontext import KontextEditor
    from mteditlab.editors.qwen_edit import QwenEditEditor

    if tiny:
        from tests.tiny_pipelines import FLUX_TRANSFORMER, QWEN_TRANSFORMER
        configs = {"kontext": FLUX_TRANSFORMER, "qwen-edit": QWEN_TRANSFORMER}
    else:
        configs = {"kontext": KONTEXT_CONFIG, "qwen-edit": QWEN_EDIT_CONFIG}
    cls, editor = {"kontext": (FluxTransformer2DModel, KontextEditor),
                   "qwen-edit": (QwenImageTransformer2DModel, QwenEditEditor)}[backend]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build in bf16 on the device: no fp32 copy of 12–20B weights
    try:
        with device:
            model = cls(**configs[backend])
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    for name in ("default", "old"):
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, init_lora_weights="gaussian",
                                     target_modules=list(editor.lora_target_modules)), adapter_name=name)
    model.set_adapter("default")
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(".default." in name)
    return model


def inputs(backend: str, model: torch.nn.Module, batch: int, resolution: int, text_tokens: int) -> dict:
    """Transformer inputs of a batch: noisy target tokens followed by the context image's tokens,
    text states, positions (and the pooled text and guidance for Kontext)."""
    config, device = model.config, model.device
    dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
    side = resolution // 16                              # tokens per side: VAE ×8, then 2×2 patches
    tokens = side * side
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    common = dict(hidden_states=randn(batch, 2 * tokens, config.in_channels),
                  encoder_hidden_states=randn(batch, text_tokens, config.joint_attention_dim),
                  timestep=torch.full((batch,), 0.5, device=device, dtype=dtype), return_dict=False)
    if backend == "qwen-edit":
        return dict(common, img_shapes=[[(1, side, side), (1, side, side)]] * batch)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    target = torch.stack([torch.zeros_like(rows), rows, cols], -1).view(-1, 3).to(device, dtype)
    context = target.clone()
    context[:, 0] = 1
    return dict(common, pooled_projections=randn(batch, config.pooled_projection_dim),
                img_ids=torch.cat([target, context]), txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
                guidance=torch.full((batch,), 3.5, device=device, dtype=torch.float32) if config.guidance_embeds else None)


def velocity(model, kwargs: dict) -> torch.Tensor:
    """The target tokens' velocity (the context tokens' outputs are sliced off, as the editors do)."""
    out = model(**kwargs)[0]
    return out[:, : kwargs["hidden_states"].shape[1] // 2]


def rollout_turn(model, kwargs: dict, steps: int) -> None:
    with torch.no_grad():
        for _ in range(steps):
            velocity(model, kwargs)


def grpo_term(model, kwargs: dict) -> None:
    """Policy call with gradients, the reference's (adapter disabled), the backward pass."""
    v = velocity(model, kwargs)
    with torch.no_grad():
        model.disable_adapters()
        v_ref = velocity(model, kwargs)
        model.enable_adapters()
    ((v.float() - v_ref.float()) ** 2).mean().backward()


def nft_term(model, kwargs: dict) -> None:
    """Policy call with gradients, the old adapter's call, the backward pass."""
    v = velocity(model, kwargs)
    with torch.no_grad():
        model.set_adapter("old")
        v_old = velocity(model, kwargs)
        model.set_adapter("default")
        for name, p in model.named_parameters():   # set_adapter flips requires_grad: the trained one again
            if "lora_" in name:
                p.requires_grad_(".default." in name)
    ((2 * v.float() - v_old.float()) ** 2).mean().backward()


def measure(fn, device: torch.device, repeats: int) -> dict:
    """Median seconds over ``repeats`` runs after a warm-up, peak memory, FLOPs of one run."""
    from torch.utils.flop_counter import FlopCounterMode

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return {"seconds": statistics.median(times), "peak_memory_gib": peak, "tflop": counter.get_total_flops() / 1e12}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench_backend(backend: str, args, device: torch.device) -> list[dict]:
    model = build(backend, args.tiny, device, args.lora_rank)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    kwargs = inputs(backend, model, args.batch, args.resolution, args.text_tokens or TEXT_TOKENS[backend])
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".default." in n)
    phases = {"rollout turn": lambda: rollout_turn(model, kwargs, args.steps),
              "GRPO term": lambda: grpo_term(model, kwargs), "NFT term": lambda: nft_term(model, kwargs)}
    rows = []
    for phase, fn in phases.items():
        model.zero_grad(set_to_none=True)
        try:
            row = measure(fn, device, args.repeats)
        except torch.OutOfMemoryError:
            row = {"seconds": None, "peak_memory_gib": None, "tflop": None, "error": "out of memory"}
            torch.cuda.empty_cache()
        rows.append({"backend": backend, "phase": phase, "params_b": params / 1e9, "lora_m": lora / 1e6, **row})
    updates = {"GRPO update": ("GRPO term", args.turns * args.sde_window), "NFT update": ("NFT term", args.turns)}
    for name, (term, count) in updates.items():
        base = next(r for r in rows if r["phase"] == term)
        if base["seconds"] is not None:
            rows.append({**base, "phase": f"{name} ({count} terms)", "seconds": base["seconds"] * count,
                         "tflop": base["tflop"] * count})
    model = None   # the phases' closures hold it: drop the weights before the next backend loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["kontext", "qwen-edit"], choices=["kontext", "qwen-edit"])
    parser.add_argument("--resolution", type=int, default=1024, help="side of the square target and context images")
    parser.add_argument("--batch", type=int, default=2, help="rollouts per transformer call")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per rollout turn (the trainer's default)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--sde-window", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=None, help="default: the pipeline's (512 Kontext, 256 Qwen)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny configs, CPU allowed: checks the script")
    parser.add_argument("--json", type=Path, default=Path("out/bench/gpu_real_size.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("gpu_real_size.py needs a CUDA device: none is visible (torch.cuda.is_available() is False). "
                 "Run it on a GPU machine, or with --tiny to check the script on the CPU.")
    if args.tiny:
        args.resolution, args.text_tokens, args.lora_rank, args.steps = 64, args.text_tokens or 16, 4, min(args.steps, 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_tflops(device, args.peak_tflops)
    rows = [r for backend in args.backends for r in bench_backend(backend, args, device)]
    for r in rows:
        r["mfu"] = r["tflop"] / r["seconds"] / peak if peak and r.get("seconds") else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{gpu}: {args.resolution}² target + context tokens, batch {args.batch}, {args.steps} steps per turn, "
          f"LoRA r{args.lora_rank}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}\n")
    print("| backend | phase | seconds | peak GiB | TFLOP | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        print(f"| {r['backend']} ({r['params_b']:.1f}B, LoRA {r['lora_m']:.0f}M) | {r['phase']} | "
              f"{r.get('error') or fmt(r['seconds'], '.3f')} | {fmt(r['peak_memory_gib'], '.1f')} | "
              f"{fmt(r['tflop'], '.2f')} | {fmt(r['mfu'], '.1%')} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": gpu, "peak_bf16_tflops": peak, "config": vars(args) | {"json": str(args.json)},
                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
