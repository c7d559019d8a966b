"""What a factorization method is: a transform of W whose SVD is truncated, and the transform's inverse.

Every method in this family computes the SVD of M = L W R (L, R built from calibration statistics), keeps the
top k singular triplets, and undoes the transform on the factors:
    B = L^-1 U_k sqrt(S_k),  A = sqrt(S_k) V_k^T R^-1,   W ~ B A.
Truncating sigma_i then costs exactly sigma_i in the norm the transform defines (Frobenius for plain SVD,
data-weighted output error for SVD-LLM's whitening). A method is one small module registered by name.

The SVD itself is taken through the eigendecomposition of the smaller Gram matrix, in float64 (see
`Decomposition`), and only as far as it is used: singular values alone for WeLore's spectra, k vectors for a
rank-k cut.
"""
from __future__ import annotations

import torch

from rankwise.compress.numerics import Decomposition, derived, truncated_factors  # noqa: F401  (re-exported)
from rankwise.compress.stages.base import FACTORIZERS, Stage, registrar

REGISTRY = FACTORIZERS
register = registrar(REGISTRY)


class Method(Stage):
    """Base of all methods, the factorizer stage of a recipe: `statistics` are the input statistics it reads,
    `model_passes` the whole-model passes (e.g. "fisher") whose per-Linear values it reads."""
    kind = "factorizer"

    def decompose(self, weight: torch.Tensor, stats) -> Decomposition:
        raise NotImplementedError

    def factorize(self, work) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, A) of one Linear (a LinearWork): its weight (or what a corrector set to decompose instead)
        decomposed, cut at its rank. A factorizer that replaces the layer by a module of its own sets
        `work.module` and returns (None, None)."""
        source = work.weight if work.decompose_from is None else work.decompose_from
        return self.decompose(source, work.stats).factors(work.rank)


def get_method(name: str, **options) -> Method:
    from rankwise.errors import RankwiseError
    if name not in REGISTRY:
        raise RankwiseError(f"unknown method {name!r}: choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)
