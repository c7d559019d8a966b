"""Plain truncated SVD: minimises ||W - BA||_F and ignores the data (a baseline, catastrophic on LLMs)."""
from rankwise.compress.methods.base import Method, register
from rankwise.compress.numerics import Decomposition


@register("svd")
class PlainSVD(Method):
    def decompose(self, weight, stats) -> Decomposition:
        return Decomposition(weight)
