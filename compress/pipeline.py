"""The block-sequential compression pipeline (llm-compressor style; memory = one block + activations).

    capture inputs of block 0 ──► for each block:  statistics of every Linear's input  (calib)
                                                   factorize at the allocated ranks     (methods)
                                                   re-run the block: compressed outputs feed the next one
Ranks are fixed before the pass from the matrix shapes (uniform allocation), so a block never waits for
another. The weights of blocks not being worked on stay where the model was loaded (CPU or offloaded).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from calib.capture import capture_block_inputs, collect_linear_stats, propagate
from compress.allocate import MatrixShape, summarize, uniform_ranks
from compress.arch import dense_weight, find_decoder_blocks, find_linears, layer_shape
from compress.config import CompressConfig
from compress.loading import resolve_device
from compress.lowrank import LowRankLinear, get_submodule_parent
from compress.methods import get_method

Progress = Callable[[str, int, int], None]


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


@torch.no_grad()
def compress_model(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig,
                   progress: Progress | None = None) -> dict:
    """Factorize every decoder Linear of `model` in place. Returns the checkpoint's `rankwise` metadata."""
    device = resolve_device(cfg.device)
    storage = torch.device("cpu") if cfg.offload else device
    method = get_method(cfg.method, **cfg.method_options())
    params_before = count_params(model)
    prefix, blocks = find_decoder_blocks(model)
    shapes = target_shapes(model)
    ranks = uniform_ranks(shapes, cfg.ratio, cfg.rank_multiple, cfg.keep_dense)
    times = StageTimes()

    t0 = time.perf_counter()
    inputs = capture_block_inputs(model, blocks, calib_ids, cfg.batch_size, device, storage)
    _sync(device)
    times.add("capture", t0)

    modules: dict[str, dict] = {}
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        linears = find_linears(block)
        t0 = time.perf_counter()
        stats = {}
        if method.needs & {"xtx", "abs_mean"}:
            stats = collect_linear_stats(block, linears, inputs, i, device, want_xtx="xtx" in method.needs,
                                         want_abs="abs_mean" in method.needs,
                                         stats_device=storage)
        _sync(device)
        times.add("statistics", t0)
        t0 = time.perf_counter()
        for name, lin in linears.items():
            full = f"{prefix}.{i}.{name}"
            rank = ranks[full]
            if rank is None:
                continue
            weight = dense_weight(lin).to(device)
            dec = method.decompose(weight, stats.get(name))
            B, A = dec.factors(rank)
            new = LowRankLinear.from_factors(B, A, getattr(lin, "bias", None), dtype=lin.weight.dtype)
            parent, child = get_submodule_parent(block, name)
            setattr(parent, child, new)
            out, inp = layer_shape(lin)
            modules[full] = {"rank": rank, "in": inp, "out": out, "bias": new.B.bias is not None, "lora_rank": 0}
        del stats
        _sync(device)
        times.add("factorize", t0)
        t0 = time.perf_counter()
        if i + 1 < len(blocks):  # the last block's outputs feed nothing we compress
            propagate(block, inputs, i, device)
        _sync(device)
        times.add("propagate", t0)
        block.to(home)
        if progress:
            progress("compress", i + 1, len(blocks))
    del inputs

    summary = summarize(shapes, ranks)
    params_after = count_params(model)
    return {
        "method": cfg.method,
        "method_options": cfg.method_options(),
        "ranks_allocation": cfg.ranks,
        "rank_multiple": cfg.rank_multiple,
        "ratio_requested": cfg.ratio,
        "ratio_achieved": summary["ratio_achieved"],
        "targeted_params_before": summary["params_before"],
        "targeted_params_after": summary["params_after"],
        "model_params_before": params_before,
        "model_params_after": params_after,
        "model_ratio_achieved": 1 - params_after / params_before,
        "kept_dense": summary["kept_dense"],
        "calibration": {"source": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed},
        "stage_seconds": {k: round(v, 3) for k, v in times.seconds.items()},
        "modules": modules,
    }
