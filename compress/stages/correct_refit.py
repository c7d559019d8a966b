"""Refit (SVD-LLM's update step in closed form, compress.correct): decompose W G C^-1, the dense layer
re-expressed on the compressed inputs, then re-solve B by ridge least squares on the dense layer's outputs."""
from rankwise.compress.correct import refit_b
from rankwise.compress.stages.base import Corrector, Statistics, register_corrector


@register_corrector("refit")
class Refit(Corrector):
    statistics = Statistics(xtx=True, cross=True)

    def before_factorize(self, work):
        # for SVD-LLM the truncation is then the exact rank-k optimum of E||W' x_c - W x_d||
        work.decompose_from = work.target(self.cfg.refit_damp).to(work.weight.dtype)

    def after_factorize(self, work):
        work.B = refit_b(work.weight, work.A, work.stats, self.cfg.refit_damp, B0=work.B)
