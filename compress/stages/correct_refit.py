"""Refit (SVD-LLM's update step in closed form, compress.correct): decompose W G C^-1, the dense layer
re-expressed on the compressed inputs, then re-solve B by ridge least squares on the dense layer's outputs."""
from pydantic import Field

from rankwise.compress.correct import refit_b
from rankwise.compress.stages.base import Corrector, StageOptions, StageRecord, Statistics, register_corrector


class RefitOptions(StageOptions):
    damp: float = Field(1.0, ge=0, allow_inf_nan=False, description="ridge damping relative to the mean input "
                        "energy; shrinks the fit toward the plain truncation (1.0: chosen on austen.txt)")


class RefitRecord(StageRecord):
    linears: int = 0   # Linears whose B was re-solved


@register_corrector("refit")
class Refit(Corrector):
    Options = RefitOptions
    Record = RefitRecord
    statistics = Statistics(xtx=True, cross=True)

    def before_factorize(self, work):
        # for SVD-LLM the truncation is then the exact rank-k optimum of E||W' x_c - W x_d||
        work.decompose_from = work.target(self.options.damp).to(work.weight.dtype)

    def after_factorize(self, work):
        work.B = refit_b(work.weight, work.A, work.stats, self.options.damp, B0=work.B)
        self.record.linears += 1
