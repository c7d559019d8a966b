"""WeLore (Jaiswal et al. 2024, arXiv:2407.11239): one global threshold on the normalised spectra of what the
factorizer truncates; the spectra come from a pass over the dense model (pass `spectra`)."""
from rankwise.compress.numerics import MatrixShape, capped_rank, check_ratio, matching_names, threshold_ranks
from rankwise.compress.stages.base import Allocator, register_allocator


def welore_ranks(shapes: dict[str, MatrixShape], spectra: dict, ratio: float, multiple: int = 1,
                 keep_dense=()) -> dict[str, int | None]:
    """One global threshold tau on each matrix's normalised singular values s_hat = (s - min s) / (max s -
    min s); a matrix keeps the s_hat >= tau. Heavy-tailed spectra lose many ranks, flat ones few. Matrices whose
    kept rank would not save parameters stay dense (WeLore's non-low-rank components), and so do `keep_dense`.
    tau is found by bisection so the kept parameters are at most (1 - ratio) of the targeted ones and as close
    to it as the discrete ranks allow.
    spectra: name -> 1-D tensor of singular values (any order; of the spectrum the method truncates)."""
    check_ratio(ratio)
    keep = matching_names(shapes, keep_dense)
    normalized = {}
    for name, s in spectra.items():
        s = s.double().flatten().sort(descending=True).values
        span = (s[0] - s[-1]).clamp_min(1e-30)
        normalized[name] = (s - s[-1]) / span

    def ranks_at(tau: float) -> dict[str, int | None]:
        return {n: None if n in keep else capped_rank(s, int((normalized[n] >= tau).sum()), multiple)
                for n, s in shapes.items()}
    # kept params fall as tau grows: the smallest tau within budget
    return threshold_ranks(shapes, ranks_at, ratio, 1.0 + 1e-9, 0.0, "by WeLore thresholds")[0]


@register_allocator("welore")
class WeLoreRanks(Allocator):
    model_passes = ("spectra",)

    def allocate(self, job, ratio):
        return welore_ranks(job.shapes, job.passes["spectra"], ratio, self.options.rank_multiple,
                            self.options.keep_dense)
