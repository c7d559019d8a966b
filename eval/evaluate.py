"""Evaluate a model (hub id, dense folder or Rankwise checkpoint) on perplexity suites; JSON results."""
from __future__ import annotations

import time


from calib.data import load_text, tokenize, validate_source
from calib.errors import RankwiseError
from compress.checkpoint import read_meta
from compress.loading import load_config, load_model, max_context, resolve_device
from eval.ppl import perplexity


def evaluate_ppl(model_ref: str, sources: list[str], seqlen: int = 2048, dtype: str = "auto",
                 device: str = "auto", batch_size: int = 1, bos: bool = False, max_windows: int | None = None,
                 trust_remote_code: bool = False, progress=None, loaded=None) -> dict:
    for s in sources:
        validate_source(s)
    if max_windows is not None and max_windows < 1:
        raise RankwiseError(f"--max-windows must be at least 1, got {max_windows}")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    ctx = max_context(loaded[2] if loaded else load_config(model_ref, trust_remote_code))
    if ctx is not None and seqlen > ctx:
        raise RankwiseError(f"--seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    model, tokenizer, config = loaded or load_model(model_ref, dtype, device, trust_remote_code)
    bos_id = None
    if bos:
        bos_id = tokenizer.bos_token_id
        if bos_id is None:
            raise RankwiseError("--bos given but the tokenizer has no BOS token")
    results = {}
    for source in sources:
        ids = tokenize(tokenizer, load_text(source, "test"))
        cb = (lambda done, total, s=source: progress(f"ppl {s}", done, total)) if progress else None
        results[source] = perplexity(model, ids, seqlen, dev, batch_size, bos_id, max_windows, cb)
    return {
        "model": model_ref,
        "rankwise": read_meta(model_ref),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(dev),
        "ppl": results,
        "settings": {"seqlen": seqlen, "batch_size": batch_size, "bos": bos, "max_windows": max_windows},
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }


def evaluate_model(model_ref: str, ppl: list[str] = (), tasks: list[str] = (), seqlen: int = 2048,
                   max_windows: int | None = None, limit: int | None = None, batch_size: int | str = 1,
                   dtype: str = "auto", device: str = "auto", bos: bool = False, trust_remote_code: bool = False,
                   progress=None) -> dict:
    """All evaluations of one model in one result dict: {"model", "rankwise", "ppl": {source: {...}},
    "tasks": {task: {metric: value, metric_stderr: value}}, "settings", "wall_seconds", ...}."""
    if tasks:
        raise RankwiseError("zero-shot tasks are not supported yet")
    result = evaluate_ppl(model_ref, list(ppl), seqlen, dtype, device, 1 if batch_size == "auto" else int(batch_size),
                          bos, max_windows, trust_remote_code, progress)
    result["tasks"] = {}
    return result
