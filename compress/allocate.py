"""Rank allocation: which rank each targeted matrix keeps so the targeted parameters drop by `ratio`.

Accounting (exact, used everywhere): a dense [m, n] Linear stores m n weights; rank k stores k (m + n).
Biases are kept either way and counted on both sides. Factorizing saves parameters only when
k < m n / (m + n) (the break-even rank); a matrix whose rank would not be below it stays dense, and the
others make up for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.errors import RankwiseError


@dataclass(frozen=True)
class MatrixShape:
    out: int
    inp: int
    bias: bool = False

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
        return self.out * self.inp / (self.out + self.inp)

    def saves(self, rank: int) -> bool:
        return rank * (self.out + self.inp) < self.out * self.inp


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


def matching_names(shapes: dict[str, MatrixShape], patterns) -> frozenset[str]:
    """Names equal to a pattern or ending in "." + pattern ("k_proj" picks every block's k_proj)."""
    found = {p: {n for n in shapes if n == p or n.endswith("." + p)} for p in patterns}
    for p, names in found.items():
        if not names:
            raise RankwiseError(f"keep-dense pattern {p!r} matches no targeted matrix")
    return frozenset().union(*found.values())


def _ranks_at(shapes: dict[str, MatrixShape], keep: float, multiple: int,
              keep_dense: frozenset[str] = frozenset()) -> dict[str, int | None]:
    out = {}
    for name, s in shapes.items():
        if name in keep_dense:
            out[name] = None
            continue
        k = min(round_rank(keep * s.break_even, multiple), min(s.out, s.inp))
        out[name] = k if s.saves(k) else None
    return out


def uniform_ranks(shapes: dict[str, MatrixShape], ratio: float, multiple: int = 1,
                  keep_dense=()) -> dict[str, int | None]:
    """Every matrix keeps the same fraction f of its own break-even rank m n / (m + n), so each shape gets its
    own rank (q, k, v, o of a GQA model differ). f = 1 - ratio removes `ratio` of every matrix; when rounding
    or dense-kept matrices shift the total, f is re-solved by bisection so the total still hits `ratio`
    (removed >= target, over by less than one rank step per matrix). Returns name -> rank or None (dense).
    `keep_dense` names matrices to leave dense whatever their rank (e.g. small ones that run slower
    factorized, see bench/infer.py --layer-table): the others give up more so the total still hits `ratio`.
    """
    keep_dense = matching_names(shapes, keep_dense)
    check_ratio(ratio)
    dense = sum(s.dense_params for s in shapes.values())
    budget = (1.0 - ratio) * dense
    ranks = _ranks_at(shapes, 1.0 - ratio, multiple, keep_dense)
    if all(r is not None for r in ranks.values()) and multiple == 1:
        return ranks
    # kept params grow with f: the largest f within budget
    f = _bisect(lambda x: total_params(shapes, _ranks_at(shapes, x, multiple, keep_dense)) <= budget, 0.0, 1.0)
    ranks = _ranks_at(shapes, f, multiple, keep_dense)
    if total_params(shapes, ranks) > budget:
        raise RankwiseError(f"ratio {ratio} cannot be reached with rank multiple {multiple}: even the smallest "
                            f"ranks keep {total_params(shapes, ranks) / dense:.1%} of the parameters")
    return ranks


def _bisect(fits, good: float, bad: float, steps: int = 60) -> float:
    """The point nearest `bad` where the monotone predicate `fits` still holds (fits(good) is assumed)."""
    for _ in range(steps):
        mid = (good + bad) / 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


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
    dense = sum(s.dense_params for s in shapes.values())
    eff = 1.0 - ((1.0 - ratio) * dense - reserve) / dense
    if eff >= 1.0:
        raise RankwiseError(f"ratio {ratio} leaves no room for the compensation path ({reserve:,} parameters): "
                            f"lower --eora-rank or --ratio")
    return eff


def _welore_at(shapes, normalized, tau: float, multiple: int) -> dict[str, int | None]:
    out = {}
    for name, s in shapes.items():
        k = int((normalized[name] >= tau).sum())
        k = min(round_rank(k, multiple) if multiple > 1 else max(k, 1), min(s.out, s.inp))
        out[name] = k if s.saves(k) else None
    return out


def welore_ranks(shapes: dict[str, MatrixShape], spectra: dict, ratio: float,
                 multiple: int = 1) -> dict[str, int | None]:
    """WeLore (Jaiswal et al. 2024, arXiv:2407.11239): one global threshold tau on each matrix's normalised
    singular values s_hat = (s - min s) / (max s - min s); a matrix keeps the s_hat >= tau. Heavy-tailed
    spectra lose many ranks, flat ones few. Matrices whose kept rank would not save parameters stay dense
    (WeLore's non-low-rank components). tau is found by bisection so the kept parameters are at most
    (1 - ratio) of the targeted ones and as close to it as the discrete ranks allow.
    spectra: name -> 1-D tensor of singular values (any order; of the spectrum the method truncates).
    """
    check_ratio(ratio)
    normalized = {}
    for name, s in spectra.items():
        s = s.double().flatten().sort(descending=True).values
        span = (s[0] - s[-1]).clamp_min(1e-30)
        normalized[name] = (s - s[-1]) / span
    dense = sum(s.dense_params for s in shapes.values())
    budget = (1.0 - ratio) * dense
    # kept params fall as tau grows: the smallest tau within budget
    tau = _bisect(lambda t: total_params(shapes, _welore_at(shapes, normalized, t, multiple)) <= budget,
                  1.0 + 1e-9, 0.0)
    ranks = _welore_at(shapes, normalized, tau, multiple)
    if total_params(shapes, ranks) > budget:
        raise RankwiseError(f"ratio {ratio} cannot be reached by WeLore thresholds: even tau = 1 keeps "
                            f"{total_params(shapes, ranks) / dense:.1%} of the parameters")
    return ranks


def truncation_scores(costs: dict, shapes: dict[str, MatrixShape]) -> dict:
    """Predicted loss per parameter of each singular component: c_ij / (m_j + n_j), non-increasing in i.

    costs: name -> predicted loss of dropping each component, in the factorizer's order (largest singular value
    first). For whitened methods (SVD-LLM: SVD of W L, L L^T = X^T X) dropping component i adds exactly
    sigma_i u_i v_i^T L^T to the layer's output over the calibration set (Wang et al., ICLR 2025, Theorem 1;
    SVD-LLM V2, NAACL 2025, allocates from this truncation loss); weighting it per output feature by the
    output Fisher diagonal, c_i = sum_o f_o (sigma_i u_io)^2, turns it into a second-order estimate of the
    loss it costs, comparable between layers (pass `truncation-loss`). A rank-k cut drops a suffix, so each
    component is scored no higher than the ones before it (running minimum): a threshold keeps a prefix.
    Each component costs m + n parameters.
    """
    scores = {}
    for name, c in costs.items():
        c = torch.cummin(c.double().flatten().clamp_min(0), 0).values
        scores[name] = c / (shapes[name].out + shapes[name].inp)
    return scores


def _loss_aware_at(shapes, scores, tau: float, multiple: int) -> dict[str, int | None]:
    out = {}
    for name, s in shapes.items():
        k = int((scores[name] >= tau).sum())        # scores descend: the components above tau are a prefix
        k = min(round_rank(k, multiple), min(s.out, s.inp))
        out[name] = k if s.saves(k) else None
    return out


def loss_aware_ranks(shapes: dict[str, MatrixShape], costs: dict, ratio: float,
                     multiple: int = 1) -> dict[str, int | None]:
    """Spend the parameter budget where the predicted loss per parameter is smallest to lose: keep every
    singular component whose score (`truncation_scores`) is above one global threshold tau, found by
    bisection (on log tau) so the kept parameters are at most (1 - ratio) of the targeted ones. Taking
    components in score order is the greedy solution of the knapsack; the bisection only finds where the
    budget ends (to within one component of one matrix). A matrix whose rank would not save parameters
    stays dense. costs: name -> predicted loss of dropping each component (`truncation_scores`)."""
    check_ratio(ratio)
    scores = truncation_scores(costs, shapes)
    positive = torch.cat([s[s > 0] for s in scores.values()])
    if positive.numel() == 0:
        raise RankwiseError("loss-aware ranks: every predicted truncation loss is zero (no calibration signal)")
    lo, hi = math.log(float(positive.min())) - 1.0, math.log(float(positive.max())) + 1.0
    budget = (1.0 - ratio) * sum(s.dense_params for s in shapes.values())
    fits = lambda t: total_params(shapes, _loss_aware_at(shapes, scores, math.exp(t), multiple)) <= budget
    log_tau = _bisect(fits, hi, lo)                 # kept params fall as tau grows: the smallest tau in budget
    ranks = _loss_aware_at(shapes, scores, math.exp(log_tau), multiple)
    if total_params(shapes, ranks) > budget:
        raise RankwiseError(f"ratio {ratio} cannot be reached by loss-aware ranks: even the smallest ranks keep "
                            f"{total_params(shapes, ranks) / (budget / (1.0 - ratio)):.1%} of the parameters")
    return ranks
