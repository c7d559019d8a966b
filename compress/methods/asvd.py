"""ASVD (Yuan et al. 2023, arXiv:2312.05821): scale input channels by mean |x|^alpha before the SVD.

M = W diag(s^alpha), s_j = mean over calibration tokens of |x_j|; A <- A diag(s^-alpha). Channels with large
activations (outliers) get their columns preserved first.
"""
from pydantic import Field

from rankwise.compress.methods.base import Method, register
from rankwise.compress.numerics import Decomposition
from rankwise.compress.stages.base import Statistics, StageOptions


class ASVDOptions(StageOptions):
    alpha: float = Field(0.5, gt=0, allow_inf_nan=False, description="exponent on mean |x|")


@register("asvd")
class ASVD(Method):
    Options = ASVDOptions
    statistics = Statistics(abs_mean=True)

    def decompose(self, weight, stats) -> Decomposition:
        s = stats.abs_mean.to(weight.device)
        # A dead channel (always zero) would make the scale singular; its column does not matter for the data.
        s = s.clamp_min(s.max() * 1e-6 + 1e-12) ** self.options.alpha
        return Decomposition(weight.to(s.dtype) * s[None, :], undo_right=lambda A: A / s[None, :].to(A.dtype))
