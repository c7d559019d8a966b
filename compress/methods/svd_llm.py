"""SVD-LLM (Wang et al., ICLR 2025, arXiv:2403.07378): truncation-aware data whitening.

C = X^T X = L L^T (Cholesky, float64). SVD of W L; truncating sigma_i costs exactly sigma_i in the output
error ||(W - W') X^T||_F, so the cut is optimal for the calibration data. A = sqrt(S_k) V_k^T L^-1 is
computed by a triangular solve, never by forming L^-1.
"""
import torch

from rankwise.compress.methods.base import Method, register
from rankwise.compress.numerics import Decomposition, cholesky_with_fallback, derived
from rankwise.compress.stages.base import Statistics


@register("svd-llm")
class SVDLLM(Method):
    statistics = Statistics(xtx=True)

    def decompose(self, weight, stats) -> Decomposition:
        dev = weight.device
        L = derived(stats, ("cholesky", dev), lambda: cholesky_with_fallback(stats.covariance.to(dev)))

        def undo_right(A):  # A L^-1: solve X L = A, in float64 (L may be ill-conditioned)
            return torch.linalg.solve_triangular(L, A.to(L.dtype), upper=False, left=False).to(A.dtype)
        return Decomposition(weight.to(L.dtype) @ L, undo_right=undo_right)
