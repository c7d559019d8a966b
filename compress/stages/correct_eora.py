"""EoRA (Liu et al. 2024, arXiv:2410.21271): a rank-r residual path fitted to what the factorization left out,
in the data-weighted norm; its parameters count inside --ratio.

Residual R = W G C^-1 - W_c (= W - W_c when x_d = x_c: numerics.target_weight), the correction that would make
W_c x_c match W x_d. C = L L^T (any square root serves; the paper uses the eigendecomposition, Cholesky is
cheaper and already at hand); SVD of R L, keep r;
    B' = U_r sqrt(S_r),  A' = sqrt(S_r) V_r^T L^-1
so B' A' is the best rank-r correction in the data-weighted norm E||(.) x_c||.
"""
import torch
from pydantic import Field

from rankwise.compress.defaults import EORA_RANK_DEFAULT
from rankwise.compress.numerics import Decomposition, cholesky_with_fallback, derived, truncated_factors
from rankwise.compress.stages.base import Corrector, StageOptions, StageRecord, Statistics, register_corrector


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


class EoRAOptions(StageOptions):
    rank: int = Field(EORA_RANK_DEFAULT, ge=1, description="rank of every residual path")
    damp: float = Field(1.0, ge=0, allow_inf_nan=False, description="ridge damping of W G C^-1 (with a dense "
                        "stream), relative to the mean input energy")


class EoRARecord(StageRecord):
    paths: int = 0    # residual paths added
    params: int = 0   # their parameters (inside the ratio)


@register_corrector("eora")
class EoRA(Corrector):
    Options = EoRAOptions
    Record = EoRARecord
    statistics = Statistics(xtx=True)

    def label(self) -> str:
        return f"EoRA rank {self.options.rank}"

    def reserved_params(self, shapes):
        r = self.options.rank
        return sum(min(r, s.out, s.inp) * (s.out + s.inp) for s in shapes.values())

    def after_factorize(self, work):
        target = work.target(self.options.damp)
        residual = target - work.compressed_weight().to(target.device)
        work.lora_B, work.lora_A = eora_factors(residual, work.stats, self.options.rank)
        self.record.paths += 1
        self.record.params += work.lora_B.numel() + work.lora_A.numel()
