"""Inference speed of a compressed model against its dense original: prefill and decode tokens/s.

    python bench/infer.py --shape 7b --ratio 0.4 --device cuda --dtype bf16          # target: decode >= 1.2x
    python bench/infer.py --shape 7b --layers 4 --ratio 0.4 --device cuda --compile compile   # CUDA graphs
    python bench/infer.py --model /path/to/smollm2-135m --ratio 0.4 --threads 2
    python bench/infer.py --model /path/to/dense --checkpoint /path/to/compressed --memory --json
    python bench/infer.py --shape 1b --ratio 0.4 --factor-dtype int8 --threads 2 --memory

The compressed model is either a Rankwise checkpoint (--checkpoint) or made here from the dense one with the
block-sequential pipeline (--method, --ratio, --rank-multiple; random or real calibration tokens: for speed
only the ranks matter, not the quality; --factor-dtype stores its factors as a checkpoint would, e.g. int8,
and re-stores a checkpoint's float factors in memory as `compress model --factor-dtype` writes them).
prefill: one forward of batch x prompt_len tokens (logits of the last position only, as a server would).
decode: greedy steps of batch x 1 token with the KV cache, after a prefill that is not timed.
--compile: none (eager, dynamic cache), static (eager, static cache) or compile (static cache and
torch.compile mode reduce-overhead: CUDA graphs on GPU, inductor C++ kernels on CPU); both models run the same.
Each figure is the median of --reps timed runs, alternating dense and compressed, after one warm-up run (two
with compile; their wall time, mostly compilation, is reported as compile_s).
--memory: resident memory of each model, measured in a fresh process per model (so that neither the other
model nor the timing runs above count): that process builds only its model (dense: loads it; compressed:
loads --checkpoint, or makes it here from the dense one, whose freed pages are handed back to the system
with malloc_trim), then reports its resident set (VmRSS) after loading, its peak while loading, and its peak
while running one prefill and decode at the largest batch (the high-water mark reset in between); on a CUDA
device also the GPU memory torch allocated. Each figure includes the interpreter and torch.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _shapes import (  # noqa: I001
    add_model_source_args, calibration_ids, load_real_model, random_ids, random_model, thread_note)

from rankwise.errors import RankwiseError, first_line
from rankwise.compress.config import CompressConfig
from rankwise.compress.loading import DTYPE_NAMES, load_model, resolve_device
from rankwise.compress.lowrank import FACTOR_DTYPES, INT4_GROUP_DEFAULT, LowRankLinear
from rankwise.compress.metadata import read_result
from rankwise.compress.peak_memory import peak_memory, reset_peak_memory
from rankwise.compress.pipeline import compress_model
from rankwise.compress.storage import check_factor_storage, quantized_storages, store_factors

COMPILE_MODES = ("none", "static", "compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--checkpoint", help="a Rankwise checkpoint of the same model (else compress here)")
    p.add_argument("--method", default="svd-llm")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--rank-multiple", type=int, default=1)
    p.add_argument("--factor-dtype", default="auto", choices=FACTOR_DTYPES,
                   help="how the factors of the model made here are stored (a --checkpoint's float factors: "
                        "re-stored so in memory)")
    p.add_argument("--int4-group", type=int, default=INT4_GROUP_DEFAULT)
    p.add_argument("--keep-dense", default="", help="comma-separated Linear names/suffixes left dense")
    p.add_argument("--layer-table", action="store_true",
                   help="also time every distinct (shape, rank) alone: dense vs factorized")
    p.add_argument("--calib", default="random", help="'random' token ids or a calibration source")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="none: eager, dynamic KV cache; static: eager, static KV cache; compile: static cache + "
                        "torch.compile(mode='reduce-overhead'), i.e. CUDA graphs on GPU (same mode for both models)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true",
                   help="also measure each model's resident memory, each in a fresh process")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--memory-of", choices=["dense", "compressed"], help=argparse.SUPPRESS)  # internal
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args


def _dtype(args, device: torch.device) -> torch.dtype:
    if args.dtype != "auto":
        return DTYPE_NAMES[args.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device) -> float:
    """Wall time of one call, the device's queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (kernel selection, allocator)
    return statistics.median(_seconds(fn, device) for _ in range(reps))


def compile_forward(model):
    """The transformers recipe: the whole forward as one graph (fullgraph) with CUDA graphs on GPU
    (reduce-overhead); dynamic=False specializes on the prefill and decode shapes instead of making the
    sequence length symbolic after the second shape."""
    return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class Caller:
    """One model fed one batch of prompts the way --compile says.

    none: eager, a new DynamicCache for every prompt (the default of `model(...)`).
    static: eager, one StaticCache of prompt_len + new_tokens positions for all runs, reset (zeroed in place,
        same tensors) before each prompt: fixed shapes, what CUDA graphs need.
    compile: the static cache and `compiler` (default `compile_forward`), one graph for the prefill shape and one for the decode
        step (what `generate` does with cache_implementation="static" and a compiled forward).
    """

    def __init__(self, model, ids: torch.Tensor, new_tokens: int, mode: str, compiler=compile_forward):
        self.ids, self.new_tokens, self.mode = ids, new_tokens, mode
        self.forward, self.cache = model, None
        if mode != "none":
            from transformers import StaticCache
            self.cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
            # the first update allocates the cache: do it eagerly, outside any compiled region, so that its
            # tensors are marked as static addresses (transformers skips that while tracing; CUDA graphs need it)
            model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        if mode == "compile":
            self.forward = compiler(model)

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def _step(self, input_ids: torch.Tensor, cache):
        if self.mode == "compile":
            torch.compiler.cudagraph_mark_step_begin()  # each call a new CUDA-graph step (no-op on CPU)
        out = self.forward(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def prefill(self):
        """(cache, next token) after the prompt; a static cache must be reset first."""
        return self._step(self.ids, self.cache)

    def decode(self, cache, nxt) -> list[torch.Tensor]:
        tokens = []  # a Python list: no extra kernel inside the timed loop
        for _ in range(self.new_tokens):
            cache, nxt = self._step(nxt, cache)
            tokens.append(nxt)
        return tokens

    def generate(self) -> torch.Tensor:
        """Greedy new tokens [batch, new_tokens + 1] (untimed; for checking that the modes agree)."""
        self.reset()
        cache, nxt = self.prefill()
        return torch.cat([nxt] + self.decode(cache, nxt), dim=1)


class _Timer:
    """Timed prefill and decode runs of one Caller; a static cache is reset before every prompt (untimed)."""

    def __init__(self, caller: Caller, device):
        self.caller, self.device = caller, device

    def prefill_s(self) -> float:
        self.caller.reset()
        return _seconds(self.caller.prefill, self.device)

    def decode_s(self) -> float:
        """Only the new-token steps are timed, not the prompt prefill before them."""
        self.caller.reset()
        cache, nxt = self.caller.prefill()
        return _seconds(lambda: self.caller.decode(cache, nxt), self.device)


@torch.no_grad()
def measure_batch(models: dict, ids: torch.Tensor, args, device, compiler=compile_forward) -> dict:
    """{name: prefill and decode tokens/s} of each model at one batch size, all in the same --compile mode.

    Each model is warmed up first (two runs in compile mode: CUDA graphs are recorded on the second call of a
    graph), and the wall time of its warm-up, nearly all compilation, is its compile_s. The timed runs then
    alternate between the models, so that a change of load on a shared machine hits them alike; each figure
    is the median of --reps runs. `compiler(model)` returns the compiled forward (--compile compile).
    """
    mode = args.compile
    if mode == "compile":
        torch._dynamo.reset()  # fresh compile cache for each batch size: only its graphs count
    out, timers = {}, {}
    for name, model in models.items():
        timer = timers[name] = _Timer(Caller(model, ids, args.new_tokens, mode, compiler), device)
        graphs, t0 = graphs_compiled(), time.perf_counter()
        try:
            for _ in range(2 if mode == "compile" else 1):
                timer.prefill_s()
                timer.decode_s()
        except torch._dynamo.exc.TorchDynamoException as e:  # inductor errors too (no C++ compiler on CPU, ...)
            raise RankwiseError(f"--compile compile: torch.compile failed on {device.type} ({first_line(e, 300)}); "
                                "--compile static runs the same static cache without compiling") from None
        out[name] = {"compile_s": time.perf_counter() - t0 if mode == "compile" else None,
                     "graphs_compiled": graphs_compiled() - graphs}
    graphs = graphs_compiled()
    runs = {name: {"prefill": [], "decode": []} for name in models}
    for _ in range(args.reps):
        for name, timer in timers.items():
            runs[name]["prefill"].append(timer.prefill_s())
        for name, timer in timers.items():
            runs[name]["decode"].append(timer.decode_s())
    for name in models:
        out[name]["prefill_tok_s"] = ids.numel() / statistics.median(runs[name]["prefill"])
        out[name]["decode_tok_s"] = ids.shape[0] * args.new_tokens / statistics.median(runs[name]["decode"])
    # must be 0: a graph compiled inside a timed run (a recompile every decode step) would be timed
    out["graphs_compiled_while_timing"] = graphs_compiled() - graphs
    return out


def measure(models: dict, vocab: int, args, device, compiler=compile_forward) -> dict:
    """{batch: measure_batch(...)}"""
    out = {}
    for bs in _batches(args):
        ids = random_ids(vocab, bs, args.prompt_len, args.seed + 1).to(device)
        out[bs] = measure_batch(models, ids, args, device, compiler)
    return out


@torch.no_grad()
def layer_table(compressed, args, device) -> list[dict]:
    """Each distinct factorized (out, in, rank) timed alone against a dense Linear of the same shape, at
    decode (batch tokens) and prefill (batch x prompt_len tokens) sizes. Where factorized is slower, the
    allocator can keep that Linear dense (--keep-dense) or round ranks up to GPU-friendly multiples."""
    dtype = next(compressed.parameters()).dtype
    groups: dict[tuple, list[str]] = {}
    for name, m in compressed.named_modules():
        if isinstance(m, LowRankLinear):
            suffix = ".".join(name.split(".")[-2:])
            groups.setdefault((m.out_features, m.in_features, m.rank), [])
            if suffix not in groups[(m.out_features, m.in_features, m.rank)]:
                groups[(m.out_features, m.in_features, m.rank)].append(suffix)
    rows = []
    for (out, inp, rank), names in sorted(groups.items()):
        dense = torch.nn.Linear(inp, out, bias=False, device=device, dtype=dtype)
        low = LowRankLinear(inp, out, rank, bias=False, device=device, dtype=dtype)
        row = {"layers": names, "out": out, "in": inp, "rank": rank}
        for label, tokens in [(f"b{b}", b) for b in _batches(args)] + [("prefill", max(_batches(args))
                                                                         * args.prompt_len)]:
            x = torch.randn(tokens, inp, device=device, dtype=dtype)
            reps = 20  # one call is microseconds: time a loop
            t_dense = _median_seconds(lambda: [dense(x) for _ in range(reps)], device, args.reps) / reps
            t_low = _median_seconds(lambda: [low(x) for _ in range(reps)], device, args.reps) / reps
            row[f"{label}_dense_us"], row[f"{label}_factorized_us"] = t_dense * 1e6, t_low * 1e6
            row[f"{label}_speedup"] = t_dense / t_low
        rows.append(row)
    return rows


def _batches(args) -> list[int]:
    return [int(b) for b in args.batch_sizes.split(",") if b.strip()]


def build_dense(args, device):
    """(dense model on CPU, tokenizer or None) in the benchmark's dtype."""
    dtype = _dtype(args, device)
    if args.shape:
        return random_model(args.shape, args.layers, dtype, args.seed)[0], None
    if args.layers:
        raise RankwiseError("--layers applies to --shape models only")
    return load_real_model(args.model, args.dtype, args.device)  # auto: fp32 on CPU


def build_compressed(args, device, dense=None, tokenizer=None):
    """(compressed model, compression meta): --checkpoint loaded, else `dense` compressed in place."""
    if args.checkpoint:
        compressed, _, _ = load_model(args.checkpoint, args.dtype, args.device, place_on_device=False)
        meta = read_result(args.checkpoint)
        return compressed, meta if args.factor_dtype == "auto" else restored(compressed, meta, args)
    vocab = dense.get_input_embeddings().weight.shape[0]
    calib = calibration_ids(tokenizer, vocab, args.calib, args.nsamples, args.seqlen, args.seed)
    cfg = CompressConfig(model=args.model or f"shape:{args.shape}", method=args.method, ratio=args.ratio,
                         calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                         rank_multiple=args.rank_multiple, device=args.device, factor_dtype=args.factor_dtype,
                         int4_group=args.int4_group,
                         keep_dense=[n.strip() for n in args.keep_dense.split(",") if n.strip()])
    return dense, compress_model(dense, calib, cfg)


def restored(model, meta, args):
    """A checkpoint's float factors stored as --factor-dtype, in memory: what `compress model --factor-dtype`
    writes at the same ratio (storage is applied after every stage). Its record, with the new modules."""
    if quantized_storages(meta):
        raise RankwiseError(f"--factor-dtype {args.factor_dtype}: {args.checkpoint} already stores quantized "
                            f"factors; only float factors are re-stored")
    check_factor_storage({}, {n: m.rank for n, m in meta.modules.items()}, args.factor_dtype, args.int4_group)
    return meta.model_copy(update={"modules": store_factors(model, meta.modules, args.factor_dtype,
                                                            args.int4_group)})


def build_models(args, device):
    """(dense, compressed, compression meta); the compressed one comes from --checkpoint or is made here."""
    dense, tokenizer = build_dense(args, device)
    compressed, meta = build_compressed(args, device, None if args.checkpoint else copy.deepcopy(dense), tokenizer)
    dtype = next(dense.parameters()).dtype  # compare like with like (integer factors keep their dtype)
    return dense.to(device).eval(), compressed.to(device, dtype).eval(), meta


def _resident_mib() -> float | None:
    """This process's resident set (VmRSS), MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc), so that the resident set counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@torch.no_grad()
def memory_of(which: str, args, device) -> dict:
    """Resident memory of one model in this (fresh) process: after loading, peak while loading, peak while
    running one prefill and decode at the largest batch; MiB (GPU: what torch allocated)."""
    reset_peak_memory(device)
    dense, tokenizer = build_dense(args, device) if which == "dense" or not args.checkpoint else (None, None)
    model = dense if which == "dense" else build_compressed(args, device, dense, tokenizer)[0]
    del dense
    dtype = _dtype(args, device)
    model = model.to(device, dtype).eval()
    _trim_heap()
    load_peak = peak_memory(device)
    out = {"rss_after_load_mib": _resident_mib(), "load_peak_mib": load_peak.host_gib * 1024,
           "gpu_after_load_mib": torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    reset_peak_memory(device)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = random_ids(vocab, max(_batches(args)), args.prompt_len, args.seed + 1).to(device)
    Caller(model, ids, args.new_tokens, args.compile).generate()
    run_peak = peak_memory(device)
    out.update(run_peak_mib=run_peak.host_gib * 1024,
               gpu_run_peak_mib=run_peak.gpu_gib * 1024 if run_peak.gpu_gib is not None else None)
    return out


def measure_memory(argv: list[str]) -> dict:
    """{dense, compressed: memory_of(...)}, each from its own fresh process running this script."""
    out = {}
    for which in ("dense", "compressed"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "memory.json"
            res = subprocess.run([sys.executable, __file__, *argv, "--memory-of", which, "--out", str(path)],
                                 capture_output=True, text=True)
            if res.returncode != 0 or not path.is_file():
                last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
                raise RankwiseError(f"--memory: the {which} model's process failed: {first_line(last, 300)}")
            out[which] = json.loads(path.read_text())
    return out


def compressed_label(args) -> str:
    factors = "" if args.factor_dtype == "auto" else f", {args.factor_dtype} factors"
    if args.checkpoint:
        return args.checkpoint + (f" (factors re-stored{factors})" if factors else "")
    return f"{args.method} ratio {args.ratio}{factors} (made here)"


def main(argv=None, compiler=compile_forward) -> dict:
    """Runs the benchmark; `compiler(model)` makes the compiled forward of --compile compile."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.memory_of:
        Path(args.out).write_text(json.dumps(memory_of(args.memory_of, args, device)))
        return {}
    dense, compressed, meta = build_models(args, device)
    vocab = dense.get_input_embeddings().weight.shape[0]
    factorized = sum(isinstance(m, LowRankLinear) for m in compressed.modules())
    models = {"dense": dense, "compressed": compressed}
    results = measure(models, vocab, args, device, compiler)
    rows = []
    for bs, r in results.items():
        d, c = r["dense"], r["compressed"]
        rows.append({"batch": bs, "dense_prefill_tok_s": d["prefill_tok_s"], "compressed_prefill_tok_s":
                     c["prefill_tok_s"], "prefill_speedup": c["prefill_tok_s"] / d["prefill_tok_s"],
                     "dense_decode_tok_s": d["decode_tok_s"], "compressed_decode_tok_s": c["decode_tok_s"],
                     "decode_speedup": c["decode_tok_s"] / d["decode_tok_s"],
                     "dense_compile_s": d["compile_s"], "compressed_compile_s": c["compile_s"]})
    result = {"settings": {"model": args.model or f"shape:{args.shape}" + (f" ({args.layers} layers)"
                                                                             if args.layers else ""),
                           "compressed": compressed_label(args),
                           "device": str(device),
                           "dtype": str(next(dense.parameters()).dtype).replace("torch.", ""),
                           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
                           "compile": args.compile,
                           "threads": thread_note(),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "params": {"dense": sum(p.numel() for p in dense.parameters()),
                         "compressed": sum(p.numel() for p in compressed.parameters()),
                         "factorized_layers": factorized, "kept_dense": len(meta.kept_dense) if meta else 0,
                         "factor_dtypes": sorted({m.factor_dtype or "auto" for m in compressed.modules()
                                                  if isinstance(m, LowRankLinear)})},
              "rows": rows,
              # compile: 2 per model and batch (prefill and decode shapes), all in the warm-up runs
              "graphs_compiled": sum(r[m]["graphs_compiled"] for r in results.values() for m in models),
              "graphs_compiled_while_timing": sum(r["graphs_compiled_while_timing"] for r in results.values())}
    if args.layer_table:
        result["layers"] = layer_table(compressed, args, device)
        result["slower_factorized_at_batch1"] = sorted(
            {n for r in result["layers"] if r[f"b{_batches(args)[0]}_speedup"] < 1 for n in r["layers"]})
    if args.memory:
        del dense, compressed, models
        result["memory"] = measure_memory([a for a in argv if a != "--memory"])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    s, p = result["settings"], result["params"]
    table = Table(title=f"{s['model']} dense ({p['dense']:,} params) vs {s['compressed']} ({p['compressed']:,})  "
                        f"{s['device']} {s['dtype']}  --compile {s['compile']}  "
                        f"prompt {s['prompt_len']}, {s['new_tokens']} new tokens  "
                        f"({s['threads']})")
    for col in ("batch", "prefill tok/s dense", "compressed", "speedup", "decode tok/s dense", "compressed",
                "speedup"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["batch"]), f"{r['dense_prefill_tok_s']:.1f}", f"{r['compressed_prefill_tok_s']:.1f}",
                      f"{r['prefill_speedup']:.2f}x", f"{r['dense_decode_tok_s']:.1f}",
                      f"{r['compressed_decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}x")
    console = Console(width=None if Console().is_terminal else 200)
    console.print(table)
    if s["compile"] == "compile":
        console.print("compile s (warm-up runs) dense / compressed: " + ", ".join(
            f"batch {r['batch']} {r['dense_compile_s']:.1f} / {r['compressed_compile_s']:.1f}" for r in result["rows"]))
    if "memory" in result:
        console.print(memory_table(result["memory"]))
    if result["graphs_compiled_while_timing"]:
        console.print(f"[red]warning: {result['graphs_compiled_while_timing']} graphs compiled inside timed runs "
                      "(recompiles): the compile figures include compilation[/red]")
    if "layers" not in result:
        return
    lt = Table(title="distinct factorized shapes alone (microseconds per call; speedup = dense / factorized)")
    keys = [k[:-len("_speedup")] for k in result["layers"][0] if k.endswith("_speedup")]
    for col in ["layers", "out x in", "rank"] + [f"{k} dense / fact. / speedup" for k in keys]:
        lt.add_column(col, justify="right")
    for r in result["layers"]:
        lt.add_row(", ".join(r["layers"]), f"{r['out']} x {r['in']}", str(r["rank"]),
                   *[f"{r[k + '_dense_us']:.1f} / {r[k + '_factorized_us']:.1f} / {r[k + '_speedup']:.2f}x"
                     for k in keys])
    console.print(lt)
    console.print(f"slower factorized at batch {result['rows'][0]['batch']}: "
                  f"{', '.join(result['slower_factorized_at_batch1']) or 'none'}")


def memory_table(memory: dict):
    from rich.table import Table
    table = Table(title="resident memory, MiB (each model alone in a fresh process; interpreter and torch "
                        "included)")
    columns = {"rss_after_load_mib": "after loading", "load_peak_mib": "peak loading",
               "run_peak_mib": "peak running", "gpu_after_load_mib": "GPU after loading",
               "gpu_run_peak_mib": "GPU peak running"}
    shown = [k for k in columns if memory["dense"].get(k) is not None]
    for col in ["model"] + [columns[k] for k in shown]:
        table.add_column(col, justify="right")
    for name, row in memory.items():
        table.add_row(name, *[f"{row[k]:.0f}" for k in shown])
    return table


if __name__ == "__main__":
    try:
        main()
    except RankwiseError as e:
        raise SystemExit(f"error: {e}")
