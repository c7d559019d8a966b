"""`compress`: the Rankwise command line (typer + rich). Commands are thin: they validate, call, report."""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from calib.errors import RankwiseError

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own progress bars and messages only
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    name="compress", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Rankwise: SVD-family low-rank compression of Hugging Face causal LMs, and what it cost in quality.")
console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 2):
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Bad input -> one line and exit 2; an unexpected failure -> one line and exit 1 (traceback only with
    RANKWISE_DEBUG=1). Never a traceback to the user by default."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except RankwiseError as e:
            fail(str(e))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            fail(f"invalid {where}: {msg}" if where else msg)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        except Exception as e:  # pragma: no cover - genuine bugs
            if os.environ.get("RANKWISE_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                 " (set RANKWISE_DEBUG=1 for a traceback)", 1)
    return wrapper


class Bars:
    """A rich progress display fed by the library's (stage, done, total) callbacks."""

    def __init__(self):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False,
                                 disable=not console.is_terminal and not os.environ.get("RANKWISE_PROGRESS"))
        self.tasks = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int):
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def summary_table(meta: dict) -> Table:
    t = Table(title=f"Rankwise: {meta['method']} on {meta['source_model']}", show_header=True)
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("removed", justify="right")
    t.add_row("targeted Linear params", _fmt(meta["targeted_params_before"]), _fmt(meta["targeted_params_after"]),
              f"{meta['ratio_achieved']:.2%} (asked {meta['ratio_requested']:.2%})")
    t.add_row("whole model params", _fmt(meta["model_params_before"]), _fmt(meta["model_params_after"]),
              f"{meta['model_ratio_achieved']:.2%}")
    mem = f"host {meta['host_peak_gib']:.2f} GiB" + (f", GPU {meta['gpu_peak_gib']:.2f} GiB"
                                                      if "gpu_peak_gib" in meta else "")
    t.caption = (f"factorized {len(meta['modules'])} Linears, kept dense {len(meta['kept_dense'])}; "
                 f"wall {meta['wall_seconds']:.1f} s; peak memory {mem}")
    return t


@app.command("model")
@user_errors
def model_cmd(
    model: str = typer.Argument(..., help="Hub id (e.g. HuggingFaceTB/SmolLM2-135M) or local checkpoint folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for the compressed checkpoint."),
    method: str = typer.Option("svd-llm", "--method", "-m",
                               help="Factorization: svd (plain), asvd (activation-scaled), svd-llm (whitened)."),
    ratio: float = typer.Option(..., "--ratio", "-r",
                                help="Fraction of the targeted Linear parameters REMOVED, in (0, 1): 0.2 keeps 80%."),
    calib: str = typer.Option("wikitext2", help="Calibration text: wikitext2, c4, ptb, text:PATH or "
                                                "jsonl:PATH[:field]."),
    nsamples: int = typer.Option(256, help="Number of random calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window (at most the model's context)."),
    seed: int = typer.Option(0, help="Seed of the window sampling (same seed, same windows)."),
    batch_size: int = typer.Option(4, help="Calibration windows per forward pass."),
    alpha: float = typer.Option(0.5, help="ASVD: exponent on mean |x| in the channel scaling."),
    rank_multiple: int = typer.Option(1, help="Round every rank down to a multiple of this (GPU-friendly shapes)."),
    dtype: str = typer.Option("auto", help="Weights dtype: auto (checkpoint's on GPU, fp32 on CPU), fp32, fp16, bf16."),
    device: str = typer.Option("auto", help="Where blocks are calibrated and factorized: auto, cpu, cuda, cuda:N."),
    offload: bool = typer.Option(False, help="Keep calibration activations and statistics on CPU (saves GPU memory)."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own modeling code from the hub."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
):
    """Compress a causal LM: calibrate on real text, factorize every decoder Linear, write a checkpoint."""
    from compress.config import CompressConfig
    from compress.job import run_compress
    cfg = CompressConfig(model=model, method=method, ratio=ratio, calib=calib, nsamples=nsamples, seqlen=seqlen,
                         seed=seed, batch_size=batch_size, alpha=alpha, rank_multiple=rank_multiple, dtype=dtype,
                         device=device, offload=offload, trust_remote_code=trust_remote_code)
    with Bars() as bars:
        meta = run_compress(cfg, output, overwrite, bars)
    out_console.print(summary_table(meta))
    out_console.print(f"wrote {output}")


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


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


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
