"""SVD-LLM (Wang et al., ICLR 2025, arXiv:2403.07378): truncation-aware data whitening.

C = X^T X = L L^T (Cholesky, float64). SVD of W L; truncating sigma_i costs exactly sigma_i in the output
error ||(W - W') X^T||_F, so the cut is optimal for the calibration data. A = sqrt(S_k) V_k^T L^-1 is
computed by a triangular solve, never by forming L^-1.
"""
import torch

from rankwise.compress.methods.base import Decomposition, Method, derived, register
from rankwise.compress.stages.base import Statistics


def cholesky_with_fallback(C: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of C (float64). If C is not positive definite (dead channels, few tokens),
    shift it by (-lambda_min + eps) I as the reference does, with eps relative to C's scale."""
    C = C.double()
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        return L
    lam_min = torch.linalg.eigvalsh(C)[0].item()
    eps = 1e-6 * max(C.diagonal().mean().item(), 1e-12)
    shift = eps - min(lam_min, 0.0)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(C + shift * torch.eye(C.shape[0], dtype=C.dtype, device=C.device))
        if int(info) == 0:
            return L
        shift *= 10
    raise ValueError("input covariance could not be made positive definite")


@register("svd-llm")
class SVDLLM(Method):
    statistics = Statistics(xtx=True)

    def decompose(self, weight, stats) -> Decomposition:
        dev = weight.device
        L = derived(stats, ("cholesky", dev), lambda: cholesky_with_fallback(stats.covariance.to(dev)))

        def undo_right(A):  # A L^-1: solve X L = A, in float64 (L may be ill-conditioned)
            return torch.linalg.solve_triangular(L, A.to(L.dtype), upper=False, left=False).to(A.dtype)
        return Decomposition(weight.to(L.dtype) @ L, undo_right=undo_right)
