"""Result files of `compress evaluate`: one JSON per run, a Markdown table beside it, deltas against a baseline.

Token perplexity (our protocol, eval/ppl.py) and lm-eval's metrics live in separate sections and separate
tables: lm-eval's `wikitext` reports *word* perplexity on document-level text, a different number.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from rankwise.errors import RankwiseError
from rankwise.compress.describe import pipeline_name
from rankwise.compress.metadata import parse_result
from rankwise.compress.outputs import write_text_atomic

STDERR = "_stderr"
# bookkeeping keys in a task's result dict that are not metrics
TASK_INFO = ("samples", "requests", "seconds", "requests_per_second", "source")


def _json_default(o):
    return str(o)


def _clean(o):
    """JSON has no inf/nan: write them as strings ("inf"), never as invalid JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def task_metrics(task_result: dict) -> dict[str, float | None]:
    """metric -> value for one task (stderr and bookkeeping keys excluded)."""
    return {k: v for k, v in task_result.items() if k not in TASK_INFO and not k.endswith(STDERR)}


def load_baseline(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RankwiseError(f"baseline {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RankwiseError(f"cannot read baseline {str(p)!r}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ppl"), dict) or not isinstance(data.get("tasks"), dict):
        raise RankwiseError(f"baseline {str(p)!r} is not a `compress evaluate` result JSON (no ppl/tasks sections)")
    return data


def _num(x):
    try:
        return float(x)  # "inf" strings from JSON come back as floats
    except (TypeError, ValueError):
        return None


def add_deltas(result: dict, baseline: dict, baseline_path: str | Path) -> dict:
    """result["deltas"] = {"ppl": {source: this - baseline}, "tasks": {task: {metric: this - baseline}}}.
    Perplexities are compared only when measured the same way (seqlen, BOS, windows)."""
    deltas, notes = {"ppl": {}, "tasks": {}}, []
    for source, r in result.get("ppl", {}).items():
        b = baseline["ppl"].get(source)
        if b is None:
            continue
        same = all(r.get(k) == b.get(k) for k in ("seqlen", "bos", "windows"))
        if not same:
            notes.append(f"ppl {source}: baseline measured with other seqlen/BOS/windows; no delta")
            continue
        this, base = _num(r.get("ppl")), _num(b.get("ppl"))
        if this is not None and base is not None:
            deltas["ppl"][source] = this - base if math.isfinite(this) and math.isfinite(base) else float("inf")
    for task, r in result.get("tasks", {}).items():
        b = baseline["tasks"].get(task)
        if b is None:
            continue
        if b.get("samples") != r.get("samples"):
            notes.append(f"task {task}: baseline scored {b.get('samples')} samples, this run {r.get('samples')}")
        d = {}
        for metric, value in task_metrics(r).items():
            this, base = _num(value), _num(b.get(metric))
            if this is not None and base is not None:
                d[metric] = this - base
        deltas["tasks"][task] = d
    result["baseline"] = {"path": str(baseline_path), "model": baseline.get("model"), "notes": notes}
    result["deltas"] = deltas
    return result


def _fmt(x, digits=4) -> str:
    x = _num(x)
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def _signed(x, digits=4) -> str:
    return "-" if x is None else (f"{x:+.{digits}f}" if math.isfinite(x) else str(x))


def markdown(result: dict) -> str:
    """The run as Markdown: a token-perplexity table and an lm-eval table, with deltas when present."""
    deltas = result.get("deltas")
    lines = [f"# {result['model']}", ""]
    meta = result.get("rankwise")
    if meta:
        info = parse_result(meta, "results")
        lines += [f"Rankwise checkpoint: {pipeline_name(info)}; ratio requested {info.ratio_requested:g}, achieved "
                  f"{info.ratio_achieved:.4f}.", ""]
    lines += [f"dtype {result.get('dtype')}, device {result.get('device')} ({result.get('device_name')}), "
              f"wall time {result.get('wall_seconds')} s.", ""]
    if deltas is not None:
        lines += [f"Deltas against baseline `{result['baseline']['path']}` ({result['baseline']['model']}).", ""]
    if result.get("ppl"):
        head = ["source", "token ppl"] + (["Δ ppl"] if deltas is not None else []) + \
               ["seqlen", "windows", "non-finite", "tokens/s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for source, r in result["ppl"].items():
            row = [source, _fmt(r["ppl"])]
            if deltas is not None:
                row.append(_signed(deltas["ppl"].get(source)))
            row += [str(r["seqlen"]), str(r["windows"]), str(r["nonfinite_windows"]),
                    _fmt(r["tokens_per_second"], 0)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if result.get("tasks"):
        head = ["task (lm-eval)", "metric", "value", "± stderr"] + (["Δ"] if deltas is not None else []) + \
               ["samples", "requests/s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        word_ppl = False
        for task, r in result["tasks"].items():
            for metric, value in task_metrics(r).items():
                word_ppl |= "perplexity" in metric
                row = [task, metric, _fmt(value), _fmt(r.get(metric + STDERR))]
                if deltas is not None:
                    row.append(_signed(deltas["tasks"].get(task, {}).get(metric)))
                row += [str(r.get("samples")), _fmt(r.get("requests_per_second"), 1)]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if word_ppl:
            lines += ["lm-eval's perplexity metrics (e.g. `wikitext` word_perplexity) are per word/byte on "
                      "document-level text: not comparable with the token ppl above.", ""]
    for note in (result.get("baseline") or {}).get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _results_json(result: dict) -> str:
    """The result as JSON text; per-sample logs go to their own files, not into it."""
    body = {k: v for k, v in result.items() if k != "samples"}
    return json.dumps(_clean(body), indent=2, default=_json_default) + "\n"


def write_results(result: dict, json_path: str | Path) -> tuple[Path, Path]:
    """JSON at `json_path` and Markdown beside it (same name, .md), each written atomically."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, _results_json(result))
    write_text_atomic(md_path, markdown(result))
    return json_path, md_path


def write_output_path(result: dict, output_path: str | Path) -> list[Path]:
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
        folder = path / sanitize_model_name(str(result["model"]))
        results_file = folder / f"results_{date_id}.json"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results_file, _results_json(result))
    written = [results_file]
    for task, samples in (result.get("samples") or {}).items():
        lines = "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in samples)
        written.append(folder / f"samples_{task}_{date_id}.jsonl")
        write_text_atomic(written[-1], lines)
    return written
