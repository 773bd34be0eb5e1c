"""Latency of one side-by-side arena turn on the mini editor (base and LoRA sides, default steps).

    python -m bench.edit_latency [--repeats 30] [--batch 8] [--json out/bench/edit_latency.json]

Prints a markdown table of medians (and p90) and where the time goes: text encoding (cached after
the first call of a string), the UNet forwards, decoding, and the verifier's parse used by the arena.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from mteditlab.editors.mini import DEFAULT_CHECKPOINT, MiniEditor
from mteditlab.world import generate_session, parse_image, render

ADAPTER = DEFAULT_CHECKPOINT.parent / "grpo"


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="also time one LoRA edit_batch of this many images")
    parser.add_argument("--json", type=Path, default=Path("out/bench/edit_latency.json"))
    args = parser.parse_args()

    base = MiniEditor.from_pretrained()
    tuned = MiniEditor(UNet2DConditionModel.from_pretrained(DEFAULT_CHECKPOINT).eval(), base.text_encoder)
    if (ADAPTER / "pytorch_lora_weights.safetensors").exists():
        tuned.load_lora(ADAPTER)
        adapter = str(ADAPTER)
    else:  # same compute as a trained adapter
        tuned.add_lora(16, 32)
        adapter = "random rank-16 adapter (none shipped yet)"
    tuned.fuse_lora()  # as the app and the benchmark load it (get_editor(..., lora=DIR))
    session = generate_session("test", 0)
    image, text = render(session.source), session.turns[0].intent
    steps = base.default_steps
    base.edit(image, text), tuned.edit(image, text)  # warm up (and cache the text states)

    cond = base.encode([image], [text])
    x = base.initial_noise(cond, [0])
    sigma = torch.tensor([0.5])
    rows = {
        "arena turn (base + LoRA)": timed(lambda: (base.edit(image, text), tuned.edit(image, text)), args.repeats),
        "base edit": timed(lambda: base.edit(image, text), args.repeats),
        "LoRA edit": timed(lambda: tuned.edit(image, text), args.repeats),
        f"LoRA edit, batch {args.batch}": timed(lambda: tuned.edit_batch([image] * args.batch, [text] * args.batch),
                                                args.repeats),
        "encode (cached text)": timed(lambda: base.encode([image], [text]), args.repeats),
        "one UNet forward": timed(lambda: torch.no_grad()(base.velocity)(x, sigma, cond), args.repeats),
        "decode": timed(lambda: base.decode(x), args.repeats),
        "verifier parse": timed(lambda: parse_image(image), args.repeats),
    }
    summary = {name: {"median_s": statistics.median(v), "p90_s": sorted(v)[int(0.9 * (len(v) - 1))]}
               for name, v in rows.items()}
    print(f"\nmini editor, {steps} steps, batch 1, torch threads {torch.get_num_threads()}, adapter: {adapter}\n")
    print("| what | median ms | p90 ms |\n|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {1000 * s['median_s']:.1f} | {1000 * s['p90_s']:.1f} |")
    forward_share = steps * 2 * summary["one UNet forward"]["median_s"] / summary["arena turn (base + LoRA)"]["median_s"]
    print(f"\n{2 * steps} UNet forwards (timed alone) ≈ {1000 * 2 * steps * summary['one UNet forward']['median_s']:.0f} ms "
          f"of the {1000 * summary['arena turn (base + LoRA)']['median_s']:.0f} ms arena turn: the denoiser is the cost.")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "steps": steps,
                                     "threads": torch.get_num_threads(), "adapter": adapter, "repeats": args.repeats, "batch": args.batch,
                                     "results": summary, "unet_share_of_turn": forward_share}, indent=2))


if __name__ == "__main__":
    main()
