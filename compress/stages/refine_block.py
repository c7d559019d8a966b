"""Block refinement (block corrector `block-refine`): after a block's Linears are factorized (and refit / EoRA
applied), train that block's low-rank factors so the compressed block, fed the compressed model's hidden
states, reproduces what the dense block outputs on the dense model's hidden states.

    min over {A, B, lora_A, lora_B} of the block   E_b || block_c(h_c[b]) - block_d(h_d[b]) ||^2

Closed-form corrections (SVD-LLM's whitening, the refit, EoRA) are optimal one Linear at a time; the block's
non-linearities (attention softmax, SiLU gate) couple them, and the error the earlier compressed blocks put
into h_c is only partly undone Linear by Linear. Block-level output matching is AA-SVD's refinement step
(2025-2026: block-wise optimisation of the factors against the dense block's outputs on the shifted inputs),
here with Adam, a cosine learning-rate schedule, a bounded number of steps and a fixed seed. Memory stays one
block plus the calibration activations already held (inputs of both streams) and one batch's autograd graph.
Only the factors train (norms, biases and embeddings stay fixed); the result is kept only if it lowers the
block's output error on the whole calibration set, so refinement never makes a block worse on it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field
from torch import nn

from rankwise.calib.capture import call_block
from rankwise.compress.lowrank import LowRankLinear
from rankwise.compress.stages.base import BlockCorrector, StageOptions, StageRecord, register_block_corrector


@dataclass(frozen=True)
class RefineSettings:
    steps: int = 32         # optimizer steps per block, one stored calibration batch each (cycled, shuffled)
    lr: float = 1e-4        # Adam's peak learning rate; cosine decay to 0 over the steps
    seed: int = 0           # order of the batches


@dataclass(frozen=True)
class RefineResult:
    """Mean squared block-output error on the calibration set before and after, whether it was kept, and the
    dtype the factors were trained in."""
    mse_before: float
    mse_after: float
    kept: bool
    steps: int
    seconds: float
    train_dtype: str = "float32"


HALF = (torch.float16, torch.bfloat16)


def _as_dtype(value, dtype: torch.dtype):
    """Floating tensors in `value` (a tensor, or tuples / lists / dicts of them: rotary tables) cast to dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_as_dtype(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _as_dtype(v, dtype) for k, v in value.items()}
    return value


def factor_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The weights refinement trains: every LowRankLinear's A and B (and its residual path), not biases."""
    params = []
    for module in block.modules():
        if isinstance(module, LowRankLinear):
            params += [module.A.weight, module.B.weight]
            if module.lora_rank:
                params += [module.lora_A.weight, module.lora_B.weight]
    return params


@torch.no_grad()
def block_mse(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
              device) -> float:
    """Mean squared error of the block's outputs against the targets, over every element of every batch."""
    total, count = 0.0, 0
    for h, t, kw in zip(inputs, targets, kwargs):
        out = call_block(block, h, kw, device)
        total += float((out.float() - t.to(device).float()).pow(2).sum())
        count += t.numel()
    return total / max(count, 1)


def refine_block(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
                 device, settings: RefineSettings = RefineSettings()) -> RefineResult:
    """Train the block's low-rank factors in place (see the module docstring). inputs[b]: batch b of the
    compressed stream entering the block; targets[b]: the dense block's outputs on the dense stream's batch b;
    kwargs[b]: the block's keyword arguments for batch b (mask, rotary tables).
    A half-precision block trains in float32 and is cast back after: Adam's eps (1e-8) and its squared
    gradients underflow in float16 (every step NaN), and bfloat16 cannot hold updates of lr 1e-4."""
    t0 = time.perf_counter()
    params = factor_parameters(block)
    dtype = params[0].dtype if params else torch.float32
    train = torch.float32 if dtype in HALF else dtype
    saved = [p.detach().clone() for p in params]
    block.to(train)
    inputs = [_Cast(h, train) for h in inputs]
    kwargs = [_as_dtype(kw, train) for kw in kwargs]
    try:
        before = block_mse(block, inputs, targets, kwargs, device)
        if not params or settings.steps < 1 or not inputs:
            return RefineResult(before, before, False, 0, time.perf_counter() - t0, str(train).removeprefix("torch."))
        _train(block, params, inputs, targets, kwargs, device, settings)
        after = block_mse(block, inputs, targets, kwargs, device)
    finally:
        block.to(dtype)
    kept = math.isfinite(after) and after < before
    if not kept:  # never worse than the closed form on the calibration set
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return RefineResult(before, after, kept, settings.steps, time.perf_counter() - t0,
                        str(train).removeprefix("torch."))


class _Cast:
    """A stored batch read in the training dtype (cast when used: the stored stream keeps its own dtype)."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype):
        self.tensor, self.dtype = tensor, dtype

    def to(self, device):
        return self.tensor.to(device=device, dtype=self.dtype)


def _train(block: nn.Module, params: list[nn.Parameter], inputs, targets, kwargs, device,
           settings: RefineSettings) -> None:
    """Adam on the factors with a cosine schedule, one stored batch per step (cycled in a seeded order)."""
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / settings.steps)))
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    try:
        with torch.enable_grad():
            for _ in range(settings.steps):
                if not order:
                    order = torch.randperm(len(inputs), generator=generator).tolist()
                b = order.pop()
                out = call_block(block, inputs[b], kwargs[b], device)
                loss = (out.float() - targets[b].to(device).float()).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for p, was in frozen:
            p.requires_grad_(was)
        for p in params:
            p.grad = None  # gradients left on the factors would stay with every finished block
        del optimizer


# ---------------------------------------------------------------- the stage

class RefineOptions(StageOptions):
    steps: int = Field(32, ge=1, description="optimizer steps per block (one calibration batch each)")
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="Adam's peak learning rate (cosine decay)")
    seed: int = Field(0, description="order of the calibration batches")


class BlockRefinement(BaseModel):
    """One block's output error (mean squared, calibration set) before and after refinement (None: not a finite
    number); kept: whether the refined factors were kept (only when they lowered it)."""
    mse_before: float | None
    mse_after: float | None
    kept: bool


class Refinement(StageRecord):
    """What refinement did to each block (prefix -> BlockRefinement) and the precision it trained in."""
    train_dtype: str = ""
    blocks: dict[str, BlockRefinement] = Field(default_factory=dict)

    def warning(self) -> str | None:
        if self.blocks and not any(b.kept for b in self.blocks.values()):
            return (f"block-refine was reverted on every block ({len(self.blocks)}): it never lowered a block's "
                    f"output error (try a smaller lr, or --dtype fp32)")
        return None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@register_block_corrector("block-refine")
class BlockRefine(BlockCorrector):
    Options = RefineOptions
    Record = Refinement
    dense_stream = True

    def correct_block(self, work):
        kwargs = work.inputs.kwargs[work.index]
        with torch.no_grad():  # the dense block's outputs on the dense stream: the targets
            targets = [call_block(work.dense_block, h, kw, work.device).to(work.inputs.storage)
                       for h, kw in zip(work.dense_inputs.hidden, kwargs)]
        o = self.options
        result = refine_block(work.block, work.inputs.hidden, targets, kwargs, work.device,
                              RefineSettings(o.steps, o.lr, o.seed))
        self.record.train_dtype = result.train_dtype
        self.record.blocks[work.prefix] = BlockRefinement(mse_before=_finite(result.mse_before),
                                                          mse_after=_finite(result.mse_after), kept=result.kept)
