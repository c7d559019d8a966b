"""The block-sequential compression pipeline (llm-compressor style; memory = one block + activations).

It runs a recipe of stages (compress/stages: docs/stages.md) and names no method:

    whole-model passes the stages name (Fisher, spectra)  ──►  the allocator fixes every rank
    capture the inputs of block 0 (and a dense copy of them when a stage wants the dense stream)
    for each block, for each group of Linears sharing an input (q/k/v, o, gate/up, down), in forward order:
        accumulate the statistics the stages declared, earlier groups already compressed
        per Linear: correctors before, the factorizer, correctors after; swap in the low-rank layer
    block correctors; propagate: the compressed outputs (and the dense twin's) feed the next block

With a `block_source` (--stream-weights, compress.streaming) the blocks start on `meta` and the source reads
each one from the checkpoint just before it is used (and prefetches the next). Every stage that runs is timed
(StageTimer; the totals are the result's `stage_seconds`).
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Callable, Protocol

import torch
from torch import nn

from rankwise.calib.capture import (BlockInputs, LinearStats, capture_block_inputs, collect_linear_stats,
                                    propagate)
from rankwise.calib.paired import Shortcuts, collect_group_stats, linear_groups, output_owners
from rankwise.compress.allocate import MatrixShape, summarize
from rankwise.compress.arch import (check_finite_weights, dense_weight, find_decoder_blocks, find_linears,
                                   layer_shape, named_target_linears)
from rankwise.compress.config import CompressConfig
from rankwise.compress.loading import resolve_device
from rankwise.compress.lowrank import LowRankLinear, get_submodule_parent
from rankwise.compress.metadata import Calibration, CompressionResult, ModuleSpec
from rankwise.compress.stages.base import BlockWork, CompressionJob, LinearStatistics, LinearWork
from rankwise.compress.stages.recipe import Recipe
from rankwise.errors import RankwiseError

Progress = Callable[[str, int, int], None]


class BlockSource(Protocol):
    """Fills in decoder blocks that start on `meta` (compress.streaming.BlockWeightStream)."""

    def ensure(self, i: int) -> None: ...   # block i's weights on CPU; may start reading block i+1

    def release(self, i: int) -> None: ...  # block i back on meta (it was only read, not changed)


class StageTimer:
    """Wall seconds of every stage that runs: `seconds` in total, `per_block[i]` for the block loop's stages.
    A `listener` (bench/speed.py) is told when each timed stage starts and ends (stage, block or None)."""

    def __init__(self, device: torch.device | None = None, listener=None):
        self.device, self.listener = device, listener
        self.seconds: dict[str, float] = {}
        self.per_block: list[dict[str, float]] = []

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, block: int | None = None):
        if self.listener is not None:
            self.listener.start(name, block)
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            if block is not None:
                while len(self.per_block) <= block:
                    self.per_block.append({})
                self.per_block[block][name] = self.per_block[block].get(name, 0.0) + dt
            if self.listener is not None:
                self.listener.end(name, block, dt)


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


def check_finite_stats(stats: LinearStats, layers: list[str]) -> None:
    """Refuse statistics with NaN / Inf (activations that overflowed), naming the layer they feed."""
    bad = stats.first_nonfinite()
    if bad is not None:
        raise RankwiseError(f"the calibration statistics ({bad}) of the input of layer {layers[0]!r} are not "
                            f"finite: its activations overflow (try --dtype fp32)")


@torch.no_grad()  # torch applies it to each resumption of the generator
def unchanged_block_stats(model, calib_ids, batch_size: int, device, storage, want_xtx: bool, want_abs: bool,
                          progress: Progress | None = None, stage: str = "statistics",
                          block_source: BlockSource | None = None):
    """For each decoder block of a model that is *not* being changed: yields (block prefix, its Linears by
    local name, their input statistics) with the block on `device`, then runs the block forward for the next
    one and moves it back. One block and the calibration activations on the device at a time; with a
    block_source, in host memory too (plus the next block being read): each is released once read."""
    prefix, blocks = find_decoder_blocks(model)
    needs_inputs = want_xtx or want_abs  # else (plain svd's spectra) no calibration forward at all
    inputs = None
    if needs_inputs:
        if block_source is not None:
            block_source.ensure(0)  # the capture runs block 0 once to learn its return convention
        inputs = capture_block_inputs(model, blocks, calib_ids, batch_size, device, storage)
    for i, block in enumerate(blocks):
        if block_source is not None:
            block_source.ensure(i)
        home = next(block.parameters()).device
        block.to(device)
        linears = find_linears(block)
        stats = {}
        if needs_inputs:
            stats = collect_linear_stats(block, linears, inputs, i, device, want_xtx=want_xtx, want_abs=want_abs,
                                         stats_device=storage)
            for name, st in stats.items():
                check_finite_stats(st, [f"{prefix}.{i}.{name}"])
        yield f"{prefix}.{i}", linears, stats
        del stats
        if needs_inputs and i + 1 < len(blocks):
            propagate(block, inputs, i, device)
        block.to(home)
        if block_source is not None:
            block_source.release(i)
        if progress:
            progress(stage, i + 1, len(blocks))


def refuse_unstreamable(recipe: Recipe, cfg: CompressConfig) -> None:
    """A whole-model pass that needs every block at once (a backward pass: FWSVD's Fisher, loss-aware ranks'
    output Fisher) cannot run on streamed weights; the error names the stage that asked for it."""
    for p in recipe.model_passes:
        if not p.streams:
            asker = next((s.name for s in recipe.stages if p.name in s.model_passes), cfg.method)
            raise RankwiseError(f"--stream-weights does not support {asker}: {p.unsupported_reason}")


@torch.no_grad()
def compress_model(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig,
                   progress: Progress | None = None, block_source: BlockSource | None = None,
                   recipe: Recipe | None = None, timer: StageTimer | None = None) -> CompressionResult:
    """Factorize every decoder Linear of `model` in place with `recipe` (default: the one `cfg` describes).
    Returns the checkpoint's `rankwise` metadata. With a block_source the blocks may start on `meta`: each is
    filled in just before it is compressed."""
    recipe = recipe or Recipe.from_config(cfg)
    device = resolve_device(cfg.device)
    timer = timer or StageTimer(device)
    if block_source is not None:
        refuse_unstreamable(recipe, cfg)
    check_finite_weights(named_target_linears(model))  # streamed blocks: checked as they are read
    job = CompressionJob(model, calib_ids, cfg, device, torch.device("cpu") if cfg.offload else device,
                         target_shapes(model), recipe.factorizer, block_source, progress)
    params_before = count_params(model)
    for model_pass in recipe.model_passes:
        with timer.stage(model_pass.name):
            job.passes[model_pass.name] = model_pass.run(job)
    ranks = recipe.allocate(job, cfg.ratio)
    walk = BlockWalk(job, recipe, timer)
    modules: dict[str, ModuleSpec] = {}
    for i in range(len(walk.blocks)):
        modules.update(walk.compress_block(i, ranks))
    del walk
    extra = {k: v for c in recipe.block_correctors for k, v in c.result_fields().items()}
    return _result(cfg, job.shapes, ranks, modules, params_before, count_params(model), timer, extra)


class BlockWalk:
    """The generic block loop: what each block goes through, whatever the recipe."""

    def __init__(self, job: CompressionJob, recipe: Recipe, timer: StageTimer):
        self.job, self.recipe, self.timer = job, recipe, timer
        self.prefix, self.blocks = find_decoder_blocks(job.model)
        self.wanted = recipe.statistics
        self.reads_inputs = self.wanted.any or recipe.dense_stream  # else: factorize only, no forward at all
        self.inputs = self.dense_inputs = self.groups = self.owners = None
        if self.reads_inputs:
            with timer.stage("capture"):
                if job.block_source is not None:
                    job.block_source.ensure(0)  # the capture runs block 0 once to learn its return convention
                self.inputs = capture_block_inputs(job.model, self.blocks, job.calib_ids, job.cfg.batch_size,
                                                   job.device, job.storage)
                if recipe.dense_stream:  # second stream: what each block receives in the dense model
                    self.dense_inputs = BlockInputs([h.clone() for h in self.inputs.hidden], self.inputs.kwargs,
                                                    self.inputs.returns_tuple, self.inputs.storage)

    def _input_groups(self, block, linears, i) -> list[list[str]]:
        """Linears by shared input in forward order, and the submodules a later pass may skip (Shortcuts),
        found once per model (every block has the same forward); without activations, one group of all."""
        if not self.reads_inputs:
            return [list(linears)]
        if self.groups is None or {n for g in self.groups for n in g} != set(linears):
            with self.timer.stage("groups", i):
                self.groups = linear_groups(block, linears, self.inputs, i, self.job.device)
                self.owners = output_owners(block, linears, self.inputs, i, self.job.device)
        return self.groups

    def _shortcuts(self, block, linears, stream) -> Shortcuts | None:
        if block is None or not self.wanted.any:
            return None
        return Shortcuts(block, linears, self.owners, len(stream.hidden), self.job.storage)

    def compress_block(self, i: int, ranks: dict[str, int | None]) -> dict[str, ModuleSpec]:
        job, block = self.job, self.blocks[i]
        if job.block_source is not None:
            job.block_source.ensure(i)  # reads block i (or waits for its prefetch), starts reading block i+1
        home = next(block.parameters()).device
        block.to(job.device)
        dense_block = copy.deepcopy(block) if self.dense_inputs is not None else None
        linears = find_linears(block)
        groups = self._input_groups(block, linears, i)
        keep = self._shortcuts(block, linears, self.inputs)
        dense_keep = self._shortcuts(dense_block, linears, self.dense_inputs)
        done: list[str] = []
        for group in groups:
            stats = None
            if self.wanted.any:
                with self.timer.stage("statistics", i):
                    stats = collect_group_stats(block, group, self.inputs, i, job.device, dense_block,
                                                self.dense_inputs, want_abs=self.wanted.abs_mean,
                                                stats_device=job.storage, want_xtx=self.wanted.xtx,
                                                shortcuts=keep, dense_shortcuts=dense_keep)
                check_finite_stats(stats, [f"{self.prefix}.{i}.{n}" for n in group])
            for name in [n for n in group if ranks[f"{self.prefix}.{i}.{n}"] is not None]:
                full = f"{self.prefix}.{i}.{name}"
                view = LinearStatistics(stats, job.pass_values(full))
                self._compress_linear(block, name, linears[name], LinearWork(
                    full, dense_weight(linears[name]).to(job.device), view, ranks[full]), i)
                done.append(name)
            for keeper in (keep, dense_keep):
                if keeper is not None:
                    keeper.finalize(group)  # the group's input is final: a later pass may skip its owner
            del stats
        work = BlockWork(i, f"{self.prefix}.{i}", block, self.inputs, dense_block, self.dense_inputs, job.device,
                         done)
        for corrector in self.recipe.block_correctors:
            with self.timer.stage(corrector.name, i):
                corrector.correct_block(work)
        if self.recipe.block_correctors:  # the block changed after the kept inputs were taken
            keep = None
        if self.reads_inputs and i + 1 < len(self.blocks):  # the last block's outputs feed nothing
            with self.timer.stage("propagate", i):
                propagate(block, self.inputs, i, job.device, keep)
                if dense_block is not None:
                    propagate(dense_block, self.dense_inputs, i, job.device, dense_keep)
        del dense_block, work, keep, dense_keep
        block.to(home)
        if job.progress:
            job.progress("compress", i + 1, len(self.blocks))
        return {f"{self.prefix}.{i}.{n}": _spec(block.get_submodule(n)) for n in done}

    def _compress_linear(self, block: nn.Module, name: str, layer: nn.Module, work: LinearWork, i: int) -> None:
        correctors = self.recipe.correctors
        for c in correctors:
            with self.timer.stage(c.name, i):
                c.before_factorize(work)
        with self.timer.stage("factorize", i):
            source = work.weight if work.decompose_from is None else work.decompose_from
            work.B, work.A = self.recipe.factorizer.decompose(source, work.stats).factors(work.rank)
        for c in correctors:
            with self.timer.stage(c.name, i):
                c.after_factorize(work)
        new = LowRankLinear.from_factors(work.B, work.A, getattr(layer, "bias", None), dtype=layer.weight.dtype)
        if work.lora_A is not None:
            new.add_lora(work.lora_B, work.lora_A)
        parent, child = get_submodule_parent(block, name)
        setattr(parent, child, new)


def _spec(layer: LowRankLinear) -> ModuleSpec:
    return ModuleSpec(rank=layer.rank, in_features=layer.in_features, out_features=layer.out_features,
                      bias=layer.B.bias is not None, lora_rank=layer.lora_rank)


def _result(cfg: CompressConfig, shapes, ranks, modules: dict[str, ModuleSpec], params_before: int,
            params_after: int, timer: StageTimer, extra: dict | None = None) -> CompressionResult:
    lora_params = sum(m.lora_params for m in modules.values())
    summary = summarize(shapes, ranks, extra=lora_params)
    base = summarize(shapes, ranks)
    return CompressionResult(
        method=cfg.method, method_options=cfg.method_options(), ranks_allocation=cfg.ranks,
        rank_multiple=cfg.rank_multiple, refit=cfg.refit, compensate=cfg.compensate,
        eora_rank=cfg.eora_rank if cfg.compensate == "eora" else 0, ratio_requested=cfg.ratio,
        ratio_achieved=summary["ratio_achieved"], ratio_achieved_without_compensation=base["ratio_achieved"],
        compensation_params=lora_params, targeted_params_before=summary["params_before"],
        targeted_params_after=summary["params_after"], model_params_before=params_before,
        model_params_after=params_after, model_ratio_achieved=1 - params_after / params_before,
        kept_dense=summary["kept_dense"],
        calibration=Calibration(source=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed),
        stage_seconds={k: round(v, 3) for k, v in timer.seconds.items()}, modules=modules, **(extra or {}))
