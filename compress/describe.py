"""What a Rankwise checkpoint is, in words: the pipeline in one line, the ratio warning, ranks by block.

Everything here reads the typed CompressionResult (compress/metadata.py); `compress inspect`, the summary of
`compress model` and the header of `compress evaluate` all describe a checkpoint through these functions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # describing needs no torch; the record's module imports it
    from rankwise.compress.metadata import CompressionResult

# an achieved ratio further than this from the requested one is reported (rank rounding, small matrices)
RATIO_TOLERANCE = 0.01


def pipeline_name(result: CompressionResult) -> str:
    """The whole pipeline in one line: method (and its options), rank allocation, refit, EoRA rank."""
    options = "".join(f" {k}={v:g}" for k, v in result.method_options.items())
    allocation = f"{result.ranks_allocation} ranks"
    if result.rank_multiple > 1:
        allocation += f" (multiple of {result.rank_multiple})"
    parts = [result.method + options, allocation]
    if result.refit:
        parts.append("refit")
    if result.compensate == "eora":
        parts.append(f"EoRA rank {result.eora_rank}")
    return " + ".join(parts)


def ratio_warning(result: CompressionResult) -> str | None:
    """One line when the achieved ratio misses the requested one by more than RATIO_TOLERANCE."""
    if abs(result.ratio_achieved - result.ratio_requested) <= RATIO_TOLERANCE:
        return None
    why = f" with --rank-multiple {result.rank_multiple}" if result.rank_multiple > 1 else ""
    return (f"achieved ratio {result.ratio_achieved:.2%} misses the requested {result.ratio_requested:.2%} by "
            f"more than {RATIO_TOLERANCE:.0%}: ranks are whole numbers{why} and the matrices are small")


def block_and_kind(name: str) -> tuple[int | None, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "q_proj"): the decoder block index and the Linear's kind."""
    block = next((int(p) for p in name.split(".") if p.isdigit()), None)
    return block, name.rsplit(".", 1)[-1]
