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

from _shapes import calibration_ids, load_real_model, random_ids, random_model, thread_note  # noqa: I001

from calib.errors import RankwiseError
from compress.config import CompressConfig
from compress.loading import DTYPE_NAMES, load_model, resolve_device
from compress.lowrank import LowRankLinear
from compress.pipeline import compress_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id or local path of the dense model")
    src.add_argument("--shape", help="random weights of a real shape: tiny, 135m, 1b, 7b, 13b, 70b")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--checkpoint", help="a Rankwise checkpoint of the same model (else compress here)")
    p.add_argument("--method", default="svd-llm")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--rank-multiple", type=int, default=1)
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
    for bs in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
        ids = random_ids(vocab, bs, args.prompt_len, args.seed + 1).to(device)
        out[bs] = {"prefill_tok_s": prefill_tokens_per_s(model, ids, device, args.reps),
                   "decode_tok_s": decode_tokens_per_s(model, ids, args.new_tokens, device, args.reps)}
    return out


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
                             rank_multiple=args.rank_multiple, device=args.device)
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
    Console(width=None if Console().is_terminal else 200).print(table)


if __name__ == "__main__":
    try:
        main()
    except RankwiseError as e:
        raise SystemExit(f"error: {e}")
