"""What a factorization method is: a transform of W whose SVD is truncated, and the transform's inverse.

Every method in this family computes the SVD of M = L W R (L, R built from calibration statistics), keeps the
top k singular triplets, and undoes the transform on the factors:
    B = L^-1 U_k sqrt(S_k),  A = sqrt(S_k) V_k^T R^-1,   W ~ B A.
Truncating sigma_i then costs exactly sigma_i in the norm the transform defines (Frobenius for plain SVD,
data-weighted output error for SVD-LLM's whitening). A method is one small module registered by name.

The SVD itself is taken through the eigendecomposition of the smaller Gram matrix, in float64 (see
`Decomposition`), and only as far as it is used: singular values alone for WeLore's spectra, k vectors for a
rank-k cut.
"""
from __future__ import annotations

from typing import Callable

import torch

from rankwise.compress.stages.base import FACTORIZERS, Stage, registrar

REGISTRY = FACTORIZERS
register = registrar(REGISTRY)


class Decomposition:
    """SVD of the transformed weight M, with the maps that undo the transform on B (left) and A (right).

    Why not torch.linalg.svd: the symmetric eigensolver (LAPACK/cuSOLVER syevd) on the smaller Gram matrix
    G = M M^T (or M^T M) is 2-4x faster than the SVD drivers at these shapes (one CPU thread, 2048 x 5632:
    20.3 s -> 4.7 s), and singular values alone (eigvalsh) are cheaper still. Forming G squares the
    condition number, hence float64: sigma_i comes out with an absolute error of about
    eps64 * sigma_max^2 / sigma_i, better than a float32 SVD for every sigma_i > 1e-4 sigma_max.
    The other side of a kept triplet is M^T u_i / sigma_i; B A is then u_i u_i^T M, the exact projection,
    whatever the accuracy of sigma_i (triplets below 1e-12 sigma_max, which carry nothing, are damped).
    """

    def __init__(self, matrix: torch.Tensor, undo_left: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 undo_right: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.M = matrix.double()
        self.undo_left, self.undo_right = undo_left, undo_right
        self.wide = self.M.shape[0] <= self.M.shape[1]
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    def _gram(self) -> torch.Tensor:
        return self.M @ self.M.T if self.wide else self.M.T @ self.M

    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S descending, Q): Q's columns are the left (wide M) or right (tall M) singular vectors."""
        if self._eig is None:
            evals, Q = torch.linalg.eigh(self._gram())                 # ascending
            self._eig = evals.flip(0).clamp_min(0).sqrt(), Q.flip(1)
        return self._eig

    @property
    def spectrum(self) -> torch.Tensor:
        """The singular values a rank cut drops from, descending (what WeLore thresholds)."""
        if self._eig is not None:
            return self._eig[0]
        return torch.linalg.eigvalsh(self._gram()).flip(0).clamp_min(0).sqrt()

    def output_weighted_spectrum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_o weights_o (sigma_i u_i[o])^2 for every component i, in spectrum order: the output error that
        dropping component i adds, weighted per output feature. u_i is M's left singular vector, so this is
        W's output space for transforms that leave the output side alone (SVD-LLM, ASVD, plain SVD)."""
        S, Q = self._eigh()
        w = weights.to(self.M)[:, None]
        if self.wide:   # Q = U: (sigma_i u_i)^2 = sigma_i^2 U^2
            return S.pow(2) * (Q.pow(2) * w).sum(0)
        return ((self.M @ Q).pow(2) * w).sum(0)   # Q = V: sigma_i u_i = M v_i

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced rank-k factors: B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T, then the transform undone."""
        S, Q = self._eigh()
        sq = S[:k].sqrt()
        floor = max(S[0].item() if S.numel() else 0.0, 1e-150) * 1e-12
        inv_sq = 1.0 / S[:k].clamp_min(floor).sqrt()
        Qk = Q[:, :k]
        if self.wide:   # U_k = Q_k,  S_k V_k^T = Q_k^T M
            B, A = Qk * sq, (Qk.T @ self.M) * inv_sq[:, None]
        else:           # V_k = Q_k,  U_k S_k = M Q_k
            B, A = (self.M @ Qk) * inv_sq, sq[:, None] * Qk.T
        if self.undo_left is not None:
            B = self.undo_left(B)
        if self.undo_right is not None:
            A = self.undo_right(A)
        return B, A


def truncated_factors(M: torch.Tensor, k: int, oversample: int = 16, power_iters: int = 6,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-k factors B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T of M by randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Algorithm 4.4), float64: a Gaussian sketch of k + `oversample` columns,
    `power_iters` rounds of re-orthonormalised M M^T products, then the SVD of the small projected matrix.
    Costs O(m n (k + p)) per round instead of the O(min(m, n)^3) of a full decomposition; for a small k
    (EoRA's rank-32 path) and a decaying spectrum the top-k subspace is accurate to many digits after a few
    rounds. Seeded: the same M gives the same factors."""
    M = M.double()
    k = min(k, *M.shape)
    width = min(k + oversample, *M.shape)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(M.shape[1], width, dtype=M.dtype, generator=generator).to(M.device)
    Q = torch.linalg.qr(M @ sketch).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)   # [width, n]: small
    sq = S[:k].sqrt()
    return (Q @ U[:, :k]) * sq, sq[:, None] * Vh[:k]


class Method(Stage):
    """Base of all methods, the factorizer stage of a recipe: `statistics` are the input statistics it reads,
    `model_passes` the whole-model passes (e.g. "fisher") whose per-Linear values it reads."""
    kind = "factorizer"

    def decompose(self, weight: torch.Tensor, stats) -> Decomposition:
        raise NotImplementedError


def derived(stats, key, compute: Callable[[], torch.Tensor]):
    """A quantity derived from one statistics object, computed once: q/k/v (and gate/up) share their input
    statistics (and their `cache`), so one Cholesky or eigendecomposition serves the whole group."""
    if key not in stats.cache:
        stats.cache[key] = compute()
    return stats.cache[key]


def get_method(name: str, **options) -> Method:
    from rankwise.errors import RankwiseError
    if name not in REGISTRY:
        raise RankwiseError(f"unknown method {name!r}: choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)
