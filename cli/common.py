"""Shared CLI pieces: the typer app, one-line user errors, rich progress bars."""
from __future__ import annotations

import functools
import os
import warnings

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rankwise.errors import RankwiseError, RankwiseWarning

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own progress bars and messages only
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    name="compress", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Rankwise: SVD-family low-rank compression of Hugging Face causal LMs, and what it cost in quality.")
console = Console(stderr=True)
out_console = Console()


def calib_source_option():
    """--calib, declared once for every command that calibrates (same default, same help)."""
    return typer.Option("wikitext2", help="Calibration text: wikitext2, c4, ptb, text:PATH or jsonl:PATH[:field].")


def calib_batch_option():
    return typer.Option(4, help="Calibration windows per forward pass.")


def fail(message: str, code: int = 2):
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _show_warning(fallback, message, category, *args, **kwargs):
    """Our warnings as one line on stderr; any other library's as Python shows it."""
    if issubclass(category, RankwiseWarning):
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        fallback(message, category, *args, **kwargs)


def user_errors(fn):
    """Bad input -> one line and exit 2; an unexpected failure -> one line and exit 1 (traceback only with
    RANKWISE_DEBUG=1). Never a traceback to the user by default."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", RankwiseWarning)
                warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
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
