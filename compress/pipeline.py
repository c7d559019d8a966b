"""The compression schedule (llm-compressor style; memory = one block + activations).

It runs a recipe of stages (compress/stages: docs/stages.md) and names none of them:

    whole-model passes the stages name  ──►  the allocator fixes every rank
    the block walk (calib.runner.BlockRunner), for each block:
        for each group of Linears sharing an input (q/k/v, o, gate/up, down), in forward order, with the
        statistics the stages declared: per Linear, correctors before, the factorizer, correctors after;
        the low-rank layer swapped in
        block correctors; the walk propagates the compressed outputs (and the dense twin's) to the next block
    model correctors, once on the whole compressed model (they saw the dense model before the walk)

With a `block_source` (--stream-weights, compress.streaming) the blocks start on `meta` and the walk reads
each one from the checkpoint just before it is used. Every stage that runs is timed (StageTimer; the totals
are the result's `stage_seconds`).
"""
from __future__ import annotations

import torch
from torch import nn

from rankwise.calib.runner import BlockSource, BlockStep, Progress, StageTimer
from rankwise.compress.numerics import MatrixShape
from rankwise.compress.arch import (block_runner, check_finite_weights, dense_weight, find_decoder_blocks,
                                   find_linears, layer_shape, named_target_linears)
from rankwise.compress.config import CompressConfig
from rankwise.compress.loading import kept_random_state, resolve_device
from rankwise.compress.lowrank import get_submodule_parent
from rankwise.compress.metadata import CompressionResult, ModuleSpec
from rankwise.compress.stages.base import BlockWork, CompressionJob, LinearStatistics, LinearWork
from rankwise.compress.stages.recipe import Recipe
from rankwise.compress.storage import check_factor_storage, priced_shapes, store_factors, with_bytes
from rankwise.errors import RankwiseError

__all__ = ["BlockSource", "Progress", "StageTimer", "compress_model", "count_params", "target_shapes"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already skips tied duplicates


def target_shapes(model: nn.Module) -> dict[str, MatrixShape]:
    prefix, blocks = find_decoder_blocks(model)
    shapes = {}
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            out, inp = layer_shape(lin)
            shapes[f"{prefix}.{i}.{name}"] = MatrixShape(out, inp, getattr(lin, "bias", None) is not None)
    return shapes


def refuse_unstreamable(recipe: Recipe, cfg: CompressConfig) -> None:
    """A whole-model pass or model corrector that needs every block at once (a backward pass: FWSVD's Fisher,
    loss-aware ranks' output Fisher, end-to-end training) cannot run on streamed weights; the error names the
    stage that asked for it, every one of them in one line."""
    reasons = [f"{next((s.name for s in recipe.stages if p.name in s.model_passes), p.name)}: {p.unsupported_reason}"
               for p in [*recipe.model_passes, *recipe.model_correctors] if not p.streams]
    if reasons:
        raise RankwiseError(f"--stream-weights does not support {'; nor '.join(reasons)}")


def compress_model(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig,
                   progress: Progress | None = None, block_source: BlockSource | None = None,
                   recipe: Recipe | None = None, timer: StageTimer | None = None) -> CompressionResult:
    """Factorize every decoder Linear of `model` in place with `recipe` (default: the one `cfg` describes).
    Returns the checkpoint's `rankwise` metadata. With a block_source the blocks may start on `meta`: each is
    filled in just before it is compressed. The caller's torch random state is left as it was (building
    layers draws from it)."""
    device = resolve_device(cfg.device)
    with kept_random_state(device):
        return _compress(model, calib_ids, cfg, device, progress, block_source, recipe or Recipe.from_config(cfg),
                         timer)


@torch.no_grad()
def _compress(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig, device: torch.device,
              progress: Progress | None, block_source: BlockSource | None, recipe: Recipe,
              timer: StageTimer | None) -> CompressionResult:
    timer = timer or StageTimer(device)
    if block_source is not None:
        refuse_unstreamable(recipe, cfg)
    check_finite_weights(named_target_linears(model))  # streamed blocks: checked as they are read
    job = CompressionJob(model, calib_ids, cfg, device, torch.device("cpu") if cfg.offload else device,
                         priced_shapes(target_shapes(model), cfg), recipe.factorizer, block_source, progress)
    params_before = count_params(model)
    for model_pass in recipe.model_passes:
        with timer.stage(model_pass.name):
            job.passes[model_pass.name] = model_pass.run(job)
    check_factor_storage(job.shapes, None, cfg.factor_dtype, cfg.int4_group)
    ranks = recipe.allocate(job, cfg.budget_ratio)
    check_factor_storage(job.shapes, ranks, cfg.factor_dtype, cfg.int4_group)
    modules: dict[str, ModuleSpec] = {}

    def compress_group(step: BlockStep, group: list[str], stats) -> None:
        for name in [n for n in group if ranks[step.full_name(n)] is not None]:
            full = step.full_name(name)
            work = LinearWork(full, dense_weight(step.linears[name]).to(device),
                              LinearStatistics(stats, job.pass_values(full)), ranks[full])
            modules[full] = compress_linear(recipe, timer, step, name, work)

    def correct_block(step: BlockStep) -> bool:
        done = [n for n in step.linears if step.full_name(n) in modules]
        work = BlockWork(step.index, step.prefix, step.block, step.inputs, step.dense_block, step.dense_inputs,
                         device, done)
        for corrector in recipe.block_correctors:
            with timer.stage(corrector.name, step.index):
                corrector.correct_block(work)
        return bool(recipe.block_correctors)

    for corrector in recipe.model_correctors:  # while the model is still dense
        with timer.stage(corrector.name):
            corrector.before_walk(job)
    runner = block_runner(model, calib_ids, cfg.batch_size, device, job.storage, block_source, timer, progress)
    runner.compress(recipe.statistics, recipe.dense_stream, compress_group, correct_block)
    for corrector in recipe.model_correctors:
        with timer.stage(corrector.name):
            corrector.correct_model(job)
    params_after = count_params(model)  # parameters, not stored elements: counted before quantized storage
    modules = store_factors(model, modules, cfg.factor_dtype, cfg.int4_group)
    result = recipe.result(cfg, job.shapes, ranks, modules, params_before, params_after, timer.seconds)
    return with_bytes(result, job.shapes, cfg.size_ratio)


def compress_linear(recipe: Recipe, timer: StageTimer, step: BlockStep, name: str, work: LinearWork) -> ModuleSpec:
    """Correctors before, the factorizer, correctors after; the Linear becomes the recipe's compressed layer."""
    for c in recipe.correctors:
        with timer.stage(c.name, step.index):
            c.before_factorize(work)
    with timer.stage("factorize", step.index):
        recipe.factorize(work)
    for c in recipe.correctors:
        with timer.stage(c.name, step.index):
            c.after_factorize(work)
    new = recipe.compressed_layer(step.linears[name], work)
    parent, child = get_submodule_parent(step.block, name)
    setattr(parent, child, new)
    return ModuleSpec.of(new)
