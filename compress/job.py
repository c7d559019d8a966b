"""One compression job end to end: load, calibrate, compress block by block, write the checkpoint."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from rankwise.calib.chat import mixed_calibration_set
from rankwise.calib.data import load_text, source_path, validate_source
from rankwise.errors import RankwiseError
from rankwise.compress.checkpoint import check_output_dir, save_checkpoint
from rankwise.compress.config import CompressConfig
from rankwise.compress.loading import load_config, load_model, max_context, resolve_device
from rankwise.compress.lowrank import RANKWISE_KEY
from rankwise.compress.metadata import Calibration, CompressionResult
from rankwise.compress.peak_memory import peak_memory, reset_peak_memory
from rankwise.compress.pipeline import Progress, compress_model, refuse_unstreamable
from rankwise.compress.stages.recipe import Recipe
from rankwise.compress.streaming import open_streaming_model


def _set_peak_memory(meta: CompressionResult, device: torch.device) -> None:
    peak = peak_memory(device)
    meta.host_peak_gib, meta.gpu_peak_gib = peak.host_gib, peak.gpu_gib


def job_inputs(cfg: CompressConfig) -> list[str]:
    """Local paths the job reads: --overwrite never deletes them."""
    return [p for p in (cfg.model, source_path(cfg.calib), cfg.calib_chat) if p]


def validate_job(cfg: CompressConfig, output: str | Path, overwrite: bool):
    """Everything that can be checked before loading weights: fail fast, write nothing."""
    check_output_dir(output, overwrite, job_inputs(cfg))
    validate_source(cfg.calib)
    if cfg.calib_chat is not None and not os.path.isfile(cfg.calib_chat):
        raise RankwiseError(f"--calib-chat {cfg.calib_chat!r}: no such file")
    device = resolve_device(cfg.device)
    if cfg.stream_weights:  # the pipeline's own check, before any weight is loaded
        refuse_unstreamable(Recipe.from_config(cfg), cfg)
    config = load_config(cfg.model, cfg.trust_remote_code)
    if getattr(config, RANKWISE_KEY, None):
        raise RankwiseError(f"{cfg.model!r} is already a Rankwise checkpoint: compress its dense source model "
                            f"with the ratio you want instead (`compress compensate` adds EoRA paths to it)")
    ctx = max_context(config)
    if ctx is not None and cfg.seqlen > ctx:
        raise RankwiseError(f"--seqlen {cfg.seqlen} is longer than the model's context ({ctx} tokens)")
    return device, config


def compress_in_memory(cfg: CompressConfig, device: torch.device, progress: Progress | None = None):
    """Load, calibrate and compress; returns (model, tokenizer, meta) without writing anything."""
    t_start = time.perf_counter()
    reset_peak_memory(device)
    text = load_text(cfg.calib, "train")  # a missing or unreachable data set fails before the model loads
    stream = None
    if cfg.stream_weights:  # decoder blocks stay on meta until the pipeline reads them from the checkpoint
        model, tokenizer, stream = open_streaming_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    else:
        model, tokenizer, _ = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                         place_on_device=False)
    if progress:
        progress("load", 1, 1)
    try:
        calib = mixed_calibration_set(tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, bos=cfg.bos,
                                      chat=cfg.calib_chat, chat_fraction=cfg.chat_fraction, text=text)
        meta = compress_model(model, calib.input_ids, cfg, progress, block_source=stream)
        meta.calibration = Calibration(source=calib.source, nsamples=calib.nsamples, seqlen=calib.seqlen,
                                       seed=calib.seed, bos=calib.bos, chat=calib.chat,
                                       chat_windows=calib.chat_windows)
    finally:
        if stream is not None:
            stream.close()
    meta.source_model = cfg.model
    meta.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    meta.compress_seconds = round(time.perf_counter() - t_start, 2)
    _set_peak_memory(meta, device)
    return model, tokenizer, meta


def run_compress(cfg: CompressConfig, output: str | Path, overwrite: bool = False,
                 progress: Progress | None = None) -> CompressionResult:
    t_start = time.perf_counter()
    device, _ = validate_job(cfg, output, overwrite)
    model, tokenizer, meta = compress_in_memory(cfg, device, progress)
    t0 = time.perf_counter()
    save_checkpoint(model, tokenizer, output, meta, overwrite, inputs=job_inputs(cfg))
    meta.save_seconds = round(time.perf_counter() - t0, 2)
    meta.wall_seconds = round(time.perf_counter() - t_start, 2)
    return meta
