"""WeLore (Jaiswal et al. 2024): one global threshold on the normalised spectra of what the factorizer
truncates (compress.allocate.welore_ranks); the spectra come from a pass over the dense model."""
from rankwise.compress.allocate import welore_ranks
from rankwise.compress.stages.base import Allocator, register_allocator


@register_allocator("welore")
class WeLoreRanks(Allocator):
    model_passes = ("spectra",)

    def allocate(self, job, ratio):
        return welore_ranks(job.shapes, job.passes["spectra"], ratio, self.options.rank_multiple)
