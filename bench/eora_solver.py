"""EoRA solver benchmark (not a test): time of one rank-r residual path per Linear shape, full
eigendecomposition path (eigh of the input covariance + full decomposition of the whitened residual, as
EoRA's paper computes it) against the Cholesky + randomized subspace iteration of the EoRA stage (compress/stages/correct_eora.py).

Random residuals with a decaying spectrum and random inputs of the given shapes (SmolLM2-135M Linears and
TinyLlama-1.1B's q/o by default); the relative error column compares the two paths' data-weighted residual
error ||(R - B'A') X^T|| (0 = identical).

    python bench/eora_solver.py [--rank 32] [--threads 1] [--reps 3]
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from rankwise.compress.numerics import Decomposition
from rankwise.compress.stages.correct_eora import eora_factors

SHAPES = {"SmolLM2 q/o 576x576": (576, 576), "SmolLM2 k/v 192x576": (192, 576),
          "SmolLM2 gate/up 1536x576": (1536, 576), "SmolLM2 down 576x1536": (576, 1536),
          "TinyLlama q/o 2048x2048": (2048, 2048)}


def full_eigh_path(R: torch.Tensor, C: torch.Tensor, r: int):
    """The reference: C = Q diag(lam) Q^T, SVD of R Q lam^1/2 in full, top r kept."""
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(1e-8 * lam.max())
    sq = lam.sqrt()
    return Decomposition(R @ (Q * sq), undo_right=lambda A: (A / sq) @ Q.T).factors(r)


def best_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), rank {args.rank}, float64, best of {args.reps}")
    print("| shape | full eigh path (s) | Cholesky + subspace iteration (s) | speedup | relative error difference |")
    print("|---|---|---|---|---|")
    for name, (m, n) in SHAPES.items():
        X = torch.randn(args.tokens, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g,
                                                                                        dtype=torch.float64)
        C = X.T @ X / args.tokens
        R = torch.randn(m, n, generator=g, dtype=torch.float64) / (1 + torch.arange(n, dtype=torch.float64))
        ref = best_seconds(lambda: full_eigh_path(R, C, args.rank), args.reps)
        new = best_seconds(lambda: eora_factors(R, SimpleNamespace(covariance=C, cache={}), args.rank), args.reps)
        errs = [((R - B @ A) @ X.T).norm().item() for B, A in (full_eigh_path(R, C, args.rank),
                                                                eora_factors(R, SimpleNamespace(covariance=C, cache={}),
                                                                             args.rank))]
        print(f"| {name} | {ref:.3f} | {new:.3f} | {ref / new:.1f}x | {errs[1] / errs[0] - 1:+.1e} |", flush=True)


if __name__ == "__main__":
    main()
