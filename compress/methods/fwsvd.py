"""FWSVD (Hsu et al., ICLR 2022, arXiv:2207.00112): Fisher-weighted SVD.

Row importance d_i = sqrt(sum_j I_ij) from the empirical Fisher (calib.fisher). SVD of diag(d) W, truncate,
B = diag(d)^-1 U_k sqrt(S_k): rows the loss is sensitive to are reconstructed first.
Memory: the Fisher pass runs the whole model forward and backward, one calibration sequence at a time with
gradient checkpointing: about the model's weights + one sequence's hidden states per layer + its logits.
"""
from rankwise.compress.methods.base import Method, register
from rankwise.compress.numerics import Decomposition


@register("fwsvd")
class FWSVD(Method):
    model_passes = ("fisher",)

    def decompose(self, weight, stats) -> Decomposition:
        d = stats.fisher.to(weight.device).double().sqrt()
        d = d.clamp_min(d.max() * 1e-6 + 1e-30)  # a row with zero gradient would make the weighting singular
        return Decomposition(weight.double() * d[:, None], undo_left=lambda B: B / d[:, None].to(B.dtype))
