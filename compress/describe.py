"""What a Rankwise checkpoint is, in words: the pipeline in one line, the ratio warning, ranks by block.

Everything here reads the typed CompressionResult (compress/metadata.py); `compress inspect`, the summary of
`compress model` and the header of `compress evaluate` all describe a checkpoint through these functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # describing needs no torch; the record's module imports it
    from rankwise.compress.metadata import CompressionResult

# an achieved ratio further than this from the requested one is reported (rank rounding, small matrices)
RATIO_TOLERANCE = 0.01


def pipeline_label(labels: list[str], preset: str | None) -> str:
    """Stage labels joined in recipe order, and the preset they came from."""
    return " + ".join(labels) + (f" (preset {preset})" if preset else "")


def pipeline_name(result: CompressionResult) -> str:
    """The whole pipeline in one line, from the recipe that ran: every stage but the whole-model passes (which
    the stages name), each with the options it was given beyond its defaults, and the preset."""
    return pipeline_label([r.label for r in result.recipe if r.kind != "pass"], result.preset)


def stage_lines(result: CompressionResult) -> list[str]:
    """One line per stage of the recipe: kind, name, every option, and the record's scalar fields (a mapping or
    list in the record is counted: block-refine's per-block errors are `blocks: 30 entries`)."""
    lines = []
    for run in result.recipe:
        options = ", ".join(f"{k}={_value(v)}" for k, v in run.options.items()) or "no options"
        record = ", ".join(f"{k}={_value(v)}" for k, v in run.record.items())
        lines.append(f"{run.kind} {run.stage}: {options}" + (f"; did: {record}" if record else ""))
    return lines


@dataclass(frozen=True)
class RecordTable:
    """A mapping of mappings in a stage's record, as rows: its key first, then the entries' fields."""
    title: str
    columns: list[str]
    rows: list[list[str]]


def record_tables(result: CompressionResult) -> list[RecordTable]:
    """One table per field of a stage's record that maps keys to records of their own (block-refine's `blocks`:
    per block the error before and after, on the training and the held-out batches, the steps, kept), rows in
    the keys' natural order (block 2 before block 10) and without the prefix they share (`model.layers.`, in the
    title); a column with no value in any row is left out, and an `x_before` column stands just before its
    `x_after`."""
    tables = []
    for run in result.recipe:
        for field, entries in run.record.items():
            if not (isinstance(entries, dict) and entries and all(isinstance(e, dict) for e in entries.values())):
                continue
            named = dict.fromkeys(c for e in entries.values() for c in e)
            columns = _before_after([c for c in named if any(e.get(c) is not None for e in entries.values())])
            prefix = _shared_prefix(list(entries))
            rows = [[key.removeprefix(prefix), *(_cell(entries[key].get(c)) for c in columns)]
                    for key in sorted(entries, key=_natural)]
            title = f"{run.stage}: {field}" + (f" ({prefix}N)" if prefix else "")
            tables.append(RecordTable(title, [field, *columns], rows))
    return tables


def _before_after(columns: list[str]) -> list[str]:
    def place(column: str) -> tuple[int, int]:
        stem = column.removesuffix("_before").removesuffix("_after")
        first = min(i for i, c in enumerate(columns) if c in (stem, f"{stem}_before", f"{stem}_after"))
        return first, column.endswith("_after")
    return sorted(columns, key=place)


def _shared_prefix(keys: list[str]) -> str:
    """The dotted prefix every key shares ("model.layers."), or "" when one key would be left empty."""
    first = keys[0].split(".")
    shared = 0
    while shared < len(first) - 1 and all(k.split(".")[:shared + 1] == first[:shared + 1] for k in keys):
        shared += 1
    return ".".join(first[:shared]) + "." if shared else ""


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _cell(v) -> str:
    return "-" if v is None else _value(v)


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return f"{len(v)} entries"
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]" if len(v) <= 4 else f"{len(v)} entries"
    return str(v)


def budget_asked(result: CompressionResult) -> str:
    """The budget the run was given: a parameter ratio removed, or a size ratio of 16-bit bytes kept."""
    if result.ratio_requested is None:
        return f"size ratio requested {result.size_ratio_requested:g}, achieved {result.size_ratio_achieved:.4f}"
    return f"ratio requested {result.ratio_requested:g}, achieved {result.ratio_achieved:.4f}"


def ratio_warning(result: CompressionResult) -> str | None:
    """One line when the achieved ratio (or size ratio) misses the requested one by more than RATIO_TOLERANCE."""
    if result.ratio_requested is None:
        if abs(result.size_ratio_achieved - result.size_ratio_requested) <= RATIO_TOLERANCE:
            return None
        return (f"achieved size ratio {result.size_ratio_achieved:.2%} misses the requested "
                f"{result.size_ratio_requested:.2%} by more than {RATIO_TOLERANCE:.0%}: ranks are whole numbers "
                f"and the matrices are small")
    if abs(result.ratio_achieved - result.ratio_requested) <= RATIO_TOLERANCE:
        return None
    allocator = next((r for r in result.recipe if r.kind == "allocator"), None)
    multiple = allocator.options.get("rank_multiple", 1) if allocator is not None else 1
    why = f" with --rank-multiple {multiple}" if multiple > 1 else ""
    return (f"achieved ratio {result.ratio_achieved:.2%} misses the requested {result.ratio_requested:.2%} by "
            f"more than {RATIO_TOLERANCE:.0%}: ranks are whole numbers{why} and the matrices are small")


def block_and_kind(name: str) -> tuple[int | None, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "q_proj"): the decoder block index and the Linear's kind."""
    block = next((int(p) for p in name.split(".") if p.isdigit()), None)
    return block, name.rsplit(".", 1)[-1]
