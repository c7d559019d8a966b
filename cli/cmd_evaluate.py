"""`compress evaluate`: perplexity (and zero-shot) of any loadable model, JSON results."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from calib.errors import RankwiseError
from cli.common import Bars, _json_default, app, out_console, user_errors


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    checkpoint: str = typer.Argument(..., help="Rankwise checkpoint, dense local folder or hub id."),
    ppl: str = typer.Option("wikitext2", help="Comma-separated perplexity sources: wikitext2, c4, ptb, text:PATH, "
                                              "jsonl:PATH[:field] (test split for hub sets)."),
    seqlen: int = typer.Option(2048, help="Window length in tokens (papers: 2048)."),
    max_windows: Optional[int] = typer.Option(None, help="Score only the first N windows (quick runs); "
                                                         "default all."),
    bos: bool = typer.Option(False, help="Start every window with BOS (Gemma needs it)."),
    batch_size: int = typer.Option(1, help="Windows per forward pass."),
    dtype: str = typer.Option("auto", help="auto, fp32, fp16, bf16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own modeling code from the hub."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
):
    """Token perplexity by the papers' protocol: concatenated text, non-overlapping windows, mean token NLL."""
    from eval.evaluate import evaluate_ppl
    sources = [s.strip() for s in ppl.split(",") if s.strip()]
    if not sources:
        raise RankwiseError("--ppl needs at least one source")
    if batch_size < 1:
        raise RankwiseError(f"--batch-size must be at least 1, got {batch_size}")
    with Bars() as bars:
        result = evaluate_ppl(checkpoint, sources, seqlen, dtype, device, batch_size, bos, max_windows,
                              trust_remote_code, progress=bars)
    t = Table(title=f"perplexity of {checkpoint} (seqlen {seqlen})")
    for col in ("source", "ppl", "windows", "non-finite", "tokens/s"):
        t.add_column(col, justify="right" if col != "source" else "left")
    for source, r in result["ppl"].items():
        t.add_row(source, f"{r['ppl']:.4f}", str(r["windows"]), str(r["nonfinite_windows"]),
                  f"{r['tokens_per_second']:.0f}")
    out_console.print(t)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(f".{json_path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        os.replace(tmp, json_path)
        out_console.print(f"wrote {json_path}")


