"""Loss-aware ranks (compress.allocate.loss_aware_ranks): singular components kept in order of predicted output
error per parameter, from the spectra of what the factorizer truncates (a pass over the dense model); one
global threshold for the exact parameter budget."""
from rankwise.compress.allocate import loss_aware_ranks
from rankwise.compress.stages.base import Allocator, register_allocator


@register_allocator("loss-aware")
class LossAwareRanks(Allocator):
    model_passes = ("spectra",)

    def allocate(self, job, ratio):
        return loss_aware_ranks(job.shapes, job.passes["spectra"], ratio, self.cfg.rank_multiple)
