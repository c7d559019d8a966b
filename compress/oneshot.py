"""`rankwise.oneshot`: compress a model object in memory with a recipe, the way a notebook works (the habit of
llm-compressor's `oneshot(model, recipe=..., dataset=...)`): no checkpoint is read or written."""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import nn

from rankwise.calib.chat import mixed_calibration_set
from rankwise.compress.config import CompressConfig
from rankwise.compress.metadata import Calibration, CompressionResult
from rankwise.compress.pipeline import compress_model


def oneshot(model: nn.Module, tokenizer_or_ids, /, *, ratio: float, recipe: Iterable[dict] | None = None,
            preset: str = "none", plugins: Iterable[str] = (), progress=None,
            **options: Any) -> tuple[nn.Module, CompressionResult]:
    """Compress `model` in place and return it with its typed CompressionResult.

    tokenizer_or_ids: a tokenizer (calibration windows are then drawn from `calib=` in options, default wikitext2, with
    `nsamples`, `seqlen`, `seed`, as `compress model` draws them) or the calibration token ids themselves
    ([windows, tokens]). recipe: a list of {"stage": name, "options": {...}}; without one, `preset` or the
    shorthand options (method=, ranks=, refit=, compensate=, refine=, ...) give it. Any other option of
    `compress model` is a keyword here (device=, batch_size=, ...)."""
    t0 = time.perf_counter()
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    settings = dict(model=source, ratio=ratio, preset=preset, plugins=list(plugins), **options)
    if recipe is not None:
        settings["recipe"] = list(recipe)
    cfg = CompressConfig(**settings)
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids
        calibration = Calibration(source="token ids", nsamples=ids.shape[0], seqlen=ids.shape[1], seed=cfg.seed)
    else:
        windows = mixed_calibration_set(tokenizer_or_ids, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed,
                                        bos=cfg.bos, chat=cfg.calib_chat, chat_fraction=cfg.chat_fraction)
        ids = windows.input_ids
        calibration = Calibration(source=windows.source, nsamples=windows.nsamples, seqlen=windows.seqlen,
                                  seed=windows.seed, bos=windows.bos, chat=windows.chat,
                                  chat_windows=windows.chat_windows)
    result = compress_model(model, ids, cfg, progress)
    result.calibration, result.source_model = calibration, source
    result.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    result.compress_seconds = round(time.perf_counter() - t0, 2)
    return model, result
