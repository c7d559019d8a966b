"""Refit: decompose W G C^-1, the dense layer re-expressed on the compressed inputs, then re-solve B by ridge
least squares on the dense layer's outputs.

With x_c the layer's input in the compressed model and x_d its input in the dense model (x_d = x_c when no
dense stream is kept), C = E[x_c x_c^T] and G = E[x_d x_c^T]; SVD-LLM's update step (Wang et al., ICLR 2025)
solved in closed form instead of trained: with A fixed,
    min_B E||B A x_c - W x_d||^2 + lambda ||B - B0||^2  =>  B = (W G A^T + lambda B0)(A C A^T + lambda I)^-1
With 16k calibration tokens and n up to a few thousand inputs the plain least squares overfits the
calibration text (measured on SmolLM2); the ridge shrinks toward the truncated solution, not toward zero.
For SVD-LLM with x_d = x_c this is exactly the truncated B already; with the dense stream it also undoes the
error that earlier compressed layers put into x_c.
"""
import torch
from pydantic import Field

from rankwise.compress.stages.base import Corrector, StageOptions, StageRecord, Statistics, register_corrector


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


class RefitOptions(StageOptions):
    damp: float = Field(1.0, ge=0, allow_inf_nan=False, description="ridge damping relative to the mean input "
                        "energy; shrinks the fit toward the plain truncation (1.0: chosen on austen.txt)")


class RefitRecord(StageRecord):
    linears: int = 0   # Linears whose B was re-solved


@register_corrector("refit")
class Refit(Corrector):
    Options = RefitOptions
    Record = RefitRecord
    statistics = Statistics(xtx=True, cross=True)

    def before_factorize(self, work):
        # for SVD-LLM the truncation is then the exact rank-k optimum of E||W' x_c - W x_d||
        work.decompose_from = work.target(self.options.damp).to(work.weight.dtype)

    def after_factorize(self, work):
        work.B = refit_b(work.weight, work.A, work.stats, self.options.damp, B0=work.B)
        self.record.linears += 1
