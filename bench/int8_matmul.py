"""Int8 factor matmul on CPU (not a test): torch's weight-only int8 kernel against dequantize + matmul.

Times y = x (s Q)^T for SmolLM2-135M-sized factors (rank ~300 of 576 x 576, ~700 of 1536 x 576) at several
token counts, one torch thread: `kernel` = torch.ops.aten._weight_int8pack_mm(x, Q, s), `dequantize` =
F.linear(x, Q.float() * s[:, None]) (what lowrank.Int8Linear does).

    python bench/int8_matmul.py [--threads 1] [--tokens 1,4,16,64,512,2048]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(300, 576), (576, 300), (700, 1536), (1536, 700)]  # (out, in) of A and B factors


def per_call_ms(fn, calls: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="1,4,16,64,512,2048")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| factor (out x in) | tokens | kernel ms | dequantize ms | kernel / dequantize |")
    print("|---|---|---|---|---|")
    for out, inp in SHAPES:
        w = torch.randn(out, inp)
        scale = w.abs().amax(1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(tokens, inp)
            calls = max(3, 2000 // tokens)
            kernel = per_call_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale), calls)
            dequant = per_call_ms(lambda: F.linear(x, q.float() * scale[:, None]), calls)
            print(f"| {out} x {inp} | {tokens} | {kernel:.3f} | {dequant:.3f} | {kernel / dequant:.1f} |")


if __name__ == "__main__":
    main()
