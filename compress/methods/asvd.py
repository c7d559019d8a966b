"""ASVD (Yuan et al. 2023, arXiv:2312.05821): scale input channels by mean |x|^alpha before the SVD.

M = W diag(s^alpha), s_j = mean over calibration tokens of |x_j|; A <- A diag(s^-alpha). Channels with large
activations (outliers) get their columns preserved first.
"""
from dataclasses import dataclass


from rankwise.compress.methods.base import Decomposition, Method, register
from rankwise.compress.stages.base import Statistics


@register("asvd")
@dataclass
class ASVD(Method):
    alpha: float = 0.5
    statistics = Statistics(abs_mean=True)

    def decompose(self, weight, stats) -> Decomposition:
        s = stats.abs_mean.to(weight.device)
        # A dead channel (always zero) would make the scale singular; its column does not matter for the data.
        s = s.clamp_min(s.max() * 1e-6 + 1e-12) ** self.alpha
        return Decomposition(weight.to(s.dtype) * s[None, :], undo_right=lambda A: A / s[None, :].to(A.dtype))
