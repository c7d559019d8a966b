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
correction that would make W_c x_c match W x_d. C = Q L Q^T; SVD of R Q L^1/2, keep r;
    B' = U_r sqrt(S_r),  A' = sqrt(S_r) V_r^T L^-1/2 Q^T
so B' A' is the best rank-r correction in the data-weighted norm E||(.) x_c||.
"""
from __future__ import annotations

import torch

from rankwise.compress.methods.base import Decomposition, derived


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


def covariance_eigh(covariance: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """C = Q diag(lam) Q^T (float64), null and negative eigenvalues clamped to eps * lam_max."""
    lam, Q = torch.linalg.eigh(covariance.double())
    return lam.clamp_min(eps * lam.max().clamp_min(1e-12)), Q


def eora_factors(residual: torch.Tensor, stats, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA: best rank-r B' A' for E||(R - B'A') x||^2 via the eigendecomposition of C = E[x x^T]
    (computed once per statistics object: q/k/v share it)."""
    R = residual.double()
    lam, Q = derived(stats, ("eigh", R.device), lambda: covariance_eigh(stats.covariance.to(R.device)))
    sq = lam.sqrt()
    whitened = Decomposition(R @ (Q * sq[None, :]), undo_right=lambda A: (A / sq[None, :]) @ Q.T)
    return whitened.factors(min(rank, *R.shape))
