"""A recipe: the stages of one compression, built from the settings (or by hand, from registered names)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rankwise.compress.allocate import reserved_ratio, total_params
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

    def reserve(self, shapes) -> int:
        """Parameters the correctors add (EoRA's paths) when the matrices in `shapes` are factorized."""
        return sum(c.reserved_params(shapes) for c in [*self.correctors, *self.block_correctors])

    def base_ratio(self, ratio: float, shapes, factorized=None) -> float:
        """The ratio the factorization must reach so that what the correctors add to the `factorized` matrices
        (default: all) still fits in `ratio` of `shapes`."""
        reserve = self.reserve(shapes if factorized is None else factorized)
        return reserved_ratio(shapes, ratio, reserve) if reserve else ratio

    def allocate(self, job, ratio: float) -> dict:
        """The allocator's ranks with the correctors' parameters inside `ratio`. Correctors add only to the
        matrices that get factorized, and an allocator may keep some dense (WeLore, loss-aware): reserving for
        every matrix would overshoot the ratio by the paths never built. So reserve for all, then for the
        ones factorized, and allocate again while the result still fits (a few rounds: the set settles)."""
        shapes = job.shapes
        budget = (1.0 - ratio) * sum(s.dense_params for s in shapes.values())
        ranks = self.allocator.allocate(job, self.base_ratio(ratio, shapes))
        for _ in range(4):
            factorized = {n: s for n, s in shapes.items() if ranks[n] is not None}
            again = self.allocator.allocate(job, self.base_ratio(ratio, shapes, factorized))
            kept = {n: s for n, s in shapes.items() if again[n] is not None}
            if again == ranks or total_params(shapes, again) + self.reserve(kept) > budget:
                break
            ranks = again
        return ranks
