"""Result files of `compress evaluate`: one JSON per run, a Markdown table beside it, deltas against a baseline.

Token perplexity (our protocol, eval/ppl.py) and lm-eval's metrics live in separate sections and separate
tables: lm-eval's `wikitext` reports *word* perplexity on document-level text, a different number. The records
themselves are in eval/records.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import ValidationError

from rankwise.compress.describe import budget_asked, pipeline_name
from rankwise.compress.outputs import write_text_atomic, write_texts_atomic
from rankwise.errors import RankwiseError
from rankwise.eval.records import BaselineRef, Deltas, EvalResult


def load_baseline(path: str | Path) -> EvalResult:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RankwiseError(f"baseline {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RankwiseError(f"cannot read baseline {str(p)!r}: {e}") from None
    try:
        return EvalResult.model_validate(data)
    except (ValidationError, RankwiseError) as e:
        why = e.errors()[0] if isinstance(e, ValidationError) else {"loc": (), "msg": str(e)}
        where = ".".join(str(x) for x in why["loc"])
        raise RankwiseError(f"baseline {str(p)!r} is not a `compress evaluate` result JSON "
                            f"({where + ': ' if where else ''}{why['msg']})") from None


def add_deltas(result: EvalResult, baseline: EvalResult, baseline_path: str | Path) -> EvalResult:
    """result.deltas: ppl per source (this - baseline) and metric per task (this - baseline). Perplexities are
    compared only when measured the same way (seqlen, BOS, windows)."""
    deltas, notes = Deltas(), []
    for source, r in result.ppl.items():
        b = baseline.ppl.get(source)
        if b is None:
            continue
        if not r.measured_like(b):
            notes.append(f"ppl {source}: baseline measured with other seqlen/BOS/windows; no delta")
            continue
        deltas.ppl[source] = r.ppl - b.ppl if math.isfinite(r.ppl) and math.isfinite(b.ppl) else float("inf")
    for task, r in result.tasks.items():
        b = baseline.tasks.get(task)
        if b is None:
            continue
        if b.samples != r.samples:
            notes.append(f"task {task}: baseline scored {b.samples} samples, this run {r.samples}")
        deltas.tasks[task] = {metric: value - b.metrics[metric] for metric, value in r.metrics.items()
                              if value is not None and b.metrics.get(metric) is not None}
    result.baseline = BaselineRef(path=str(baseline_path), model=baseline.model, notes=notes)
    result.deltas = deltas
    return result


def _fmt(x: float | None, digits=4) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def _signed(x: float | None, digits=4) -> str:
    return "-" if x is None else (f"{x:+.{digits}f}" if math.isfinite(x) else str(x))


def _ppl_table(result: EvalResult) -> list[str]:
    deltas = result.deltas
    head = ["source", "token ppl"] + (["Δ ppl"] if deltas is not None else []) + \
        ["seqlen", "windows", "non-finite", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for source, r in result.ppl.items():
        row = [source, _fmt(r.ppl)]
        if deltas is not None:
            row.append(_signed(deltas.ppl.get(source)))
        row += [str(r.seqlen), str(r.windows), str(r.nonfinite_windows), _fmt(r.tokens_per_second, 0)]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _task_table(result: EvalResult) -> list[str]:
    deltas = result.deltas
    head = ["task (lm-eval)", "metric", "value", "± stderr"] + (["Δ"] if deltas is not None else []) + \
        ["samples", "requests/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    word_ppl = False
    for task, r in result.tasks.items():
        for metric, value in r.metrics.items():
            word_ppl |= "perplexity" in metric
            row = [task, metric, _fmt(value), _fmt(r.stderr.get(metric))]
            if deltas is not None:
                row.append(_signed(deltas.tasks[task].get(metric) if task in deltas.tasks else None))
            row += [str(r.samples), _fmt(r.requests_per_second, 1)]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if word_ppl:
        lines += ["lm-eval's perplexity metrics (e.g. `wikitext` word_perplexity) are per word/byte on "
                  "document-level text: not comparable with the token ppl above.", ""]
    return lines


def markdown(result: EvalResult) -> str:
    """The run as Markdown: a token-perplexity table and an lm-eval table, with deltas when present."""
    lines = [f"# {result.model}", ""]
    info = result.rankwise
    if info is not None:
        lines += [f"Rankwise checkpoint: {pipeline_name(info)}; {budget_asked(info)}.", ""]
    lines += [f"dtype {result.dtype}, device {result.device} ({result.device_name}), "
              f"wall time {result.wall_seconds} s.", ""]
    if result.baseline is not None:
        lines += [f"Deltas against baseline `{result.baseline.path}` ({result.baseline.model}).", ""]
    if result.ppl:
        lines += _ppl_table(result)
    if result.tasks:
        lines += _task_table(result)
    for note in result.baseline.notes if result.baseline is not None else []:
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _results_json(result: EvalResult) -> str:
    """The result as JSON text; per-sample logs go to their own files, not into it."""
    return json.dumps(result.to_json(), indent=2, default=str) + "\n"


def write_results(result: EvalResult, json_path: str | Path) -> tuple[Path, Path]:
    """JSON at `json_path` and Markdown beside it (same name, .md), written together atomically."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_texts_atomic({json_path: _results_json(result), md_path: markdown(result)})
    return json_path, md_path


def write_output_path(result: EvalResult, output_path: str | Path) -> list[Path]:
    """lm-eval's --output_path layout: a folder gets MODEL/results_DATE.json (MODEL the sanitized model name),
    a path ending in .json gets STEM_DATE.json beside it; per-task samples_TASK_DATE.jsonl go next to the
    results file when the run logged samples."""
    from datetime import datetime

    from lm_eval.utils import handle_non_serializable, sanitize_model_name
    path = Path(output_path)
    date_id = datetime.now().isoformat().replace(":", "-")
    if path.suffix == ".json":
        folder, results_file = path.parent, path.with_name(f"{path.stem}_{date_id}.json")
    else:
        folder = path / sanitize_model_name(result.model)
        results_file = folder / f"results_{date_id}.json"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results_file, _results_json(result))
    written = [results_file]
    for task, samples in result.samples.items():
        lines = "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in samples)
        written.append(folder / f"samples_{task}_{date_id}.jsonl")
        write_text_atomic(written[-1], lines)
    return written
