"""`compress inspect`: what a Rankwise checkpoint is (pipeline, ratios, ranks, what the stages did per block,
dense layers, calibration)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from rankwise.errors import RankwiseError
from rankwise.cli.common import app, out_console, ratio_table, user_errors
from rankwise.compress.describe import RecordTable, block_and_kind, pipeline_name, record_tables, stage_lines

if TYPE_CHECKING:
    from rankwise.compress.metadata import CompressionResult

# the usual forward order of a decoder block's Linears (metadata keys are sorted by name)
FORWARD_ORDER = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                 "down_proj", "c_attn", "c_proj", "c_fc", "fc1", "fc2", "out_proj"]


def rank_table(info: CompressionResult) -> Table:
    """One row per decoder block, one column per Linear kind: its rank (+ EoRA rank), 'dense' if kept."""
    cells = {block_and_kind(name): (str(m.rank) if m.rank is not None else "dense")
             + (f"+{m.lora_rank}" if m.lora_rank else "") for name, m in info.modules.items()}
    for name in info.kept_dense:
        cells[block_and_kind(name)] = "dense"
    kinds = sorted({kind for _, kind in cells},
                   key=lambda k: (FORWARD_ORDER.index(k) if k in FORWARD_ORDER else len(FORWARD_ORDER), k))
    t = Table(title="Ranks per block" + (" (+ EoRA rank)" if info.compensation_params else ""),
              title_justify="left")
    t.add_column("block", justify="right")
    for kind in kinds:
        t.add_column(kind, justify="right")
    for layer in sorted({k[0] for k in cells}, key=lambda x: -1 if x is None else x):
        t.add_row("-" if layer is None else str(layer), *(cells.get((layer, k), "") for k in kinds))
    return t


def record_table(table: RecordTable) -> Table:
    t = Table(title=table.title, title_justify="left")
    for i, column in enumerate(table.columns):
        t.add_column(column.replace("_", " "), justify="left" if i == 0 else "right", overflow="fold")
    for row in table.rows:
        t.add_row(*row)
    return t


@app.command("inspect")
@user_errors
def inspect_cmd(
    checkpoint: Path = typer.Argument(..., help="A Rankwise checkpoint folder."),
    plot: Optional[Path] = typer.Option(None, help="Also draw the per-block rank heatmap into this PNG."),
    overwrite: bool = typer.Option(False, help="Replace the --plot file if it exists."),
):
    """Show what a checkpoint is: pipeline, ratios, per-module ranks, dense layers, calibration, versions."""
    if not (checkpoint / "config.json").is_file():
        raise RankwiseError(f"{str(checkpoint)!r} is not a checkpoint folder (no config.json)")
    if plot is not None:  # before the work: never into the checkpoint, never over a file without --overwrite
        from rankwise.compress.outputs import check_output_file
        check_output_file(plot, "--plot", overwrite, [checkpoint])
    from rankwise.compress.metadata import read_result
    info = read_result(checkpoint)
    if info is None:
        raise RankwiseError(f"{str(checkpoint)!r} is a dense checkpoint (its config.json has no rankwise section)")
    cal = info.calibration
    out = out_console
    out.print(f"{checkpoint}: Rankwise checkpoint of {info.source_model}", highlight=False, markup=False)
    out.print(f"pipeline: {pipeline_name(info)}", highlight=False, markup=False, soft_wrap=True)
    for line in stage_lines(info):
        out.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    out.print(ratio_table(info, "Parameters removed"))
    if info.targeted_bytes_before:
        dtypes = sorted({m.factor_dtype or "model dtype" for m in info.modules.values() if m.rank is not None})
        asked = f", asked {info.size_ratio_requested:g}" if info.size_ratio_requested is not None else ""
        out.print(f"storage: factors in {', '.join(dtypes) or '-'}; targeted Linears {info.targeted_bytes_after:,} "
                  f"bytes of {info.targeted_bytes_before:,} at 16 bits per weight (size ratio "
                  f"{info.size_ratio_achieved:.4f}{asked})", highlight=False, markup=False, soft_wrap=True)
    out.print(rank_table(info))
    for table in record_tables(info):
        out.print(record_table(table))
    out.print(f"kept dense: {', '.join(info.kept_dense) if info.kept_dense else 'none'}", highlight=False,
              markup=False, soft_wrap=True)
    out.print(f"calibration: {cal.source}, {cal.nsamples} x {cal.seqlen} tokens, seed {cal.seed}",
              highlight=False, markup=False, soft_wrap=True)
    versions = ", ".join(f"{k} {v}" for k, v in info.versions.items())
    out.print(f"format_version {info.format_version}" + (f"; written with {versions}" if versions else ""),
              highlight=False, markup=False, soft_wrap=True)
    if plot is not None:
        from rankwise.eval.report import plot_module_ranks
        title = f"{pipeline_name(info)}\n{Path(info.source_model).name}"
        if not plot_module_ranks(info.modules, title, plot, info.kept_dense):
            raise RankwiseError(f"{str(checkpoint)!r} has no factorized Linear to plot")
        out.print(f"wrote {plot}", highlight=False, markup=False)
