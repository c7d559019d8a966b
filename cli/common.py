"""Shared CLI pieces: the typer app, one-line user errors, progress (bars on a terminal, log lines elsewhere)."""
from __future__ import annotations

import functools
import inspect
import math
import os
import socket
import sys
import time
import warnings
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from rankwise import __version__
from rankwise.errors import RankwiseError, RankwiseWarning

if TYPE_CHECKING:  # the CLI's import stays free of torch until a command runs
    from rankwise.compress.metadata import CompressionResult

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own progress bars and messages only
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# -h as well as --help; help text wrapped at 80 columns whatever the terminal's width (click's plain help
# formatter honours max_content_width; typer's rich one takes the terminal's width, hence rich_markup_mode=None)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 80}
app = typer.Typer(
    name="compress", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings=CONTEXT, rich_markup_mode=None,
    help="Rankwise: SVD-family low-rank compression of Hugging Face causal LMs, and what it cost in quality.")
console = Console(stderr=True)
# results (Markdown tables, summaries) are never wrapped at the console's width: a row piped through `| tee`
# or into a file stays one line (on a terminal the terminal wraps what is too long)
out_console = Console(soft_wrap=True)


def _print_version(value: bool):
    if value:
        out_console.print(f"rankwise {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Rankwise: SVD-family low-rank compression of Hugging Face causal LMs, and what it cost in quality."""


def quiet_option():
    return typer.Option(False, "--quiet", "-q", help="No progress output (the result is still printed).")


def eora_rank_option(help_text: str):
    """--eora-rank, one default for every command that fits EoRA paths."""
    from rankwise.compress.defaults import EORA_RANK_DEFAULT
    return typer.Option(EORA_RANK_DEFAULT, "--eora-rank", help=help_text)


def calib_source_option():
    """--calib, declared once for every command that calibrates (same default, same help)."""
    return typer.Option("wikitext2", help="Calibration text: wikitext2, c4, ptb, text:PATH or jsonl:PATH[:field].")


def calib_batch_option():
    return typer.Option(4, help="Calibration windows per forward pass.")


def fail(message: str, code: int = 2):
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _show_warning(fallback, message, category, *args, **kwargs):
    """Our warnings as one line on stderr; any other library's as Python shows it."""
    if issubclass(category, RankwiseWarning):
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        fallback(message, category, *args, **kwargs)


def _flag(name: str, declared) -> str:
    """How the user writes a command's parameter: its longest --flag as declared (typer.Option's
    param_decls), else typer's default spelling of the name."""
    flags = [d for d in getattr(declared, "param_decls", None) or () if d.startswith("--")]
    return max(flags, key=len) if flags else "--" + name.replace("_", "-")


def check_finite(fn, values: dict) -> None:
    """Every number a command was given is finite (click's FLOAT parses "inf" and "nan"): checked here, at
    parse time, for every option of every command, before any work."""
    params = inspect.signature(fn).parameters
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            declared = params[name].default if name in params else None
            raise RankwiseError(f"{_flag(name, declared)} must be a finite number, got {value}")


def user_errors(fn):
    """Bad input -> one line and exit 2; an unexpected failure -> one line and exit 1 (traceback only with
    RANKWISE_DEBUG=1). Never a traceback to the user by default."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_finite(fn, kwargs)
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


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub (HF_ENDPOINT) opens within `timeout`; behind a proxy, the libraries decide."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def use_hub_cache_when_offline(models: list[str | None], texts: list[str] = (), tasks: list[str] = ()) -> None:
    """Before anything reaches the hub: when a model named by hub id (not a local path), a hub text source or
    an lm-eval task (`tasks`, data from the hub) is asked for and the hub cannot be reached, fail at once for a
    model the hub cache does not hold, else switch the hub libraries to their cache (HF_HUB_OFFLINE) and say
    so: one line, not minutes of retries."""
    hub_models = [m for m in models if m and not os.path.exists(m) and not m.endswith(".gguf")]
    from rankwise.calib.data import HUB_SOURCES
    hub_data = [d for d in texts if d in HUB_SOURCES] + list(tasks)
    if not (hub_models or hub_data) or _offline_requested() or _hub_reachable():
        return
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    for ref in hub_models:
        if not _in_hub_cache(ref):
            raise RankwiseError(f"{ref!r} is not a local folder and the hub ({url}) cannot be reached: give a local "
                                f"checkpoint folder (offline, HF_HUB_OFFLINE=1 uses the hub cache only)")
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module in ("huggingface_hub.constants", "datasets.config"):  # already imported: read at import time
        if module in sys.modules:
            sys.modules[module].HF_HUB_OFFLINE = True
    warnings.warn(f"the hub ({url}) cannot be reached: models and data sets come from the hub cache only "
                  f"(as with HF_HUB_OFFLINE=1); use local files (text:PATH) for anything not cached",
                  RankwiseWarning, stacklevel=2)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LogLines:
    """Progress as plain lines (stage, step i/N, elapsed, ETA) for logs that are not a terminal (nohup, SLURM,
    CI): a stage's first and last step, and at most one line per `interval` seconds in between. A stage whose
    first report is already past step 0 started when the previous report came (the stages run one after
    another), so its elapsed time and ETA count that first step too."""

    def __init__(self, out: Console, interval: float):
        self.out, self.interval = out, interval
        self.started: dict[str, float] = {}
        self.last_line: dict[str, float] = {}
        self.last_report = time.monotonic()

    def __call__(self, stage: str, done: int, total: int):
        now = time.monotonic()
        start = self.started.setdefault(stage, now if done == 0 else self.last_report)
        self.last_report = now
        if done < total and stage in self.last_line and now - self.last_line[stage] < self.interval:
            return
        self.last_line[stage] = now
        elapsed = now - start
        eta = elapsed / done * (total - done) if done else None
        self.out.print(f"{time.strftime('%H:%M:%S')} {stage}: {done}/{total}, elapsed {_duration(elapsed)}, "
                       f"ETA {_duration(eta)}", highlight=False, markup=False, soft_wrap=True)


class Bars:
    """Progress for the library's (stage, done, total) callbacks: rich bars with ETA on a terminal, periodic log
    lines otherwise (every RANKWISE_LOG_INTERVAL seconds, default 30), nothing with quiet=True."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bars = console.is_terminal and not quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                                 transient=False, disable=not self.bars)
        self.lines = LogLines(console, float(os.environ.get("RANKWISE_LOG_INTERVAL", "30")))
        self.tasks = {}

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # e.g. "Writing model shards": these bars or lines are the only ones
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int):
        if self.quiet:
            return
        if not self.bars:
            self.lines(stage, done, total)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def ratio_table(meta: CompressionResult, title: str) -> Table:
    """Parameters before and after, and the ratios asked and achieved (with and without the EoRA paths):
    the table `compress model` ends with and `compress inspect` shows."""
    t = Table(title=title, show_header=True)
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("removed", "right")):
        t.add_column(col, justify=justify)
    asked = f" (asked {meta.ratio_requested:.2%})" if meta.ratio_requested is not None else ""
    t.add_row("targeted Linear params", f"{meta.targeted_params_before:,}", f"{meta.targeted_params_after:,}",
              f"{meta.ratio_achieved:.2%}{asked}")
    if meta.compensation_params:
        t.add_row("  without the EoRA paths", "", f"{meta.targeted_params_after - meta.compensation_params:,}",
                  f"{meta.ratio_achieved_without_compensation:.2%}")
    t.add_row("whole model params", f"{meta.model_params_before:,}", f"{meta.model_params_after:,}",
              f"{meta.model_ratio_achieved:.2%}")
    if meta.targeted_bytes_before:  # before: at 16 bits per weight; after: as stored (factor dtype, scales)
        asked = f", asked {meta.size_ratio_requested:.2%}" if meta.size_ratio_requested is not None else ""
        kept = f"{1 - meta.size_ratio_achieved:.2%} (kept {meta.size_ratio_achieved:.2%}{asked})"
        t.add_row("targeted Linear bytes (16-bit before)", f"{meta.targeted_bytes_before:,}",
                  f"{meta.targeted_bytes_after:,}", kept)
    return t
