"""Which weight makes loss-aware ranks work (not a test): perplexity of SmolLM2-135M when each matrix keeps the
ranks an allocation gives, with every truncation taken from the dense model's whitened SVD (SVD-LLM's
transform, statistics from the dense stream, no sequential update), so one calibration pass and one SVD per
matrix serve every allocation and each costs only an evaluation.

Weights compared (each component's predicted loss is sigma_i^2 times the weight, per matrix unless stated):
  uniform    every matrix keeps the same fraction (no scores)
  relative   1 / sum_i sigma_i^2: the error relative to the layer's output energy
  absolute   1
  resid      1 / mean ||h||^2 of the block's input (the residual stream's energy)
  fiso       mean over output features of the output Fisher f_o
  fdiag      per component sum_o f_o u_io^2 (what `--ranks loss-aware` uses)
  fexact     per component u_i^T F u_i with the full output Fisher matrix F = sum_t g_t g_t^T
  fsketchK   per component ||Z u_i||^2, Z = R G a K-row Gaussian sketch of the token gradients (E Z^T Z = F;
             drawn here as randn(K, out) F^(1/2) / sqrt(K), which has the same distribution)

    python bench/allocation_weights.py [--ratios 0.2,0.4] [--weights uniform,fdiag] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from rankwise.calib.data import calibration_set, load_text, tokenize
from rankwise.compress.numerics import MatrixShape, total_params
from rankwise.compress.stages.allocate_loss_aware import loss_aware_ranks
from rankwise.compress.stages.allocate_uniform import uniform_ranks
from rankwise.compress.loading import load_model
from rankwise.eval.ppl import perplexity

ASSETS = Path(os.environ.get("RANKWISE_ASSETS", Path.home() / ".cache" / "rankwise-assets"))
WEIGHTS = ("uniform", "relative", "absolute", "resid", "fiso", "fdiag", "fexact", "fsketch64", "fsketch256")


def calibrate(model, linears: dict, calib_ids: torch.Tensor):
    """Dense-stream X^T X and output-gradient Gram G = sum_t g_t g_t^T of every Linear, and the mean squared
    norm of each block's input, from one forward + backward pass per calibration sequence."""
    xtx = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    ggt = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in linears.items()}
    blocks = model.model.layers
    stream = torch.zeros(len(blocks), dtype=torch.float64)

    def fold(acc, name, t):
        t = t.detach().reshape(-1, t.shape[-1]).double()
        acc[name] += t.T @ t

    hooks = []
    for n, m in linears.items():
        hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: fold(xtx, n, i[0])))
        hooks.append(m.register_full_backward_hook(lambda mod, gi, go, n=n: fold(ggt, n, go[0])))
    for i, block in enumerate(blocks):
        def pre(mod, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            stream[i] += h.detach().double().pow(2).sum(-1).mean()
        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    for p in model.parameters():  # gradients reach every Linear's output through the embedding's output alone
        p.requires_grad_(False)
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
    for s in range(calib_ids.shape[0]):
        ids = calib_ids[s:s + 1]
        model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    return xtx, ggt, stream / calib_ids.shape[0]


def whitened_svd(W: torch.Tensor, xtx: torch.Tensor):
    """SVD of W L (L L^T = X^T X, SVD-LLM): returns (U S, V^T L^-1, S, U)."""
    C = xtx + 1e-6 * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)
    L = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd(W.double() @ L, full_matrices=False)
    return (U * S).float(), torch.linalg.solve_triangular(L, Vh, upper=False, left=False).float(), S, U


def gaussian_sketch(F: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    """Z [rows, out] with E[Z^T Z] = F: the rows of R G for Gaussian R are N(0, F / rows)."""
    evals, evecs = torch.linalg.eigh(F)
    root = evecs * evals.clamp_min(0).sqrt()
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, F.shape[0], dtype=F.dtype, generator=gen) @ root.T / rows ** 0.5


def allocation(weight: str, ratio: float, shapes, svds, ggt, stream) -> dict:
    if weight == "uniform":
        return uniform_ranks(shapes, ratio)
    costs = {}
    for n, (_, _, S, U) in svds.items():
        block = int(n.split(".layers.")[1].split(".")[0])
        per_matrix = {"relative": 1.0 / float(S.pow(2).sum()), "absolute": 1.0, "resid": 1.0 / float(stream[block]),
                      "fiso": float(ggt[n].trace()) / shapes[n].out}
        if weight in per_matrix:
            costs[n] = S.pow(2) * per_matrix[weight]
        elif weight == "fdiag":
            costs[n] = S.pow(2) * (U.pow(2) * ggt[n].diagonal()[:, None]).sum(0)
        elif weight == "fexact":
            costs[n] = S.pow(2) * torch.einsum("oi,op,pi->i", U, ggt[n], U).clamp_min(0)
        else:  # fsketchK
            costs[n] = S.pow(2) * (gaussian_sketch(ggt[n], int(weight.removeprefix("fsketch"))) @ U).pow(2).sum(0)
    return loss_aware_ranks(shapes, costs, ratio)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "smollm2-135m"))
    ap.add_argument("--calib", default=f"text:{ASSETS / 'text' / 'wiki_calib.txt'}")
    ap.add_argument("--eval", default=f"text:{ASSETS / 'text' / 'wiki_eval.txt'}")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--weights", default=",".join(WEIGHTS))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model, "fp32", "cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    shapes = {n: MatrixShape(m.out_features, m.in_features) for n, m in linears.items()}
    calib = calibration_set(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    t0 = time.perf_counter()
    xtx, ggt, stream = calibrate(model, linears, calib.input_ids)
    svds = {n: whitened_svd(m.weight.data, xtx[n]) for n, m in linears.items()}
    print(f"calibration + SVDs {time.perf_counter() - t0:.0f} s (threads {torch.get_num_threads()})", flush=True)
    dense_weights = {n: m.weight.data.clone() for n, m in linears.items()}
    eval_ids = tokenize(tokenizer, load_text(args.eval, "test"))

    @torch.no_grad()
    def ppl(ranks) -> float:
        for n, m in linears.items():
            k = ranks[n]
            m.weight.data.copy_(dense_weights[n] if k is None else svds[n][0][:, :k] @ svds[n][1][:k])
        return perplexity(model, eval_ids, args.seqlen, "cpu", max_windows=args.windows).ppl

    dense = ppl({n: None for n in shapes})
    dense_params = sum(s.dense_params for s in shapes.values())
    print(f"\n| weight | ratio | achieved | ppl | x dense | kept dense |\n|---|---|---|---|---|---|\n"
          f"| dense | - | - | {dense:.2f} | 1.00 | - |", flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for weight in args.weights.split(","):
            ranks = allocation(weight, ratio, shapes, svds, ggt, stream)
            p = ppl(ranks)
            print(f"| {weight} | {ratio} | {1 - total_params(shapes, ranks) / dense_params:.4f} | {p:.2f} "
                  f"| {p / dense:.2f} | {sum(r is None for r in ranks.values())} |", flush=True)


if __name__ == "__main__":
    main()
