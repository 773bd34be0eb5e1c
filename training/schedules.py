"""Learning-rate schedules of the plain supervised loops (pretraining, the intent reconstructor)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, times a cosine from ``lr`` down to ``min_lr`` over ``steps``:
    lr_t = min(1, (t + 1)/warmup) · (min_lr + ½(lr − min_lr)(1 + cos(π · min(1, t/steps))))."""
    warm = min(1.0, (step + 1) / warmup)
    progress = min(1.0, step / max(1, steps))
    return warm * (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress)))
