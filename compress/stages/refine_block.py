"""Block refinement (block corrector `block-refine`): after a block's Linears are factorized (and refit / EoRA
applied), train that block's low-rank factors so the compressed block, fed the compressed model's hidden
states, reproduces what the dense block outputs on the dense model's hidden states.

    min over {A, B, lora_A, lora_B} of the block   E_b || block_c(h_c[b]) - block_d(h_d[b]) ||^2

Closed-form corrections (SVD-LLM's whitening, the refit, EoRA) are optimal one Linear at a time; the block's
non-linearities (attention softmax, SiLU gate) couple them, and the error the earlier compressed blocks put
into h_c is only partly undone Linear by Linear. Block-level output matching is AA-SVD's refinement step
(2025-2026: block-wise optimisation of the factors against the dense block's outputs on the shifted inputs),
here with Adam (AdamW with weight decay), a learning-rate warm-up then cosine decay, optional gradient
clipping, a bounded number of steps (or epochs over the training batches, capped) and a fixed seed. Memory
stays one block plus the calibration activations already held (inputs of both streams), one batch's autograd
graph and, with a hold-out, one copy of the best weights. Only the factors train (and, as an option, the
block's norms; biases and embeddings stay fixed). A seeded part of the stored calibration batches can be held
out: they are never trained on, they stop the training when their error stops falling (patience), and they
judge it: the weights kept are the best seen on them, and only if they beat the closed form there. Without a
hold-out the whole calibration set trains and judges. Either way refinement never makes a block worse on the
batches that judge it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from rankwise.calib.capture import call_block
from rankwise.compress.lowrank import LowRankLinear
from rankwise.compress.stages.base import BlockCorrector, StageOptions, StageRecord, register_block_corrector
from rankwise.compress.training import (HALF, copy_weights, finite_or_none, holdout_split, norm_parameters,
                                        restore_weights, warmup_cosine)


@dataclass(frozen=True)
class RefineSettings:
    steps: int = 32         # optimizer steps per block (with `epochs`: the most), one stored batch each
    lr: float = 1e-3        # peak learning rate; warm-up, then cosine decay to 0 over the steps
    seed: int = 0           # order of the batches and the held-out split
    epochs: int | None = None         # passes over the training batches (None: exactly `steps` steps)
    warmup: float = 0.0               # fraction of the steps with a linear warm-up
    clip: float | None = None         # largest gradient norm (None: no clipping)
    weight_decay: float = 0.0         # AdamW's decoupled weight decay on the factors (0: Adam)
    norms: bool = False               # train the block's norm weights too
    holdout: float = 0.0              # fraction of the stored batches held out (0: judge on the training ones)
    patience: int | None = None       # held-out evaluations without improvement before stopping
    eval_every: int | None = None     # steps between held-out evaluations (None: one per epoch)


@dataclass(frozen=True)
class RefineResult:
    """Mean squared block-output error on the training batches (the whole calibration set without a hold-out)
    before and after, and on the held-out batches (None without one); whether the refined weights were kept,
    the optimizer steps taken and the dtype the weights were trained in."""
    mse_before: float
    mse_after: float
    kept: bool
    steps: int
    seconds: float
    train_dtype: str = "float32"
    heldout_before: float | None = None
    heldout_after: float | None = None
    train_windows: int = 0
    heldout_windows: int = 0


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


@dataclass
class _Batches:
    """Stored batches of one stream: block inputs, dense targets and the block's keyword arguments."""
    inputs: list
    targets: list
    kwargs: list

    def pick(self, indices: list[int]) -> "_Batches":
        return _Batches([self.inputs[i] for i in indices], [self.targets[i] for i in indices],
                        [self.kwargs[i] for i in indices])

    def mse(self, block, device) -> float | None:
        return block_mse(block, self.inputs, self.targets, self.kwargs, device) if self.inputs else None

    def windows(self) -> int:
        return sum(int(t.shape[0]) for t in self.targets)


def refine_block(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
                 device, settings: RefineSettings = RefineSettings()) -> RefineResult:
    """Train the block's low-rank factors in place (see the module docstring). inputs[b]: batch b of the
    compressed stream entering the block; targets[b]: the dense block's outputs on the dense stream's batch b;
    kwargs[b]: the block's keyword arguments for batch b (mask, rotary tables).
    With a hold-out, the held-out batches stop the training (patience) and judge it: the weights kept are the
    best seen on them, and only if they beat the closed form there; without one, the training batches judge.
    A half-precision block trains in float32 and is cast back after: Adam's eps (1e-8) and its squared
    gradients underflow in float16 (every step NaN), and bfloat16 cannot hold the small updates of
    late cosine steps."""
    t0 = time.perf_counter()
    params = factor_parameters(block) + (norm_parameters(block) if settings.norms else [])
    dtype = params[0].dtype if params else torch.float32
    train = torch.float32 if dtype in HALF else dtype
    saved = copy_weights(params)
    block.to(train)
    every = _Batches([_Cast(h, train) for h in inputs], targets, [_as_dtype(kw, train) for kw in kwargs])
    fit, held = (every.pick(i) for i in holdout_split(len(inputs), settings.holdout, settings.seed))
    steps, best = 0, None
    try:
        before, held_before = fit.mse(block, device), held.mse(block, device)
        if params and fit.inputs:
            steps, best = _train(block, params, fit, held, device, settings, held_before)
        if best is not None:  # the best weights seen on the held-out batches, not the last ones
            restore_weights(params, best)
        after, held_after = (fit.mse(block, device), held.mse(block, device)) if steps else (before, held_before)
    finally:
        block.to(dtype)
    judged_before, judged_after = (held_before, held_after) if held.inputs else (before, after)
    kept = bool(steps) and math.isfinite(judged_after) and judged_after < judged_before
    if not kept:  # never worse than the closed form on the judging batches
        restore_weights(params, saved)
    return RefineResult(before, after, kept, steps, time.perf_counter() - t0, str(train).removeprefix("torch."),
                        held_before, held_after, fit.windows(), held.windows())


class _Cast:
    """A stored batch read in the training dtype (cast when used: the stored stream keeps its own dtype)."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype):
        self.tensor, self.dtype = tensor, dtype

    def to(self, device):
        return self.tensor.to(device=device, dtype=self.dtype)


def _optimizer(params: list[nn.Parameter], factors: int, settings: RefineSettings):
    """Adam (AdamW when weight decay is asked: decoupled, on the factors only, never on the norms)."""
    if not settings.weight_decay:
        return torch.optim.Adam(params, lr=settings.lr)
    return torch.optim.AdamW([{"params": params[:factors], "weight_decay": settings.weight_decay},
                              {"params": params[factors:], "weight_decay": 0.0}], lr=settings.lr)


def _train(block: nn.Module, params: list[nn.Parameter], fit: _Batches, held: _Batches, device,
           settings: RefineSettings, held_before: float | None) -> tuple[int, list[torch.Tensor] | None]:
    """The optimizer over the training batches (cycled in a seeded order), with the schedule, clipping and,
    with held-out batches, evaluations every `eval_every` steps that keep the best weights and stop after
    `patience` evaluations without improvement. Returns (steps taken, best weights on the held-out batches or
    None when none beat the starting point)."""
    total = min(settings.steps, settings.epochs * len(fit.inputs)) if settings.epochs else settings.steps
    every = settings.eval_every or len(fit.inputs)
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = _optimizer(params, len(factor_parameters(block)), settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, settings.warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    best, best_error, stale, step = None, held_before, 0, 0
    try:
        while step < total:
            if not order:
                order = torch.randperm(len(fit.inputs), generator=generator).tolist()
            b = order.pop()
            with torch.enable_grad():
                out = call_block(block, fit.inputs[b], fit.kwargs[b], device)
                loss = (out.float() - fit.targets[b].to(device).float()).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if settings.clip:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            optimizer.step()
            schedule.step()
            step += 1
            if held.inputs and (step % every == 0 or step == total):
                error = held.mse(block, device)
                if math.isfinite(error) and (best_error is None or error < best_error):
                    best, best_error, stale = copy_weights(params), error, 0
                else:
                    stale += 1
                if settings.patience and stale >= settings.patience:
                    break
    finally:
        for p, was in frozen:
            p.requires_grad_(was)
        for p in params:
            p.grad = None  # gradients left on the factors would stay with every finished block
        del optimizer
    return step, best


# ---------------------------------------------------------------- the stage

class RefineOptions(StageOptions):
    """The defaults are a fixed number of Adam steps judged on the training batches; `holdout` with `patience`
    (and `epochs`, `warmup`, `clip`, `weight_decay`, `norms`) make it train until the held-out batches stop
    improving and keep only what helps on them."""
    steps: int = Field(32, ge=1, description="optimizer steps per block, one calibration batch each (with epochs: "
                       "the most)")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="peak learning rate (warm-up, then cosine decay)")
    seed: int = Field(0, description="order of the calibration batches and the held-out split")
    epochs: int | None = Field(None, ge=1, description="passes over the training batches, at most `steps` steps "
                               "(None: exactly `steps` steps)")
    warmup: float = Field(0.0, ge=0, lt=1, description="fraction of the steps with a linear learning-rate warm-up")
    clip: float | None = Field(None, gt=0, allow_inf_nan=False, description="largest gradient norm (None: no "
                               "clipping)")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW's decoupled weight decay on "
                                "the factors (0: Adam)")
    norms: bool = Field(False, description="train the block's norm weights too")
    holdout: float = Field(0.0, ge=0, lt=1, description="fraction of the calibration batches held out (a seeded "
                           "split) to stop the training and to judge it (0: the training batches judge)")
    patience: int | None = Field(None, ge=1, description="held-out evaluations without improvement before "
                                 "stopping (None: train all the steps)")
    eval_every: int | None = Field(None, ge=1, description="steps between held-out evaluations (None: one epoch)")

    @model_validator(mode="after")
    def _patience_needs_holdout(self):
        if self.patience is not None and self.holdout == 0:
            raise ValueError("patience needs held-out batches: give holdout above 0")
        return self

    def settings(self) -> RefineSettings:
        return RefineSettings(**self.model_dump())


class BlockRefinement(BaseModel):
    """One block's output error (mean squared) on the training batches (the whole calibration set without a
    hold-out) and on the held-out batches, before and after refinement (None: not a finite number, or no
    hold-out); kept: whether the refined weights were kept (only when they lowered the error on the judging
    batches: the held-out ones when there are); steps: optimizer steps taken."""
    mse_before: float | None
    mse_after: float | None
    kept: bool
    heldout_before: float | None = None
    heldout_after: float | None = None
    steps: int | None = None


class Refinement(StageRecord):
    """What refinement did to each block (prefix -> BlockRefinement), the precision it trained in and how many
    calibration windows trained and were held out."""
    train_dtype: str = ""
    train_windows: int = 0
    heldout_windows: int = 0
    blocks: dict[str, BlockRefinement] = Field(default_factory=dict)

    def warning(self) -> str | None:
        if self.blocks and not any(b.kept for b in self.blocks.values()):
            return (f"block-refine was reverted on every block ({len(self.blocks)}): it never lowered a block's "
                    f"output error (try a smaller lr, or --dtype fp32)")
        return None


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
        result = refine_block(work.block, work.inputs.hidden, targets, kwargs, work.device, self.options.settings())
        record = self.record
        record.train_dtype, record.train_windows = result.train_dtype, result.train_windows
        record.heldout_windows = result.heldout_windows
        record.blocks[work.prefix] = BlockRefinement(
            mse_before=finite_or_none(result.mse_before), mse_after=finite_or_none(result.mse_after), kept=result.kept,
            heldout_before=finite_or_none(result.heldout_before), heldout_after=finite_or_none(result.heldout_after),
            steps=result.steps)
