"""EoRA compensation of a model compressed by anything (Liu et al. 2024, arXiv:2410.21271).

`compress compensate ORIGINAL COMPRESSED` runs a recipe through the normal pipeline on ORIGINAL: the
factorizer `given-factors` replaces each decoder Linear by COMPRESSED's layer of the same name (low-rank,
pruned, or any dense-weight layer), the allocator `given-ranks` skips the layers COMPRESSED left as they were,
and the EoRA stage (compress/stages/correct_eora.py, the one EoRA there is) fits each changed layer a residual
path B' A' of rank r to R = W - W_c in the norm of that layer's inputs in the model being compensated, block
by block (memory = one block + the calibration activations). The result is a Rankwise checkpoint: low-rank
layers keep their A, B and gain lora_A / lora_B; other layers become LoraLinear(base + path). Quantized layer
types whose weight is not a plain tensor are not supported.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.compress.arch import check_finite_weights, layer_shape, named_target_linears
from rankwise.compress.config import CompressConfig
from rankwise.compress.metadata import Calibration, CompressionResult, read_result
from rankwise.compress.pipeline import compress_model, count_params
from rankwise.compress.stages.correct_eora import EoRA
from rankwise.compress.stages.given_model import GivenFactors, GivenRanks
from rankwise.compress.stages.recipe import Recipe


def compensation_recipe(compressed: nn.Module, checkpoint: str, rank: int) -> Recipe:
    """COMPRESSED's layers as they are, then an EoRA path of rank `rank` beside each one that changed."""
    return Recipe(allocator=GivenRanks(model=compressed),
                  factorizer=GivenFactors({"checkpoint": checkpoint}, model=compressed),
                  correctors=[EoRA(rank=rank)])


def take_other_weights(original: nn.Module, compressed: nn.Module) -> None:
    """Everything of `compressed` but its decoder Linears (embeddings, norms, head) copied into `original`,
    so that the compensated model is `compressed` plus its paths."""
    targets = set(named_target_linears(original))
    theirs = compressed.state_dict()
    with torch.no_grad():
        for key, value in original.state_dict().items():
            parts = key.split(".")
            if any(".".join(parts[:i]) in targets for i in range(1, len(parts))):
                continue
            if key not in theirs or theirs[key].shape != value.shape:
                raise RankwiseError(f"the compressed model's {key!r} does not match the original's (only decoder "
                                    f"Linears may differ)")
            value.copy_(theirs[key])


def compensate_model(original: nn.Module, compressed: nn.Module, calib_ids: torch.Tensor, rank: int,
                     cfg: CompressConfig, checkpoint: str = "", progress=None) -> CompressionResult:
    """`original` becomes `compressed` with EoRA paths (the compensation recipe run on it); returns the
    pipeline's result (its modules are the layers that got a path)."""
    take_other_weights(original, compressed)
    return compress_model(original, calib_ids, cfg, progress, recipe=compensation_recipe(compressed, checkpoint,
                                                                                           rank))


def check_inputs(original: nn.Module, compressed: nn.Module, rank: int) -> None:
    """Before calibration: finite weights, and a rank every layer can hold (a path of rank min(m, n) is a
    full-rank copy of the residual; more is not a low-rank path at all)."""
    linears = named_target_linears(original)
    check_finite_weights(linears)
    check_finite_weights(named_target_linears(compressed))
    name, lin = min(linears.items(), key=lambda kv: min(layer_shape(kv[1])))
    if rank > min(layer_shape(lin)):
        out, inp = layer_shape(lin)
        raise RankwiseError(f"--eora-rank {rank} is larger than layer {name!r} ({out} x {inp}): at most "
                            f"{min(out, inp)}, and well below it for the path to save anything")


def run_compensate(original: str, compressed: str, output, rank: int, calib: str, nsamples: int, seqlen: int,
                   seed: int = 0, batch_size: int = 4, device: str = "auto", overwrite: bool = False,
                   progress=None) -> CompressionResult:
    from rankwise.calib.data import calibration_set, source_path, validate_source
    from rankwise.compress.checkpoint import check_output_dir, save_checkpoint
    from rankwise.compress.peak_memory import peak_memory
    from rankwise.compress.loading import load_model, resolve_device
    t0 = time.perf_counter()
    if rank < 1:
        raise RankwiseError(f"--eora-rank must be at least 1, got {rank}")
    inputs = [original, compressed, source_path(calib)]
    check_output_dir(output, overwrite, inputs)
    validate_source(calib)
    dev = resolve_device(device)
    previous = read_result(compressed)  # validated before any weight is read
    orig, tokenizer, _ = load_model(original, "fp32", device, place_on_device=False)
    comp, comp_tok, _ = load_model(compressed, "fp32", device, place_on_device=False)
    check_inputs(orig, comp, rank)
    ids = calibration_set(tokenizer, calib, nsamples, seqlen, seed).input_ids
    params_comp, before = count_params(comp), count_params(orig)
    # the ratio is not read: the given ranks do not depend on it
    cfg = CompressConfig(model=original, ratio=0.5, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         batch_size=batch_size, device=device)
    result = compensate_model(orig, comp, ids, rank, cfg, compressed, progress)
    if not result.modules:
        raise RankwiseError("the compressed model's layers are identical to the original's: nothing to compensate")
    calibration = Calibration(source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    meta = _compensated(previous, result, calibration, before, params_comp, count_params(orig))
    meta.source_model = meta.source_model or original
    meta.compressed_model = compressed
    meta.compress_seconds = round(time.perf_counter() - t0, 2)
    peak = peak_memory(dev)
    meta.host_peak_gib, meta.gpu_peak_gib = peak.host_gib, peak.gpu_gib
    save_checkpoint(orig, comp_tok, output, meta, overwrite, inputs=inputs)
    meta.wall_seconds = round(time.perf_counter() - t0, 2)
    return meta


def _compensated(previous: CompressionResult | None, result: CompressionResult, calibration: Calibration,
                 params_before: int, params_compressed: int, params_after: int) -> CompressionResult:
    """The metadata of the compensated model. A Rankwise checkpoint keeps its own record (and recipe, the EoRA
    stage added) and the EoRA parameters count in its targeted ratio; a model compressed by anything else is
    counted whole-model, its recipe the one that ran."""
    added, lora = result.modules, result.compensation_params
    common = dict(compensation_params=lora, calibration=calibration, stage_seconds=result.stage_seconds,
                  model_params_before=params_before, model_params_after=params_after,
                  model_ratio_achieved=1 - params_after / params_before)
    if previous is not None:
        targeted_after = previous.targeted_params_after + lora
        return previous.model_copy(update=dict(
            common, recipe=[*previous.recipe, *[r for r in result.recipe if r.adds_paths]],
            modules={**previous.modules, **added}, targeted_params_after=targeted_after,
            ratio_achieved_without_compensation=previous.ratio_achieved,
            ratio_achieved=1 - targeted_after / previous.targeted_params_before))
    ratio_base = 1 - params_compressed / params_before
    return CompressionResult(
        **common, method="external", ranks_allocation="external", modules=added, recipe=result.recipe,
        targeted_params_before=params_before, targeted_params_after=params_after, ratio_requested=ratio_base,
        ratio_achieved=1 - params_after / params_before, ratio_achieved_without_compensation=ratio_base)
