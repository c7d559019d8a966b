"""How the factors of a compressed model are stored (`--factor-dtype`): checked against the ranks before any
work, applied once every stage has run (refinement and correction work on float factors), so the model in
memory computes what the written checkpoint computes."""
from __future__ import annotations

from torch import nn

from rankwise.compress.lowrank import QUANTIZED_LINEARS, LowRankFactors
from rankwise.compress.metadata import CompressionResult, ModuleSpec
from rankwise.compress.numerics import FLOAT_BYTES, MatrixShape, StoragePrice
from rankwise.errors import RankwiseError


def check_factor_storage(shapes: dict[str, MatrixShape], ranks: dict[str, int | None] | None, factor_dtype: str,
                         group_size: int) -> None:
    """int4 groups run along each factor's inputs: the group must divide every targeted matrix's input size
    (A's inputs; checked before the allocation when `ranks` is None) and every rank (B's inputs). One line
    naming the first that it does not."""
    if factor_dtype != "int4":
        return
    if group_size % 2:
        raise RankwiseError(f"--int4-group {group_size} must be even (two int4 values per byte)")
    sizes = ([("input size", name, s.inp) for name, s in shapes.items()] if ranks is None else
             [("rank", name, rank) for name, rank in ranks.items() if rank is not None])
    for what, name, size in sizes:
        if size % group_size:
            raise RankwiseError(f"int4 group {group_size} does not divide the {what} {size} of {name}: "
                                + ("give ranks a --rank-multiple of it" if what == "rank" else "choose another "
                                   "--int4-group"))


def store_factors(model: nn.Module, modules: dict[str, ModuleSpec], factor_dtype: str,
                  group_size: int) -> dict[str, ModuleSpec]:
    """Store the factors of every compressed layer named in `modules` as `factor_dtype` (in place); their
    specs, updated."""
    if factor_dtype == "auto":
        return modules
    out = dict(modules)
    for name, spec in modules.items():
        layer = model.get_submodule(name)
        if isinstance(layer, LowRankFactors):
            layer.store_factors(factor_dtype, group_size)
            out[name] = ModuleSpec.of(layer)
    return out


def priced_shapes(shapes: dict[str, MatrixShape], cfg) -> dict[str, MatrixShape]:
    """The targeted shapes as the allocators see them: priced in stored bytes under a byte budget."""
    price = cfg.storage_price()
    return shapes if price is None else {n: s.priced(price) for n, s in shapes.items()}


def stored_bytes(shapes: dict[str, MatrixShape], modules: dict[str, ModuleSpec]) -> float:
    """Stored bytes of the targeted Linears: each factorized one at its factors' storage (scales included),
    the dense ones and every float residual path or bias at 16 bits."""
    total = 0.0
    for name, shape in shapes.items():
        spec = modules.get(name)
        rank = spec.rank if spec is not None else None
        price = StoragePrice.of(spec.factor_dtype or "auto", spec.group_size) if spec is not None else None
        total += shape.priced(price or StoragePrice()).cost(rank)
        total += FLOAT_BYTES * (spec.lora_params if spec is not None else 0)
    return total


def with_bytes(result: CompressionResult, shapes: dict[str, MatrixShape],
               size_ratio: float | None) -> CompressionResult:
    """The result with the targeted Linears' bytes, asked (`size_ratio`) and achieved."""
    before = sum(FLOAT_BYTES * s.dense_params for s in shapes.values())
    after = stored_bytes(shapes, result.modules)
    return result.model_copy(update={"size_ratio_requested": size_ratio, "size_ratio_achieved": after / before,
                                     "targeted_bytes_before": int(before), "targeted_bytes_after": round(after)})


def quantized_storages(result: CompressionResult) -> list[str]:
    """The quantized dtypes a checkpoint's factors are stored in (none: float factors, which can be stored anew)."""
    return sorted({m.factor_dtype for m in result.modules.values() if m.factor_dtype in QUANTIZED_LINEARS})


def restored_result(result: CompressionResult, modules: dict[str, ModuleSpec]) -> CompressionResult:
    """The record of a checkpoint whose factors were stored anew (`compress store-factors`): its module specs
    and the targeted Linears' bytes achieved (only the factorized layers' storage changed)."""
    if result.targeted_bytes_before is None or result.targeted_bytes_after is None:
        raise RankwiseError("the checkpoint records no stored bytes (written before factor storage existed): "
                            "compress the model again with --factor-dtype")
    shapes = {name: MatrixShape(m.out_features, m.in_features, m.bias) for name, m in result.modules.items()}
    after = result.targeted_bytes_after - stored_bytes(shapes, result.modules) + stored_bytes(shapes, modules)
    return result.model_copy(update={"modules": modules, "targeted_bytes_after": round(after),
                                     "size_ratio_achieved": after / result.targeted_bytes_before})
