"""`compress store-factors`: a checkpoint's float factors stored as int8, int4 or another float dtype."""
from __future__ import annotations

from pathlib import Path

import typer

from rankwise.errors import RankwiseError
from rankwise.cli.common import app, out_console, use_hub_cache_when_offline, user_errors

STORED_DTYPES = ("bf16", "fp16", "fp32", "int8", "int4")


@app.command("store-factors")
@user_errors
def store_factors_cmd(
    checkpoint: str = typer.Argument(..., help="A Rankwise checkpoint whose factors are floats."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (a Rankwise checkpoint)."),
    factor_dtype: str = typer.Option(..., help="How the factors are stored: bf16, fp16, fp32, int8 (one scale "
                                               "per output) or int4 (one scale per --int4-group inputs)."),
    int4_group: int = typer.Option(32, help="int4 factors: inputs per scale (it must divide the ranks)."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
):
    """Store a checkpoint's factors in another dtype without compressing again: the checkpoint that
    `compress model --factor-dtype` writes at the same ratio (storage is applied after every stage)."""
    if factor_dtype not in STORED_DTYPES:
        raise RankwiseError(f"--factor-dtype {factor_dtype!r}: choose one of {', '.join(STORED_DTYPES)}")
    use_hub_cache_when_offline([checkpoint])
    from transformers import AutoTokenizer

    from rankwise.compress.checkpoint import save_checkpoint
    from rankwise.compress.lowrank import CheckpointError, load_rankwise_model
    from rankwise.compress.metadata import read_result
    from rankwise.compress.outputs import check_output_dir
    from rankwise.compress.storage import check_factor_storage, quantized_storages, restored_result, store_factors
    check_output_dir(output, overwrite, [checkpoint])  # before loading anything
    meta = read_result(checkpoint)
    if meta is None:
        raise RankwiseError(f"{checkpoint!r} is not a Rankwise checkpoint (no config.json with a rankwise section)")
    stored = quantized_storages(meta)
    if stored:
        raise RankwiseError(f"{checkpoint!r} stores its factors as {', '.join(stored)}: only float factors are "
                            "stored anew (quantizing quantized factors again would compound the error)")
    check_factor_storage({}, {n: m.rank for n, m in meta.modules.items()}, factor_dtype, int4_group)
    try:
        model = load_rankwise_model(checkpoint)
    except CheckpointError as e:
        raise RankwiseError(str(e)) from None
    before = meta.targeted_bytes_after
    meta = restored_result(meta, store_factors(model, meta.modules, factor_dtype, int4_group))
    save_checkpoint(model, AutoTokenizer.from_pretrained(checkpoint), output, meta, overwrite, inputs=[checkpoint])
    out_console.print(f"factors stored as {factor_dtype}: targeted Linears {before / 1e6:.1f} MB -> "
                      f"{meta.targeted_bytes_after / 1e6:.1f} MB ({meta.size_ratio_achieved:.2%} of 16 bits)")
    out_console.print(f"wrote {output}", highlight=False, markup=False, soft_wrap=True)
