"""What the training stages share (block-refine, kl-refine): the learning-rate schedule, keeping and restoring
weights, the held-out split, the norm weights they may train, and the finite numbers their records hold."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

# Trained in float32 and cast back: Adam's eps (1e-8) and its squared gradients underflow in float16, and
# bfloat16 cannot hold the small updates of late cosine steps.
HALF = (torch.float16, torch.bfloat16)


def warmup_cosine(total: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over `warmup` of the steps, then cosine decay to 0 (SGDR,
    Loshchilov & Hutter 2017, without restarts)."""
    warm = int(warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    return factor


def norm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """A module's normalisation weights (RMSNorm / LayerNorm: a module whose class name says norm)."""
    return [p for m in module.modules() if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()
            for p in m.parameters(recurse=False)]


@torch.no_grad()
def copy_weights(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore_weights(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def holdout_split(count: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of `count` calibration batches or windows: a seeded draw of
    round(holdout * count) (at least one when holdout > 0, never all of them); no hold-out when holdout is 0 or
    there is a single one."""
    held = min(max(1, round(holdout * count)), count - 1) if holdout > 0 else 0
    if held <= 0:
        return list(range(count)), []
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def finite_or_none(x: float | None) -> float | None:
    """x, or None when it is missing or not a finite number (a record is JSON, which has no NaN)."""
    return x if x is not None and math.isfinite(x) else None
