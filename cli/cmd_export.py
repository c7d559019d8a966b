"""`compress export-peft`: write a checkpoint's EoRA residual paths as a PEFT LoRA adapter."""
from __future__ import annotations

from pathlib import Path

import typer

from rankwise.errors import RankwiseError
from rankwise.cli.common import app, out_console, use_hub_cache_when_offline, user_errors


@app.command("export-peft")
@user_errors
def export_peft_cmd(
    checkpoint: str = typer.Argument(..., help="A Rankwise checkpoint made with --compensate eora (or by "
                                               "`compress compensate`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Adapter folder: adapter_model.safetensors, "
                                                            "adapter_config.json (per-module ranks), README.md "
                                                            "and base/, the checkpoint without its EoRA paths."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
):
    """Export the EoRA paths as a PEFT LoRA adapter, with the base it loads onto (the checkpoint without them).

    Load it with transformers + peft, as the adapter's README.md shows:
    AutoModelForCausalLM.from_pretrained(OUTPUT/base, trust_remote_code=True), then model.load_adapter(OUTPUT).
    """
    use_hub_cache_when_offline([checkpoint])
    from transformers import AutoTokenizer

    from rankwise.compress.checkpoint import save_checkpoint
    from rankwise.compress.outputs import atomic_output_dir, check_output_dir
    from rankwise.compress.lowrank import CheckpointError, load_rankwise_model
    from rankwise.compress.metadata import read_result
    from rankwise.compress.peft_export import BASE_DIR, adapter_card, base_meta, export_eora_adapter
    check_output_dir(output, overwrite, [checkpoint])  # before loading anything
    meta = read_result(checkpoint)
    if meta is None:  # a local folder or a hub id
        raise RankwiseError(f"{checkpoint!r} is not a Rankwise checkpoint (no config.json with a rankwise section)")
    try:
        model = load_rankwise_model(checkpoint)
    except CheckpointError as e:
        raise RankwiseError(str(e)) from None
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with atomic_output_dir(output, overwrite, [checkpoint]) as tmp:
        # base_model_name_or_path names where the base will be once the folder is renamed into place
        export_eora_adapter(model, tmp, base_model_name=str(output.resolve() / BASE_DIR))
        save_checkpoint(model, tokenizer, tmp / BASE_DIR, base_meta(meta))
        n_paths = sum(1 for m in meta.modules.values() if m.lora_rank)
        (tmp / "README.md").write_text(adapter_card(str(output), str(output / BASE_DIR), n_paths))
    out_console.print(f"wrote {output} (adapter, README.md with the load snippet) and {output / BASE_DIR} "
                      "(the base it loads onto)", highlight=False, markup=False, soft_wrap=True)
