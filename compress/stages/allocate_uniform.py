"""Uniform allocation: every matrix keeps the same fraction f of its own break-even rank m n / (m + n), so each
shape gets its own rank (q, k, v, o of a GQA model differ)."""
from rankwise.compress.numerics import MatrixShape, capped_rank, check_ratio, matching_names, threshold_ranks
from rankwise.compress.stages.base import Allocator, register_allocator


def uniform_ranks(shapes: dict[str, MatrixShape], ratio: float, multiple: int = 1,
                  keep_dense=()) -> dict[str, int | None]:
    """f = 1 - ratio removes `ratio` of every matrix; when rounding or dense-kept matrices shift the total, f is
    re-solved by bisection so the total still hits `ratio` (removed >= target, over by less than one rank step
    per matrix). Returns name -> rank or None (dense). `keep_dense` names matrices to leave dense whatever their
    rank (e.g. small ones that run slower factorized, see bench/infer.py --layer-table): the others give up
    more so the total still hits `ratio`."""
    keep = matching_names(shapes, keep_dense)
    check_ratio(ratio)

    def ranks_at(f: float) -> dict[str, int | None]:
        return {n: None if n in keep else capped_rank(s, f * s.break_even, multiple) for n, s in shapes.items()}
    ranks = ranks_at(1.0 - ratio)
    exact = all(s.price is None for s in shapes.values())  # in bytes, the scales shift f * break-even's total
    if all(r is not None for r in ranks.values()) and multiple == 1 and exact:
        return ranks
    # kept params grow with f: the largest f within budget
    return threshold_ranks(shapes, ranks_at, ratio, 0.0, 1.0, f"with rank multiple {multiple}")[0]


@register_allocator("uniform")
class UniformRanks(Allocator):
    def allocate(self, job, ratio):
        return uniform_ranks(job.shapes, ratio, self.options.rank_multiple, self.options.keep_dense)
