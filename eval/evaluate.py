"""Evaluate a model (hub id, dense folder, Rankwise checkpoint or GGUF) on perplexity suites and lm-eval tasks."""
from __future__ import annotations

import os
import platform
import time

import torch

from rankwise.calib.data import load_text, resolve_bos, tokenize, validate_source
from rankwise.errors import RankwiseError, first_line
from rankwise.compress.checkpoint import package_versions
from rankwise.compress.metadata import read_result
from rankwise.compress.loading import (check_finite_tensors, load_config, load_model, max_context, normalize_dtype,
                                       resolve_device, resolve_dtype)
from rankwise.eval.generation import check_generation
from rankwise.eval.ppl import perplexity
from rankwise.eval.records import EvalResult, EvalSettings, PplResult


def _compression_record(model_ref: str):
    """The checkpoint's validated compression record (None for a dense model or a GGUF file)."""
    return None if os.path.isfile(model_ref) else read_result(model_ref)


def evaluate_ppl(model_ref: str, sources: list[str], seqlen: int = 2048, dtype: str = "auto",
                 device: str = "auto", batch_size: int = 1, bos: bool | None = None, max_windows: int | None = None,
                 trust_remote_code: bool = False, progress=None, loaded=None) -> dict[str, PplResult]:
    """Token perplexity of each source (eval/ppl.py), the model loaded here unless `loaded` is given."""
    for s in sources:
        validate_source(s)
    if max_windows is not None and max_windows < 1:
        raise RankwiseError(f"--max-windows must be at least 1, got {max_windows}")
    dev = resolve_device(device)
    ctx = max_context(loaded[2] if loaded else load_config(model_ref, trust_remote_code))
    if ctx is not None and seqlen > ctx:
        raise RankwiseError(f"--seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    model, tokenizer, config = loaded or load_model(model_ref, dtype, device, trust_remote_code)
    bos_id = resolve_bos(tokenizer, bos)
    results = {}
    for source in sources:
        ids = tokenize(tokenizer, load_text(source, "test"))
        cb = (lambda done, total, s=source: progress(f"ppl {s}", done, total)) if progress else None
        results[source] = perplexity(model, ids, seqlen, dev, batch_size, bos_id, max_windows, cb)
    return results


def _versions() -> dict:
    import importlib.metadata as md
    out = package_versions()
    for name in ("lm_eval", "datasets", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def load_for_eval(model_ref: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                  gguf_file: str | None = None):
    """(model, tokenizer, config) on the device: our loader, or transformers' GGUF path for a `.gguf` file
    (`model_ref` = the file itself, or a folder / hub id with `gguf_file` naming the file in it)."""
    if gguf_file is None and model_ref.endswith(".gguf"):
        if not os.path.isfile(model_ref):
            raise RankwiseError(f"GGUF file {model_ref!r} does not exist")
        model_ref, gguf_file = os.path.dirname(os.path.abspath(model_ref)), os.path.basename(model_ref)
    if gguf_file is None:
        return load_model(model_ref, dtype, device, trust_remote_code)
    import transformers
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:  # transformers dequantizes GGUF weights to torch tensors (fp32 unless a dtype is given)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_ref, gguf_file=gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_ref, gguf_file=gguf_file, dtype=torch.float32 if torch_dtype == "auto" else torch_dtype,
            device_map=str(dev))
    except Exception as e:
        raise RankwiseError(f"cannot load GGUF {gguf_file!r} from {model_ref!r}: {first_line(e, 300)}") from None
    check_finite_tensors(model.named_parameters(), os.path.join(model_ref, gguf_file))
    model.eval()
    return model, tokenizer, model.config


def check_limit(limit: int | float | None) -> int | float | None:
    """lm-eval's --limit: below 1 a fraction of each task's examples, else a whole number of examples."""
    if limit is None:
        return None
    if limit <= 0:
        raise RankwiseError(f"--limit must be above 0 (a count of examples, or a fraction below 1), got {limit:g}")
    if limit >= 1:
        if limit != int(limit):
            raise RankwiseError(f"--limit above 1 must be a whole number of examples, got {limit:g}")
        return int(limit)
    return float(limit)


def evaluate_model(model_ref: str, ppl: list[str] = (), tasks: list[str] = (), seqlen: int = 2048,
                   max_windows: int | None = None, limit: int | float | None = None, batch_size: int | str = 1,
                   dtype: str = "auto", device: str = "auto", bos: bool | None = None, trust_remote_code: bool = False,
                   progress=None, gguf_file: str | None = None, num_fewshot: int | None = None,
                   bootstrap_iters: int = 1000, seed: int | None = None, log_samples: bool = False,
                   task_set=None, generation: bool = False, reference: str | None = None,
                   max_new_tokens: int = 32) -> EvalResult:
    """All evaluations of one model, loaded once, in one EvalResult (eval/records.py): token perplexity per
    source, lm-eval's metrics per task, the settings, and lm-eval's own sections ("results" with its "acc,none"
    keys, "versions", "n-shot", "higher_is_better", "configs", "config", ...) as extra fields, so that its JSON
    reads as lm-eval output too. With log_samples, `samples` holds lm-eval's per-task samples (written to
    their own files, not into the JSON). Bad input fails before the model is loaded. task_set: the
    eval.zeroshot.TaskSet that resolves task names (default: the local tasks and lm-eval's own). With generation,
    `generation` holds the generation check (eval/generation.py) against `reference` (default: a checkpoint's
    dense source model, else the model itself)."""
    t_start = time.perf_counter()
    ppl, tasks = list(ppl), list(tasks)
    if not ppl and not tasks and not generation:
        raise RankwiseError("nothing to evaluate: give at least one perplexity source or task")
    limit = check_limit(limit)
    if batch_size != "auto" and (not str(batch_size).isdigit() or int(batch_size) < 1):
        raise RankwiseError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
    if max_windows is not None and max_windows < 1:
        raise RankwiseError(f"--max-windows must be at least 1, got {max_windows}")
    dtype = normalize_dtype(dtype)
    for s in ppl:
        validate_source(s)
    if gguf_file is None and not model_ref.endswith(".gguf"):
        load_config(model_ref, trust_remote_code)  # missing path / unknown id: fail before anything heavy
    if generation:
        source = _compression_record(model_ref)
        reference = reference or (source.source_model if source is not None else None) or model_ref
        load_config(reference, trust_remote_code)
    prepared = None
    if tasks:  # unknown tasks and unreachable task data fail here, before the model is loaded
        from rankwise.eval.zeroshot import TaskSet
        task_set = task_set or TaskSet()
        prepared = task_set.prepare(tasks)
    loaded = load_for_eval(model_ref, dtype, device, trust_remote_code, gguf_file)
    model, tokenizer, _ = loaded
    bos = resolve_bos(tokenizer, bos) is not None  # None: the tokenizer's own setting
    dev = next(model.parameters()).device
    ppl_results = {}
    if ppl:  # "auto" means lm-eval's batch-size search; ppl windows are all the same length, 1 is safe
        ppl_batch = 1 if batch_size == "auto" else int(batch_size)
        ppl_results = evaluate_ppl(model_ref, ppl, seqlen, dtype, str(dev), ppl_batch, bos, max_windows,
                                   trust_remote_code, progress, loaded=loaded)
    from rankwise.eval.zeroshot import TaskRun, run_tasks
    run = TaskRun()
    if tasks:
        run = run_tasks(model, tokenizer, prepared, limit, batch_size if batch_size == "auto" else int(batch_size),
                        bos, num_fewshot, bootstrap_iters, task_set, progress, seed, log_samples)
    settings = EvalSettings(ppl=ppl, tasks=tasks, seqlen=seqlen, max_windows=max_windows, limit=limit,
                            batch_size=batch_size, bos=bos, num_fewshot=num_fewshot or 0,
                            bootstrap_iters=bootstrap_iters, dtype=dtype, device=device, seed=seed,
                            generation=generation)
    check = check_generation(model, tokenizer, reference, max_new_tokens, dtype=dtype,
                             trust_remote_code=trust_remote_code) if generation else None
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or \
        platform.machine()
    return EvalResult(model=model_ref, gguf_file=gguf_file, rankwise=_compression_record(model_ref),
                      dtype=str(next(model.parameters()).dtype).replace("torch.", ""), device=str(dev),
                      device_name=device_name, parameters=sum(p.numel() for p in model.parameters()),
                      ppl=ppl_results, tasks=run.metrics, generation=check, settings=settings,
                      package_versions=_versions(),
                      samples=run.samples if log_samples else {},
                      wall_seconds=round(time.perf_counter() - t_start, 2),
                      **run.lm_eval)  # lm-eval's own keys; none of them collides with the ones above
