"""`compress evaluate`: token perplexity suites and lm-eval zero-shot tasks of any loadable model, JSON results."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from rankwise.errors import RankwiseError
from rankwise.cli.common import Bars, app, out_console, quiet_option, use_hub_cache_when_offline, user_errors

# lm-eval's and datasets' own tqdm bars (ours are the rich ones); tqdm reads this when first imported
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _split(value: Optional[str]) -> list[str]:
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def local_sources(sources: list[str], tasks: list[str]) -> list[str]:
    """The local files the evaluation reads: text / jsonl sources and task YAMLs given by path."""
    from rankwise.calib.data import source_path
    return [p for p in (source_path(s) for s in sources) if p] + [t for t in tasks if os.path.exists(t)]


def check_outputs(json_path: Optional[Path], output_path: Optional[Path], overwrite: bool, inputs: list) -> None:
    """Every file the command will write, before the evaluation: never an input (the model, the baseline, a
    text or task file) nor inside one; the JSON and its Markdown never replace a file without --overwrite;
    --output-path (and --log-samples beside it) writes new dated files into a folder that is no input."""
    from rankwise.compress.outputs import check_not_input, check_output_file, check_results_folder
    if json_path is not None:
        check_output_file(json_path, "--json", overwrite, inputs)
        check_output_file(json_path.with_suffix(".md"), "--json's Markdown", overwrite, inputs)
    if output_path is not None and output_path.suffix == ".json":
        check_not_input(output_path, "--output-path", inputs)
        check_results_folder(output_path.parent, "--output-path's folder", inputs)
    elif output_path is not None:
        check_results_folder(output_path, "--output-path", inputs)


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    checkpoint: str = typer.Argument(..., help="Rankwise checkpoint, dense local folder, hub id or .gguf file."),
    ppl: Optional[str] = typer.Option(None, help="Comma-separated token-perplexity sources: wikitext2, c4, ptb, "
                                                 "text:PATH, jsonl:PATH[:field] (test split for hub sets). "
                                                 "Default wikitext2 when no --tasks."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated lm-eval tasks: names (arc_easy, hellaswag, "
                                                   "piqa, winogrande; data from the hub), local task names in "
                                                   "configs/tasks (austen_mc) or paths to task YAMLs."),
    seqlen: Optional[int] = typer.Option(None, help="Perplexity window length in tokens (default 2048, "
                                                    "papers' protocol)."),
    max_windows: Optional[int] = typer.Option(None, help="Score only the first N ppl windows (quick runs)."),
    limit: Optional[float] = typer.Option(None, help="Score only the first N examples of each task, or a "
                                                      "fraction of them below 1 (as lm-eval's --limit)."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per task (default 0: zero-shot)."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Start every ppl window / lm-eval request "
                                       "with BOS (default: as the model's tokenizer does in normal use)."),
    batch_size: str = typer.Option("1", help="Windows / requests per forward pass, or 'auto' (lm-eval's search)."),
    dtype: str = typer.Option("auto", help="auto, fp32 / float32, fp16 / float16, bf16 / bfloat16."),
    device: str = typer.Option("auto", help="auto (cuda when present), cpu, cuda, cuda:N."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file inside CHECKPOINT (folder or hub repo)."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own modeling code from the hub."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON here (+ Markdown beside "
                                                                  "it, same name .md)."),
    baseline: Optional[Path] = typer.Option(None, help="A previous run's JSON (e.g. the dense model): adds delta "
                                                       "columns; with no --ppl/--tasks, repeats its evaluations."),
    output_path: Optional[Path] = typer.Option(None, "--output-path", help="Also write the results as lm-eval "
                                               "does: a folder gets MODEL/results_DATE.json, a .json path "
                                               "gets STEM_DATE.json."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Write lm-eval's per-sample log of every task "
                                     "(samples_TASK_DATE.jsonl beside the --output-path results)."),
    seed: Optional[int] = typer.Option(None, help="lm-eval's seeds (python, numpy, torch, few-shot sampling); "
                                                  "default lm-eval's own."),
    generation_check: bool = typer.Option(False, "--generation-check", help="Greedy answers to a fixed prompt set "
                                          "(chat template applied) scored against --reference's: exact-match rate "
                                          "and first-token agreement, in the JSON's `generation`."),
    reference: Optional[str] = typer.Option(None, help="The model the generation check compares with (default: "
                                            "the checkpoint's dense source model)."),
    max_new_tokens: int = typer.Option(32, help="Generation check: the longest answer, in tokens."),
    overwrite: bool = typer.Option(False, help="Replace the --json file and its Markdown if they exist."),
    quiet: bool = quiet_option(),
):
    """Token perplexity by the papers' protocol and lm-eval zero-shot accuracy, one JSON + Markdown per run."""
    if log_samples and output_path is None:
        raise RankwiseError("--log-samples needs --output-path (where the sample files go), as in lm-eval")
    if json_path is not None and json_path.suffix == ".md":
        raise RankwiseError(f"--json {str(json_path)!r} ends in .md; the Markdown table is written beside the JSON")
    if seqlen is not None and seqlen < 1:
        raise RankwiseError(f"--seqlen must be a positive number of tokens, got {seqlen}")
    sources, task_list = _split(ppl), _split(tasks)
    if ppl is not None and not sources:
        raise RankwiseError("--ppl needs at least one source")
    if tasks is not None and not task_list:
        raise RankwiseError("--tasks needs at least one task")
    if batch_size != "auto" and (not batch_size.isdigit() or int(batch_size) < 1):
        raise RankwiseError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
    base = None
    if baseline:
        from rankwise.eval.results import load_baseline
        base = load_baseline(baseline)
    if base is not None and not sources and not task_list:  # compare like with like: repeat the baseline's run
        s = base.settings
        sources = list(base.ppl)
        # a task run from a YAML path is repeated from that path (its `source`), a hub task by name
        task_list = list(dict.fromkeys(r.source if r.from_yaml else name for name, r in base.tasks.items()))
        seqlen = seqlen if seqlen is not None else s.seqlen
        max_windows = max_windows if max_windows is not None else s.max_windows
        limit = limit if limit is not None else s.limit
        bos = bos if bos is not None else s.bos
    elif not sources and not task_list and not generation_check:
        sources = ["wikitext2"]
    check_outputs(json_path, output_path, overwrite, [checkpoint, baseline, *local_sources(sources, task_list)])
    hub_tasks = []
    if task_list:  # a misspelled name fails here, before torch, transformers or lm-eval load
        from rankwise.eval.zeroshot import TaskSet
        hub_tasks = TaskSet().check_names(task_list)
    use_hub_cache_when_offline([None if gguf_file else checkpoint], sources, hub_tasks)
    from rankwise.eval.evaluate import evaluate_model
    from rankwise.eval.results import add_deltas, markdown, write_output_path, write_results
    with Bars(quiet) as bars:
        result = evaluate_model(checkpoint, sources, task_list, 2048 if seqlen is None else seqlen, max_windows, limit,
                                batch_size if batch_size == "auto" else int(batch_size), dtype, device, bos,
                                trust_remote_code, progress=bars, gguf_file=gguf_file, num_fewshot=num_fewshot,
                                seed=seed, log_samples=log_samples, generation=generation_check,
                                reference=reference, max_new_tokens=max_new_tokens)
    if base is not None:
        add_deltas(result, base, baseline)
    out_console.print(markdown(result), markup=False, highlight=False)
    if result.generation is not None:
        g = result.generation
        out_console.print(f"generation check against {g.reference_model}: exact match {g.exact_match:.0%}, "
                          f"first token {g.first_token_agreement:.0%} of {len(g.answers)} prompts",
                          markup=False, highlight=False)
    if json_path:
        j, m = write_results(result, json_path)
        out_console.print(f"wrote {j} and {m}", markup=False, highlight=False)
    if output_path:
        written = write_output_path(result, output_path)
        out_console.print(f"wrote {', '.join(str(w) for w in written)}", markup=False, highlight=False,
                          soft_wrap=True)
