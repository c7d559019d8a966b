"""Loss-aware ranks (compress.allocate.loss_aware_ranks): singular components kept in order of predicted loss
per parameter (the factorizer's truncation error weighted by the output Fisher diagonal, passes
`output-fisher` then `truncation-loss`); one global threshold for the exact parameter budget."""
from rankwise.compress.allocate import loss_aware_ranks
from rankwise.compress.stages.base import Allocator, register_allocator


@register_allocator("loss-aware")
class LossAwareRanks(Allocator):
    model_passes = ("output-fisher", "truncation-loss")

    def allocate(self, job, ratio):
        return loss_aware_ranks(job.shapes, job.passes["truncation-loss"], ratio, self.options.rank_multiple)
