"""Loss-aware ranks: singular components kept in order of predicted loss per parameter (the factorizer's
truncation error weighted by the output Fisher diagonal, passes `output-fisher` then `truncation-loss`); one
global threshold for the exact parameter budget."""
import math

import torch

from rankwise.compress.numerics import MatrixShape, capped_rank, check_ratio, matching_names, threshold_ranks
from rankwise.compress.stages.base import Allocator, register_allocator
from rankwise.errors import RankwiseError


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
        scores[name] = c / shapes[name].rank_cost   # m + n parameters, or the rank's stored bytes
    return scores


def loss_aware_ranks(shapes: dict[str, MatrixShape], costs: dict, ratio: float, multiple: int = 1,
                     keep_dense=()) -> dict[str, int | None]:
    """Spend the parameter budget where the predicted loss per parameter is smallest to lose: keep every
    singular component whose score (`truncation_scores`) is above one global threshold tau, found by
    bisection (on log tau) so the kept parameters are at most (1 - ratio) of the targeted ones. Taking
    components in score order is the greedy solution of the knapsack; the bisection only finds where the
    budget ends (to within one component of one matrix). A matrix whose rank would not save parameters
    stays dense, and so do `keep_dense`. costs: name -> predicted loss of dropping each component."""
    check_ratio(ratio)
    keep = matching_names(shapes, keep_dense)
    scores = truncation_scores(costs, shapes)
    positive = torch.cat([s[s > 0] for s in scores.values()])
    if positive.numel() == 0:
        raise RankwiseError("loss-aware ranks: every predicted truncation loss is zero (no calibration signal)")
    lo, hi = math.log(float(positive.min())) - 1.0, math.log(float(positive.max())) + 1.0

    def ranks_at(log_tau: float) -> dict[str, int | None]:   # scores descend: those above tau are a prefix
        tau = math.exp(log_tau)
        return {n: None if n in keep else capped_rank(s, int((scores[n] >= tau).sum()), multiple)
                for n, s in shapes.items()}
    # kept params fall as tau grows: the smallest tau within budget
    return threshold_ranks(shapes, ranks_at, ratio, hi, lo, "by loss-aware ranks")[0]


@register_allocator("loss-aware")
class LossAwareRanks(Allocator):
    model_passes = ("output-fisher", "truncation-loss")

    def allocate(self, job, ratio):
        return loss_aware_ranks(job.shapes, job.passes["truncation-loss"], ratio, self.options.rank_multiple,
                                self.options.keep_dense)
