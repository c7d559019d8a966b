"""EoRA compensation of a model compressed by anything (Liu et al. 2024, arXiv:2410.21271).

`compress compensate ORIGINAL COMPRESSED`: for every decoder Linear of ORIGINAL, the layer of the same name in
COMPRESSED (low-rank, pruned, or any dense-weight layer) gets a residual path B' A' of rank r fitted to
R = W - W_c in the norm of ORIGINAL's inputs to that layer: statistics come from a block-sequential pass over
the dense model (memory = one block + the calibration activations), the factors from the EoRA stage (compress/stages/correct_eora.py).
The result is a Rankwise checkpoint: low-rank layers keep their A, B and gain lora_A / lora_B; other layers
become LoraLinear(base + path). Quantized layer types whose weight is not a plain tensor are not supported.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.calib.stats import Statistics
from rankwise.compress.arch import block_runner, check_finite_weights, dense_weight, layer_shape, named_target_linears
from rankwise.compress.stages.correct_eora import eora_factors
from rankwise.compress.lowrank import LoraLinear, LowRankLinear, get_submodule_parent
from rankwise.compress.metadata import Calibration, CompressionResult, ModuleSpec, StageRun, read_result


def _compressed_layer(compressed: nn.Module, name: str) -> nn.Module:
    try:
        layer = compressed.get_submodule(name)
    except AttributeError:
        raise RankwiseError(f"the compressed model has no layer {name!r} (layer names must match the original)")
    if isinstance(layer, LoraLinear) or (isinstance(layer, LowRankLinear) and layer.lora_rank):
        raise RankwiseError(f"layer {name!r} of the compressed model already has a compensation path")
    return layer


@torch.no_grad()
def compensate_model(original: nn.Module, compressed: nn.Module, calib_ids: torch.Tensor, rank: int,
                     batch_size: int, device: torch.device, progress=None) -> dict[str, ModuleSpec]:
    """Add EoRA paths to `compressed` in place. Returns the changed layers by name."""
    modules = {}
    runner = block_runner(original, calib_ids, batch_size, device, device, progress=progress)
    for step, stats in runner.unchanged(Statistics(xtx=True), "compensate"):
        for name, lin in step.linears.items():
            full = step.full_name(name)
            layer = _compressed_layer(compressed, full)
            W = dense_weight(lin).to(device).double()
            Wc = layer.weight.detach().to(device).double()
            if Wc.shape != W.shape:
                raise RankwiseError(f"layer {full!r}: shape {tuple(Wc.shape)} in the compressed model, "
                                    f"{tuple(W.shape)} in the original")
            if torch.equal(Wc, W):
                continue  # identical layer: nothing to compensate
            lB, lA = eora_factors(W - Wc, stats[name], rank)
            if isinstance(layer, LowRankLinear):
                layer.add_lora(lB.to(layer.A.weight.dtype), lA.to(layer.A.weight.dtype))
                modules[full] = ModuleSpec(rank=layer.rank, in_features=layer.in_features,
                                           out_features=layer.out_features, bias=layer.B.bias is not None,
                                           lora_rank=lA.shape[0])
            else:
                wrapped = LoraLinear(layer, lA.shape[0])
                wrapped.lora_A.weight.copy_(lA)
                wrapped.lora_B.weight.copy_(lB)
                parent, child = get_submodule_parent(compressed, full)
                setattr(parent, child, wrapped)
                modules[full] = ModuleSpec(rank=None, in_features=W.shape[1], out_features=W.shape[0],
                                           bias=getattr(layer, "bias", None) is not None, lora_rank=lA.shape[0])
    return modules


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
    from rankwise.compress.job import peak_memory
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
    params_comp = sum(p.numel() for p in comp.parameters())
    modules = compensate_model(orig, comp, ids, rank, batch_size, dev, progress)
    if not modules:
        raise RankwiseError("the compressed model's layers are identical to the original's: nothing to compensate")
    before = sum(p.numel() for p in orig.parameters())
    after = sum(p.numel() for p in comp.parameters())
    calibration = Calibration(source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    meta = _compensated(previous, modules, calibration, rank, before, params_comp, after)
    meta.source_model = meta.source_model or original
    meta.compressed_model = compressed
    meta.compress_seconds = round(time.perf_counter() - t0, 2)
    peak = peak_memory(dev)
    meta.host_peak_gib, meta.gpu_peak_gib = peak["host_peak_gib"], peak.get("gpu_peak_gib")
    save_checkpoint(comp, comp_tok, output, meta, overwrite, inputs=inputs)
    meta.wall_seconds = round(time.perf_counter() - t0, 2)
    return meta


def _compensated(previous: CompressionResult | None, added: dict[str, ModuleSpec], calibration: Calibration,
                 rank: int, params_before: int, params_compressed: int, params_after: int) -> CompressionResult:
    """The metadata of the compensated model. A Rankwise checkpoint keeps its own record and the EoRA
    parameters count in its targeted ratio; a model compressed by anything else is counted whole-model."""
    lora = sum(m.lora_params for m in added.values())
    eora = StageRun(stage="eora", kind="corrector", label=f"EoRA rank {rank}", options={"rank": rank},
                    record={"paths": len(added), "params": lora}, adds_paths=True)
    common = dict(compensation_params=lora, calibration=calibration,
                  model_params_before=params_before, model_params_after=params_after,
                  model_ratio_achieved=1 - params_after / params_before)
    if previous is not None:
        targeted_after = previous.targeted_params_after + lora
        return previous.model_copy(update=dict(
            common, recipe=[*previous.recipe, eora], modules={**previous.modules, **added},
            targeted_params_after=targeted_after,
            ratio_achieved_without_compensation=previous.ratio_achieved,
            ratio_achieved=1 - targeted_after / previous.targeted_params_before))
    ratio_base = 1 - params_compressed / params_before
    return CompressionResult(
        **common, method="external", ranks_allocation="external", modules=added,
        recipe=[StageRun(stage="external", kind="factorizer", label="external compression"), eora],
        targeted_params_before=params_before, targeted_params_after=params_after, ratio_requested=ratio_base,
        ratio_achieved=1 - params_after / params_before, ratio_achieved_without_compensation=ratio_base)
