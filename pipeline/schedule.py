"""The learning-rate schedule every Kiln training loop uses (train, distill, prune's recovery).

Linear warmup from lr/warmup to `lr` over `warmup` steps, then cosine decay to `min_lr` at `steps`
(held there after). Pure: the step alone decides the rate, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
