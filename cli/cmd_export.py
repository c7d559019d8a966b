"""`compress export-peft`: write a checkpoint's EoRA residual paths as a PEFT LoRA adapter."""
from __future__ import annotations

from pathlib import Path

import typer

from rankwise.errors import RankwiseError
from rankwise.cli.common import app, out_console, user_errors


@app.command("export-peft")
@user_errors
def export_peft_cmd(
    checkpoint: str = typer.Argument(..., help="A Rankwise checkpoint made with --compensate eora (or by "
                                               "`compress compensate`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Adapter folder (adapter_model.safetensors + "
                                                            "adapter_config.json with per-module ranks)."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
):
    """Export the EoRA paths as a PEFT adapter for the compressed base (the checkpoint without its paths).

    Load it back with rankwise.compress.peft_export.load_eora_adapter(base, ADAPTER), where base is the checkpoint
    loaded and stripped of its paths (rankwise.compress.peft_export.strip_compensation).
    """
    from rankwise.compress.outputs import atomic_output_dir, check_output_dir
    from rankwise.compress.lowrank import CheckpointError, load_rankwise_model
    from rankwise.compress.metadata import read_result
    from rankwise.compress.peft_export import export_eora_adapter
    check_output_dir(output, overwrite, [checkpoint])  # before loading anything
    if read_result(checkpoint) is None:  # a local folder or a hub id
        raise RankwiseError(f"{checkpoint!r} is not a Rankwise checkpoint (no config.json with a rankwise section)")
    try:
        model = load_rankwise_model(checkpoint)
    except CheckpointError as e:
        raise RankwiseError(str(e)) from None
    with atomic_output_dir(output, overwrite, [checkpoint]) as tmp:
        export_eora_adapter(model, tmp, base_model_name=str(checkpoint))
    out_console.print(f"wrote {output}")
