"""The block-sequential compression pipeline (llm-compressor style; memory = one block + activations).

    [fisher pass]     FWSVD only: whole-model backward, per-row squared gradients         (calib.fisher)
    [spectra pass]    WeLore only: dense model, block by block, singular values of every
                      matrix's transformed weight; one global threshold then fixes all ranks
    capture inputs of block 0 ──► for each block, for each group of Linears sharing an input (q/k/v, o,
                                  gate/up, down), in forward order:
                                     statistics of the group's input, earlier groups already compressed
                                     factorize at the allocated rank                 (methods)
                                     [refit B to the dense outputs] [EoRA residual path]   (correct)
                                  re-run the block: compressed outputs feed the next one
With --refit a dense twin of the current block is run on the dense model's hidden states (a second stream of
activations) so every layer is fitted to what the *dense* layer outputs, correcting upstream error.
Uniform ranks are fixed from shapes alone; WeLore's global threshold needs every spectrum first, hence the
statistics pass over the dense model (only singular values are kept: memory = one block + the spectra).
With a `block_source` (--stream-weights, compress.streaming) the blocks start on `meta` and the source reads
each one from the checkpoint just before it is used (and prefetches the next).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from rankwise.calib.capture import BlockInputs, capture_block_inputs, collect_linear_stats, propagate
from rankwise.errors import RankwiseError
from rankwise.calib.paired import collect_group_stats, linear_groups
from rankwise.compress.allocate import (MatrixShape, loss_aware_ranks, reserved_ratio, summarize, uniform_ranks,
                                        welore_ranks)
from rankwise.compress.arch import Conv1D, dense_weight, find_decoder_blocks, find_linears, layer_shape
from rankwise.compress.config import CompressConfig
from rankwise.compress.correct import eora_factors, refit_b, target_weight
from rankwise.compress.loading import resolve_device
from rankwise.compress.lowrank import LowRankLinear, get_submodule_parent
from rankwise.compress.methods import get_method
from rankwise.compress.refine import RefineSettings, refine_block

Progress = Callable[[str, int, int], None]
SPECTRA_ALLOCATIONS = ("welore", "loss-aware")  # read every matrix's spectrum before any rank is fixed
FWSVD_UNSUPPORTED = "--stream-weights does not support fwsvd: its Fisher pass needs every block at once"


class BlockSource(Protocol):
    """Fills in decoder blocks that start on `meta` (compress.streaming.BlockWeightStream)."""

    def ensure(self, i: int) -> None: ...   # block i's weights on CPU; may start reading block i+1

    def release(self, i: int) -> None: ...  # block i back on meta (it was only read, not changed)


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, t0: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eora_params(shapes: dict[str, MatrixShape], rank: int) -> int:
    return sum(min(rank, s.out, s.inp) * (s.out + s.inp) for s in shapes.values())


def fisher_pass(model, calib_ids, device, progress=None) -> dict[str, torch.Tensor]:
    from rankwise.calib.fisher import row_fisher
    prefix, blocks = find_decoder_blocks(model)
    weights, transposed = {}, set()
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            weights[full] = lin.weight
            if Conv1D and isinstance(lin, Conv1D):
                transposed.add(full)
    return row_fisher(model, calib_ids, weights, device, transposed, progress)


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
        yield f"{prefix}.{i}", linears, stats
        del stats
        if needs_inputs and i + 1 < len(blocks):
            propagate(block, inputs, i, device)
        block.to(home)
        if block_source is not None:
            block_source.release(i)
        if progress:
            progress(stage, i + 1, len(blocks))


def spectra_pass(model, method, calib_ids, cfg, device, storage, fisher, progress=None, block_source=None) -> dict:
    """Singular values of every matrix's transformed weight, statistics from the dense model (WeLore)."""
    spectra = {}
    for block_prefix, linears, stats in unchanged_block_stats(
            model, calib_ids, cfg.batch_size, device, storage, want_xtx="xtx" in method.needs,
            want_abs="abs_mean" in method.needs, progress=progress, stage="spectra", block_source=block_source):
        for name, lin in linears.items():
            full = f"{block_prefix}.{name}"
            st = _FisherStats(fisher[full]) if fisher is not None else stats.get(name)
            spectra[full] = method.decompose(dense_weight(lin).to(device), st).spectrum.cpu()
    return spectra


@dataclass
class _FisherStats:
    """What a method that reads no activations gets as statistics: FWSVD's Fisher rows, if any."""
    fisher: torch.Tensor | None = None


def _allocate(cfg, shapes, spectra) -> dict[str, int | None]:
    ratio = cfg.ratio
    if cfg.compensate == "eora":  # --ratio counts the EoRA path: the base factorization removes more
        ratio = reserved_ratio(shapes, cfg.ratio, eora_params(shapes, cfg.eora_rank))
    if cfg.ranks == "welore":
        return welore_ranks(shapes, spectra, ratio, cfg.rank_multiple)
    if cfg.ranks == "loss-aware":
        return loss_aware_ranks(shapes, spectra, ratio, cfg.rank_multiple)
    return uniform_ranks(shapes, ratio, cfg.rank_multiple, cfg.keep_dense)


@torch.no_grad()
def compress_model(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig,
                   progress: Progress | None = None, block_source: BlockSource | None = None) -> dict:
    """Factorize every decoder Linear of `model` in place. Returns the checkpoint's `rankwise` metadata.
    With a block_source the blocks may start on `meta`: each is filled in just before it is compressed."""
    device = resolve_device(cfg.device)
    storage = torch.device("cpu") if cfg.offload else device
    method = get_method(cfg.method, **cfg.method_options())
    if block_source is not None and "fisher" in method.needs:
        raise RankwiseError(FWSVD_UNSUPPORTED)
    params_before = count_params(model)
    prefix, blocks = find_decoder_blocks(model)
    shapes = target_shapes(model)
    times = StageTimes()

    fisher = None
    if "fisher" in method.needs:
        t0 = time.perf_counter()
        fisher = fisher_pass(model, calib_ids, device, progress)
        times.add("fisher", t0)
    spectra = None
    if cfg.ranks in SPECTRA_ALLOCATIONS:
        t0 = time.perf_counter()
        spectra = spectra_pass(model, method, calib_ids, cfg, device, storage, fisher, progress, block_source)
        times.add("spectra", t0)
    ranks = _allocate(cfg, shapes, spectra)
    del spectra

    # Plain SVD (and FWSVD, whose Fisher rows are already known) read no activations unless refit or EoRA
    # asks for them: the block walk then only factorizes, with no capture, statistics or propagation.
    needs_xtx = "xtx" in method.needs or cfg.refit or cfg.compensate == "eora"
    needs_activations = needs_xtx or "abs_mean" in method.needs or cfg.refine
    t0 = time.perf_counter()
    inputs = None
    if needs_activations:
        if block_source is not None:
            block_source.ensure(0)  # the capture runs block 0 once to learn its return convention
        inputs = capture_block_inputs(model, blocks, calib_ids, cfg.batch_size, device, storage)
    dense_inputs = None
    if cfg.refit or cfg.refine:  # second stream: what each block receives in the dense model
        dense_inputs = BlockInputs([h.clone() for h in inputs.hidden], inputs.kwargs, inputs.returns_tuple,
                                   inputs.storage)
    _sync(device)
    times.add("capture", t0)

    modules: dict[str, dict] = {}
    refined: dict[str, dict] = {}  # block prefix -> block output MSE before / after refinement
    lora_params = 0
    for i, block in enumerate(blocks):
        if block_source is not None:
            block_source.ensure(i)  # reads block i (or waits for its prefetch), starts reading block i+1
        home = next(block.parameters()).device
        block.to(device)
        dense_block = copy.deepcopy(block) if dense_inputs is not None else None
        paired = dense_block if cfg.refit else None  # cross statistics only where the refit reads them
        linears = find_linears(block)
        groups = linear_groups(block, linears, inputs, i, device) if needs_activations else [list(linears)]
        for group in groups:
            t0 = time.perf_counter()
            stats = _FisherStats()  # a data-free method reads only the Fisher rows, set below
            if needs_activations:
                stats = collect_group_stats(block, group, inputs, i, device, paired, dense_inputs if paired else None,
                                            want_abs="abs_mean" in method.needs, stats_device=storage,
                                            want_xtx=needs_xtx)
            _sync(device)
            times.add("statistics", t0)
            t0 = time.perf_counter()
            for name in group:
                full = f"{prefix}.{i}.{name}"
                rank = ranks[full]
                if rank is None:
                    continue
                lin = linears[name]
                weight = dense_weight(lin).to(device)
                if fisher is not None:
                    stats.fisher = fisher[full]
                target = None
                if cfg.refit or cfg.compensate == "eora":
                    target = target_weight(weight, stats, cfg.refit_damp)
                if cfg.refit:
                    # Decompose W G C^-1 (the dense layer re-expressed on compressed inputs): for SVD-LLM the
                    # truncation is then the exact rank-k optimum of E||W' x_c - W x_d||; B is re-solved last.
                    B, A = method.decompose(target.to(weight.dtype), stats).factors(rank)
                    B = refit_b(weight, A, stats, cfg.refit_damp, B0=B)
                else:
                    B, A = method.decompose(weight, stats).factors(rank)
                new = LowRankLinear.from_factors(B, A, getattr(lin, "bias", None), dtype=lin.weight.dtype)
                lora_rank = 0
                if cfg.compensate == "eora":
                    lB, lA = eora_factors(target - B.double().to(target.device) @ A.double().to(target.device),
                                          stats, cfg.eora_rank)
                    new.add_lora(lB, lA)
                    lora_rank = lA.shape[0]
                    lora_params += lora_rank * (lA.shape[1] + lB.shape[0])
                parent, child = get_submodule_parent(block, name)
                setattr(parent, child, new)
                out, inp = layer_shape(lin)
                modules[full] = {"rank": rank, "in": inp, "out": out, "bias": new.B.bias is not None,
                                 "lora_rank": lora_rank}
            del stats
            _sync(device)
            times.add("factorize", t0)
        t0 = time.perf_counter()
        last = i + 1 == len(blocks)
        if dense_block is not None and (cfg.refine or not last):
            propagate(dense_block, dense_inputs, i, device)  # now the dense block's outputs: the targets
        _sync(device)
        times.add("propagate", t0)
        if cfg.refine:
            t0 = time.perf_counter()
            result = refine_block(block, inputs.hidden, dense_inputs.hidden, inputs.kwargs[i], device,
                                  RefineSettings(cfg.refine_steps, cfg.refine_lr, cfg.seed))
            refined[f"{prefix}.{i}"] = {"mse_before": result.mse_before, "mse_after": result.mse_after,
                                        "kept": result.kept}
            _sync(device)
            times.add("refine", t0)
        t0 = time.perf_counter()
        if needs_activations and not last:  # the last block's outputs feed nothing we compress
            propagate(block, inputs, i, device)
        del dense_block
        _sync(device)
        times.add("propagate", t0)
        block.to(home)
        if progress:
            progress("compress", i + 1, len(blocks))
    del inputs, dense_inputs

    summary = summarize(shapes, ranks, extra=lora_params)
    base = summarize(shapes, ranks)
    params_after = count_params(model)
    return {
        "method": cfg.method,
        "method_options": cfg.method_options(),
        "ranks_allocation": cfg.ranks,
        "rank_multiple": cfg.rank_multiple,
        "refit": cfg.refit,
        "compensate": cfg.compensate,
        "eora_rank": cfg.eora_rank if cfg.compensate == "eora" else 0,
        "ratio_requested": cfg.ratio,
        "ratio_achieved": summary["ratio_achieved"],
        "ratio_achieved_without_compensation": base["ratio_achieved"],
        "compensation_params": lora_params,
        "targeted_params_before": summary["params_before"],
        "targeted_params_after": summary["params_after"],
        "model_params_before": params_before,
        "model_params_after": params_after,
        "model_ratio_achieved": 1 - params_after / params_before,
        "kept_dense": summary["kept_dense"],
        "refine": ({"steps": cfg.refine_steps, "lr": cfg.refine_lr, "seed": cfg.seed, "blocks": refined}
                   if cfg.refine else None),
        "calibration": {"source": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed},
        "stage_seconds": {k: round(v, 3) for k, v in times.seconds.items()},
        "modules": modules,
    }
