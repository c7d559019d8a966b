"""Uniform allocation: every matrix keeps the same fraction of its break-even rank (compress.allocate)."""
from rankwise.compress.allocate import uniform_ranks
from rankwise.compress.stages.base import Allocator, register_allocator


@register_allocator("uniform")
class UniformRanks(Allocator):
    def allocate(self, job, ratio):
        return uniform_ranks(job.shapes, ratio, self.options.rank_multiple, self.options.keep_dense)
