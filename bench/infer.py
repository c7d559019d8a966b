"""Inference speed of a compressed model against its dense original: prefill and decode tokens/s.

    python bench/infer.py --shape 7b --ratio 0.4 --device cuda --dtype bf16          # target: decode >= 1.2x
    python bench/infer.py --model /path/to/smollm2-135m --ratio 0.4 --threads 2
    python bench/infer.py --model /path/to/dense --checkpoint /path/to/compressed --json

The compressed model is either a Rankwise checkpoint (--checkpoint) or made here from the dense one with the
block-sequential pipeline (--method, --ratio, --rank-multiple; random or real calibration tokens: for speed
only the ranks matter, not the quality).
prefill: one forward of batch x prompt_len tokens (logits of the last position only, as a server would).
decode: greedy steps of batch x 1 token with the KV cache, after a prefill that is not timed.
Each figure is the median of --reps timed runs after one warm-up run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from _shapes import (  # noqa: I001
    add_model_source_args, calibration_ids, load_real_model, random_ids, random_model, thread_note)

from calib.errors import RankwiseError
from compress.config import CompressConfig
from compress.loading import DTYPE_NAMES, load_model, resolve_device
from compress.lowrank import LowRankLinear
from compress.pipeline import compress_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--checkpoint", help="a Rankwise checkpoint of the same model (else compress here)")
    p.add_argument("--method", default="svd-llm")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--rank-multiple", type=int, default=1)
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
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p.parse_args(argv)


def _dtype(args, device: torch.device) -> torch.dtype:
    if args.dtype != "auto":
        return DTYPE_NAMES[args.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def prefill_tokens_per_s(model, ids: torch.Tensor, device, reps: int) -> float:
    seconds = _median_seconds(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), device, reps)
    return ids.numel() / seconds


@torch.no_grad()
def decode_tokens_per_s(model, ids: torch.Tensor, new_tokens: int, device, reps: int) -> float:
    """Greedy decoding with the KV cache; only the new-token steps are timed (the prompt prefill is not)."""
    state = {}

    def prefill():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        state["cache"], state["next"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def steps():
        cache, nxt = state["cache"], state["next"]
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def timed_once():
        prefill()
        _sync(device)
        t0 = time.perf_counter()
        steps()
        _sync(device)
        return time.perf_counter() - t0

    timed_once()  # warm-up
    seconds = statistics.median(timed_once() for _ in range(reps))
    return ids.shape[0] * new_tokens / seconds


def measure(model, vocab: int, args, device) -> dict:
    out = {}
    for bs in _batches(args):
        ids = random_ids(vocab, bs, args.prompt_len, args.seed + 1).to(device)
        out[bs] = {"prefill_tok_s": prefill_tokens_per_s(model, ids, device, args.reps),
                   "decode_tok_s": decode_tokens_per_s(model, ids, args.new_tokens, device, args.reps)}
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


def build_models(args, device):
    """(dense, compressed, compression meta); the compressed one comes from --checkpoint or is made here."""
    dtype = _dtype(args, device)
    tokenizer = None
    if args.shape:
        dense, _ = random_model(args.shape, args.layers, dtype, args.seed)
    else:
        if args.layers:
            raise RankwiseError("--layers applies to --shape models only")
        dense, tokenizer = load_real_model(args.model, args.dtype, args.device)  # auto: fp32 on CPU
    if args.checkpoint:
        compressed, _, _ = load_model(args.checkpoint, args.dtype, args.device, place_on_device=False)
        meta = getattr(compressed.config, "rankwise", {}) or {}
    else:
        compressed = copy.deepcopy(dense)
        vocab = dense.get_input_embeddings().weight.shape[0]
        calib = calibration_ids(tokenizer, vocab, args.calib, args.nsamples, args.seqlen, args.seed)
        cfg = CompressConfig(model=args.model or f"shape:{args.shape}", method=args.method, ratio=args.ratio,
                             calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                             rank_multiple=args.rank_multiple, device=args.device,
                             keep_dense=[n.strip() for n in args.keep_dense.split(",") if n.strip()])
        meta = compress_model(compressed, calib, cfg)
    dtype = next(dense.parameters()).dtype  # compare like with like
    return dense.to(device).eval(), compressed.to(device, dtype).eval(), meta


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dense, compressed, meta = build_models(args, device)
    vocab = dense.get_input_embeddings().weight.shape[0]
    factorized = sum(isinstance(m, LowRankLinear) for m in compressed.modules())
    results = {"dense": measure(dense, vocab, args, device), "compressed": measure(compressed, vocab, args, device)}
    rows = []
    for bs in results["dense"]:
        d, c = results["dense"][bs], results["compressed"][bs]
        rows.append({"batch": bs, "dense_prefill_tok_s": d["prefill_tok_s"], "compressed_prefill_tok_s":
                     c["prefill_tok_s"], "prefill_speedup": c["prefill_tok_s"] / d["prefill_tok_s"],
                     "dense_decode_tok_s": d["decode_tok_s"], "compressed_decode_tok_s": c["decode_tok_s"],
                     "decode_speedup": c["decode_tok_s"] / d["decode_tok_s"]})
    result = {"settings": {"model": args.model or f"shape:{args.shape}" + (f" ({args.layers} layers)"
                                                                             if args.layers else ""),
                           "compressed": args.checkpoint or f"{args.method} ratio {args.ratio} (made here)",
                           "device": str(device),
                           "dtype": str(next(dense.parameters()).dtype).replace("torch.", ""),
                           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
                           "threads": thread_note(),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "params": {"dense": sum(p.numel() for p in dense.parameters()),
                         "compressed": sum(p.numel() for p in compressed.parameters()),
                         "factorized_layers": factorized, "kept_dense": len(meta.get("kept_dense", []))},
              "rows": rows}
    if args.layer_table:
        result["layers"] = layer_table(compressed, args, device)
        result["slower_factorized_at_batch1"] = sorted(
            {n for r in result["layers"] if r[f"b{_batches(args)[0]}_speedup"] < 1 for n in r["layers"]})
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
                        f"{s['device']} {s['dtype']}  prompt {s['prompt_len']}, {s['new_tokens']} new tokens  "
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


if __name__ == "__main__":
    try:
        main()
    except RankwiseError as e:
        raise SystemExit(f"error: {e}")
