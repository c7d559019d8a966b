"""Closed-form corrections after truncation: the refit of B and the EoRA residual path.

Both fit the *dense* layer's outputs. With x_c the layer's input in the compressed model and x_d its input in
the dense model (x_d = x_c when no dense stream is kept), C = E[x_c x_c^T] and G = E[x_d x_c^T]:

refit (SVD-LLM's update step, Wang et al. 2025, solved in closed form instead of trained): with A fixed,
    min_B E||B A x_c - W x_d||^2 + lambda ||B - B0||^2  =>  B = (W G A^T + lambda B0)(A C A^T + lambda I)^-1
With 16k calibration tokens and n up to a few thousand inputs the plain least squares overfits the
calibration text (measured on SmolLM2); the ridge shrinks toward the truncated solution, not toward zero.
For SVD-LLM with x_d = x_c this is exactly the truncated B already; with the dense stream it also undoes the
error that earlier compressed layers put into x_c.

EoRA (Liu et al. 2024, arXiv:2410.21271): residual R = W G C^-1 - W_c (= W - W_c when x_d = x_c), the
correction that would make W_c x_c match W x_d. C = L L^T (any square root serves; the paper uses the
eigendecomposition, Cholesky is cheaper and already at hand); SVD of R L, keep r;
    B' = U_r sqrt(S_r),  A' = sqrt(S_r) V_r^T L^-1
so B' A' is the best rank-r correction in the data-weighted norm E||(.) x_c||.
"""
from __future__ import annotations

import torch

from rankwise.compress.methods.base import Decomposition, derived, truncated_factors
from rankwise.compress.methods.svd_llm import cholesky_with_fallback


def _ridge(M: torch.Tensor, damp: float) -> torch.Tensor:
    lam = damp * M.diagonal().mean().clamp_min(1e-12)
    return M + lam * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def refit_b(weight: torch.Tensor, A: torch.Tensor, stats, damp: float = 1e-4,
            B0: torch.Tensor | None = None) -> torch.Tensor:
    """B = (W G A^T + lambda B0)(A C A^T + lambda I)^-1, float64: least squares ridge-shrunk toward the
    truncated B0 (toward 0 without one); lambda = damp * mean diag(A C A^T)."""
    W = weight.double()
    A = A.double().to(W.device)
    C = stats.covariance.to(W.device)
    G = stats.cross_covariance.to(W.device)
    M = A @ C @ A.T                                 # [k, k], symmetric positive semi-definite
    lam = damp * M.diagonal().mean().clamp_min(1e-12)
    rhs = W @ G @ A.T                               # [m, k]
    if B0 is not None:
        rhs = rhs + lam * B0.double().to(W.device)
    lhs = M + lam * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return torch.linalg.solve(lhs, rhs.T).T         # B lhs = rhs  (lhs symmetric)


def target_weight(weight: torch.Tensor, stats, damp: float = 1e-4) -> torch.Tensor:
    """W G C^-1, the dense layer re-expressed on compressed inputs, ridge-shrunk toward W itself:
    W + W (G - C)(C + lambda I)^-1 (= W G C^-1 at lambda = 0, = W as lambda grows; W when x_d = x_c)."""
    W = weight.double()
    if getattr(stats, "cross", None) is None:
        return W
    dev = W.device
    C = stats.covariance.to(dev)
    G = stats.cross_covariance.to(dev)
    ridged = derived(stats, ("ridge_cholesky", damp, dev), lambda: torch.linalg.cholesky_ex(_ridge(C, damp)))
    L, info = ridged
    if int(info) != 0:  # numerically indefinite despite the ridge: a general solve still works
        return W + torch.linalg.solve(_ridge(C, damp), (W @ (G - C)).T).T
    return W + torch.cholesky_solve((W @ (G - C)).T, L).T   # C symmetric


def eora_factors(residual: torch.Tensor, stats, rank: int, truncated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA: best rank-r B' A' for E||(R - B'A') x||^2. Any square root of C = E[x x^T] whitens the problem:
    with C = L L^T (Cholesky, the factor SVD-LLM already computed for this statistics object, so q/k/v share
    it and svd-llm pays nothing more), the best rank-r fit of R L, then A' L^-1 (triangular solve).
    Only the top r triplets are needed: randomized subspace iteration (`truncated_factors`) gives them
    without a full decomposition; `truncated=False` takes the full one (the reference it is tested against)."""
    R = residual.double()
    dev = R.device
    L = derived(stats, ("cholesky", dev), lambda: cholesky_with_fallback(stats.covariance.to(dev)))
    undo = lambda A: torch.linalg.solve_triangular(L, A.to(L.dtype), upper=False, left=False)  # noqa: E731
    r = min(rank, *R.shape)
    if not truncated or 2 * r >= min(R.shape):  # a rank near full: the full decomposition is as cheap
        return Decomposition(R @ L, undo_right=undo).factors(r)
    B, A = truncated_factors(R @ L, r)
    return B, undo(A)
