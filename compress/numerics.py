"""The numerics every stage shares, one place for each: the thin SVD through the Gram matrix (Decomposition) and
its randomized top-k variant, Cholesky with a fallback, ridge solves, the dense layer re-expressed on the
compressed stream, quantities derived once per input group, and the parameter accounting with the one
threshold-and-bisect search the rank allocators use. Stages depend on this module, not on each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rankwise.errors import RankwiseError


# ---------------------------------------------------------------- decompositions

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
        W's output space for transforms that leave the output side alone (SVD-LLM, ASVD, plain SVD).
        weights [k, out] (a sketch Z of a weight matrix F = E[Z^T Z]): ||Z sigma_i u_i||^2, the error weighted
        by the whole matrix."""
        S, Q = self._eigh()
        errors = Q * S if self.wide else self.M @ Q   # sigma_i u_i: Q = U when wide, else M v_i with Q = V
        if weights.dim() == 2:
            return (weights.to(self.M) @ errors).pow(2).sum(0)
        return (errors.pow(2) * weights.to(self.M)[:, None]).sum(0)

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


def derived(stats, key, compute: Callable[[], torch.Tensor]):
    """A quantity derived from one statistics object, computed once: q/k/v (and gate/up) share their input
    statistics (and their `cache`), so one Cholesky or eigendecomposition serves the whole group."""
    if key not in stats.cache:
        stats.cache[key] = compute()
    return stats.cache[key]


# ---------------------------------------------------------------- Cholesky, ridge solves

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


def ridge(M: torch.Tensor, damp: float) -> torch.Tensor:
    """M + lambda I with lambda = damp * mean diag(M): a damping relative to the matrix's own scale."""
    lam = damp * M.diagonal().mean().clamp_min(1e-12)
    return M + lam * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def target_weight(weight: torch.Tensor, stats, damp: float = 1e-4) -> torch.Tensor:
    """W G C^-1, the dense layer re-expressed on compressed inputs, ridge-shrunk toward W itself:
    W + W (G - C)(C + lambda I)^-1 (= W G C^-1 at lambda = 0, = W as lambda grows; W when x_d = x_c)."""
    W = weight.double()
    if getattr(stats, "cross", None) is None:
        return W
    dev = W.device
    C = stats.covariance.to(dev)
    G = stats.cross_covariance.to(dev)
    ridged = derived(stats, ("ridge_cholesky", damp, dev), lambda: torch.linalg.cholesky_ex(ridge(C, damp)))
    L, info = ridged
    if int(info) != 0:  # numerically indefinite despite the ridge: a general solve still works
        return W + torch.linalg.solve(ridge(C, damp), (W @ (G - C)).T).T
    return W + torch.cholesky_solve((W @ (G - C)).T, L).T   # C symmetric


# ---------------------------------------------------------------- parameter accounting and the budget search
# A dense [m, n] Linear stores m n weights; rank k stores k (m + n). Biases are kept either way and counted on
# both sides. Factorizing saves parameters only when k < m n / (m + n) (the break-even rank); a matrix whose
# rank would not be below it stays dense, and the others make up for it.

# A byte budget (--size-ratio) prices the same choices in stored bytes instead: float weights as deployed, at 16
# bits (FLOAT_BYTES; fp32 factors at 32), quantized factors at their element size plus their float32 scales.
FLOAT_BYTES = 2
SCALE_BYTES = 4


@dataclass(frozen=True)
class StoragePrice:
    """Stored bytes of one factor by how it is stored (lowrank.FACTOR_DTYPES), scales included: `element`
    bytes per weight, plus one float32 scale per row (int8) or per `group` inputs of each row (int4)."""
    element: float = FLOAT_BYTES
    scale_per_row: bool = False
    group: int = 0

    @classmethod
    def of(cls, factor_dtype: str, group: int) -> "StoragePrice":
        return {"int8": cls(1.0, scale_per_row=True), "int4": cls(0.5, group=group), "fp32": cls(4.0)}.get(
            factor_dtype, cls())

    def factor(self, rows: int, cols: int) -> float:
        scales = rows if self.scale_per_row else (rows * cols / self.group if self.group else 0)
        return rows * cols * self.element + SCALE_BYTES * scales


@dataclass(frozen=True)
class MatrixShape:
    """A targeted Linear [out, inp]. `price` set: the budget counts stored bytes (`cost`), the dense matrix at 16
    bits per weight; None: it counts parameters. `params` always counts parameters."""
    out: int
    inp: int
    bias: bool = False
    price: StoragePrice | None = None

    def priced(self, price: StoragePrice | None) -> "MatrixShape":
        return MatrixShape(self.out, self.inp, self.bias, price)

    def cost(self, rank: int | None) -> float:
        """What the budget counts at `rank` (None = kept dense): parameters, or stored bytes."""
        if self.price is None:
            return self.params(rank)
        if rank is None:
            return FLOAT_BYTES * self.dense_params
        return (self.price.factor(rank, self.inp) + self.price.factor(self.out, rank)
                + (FLOAT_BYTES * self.out if self.bias else 0))

    @property
    def dense_cost(self) -> float:
        return self.cost(None)

    @property
    def rank_cost(self) -> float:
        """What one more rank costs (parameters: out + inp)."""
        return self.cost(2) - self.cost(1)

    def path_cost(self, params: int) -> float:
        """What a float residual path of `params` parameters costs."""
        return params if self.price is None else FLOAT_BYTES * params

    @property
    def dense_params(self) -> int:
        return self.out * self.inp + (self.out if self.bias else 0)

    def params(self, rank: int | None) -> int:
        """Stored parameters at `rank` (None = kept dense)."""
        if rank is None:
            return self.dense_params
        return rank * (self.out + self.inp) + (self.out if self.bias else 0)

    @property
    def break_even(self) -> float:
        """The rank at which the factors cost what the dense matrix does (parameters: m n / (m + n))."""
        return (self.dense_cost - self.cost(0)) / self.rank_cost

    def saves(self, rank: int) -> bool:
        return self.cost(rank) < self.dense_cost


def round_rank(k: float, multiple: int) -> int:
    """Round down to a multiple (at least one multiple, at least rank 1)."""
    k = int(k)
    if multiple > 1:
        k = (k // multiple) * multiple
        return max(k, multiple)
    return max(k, 1)


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise RankwiseError(f"--ratio must be in (0, 1) (fraction of targeted parameters removed), got {ratio}")


def total_params(shapes: dict[str, MatrixShape], ranks: dict[str, int | None]) -> int:
    return sum(s.params(ranks.get(n)) for n, s in shapes.items())


def total_cost(shapes: dict[str, MatrixShape], ranks: dict[str, int | None]) -> float:
    """What the budget counts (parameters, or stored bytes: MatrixShape.price)."""
    return sum(s.cost(ranks.get(n)) for n, s in shapes.items())


def dense_cost(shapes: dict[str, MatrixShape]) -> float:
    return sum(s.dense_cost for s in shapes.values())


def path_cost(shapes: dict[str, MatrixShape], params: int) -> float:
    """What residual paths of `params` parameters cost in the budget's unit."""
    return next(iter(shapes.values())).path_cost(params) if shapes else params


def budget_unit(shapes: dict[str, MatrixShape]) -> str:
    return "bytes" if any(s.price is not None for s in shapes.values()) else "parameters"


def matching_names(shapes: dict[str, MatrixShape], patterns) -> frozenset[str]:
    """Names equal to a pattern or ending in "." + pattern ("k_proj" picks every block's k_proj)."""
    found = {p: {n for n in shapes if n == p or n.endswith("." + p)} for p in patterns}
    for p, names in found.items():
        if not names:
            raise RankwiseError(f"keep-dense pattern {p!r} matches no targeted matrix")
    return frozenset().union(*found.values())


def summarize(shapes: dict[str, MatrixShape], ranks: dict[str, int | None], extra: int = 0) -> dict:
    before = sum(s.dense_params for s in shapes.values())
    after = total_params(shapes, ranks) + extra
    return {"params_before": before, "params_after": after, "ratio_achieved": 1 - after / before,
            "factorized": sum(r is not None for r in ranks.values()),
            "kept_dense": sorted(n for n, r in ranks.items() if r is None)}


def reserved_ratio(shapes: dict[str, MatrixShape], ratio: float, reserve: int) -> float:
    """The ratio the base factorization must reach so that base + `reserve` extra parameters (an EoRA path)
    still removes `ratio` of the targeted parameters."""
    check_ratio(ratio)
    dense = dense_cost(shapes)
    eff = 1.0 - ((1.0 - ratio) * dense - path_cost(shapes, reserve)) / dense
    if eff >= 1.0:
        raise RankwiseError(f"ratio {ratio} leaves no room for the compensation path ({reserve:,} parameters): "
                            f"lower --eora-rank or --ratio")
    return eff


def capped_rank(shape: MatrixShape, k: float, multiple: int) -> int | None:
    """k rounded down to a multiple, at most full rank; None (kept dense) when it would not save parameters."""
    k = min(round_rank(k, multiple), min(shape.out, shape.inp))
    return k if shape.saves(k) else None


def bisect(fits: Callable[[float], bool], good: float, bad: float, steps: int = 60) -> float:
    """The point nearest `bad` where the monotone predicate `fits` still holds (fits(good) is assumed)."""
    for _ in range(steps):
        mid = (good + bad) / 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def threshold_ranks(shapes: dict[str, MatrixShape], ranks_at: Callable[[float], dict[str, int | None]],
                    ratio: float, good: float, bad: float, what: str) -> tuple[dict[str, int | None], float]:
    """The allocators' one search: ranks_at(t) gives every matrix's rank at a threshold t, monotone in t; find
    the t nearest `bad` whose ranks keep at most (1 - ratio) of the targeted parameters, or of their 16-bit
    bytes when the shapes are priced in bytes (bisection from `good`,
    which must fit), and return those ranks and t. Over budget even at `good`: one line naming `what`."""
    check_ratio(ratio)
    dense = dense_cost(shapes)
    budget = (1.0 - ratio) * dense
    t = bisect(lambda x: total_cost(shapes, ranks_at(x)) <= budget, good, bad)
    ranks = ranks_at(t)
    if total_cost(shapes, ranks) > budget:
        kept = total_cost(shapes, ranks) / dense
        if budget_unit(shapes) == "bytes":
            raise RankwiseError(f"size ratio {1 - ratio:g} cannot be reached {what}: even the smallest ranks "
                                f"keep {kept:.1%} of the 16-bit bytes")
        raise RankwiseError(f"ratio {ratio} cannot be reached {what}: even the smallest ranks keep "
                            f"{kept:.1%} of the parameters")
    return ranks, t
