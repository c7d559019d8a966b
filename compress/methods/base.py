"""What a factorization method is: a transform of W whose SVD is truncated, and the transform's inverse.

Every method in this family computes the SVD of M = L W R (L, R built from calibration statistics), keeps the
top k singular triplets, and undoes the transform on the factors:
    B = L^-1 U_k sqrt(S_k),  A = sqrt(S_k) V_k^T R^-1,   W ~ B A.
Truncating sigma_i then costs exactly sigma_i in the norm the transform defines (Frobenius for plain SVD,
data-weighted output error for SVD-LLM's whitening). A method is one small module registered by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

REGISTRY: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


@dataclass
class Decomposition:
    """SVD of the transformed weight, with the maps that undo the transform on B (left) and A (right)."""
    U: torch.Tensor        # [m, r]
    S: torch.Tensor        # [r], descending
    Vh: torch.Tensor       # [r, n]
    undo_left: Callable[[torch.Tensor], torch.Tensor] | None = None
    undo_right: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def spectrum(self) -> torch.Tensor:
        """The singular values a rank cut drops from (what WeLore thresholds)."""
        return self.S

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        sq = self.S[:k].sqrt()
        B = self.U[:, :k] * sq
        A = sq[:, None] * self.Vh[:k]
        if self.undo_left is not None:
            B = self.undo_left(B)
        if self.undo_right is not None:
            A = self.undo_right(A)
        return B, A


class Method:
    """Base of all methods: `needs` names the calibration statistics the method reads."""
    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # subset of {"xtx", "abs_mean", "fisher"}

    def decompose(self, weight: torch.Tensor, stats) -> Decomposition:
        raise NotImplementedError


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD. float64 on CPU (cheap at these sizes, exact), float32 on an accelerator (fast)."""
    dtype = torch.float64 if matrix.device.type == "cpu" else torch.float32
    return torch.linalg.svd(matrix.to(dtype), full_matrices=False)


def get_method(name: str, **options) -> Method:
    from calib.errors import RankwiseError
    if name not in REGISTRY:
        raise RankwiseError(f"unknown method {name!r}: choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)
