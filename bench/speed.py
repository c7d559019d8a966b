"""Compression cost: time and peak memory of every stage, per block and in total, for each method.

    python bench/speed.py --shape 7b --methods svd-llm --nsamples 256 --seqlen 2048     # on a GPU
    python bench/speed.py --shape 1b --layers 2 --nsamples 8 --seqlen 256 --threads 2   # on CPU
    python bench/speed.py --shape 70b --lazy --no-save --methods svd-llm --nsamples 256 --seqlen 2048
    python bench/speed.py --model /path/to/smollm2-135m --calib text:wiki.txt --json

Row `baseline` (in the default --methods): one dense pass over the same calibration windows forming the Gram
matrix of each distinct Linear input once, what any method reading X^T X must at least do; the "forward work"
column (capture, input-group probe, statistics, propagation, whole-model passes: everything timed but the
decompositions and corrections) is compared with it ("x baseline").

Stages: fisher (FWSVD's whole-model Fisher pass), spectra (WeLore's pass over the dense blocks), output-fisher
and truncation-loss (loss-aware ranks' backward pass and its pass over the dense blocks), capture
(calibration forward up to block 0), statistics (per-Linear input statistics), factorize
(decompositions + new layers + corrections and block refinement, including moving the block to and from the
device), propagate (re-running the
compressed block for the next one), save (checkpoint written to a temporary folder). Stage times are the
pipeline's own (its StageTimer, which times every stage that runs: `pipeline_stage_seconds` in the JSON also
has the input-group probe and each corrector); a block's factorize time is its wall time less its statistics
and propagation. Memory: peak GPU allocation (torch) and peak host RSS, both reset before
every stage window (host via /proc/self/clear_refs on Linux).

A model given by --shape has random weights; with --lazy its blocks are created one at a time just before the
pipeline reaches them, the next one in a background thread while this one is compressed (a 70B shape then
never holds its dense weights in host memory all at once; its compressed blocks still accumulate on the host,
and --no-save avoids writing ~80 GB to disk). A real model streams the same way with --stream-weights (the
product's option: each block read from the checkpoint's safetensors just in time).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _shapes import (  # noqa: I001
    PeakMemory, add_model_source_args, calibration_ids, load_real_model, random_model, thread_note)

import rankwise.compress.pipeline as pipeline
from rankwise.calib.stats import Statistics
from rankwise.compress.arch import block_runner
from rankwise.errors import RankwiseError
from rankwise.compress.checkpoint import save_checkpoint
from rankwise.compress.config import CompressConfig
from rankwise.compress.loading import DTYPE_NAMES, resolve_device
from rankwise.compress.methods import REGISTRY

DEFAULT_METHODS = "baseline,svd,asvd,svd-llm,fwsvd,svd-llm+eora"
BASELINE = "baseline"  # one dense pass forming each distinct input's Gram: the least a data-aware method does
# a method name may carry pipeline options: svd-llm+eora, svd-llm+refit+eora, svd-llm+welore
VARIANTS = {"eora": {"compensate": "eora"}, "refit": {"refit": True}, "welore": {"ranks": "welore"},
            "loss-aware": {"ranks": "loss-aware"}, "sketch": {"fisher_sketch": 256}, "refine": {"refine": True},
            "kl-refine": {"kl_refine": True}}


def parse_variant(name: str) -> tuple[str, dict] | None:
    """'svd-llm+refit+eora' -> ('svd-llm', {...config fields}); None if a part is unknown."""
    base, *extras = name.split("+")
    if base not in REGISTRY or any(e not in VARIANTS for e in extras):
        return None
    options = {}
    for e in extras:
        options.update(VARIANTS[e])
    return base, options
WHOLE_MODEL_STAGES = ("fisher", "spectra", "output-fisher", "truncation-loss", "capture")  # once, before the blocks
MODEL_CORRECTIONS = ("kl-refine",)  # once, after the blocks (its teacher pass before them counts in it too)
STAGES = (*WHOLE_MODEL_STAGES, "statistics", "factorize", "propagate", *MODEL_CORRECTIONS, "save")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--lazy", action="store_true", help="create random blocks one at a time, the next one in a "
                                                       "background thread (--shape only)")
    p.add_argument("--stream-weights", action="store_true", help="read each block from the checkpoint's "
                                                                 "safetensors just in time (--model only)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; a method may carry +eora, "
                   "+refit, +welore, +loss-aware, +sketch (with +loss-aware), +refine, +kl-refine (e.g. "
                   "svd-llm+refit+eora); unknown ones "
                   "are reported as skipped")
    p.add_argument("--eora-rank", type=int, default=32, help="rank of the EoRA path for +eora")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--rank-multiple", type=int, default=1)
    p.add_argument("--calib", default="random", help="'random' token ids, or a calibration source")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--offload", action="store_true", help="keep activations and statistics on CPU")
    p.add_argument("--no-save", action="store_true", help="skip the save stage")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-block", action="store_true", help="also print the per-block table")
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p.parse_args(argv)


class StageRecorder:
    """Listens to the pipeline's own stage timer (compress.pipeline.StageTimer): reads the memory peak of each
    whole-model stage and of each block, and each block's wall time from the per-block progress callback."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mem = PeakMemory(device)
        self.timer = pipeline.StageTimer(device, listener=self)
        self.blocks: list[dict] = []
        # stages a run does not have (plain svd captures nothing; only fwsvd has a Fisher pass) stay at zero
        self.whole = {s: {"seconds": 0.0, "gpu_peak_gib": None, "host_peak_gib": None}
                      for s in (*WHOLE_MODEL_STAGES, *MODEL_CORRECTIONS)}
        self._block_start = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_block(self):
        self.mem.reset()
        self._block_start = time.perf_counter()

    def start(self, stage: str, block: int | None) -> None:
        if block is None:  # a whole-model stage: its own memory window
            self.mem.reset()

    def end(self, stage: str, block: int | None, seconds: float) -> None:
        if block is None:
            peaks, before = self.mem.read(), self.whole.get(stage, {})
            self.whole[stage] = {"seconds": before.get("seconds", 0.0) + seconds,  # a stage may run twice
                                 "gpu_peak_gib": _max([before.get("gpu_peak_gib"), peaks.gpu_gib]),
                                 "host_peak_gib": _max([before.get("host_peak_gib"), peaks.host_gib])}
            self.start_block()

    def progress(self, phase: str, done: int, total: int) -> None:
        if phase != "compress":
            return
        self._sync()
        wall = time.perf_counter() - self._block_start
        peaks = self.mem.read()
        timed = self.timer.per_block[done - 1] if done - 1 < len(self.timer.per_block) else {}
        stats, prop = timed.get("statistics", 0.0), timed.get("propagate", 0.0)
        self.blocks.append({"block": done - 1, "seconds": wall, "statistics": stats, "propagate": prop,
                            "factorize": max(wall - stats - prop, 0.0), "stages": dict(timed),
                            "gpu_peak_gib": peaks.gpu_gib, "host_peak_gib": peaks.host_gib})
        self.start_block()

    def run(self, model, calib_ids, cfg, block_source=None):
        self.start_block()  # the capture restarts it; a data-free run has none
        return pipeline.compress_model(model, calib_ids, cfg, self.progress, block_source=block_source,
                                       timer=self.timer)


def _dtype_for(args, device: torch.device) -> torch.dtype:
    if args.dtype != "auto":
        return DTYPE_NAMES[args.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(args, device):
    """(model, tokenizer, block source or None, description) for one run; a fresh model every call.
    A block source fills the decoder blocks in just before the pipeline reaches each one (next one prefetched
    in a thread): random blocks with --lazy, blocks read from safetensors with --stream-weights."""
    if args.shape:
        if args.stream_weights:
            raise RankwiseError("--stream-weights applies to --model; a --shape model streams with --lazy")
        model, mat = random_model(args.shape, args.layers, _dtype_for(args, device), args.seed, lazy=args.lazy)
        return model, None, mat if args.lazy else None, f"shape:{args.shape}"
    if args.lazy or args.layers:
        raise RankwiseError("--lazy and --layers apply to --shape models only")
    if args.stream_weights:
        from rankwise.compress.streaming import open_streaming_model
        model, tokenizer, stream = open_streaming_model(args.model, args.dtype, args.device)
        return model, tokenizer, stream, args.model
    model, tokenizer = load_real_model(args.model, args.dtype, args.device)
    return model, tokenizer, None, args.model


@torch.no_grad()
def run_baseline(args, device: torch.device) -> dict:
    """The reference for the pipeline's forward work: the same block walk (calib.runner) over the unchanged
    model, capturing block 0's inputs, then per block one dense forward that also forms X^T X of each distinct
    Linear input (q/k/v share one), its output feeding the next block. Timed stages: capture, groups (the
    input-group probe), statistics (the forward with its Grams); nothing is factorized."""
    model, tokenizer, source, desc = build(args, device)
    vocab = model.get_input_embeddings().weight.shape[0]
    calib = calibration_ids(tokenizer, vocab, args.calib, args.nsamples, args.seqlen, args.seed)
    storage = torch.device("cpu") if args.offload else device
    rec = StageRecorder(device)
    timer = rec.timer
    rec.start_block()
    runner = block_runner(model, calib, args.batch_size, device, storage, source, timer, rec.progress)
    try:
        for _ in runner.unchanged(Statistics(xtx=True), "compress"):
            pass
    finally:
        if source is not None:
            source.close()
    stages = {**rec.whole, **{s: {"seconds": sum(b[s] for b in rec.blocks),
                                  "gpu_peak_gib": _max(b["gpu_peak_gib"] for b in rec.blocks),
                                  "host_peak_gib": _max(b["host_peak_gib"] for b in rec.blocks)}
                              for s in ("statistics", "factorize", "propagate")},
              "save": {"seconds": None, "gpu_peak_gib": None, "host_peak_gib": None}}
    return {"method": BASELINE, "model": desc, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "blocks": rec.blocks, "stages": stages, "total_seconds": sum(timer.seconds.values()),
            "gpu_peak_gib": _max(s.get("gpu_peak_gib") for s in stages.values()),
            "host_peak_gib": _max(s.get("host_peak_gib") for s in stages.values()),
            "ratio_achieved": 0.0, "kept_dense": 0, "forward_work_seconds": sum(timer.seconds.values()),
            "pipeline_stage_seconds": {k: round(v, 3) for k, v in timer.seconds.items()}}


def forward_work_seconds(run: dict) -> float:
    """Everything the pipeline timed but the decompositions and corrections: capture, the input-group probe,
    statistics, propagation and the whole-model passes (compare with the baseline row's total)."""
    return sum(v for k, v in run["pipeline_stage_seconds"].items()
               if k in ("groups", "statistics", "propagate", *WHOLE_MODEL_STAGES))


def run_method(args, method: str, device: torch.device) -> dict:
    model, tokenizer, source, desc = build(args, device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    vocab = model.get_input_embeddings().weight.shape[0]
    calib = calibration_ids(tokenizer, vocab, args.calib, args.nsamples, args.seqlen, args.seed)
    base, options = parse_variant(method)
    if options.get("compensate") == "eora":
        options["eora_rank"] = args.eora_rank
    cfg = CompressConfig(model=desc, method=base, **options, ratio=args.ratio, calib=args.calib, nsamples=args.nsamples,
                         seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
                         rank_multiple=args.rank_multiple, device=args.device, offload=args.offload)
    rec = StageRecorder(device)
    t0 = time.perf_counter()
    try:
        meta = rec.run(model, calib, cfg, block_source=source)
    finally:
        if source is not None:
            source.close()
    compress_seconds = time.perf_counter() - t0
    save = {"seconds": None, "gpu_peak_gib": None, "host_peak_gib": None}
    if not args.no_save:
        out_root = Path(tempfile.mkdtemp(prefix="rankwise-speed-"))
        try:
            rec.mem.reset()
            t0 = time.perf_counter()
            save_checkpoint(model, tokenizer, out_root / "ckpt", meta)
            peaks = rec.mem.read()
            save = {"seconds": time.perf_counter() - t0, "gpu_peak_gib": peaks.gpu_gib,
                    "host_peak_gib": peaks.host_gib}
        finally:
            shutil.rmtree(out_root, ignore_errors=True)
    stages = {**rec.whole,
              **{s: {"seconds": sum(b[s] for b in rec.blocks),
                     "gpu_peak_gib": _max(b["gpu_peak_gib"] for b in rec.blocks),
                     "host_peak_gib": _max(b["host_peak_gib"] for b in rec.blocks)}
                 for s in ("statistics", "factorize", "propagate")},
              "save": save}
    total = compress_seconds + (save["seconds"] or 0.0)
    del model
    return {"method": method, "model": desc, "dtype": dtype, "blocks": rec.blocks, "stages": stages,
            "total_seconds": total,
            "gpu_peak_gib": _max(s.get("gpu_peak_gib") for s in stages.values()),
            "host_peak_gib": _max(s.get("host_peak_gib") for s in stages.values()),
            "ratio_achieved": meta.ratio_achieved, "kept_dense": len(meta.kept_dense),
            "pipeline_stage_seconds": meta.stage_seconds, "forward_work_seconds": forward_work_seconds(
                {"pipeline_stage_seconds": meta.stage_seconds})}


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def runs_dtype(result: dict) -> str:
    return ",".join(sorted({r["dtype"] for r in result["runs"] if "dtype" in r})) or result["settings"]["dtype"]


def print_tables(result: dict, per_block: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(width=None if Console().is_terminal else 200)  # no wrapping when piped to a file
    s = result["settings"]
    title = (f"{s['model']}  ratio {s['ratio']}  calib {s['calib']} {s['nsamples']}x{s['seqlen']}  "
             f"device {s['device']} {runs_dtype(result)}  ({s['threads']})")
    table = Table(title=title)
    table.add_column("method")
    for stage in STAGES:
        table.add_column(f"{stage} s", justify="right")
    for col in ("total s", "s/block", "GPU peak GiB", "host peak GiB", "ratio", "forward work s", "x baseline"):
        table.add_column(col, justify="right")
    base = next((r["total_seconds"] for r in result["runs"] if r["method"] == BASELINE), None)
    for r in result["runs"]:
        if "skipped" in r:
            table.add_row(r["method"], *["-"] * (len(STAGES) + 4), r["skipped"], "-", "-")
            continue
        nb = max(len(r["blocks"]), 1)
        per = sum(b["seconds"] for b in r["blocks"]) / nb
        work = r["forward_work_seconds"]
        table.add_row(r["method"], *[_fmt(r["stages"][st]["seconds"]) for st in STAGES], _fmt(r["total_seconds"]),
                      _fmt(per), _fmt(r["gpu_peak_gib"]), _fmt(r["host_peak_gib"]), f"{r['ratio_achieved']:.4f}",
                      _fmt(work), _fmt(work / base) if base else "-")
    console.print(table)
    if per_block:
        for r in result["runs"]:
            if "skipped" in r:
                continue
            bt = Table(title=f"{r['method']} per block")
            for col in ("block", "total s", "statistics s", "factorize s", "propagate s", "GPU peak GiB",
                        "host peak GiB"):
                bt.add_column(col, justify="right")
            for b in r["blocks"]:
                bt.add_row(str(b["block"]), _fmt(b["seconds"]), _fmt(b["statistics"]), _fmt(b["factorize"]),
                           _fmt(b["propagate"]), _fmt(b["gpu_peak_gib"]), _fmt(b["host_peak_gib"]))
            console.print(bt)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = {"model": args.model or f"shape:{args.shape}" + (f" ({args.layers} layers)" if args.layers else ""),
                "ratio": args.ratio, "rank_multiple": args.rank_multiple, "eora_rank": args.eora_rank,
                "calib": args.calib,
                "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                "device": str(device), "dtype": args.dtype,
                "offload": args.offload, "lazy": args.lazy, "stream_weights": args.stream_weights,
                "threads": thread_note(),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    runs = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method == BASELINE:
            runs.append(run_baseline(args, device))
            continue
        if parse_variant(method) is None:
            runs.append({"method": method, "skipped": f"unknown (methods: {', '.join(REGISTRY)}; "
                                                      f"add +{'/+'.join(VARIANTS)})"})
            continue
        try:
            runs.append(run_method(args, method, device))
        except RankwiseError as e:  # e.g. fwsvd on a streamed model: the others still run
            runs.append({"method": method, "skipped": str(e)})
    result = {"settings": settings, "runs": runs}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result, args.per_block)
    return result


if __name__ == "__main__":
    try:
        main()
    except RankwiseError as e:
        raise SystemExit(f"error: {e}")
