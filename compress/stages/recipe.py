"""A recipe: the stages of one compression, built from the settings (or by hand, from registered names)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rankwise.compress.allocate import reserved_ratio
from rankwise.compress.methods import Method, get_method
from rankwise.compress.stages.base import (
    ALLOCATORS, BLOCK_CORRECTORS, CORRECTORS, PASSES, Allocator, BlockCorrector, Corrector, ModelPass, Statistics)
from rankwise.compress.stages import (  # noqa: F401  (the built-in stages register themselves)
    allocate_loss_aware, allocate_uniform, allocate_welore, correct_eora, correct_refit, pass_fisher,
    pass_output_fisher, pass_spectra, pass_truncation_loss, refine_block)
from rankwise.errors import RankwiseError


def _lookup(registry: dict, name: str, kind: str):
    if name not in registry:
        raise RankwiseError(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(registry))}")
    return registry[name]


@dataclass
class Recipe:
    allocator: Allocator
    factorizer: Method
    correctors: list[Corrector]
    block_correctors: list[BlockCorrector]

    @classmethod
    def from_config(cls, cfg, correctors: Sequence[str] | None = None,
                    block_correctors: Sequence[str] | None = None) -> "Recipe":
        """The settings' recipe; `correctors` replaces the list the settings imply (refit, then eora), and
        `block_correctors` the one they imply (block-refine with --refine)."""
        if correctors is None:
            correctors = (["refit"] if cfg.refit else []) + (["eora"] if cfg.compensate == "eora" else [])
        if block_correctors is None:
            block_correctors = ["block-refine"] if cfg.refine else []
        return cls(allocator=_lookup(ALLOCATORS, cfg.ranks, "rank allocation")(cfg),
                   factorizer=get_method(cfg.method, **cfg.method_options()),
                   correctors=[_lookup(CORRECTORS, n, "corrector")(cfg) for n in correctors],
                   block_correctors=[_lookup(BLOCK_CORRECTORS, n, "block corrector")(cfg) for n in block_correctors])

    @property
    def stages(self) -> list:
        return [self.factorizer, self.allocator, *self.correctors, *self.block_correctors]

    @property
    def statistics(self) -> Statistics:
        out = Statistics()
        for s in self.stages:
            out = out | s.statistics
        return out

    @property
    def dense_stream(self) -> bool:
        return any(s.dense_stream for s in self.stages) or self.statistics.cross

    @property
    def model_passes(self) -> list[ModelPass]:
        """Passes named by any stage, each once, in the order named (the factorizer's first: the spectra
        pass reads the Fisher rows)."""
        names = list(dict.fromkeys(n for s in self.stages for n in s.model_passes))
        return [_lookup(PASSES, n, "model pass")() for n in names]

    def base_ratio(self, ratio: float, shapes) -> float:
        """The ratio the factorization must reach so that what the correctors add still fits in `ratio`."""
        reserve = sum(c.reserved_params(shapes) for c in [*self.correctors, *self.block_correctors])
        return reserved_ratio(shapes, ratio, reserve) if reserve else ratio
