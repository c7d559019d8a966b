"""`compress compensate`: EoRA residual paths for a model compressed by anything (same layer names)."""
from __future__ import annotations

from pathlib import Path

import typer

from rankwise.cli.common import (Bars, app, calib_batch_option, calib_source_option, eora_rank_option, out_console,
                                 quiet_option, use_hub_cache_when_offline, user_errors)


@app.command("compensate")
@user_errors
def compensate_cmd(
    original: str = typer.Argument(..., help="The dense model the compressed one was made from (hub id or folder)."),
    compressed: str = typer.Argument(..., help="The compressed model (Rankwise checkpoint, pruned or other "
                                               "dense-weight model with the same layer names)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (a Rankwise checkpoint)."),
    eora_rank: int = eora_rank_option("Rank of the residual path of every compensated Linear."),
    calib: str = calib_source_option(),
    nsamples: int = typer.Option(64, help="Number of random calibration windows (EoRA's recipe: 64)."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed of the window sampling."),
    batch_size: int = calib_batch_option(),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    quiet: bool = quiet_option(),
):
    """EoRA: add to every layer of COMPRESSED a low-rank path fitted to ORIGINAL's layer on ORIGINAL's inputs."""
    use_hub_cache_when_offline([original, compressed], [calib])
    from rankwise.compress.compensate import run_compensate
    with Bars(quiet) as bars:
        meta = run_compensate(original, compressed, output, eora_rank, calib, nsamples, seqlen, seed, batch_size,
                              device, overwrite, bars)
    share = meta.compensation_params / meta.targeted_params_before
    removed = (f"; ratio {meta.ratio_achieved_without_compensation:.2%} -> {meta.ratio_achieved:.2%}"
               if meta.ratio_achieved_without_compensation > 0 else "")  # a pruned or quantized model removed none
    out_console.print(f"compensated {sum(1 for m in meta.modules.values() if m.lora_rank)} Linears "
                      f"(rank {eora_rank}, +{meta.compensation_params:,} parameters, {share:.2%} of the targeted)"
                      f"{removed}")
    out_console.print(f"wrote {output}")
