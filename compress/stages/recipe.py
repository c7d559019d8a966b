"""A recipe: the stages of one compression, built from recipe entries ({stage, options}), and the record of
what they did (the CompressionResult the checkpoint stores)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from rankwise.compress.numerics import dense_cost, path_cost, reserved_ratio, summarize, total_cost
from rankwise.compress.describe import pipeline_label
from rankwise.compress.lowrank import LoraLinear, LowRankLinear
from rankwise.compress.metadata import Calibration, CompressionResult, ModuleSpec, StageRun
from rankwise.compress.methods import Method
from rankwise.compress.stages.base import (
    PASSES, Allocator, BlockCorrector, Corrector, ModelCorrector, ModelPass, Stage, Statistics, find_stage)
from rankwise.compress.stages import (  # noqa: F401  (the built-in stages register themselves)
    allocate_loss_aware, allocate_uniform, allocate_welore, correct_eora, correct_refit, given_model, pass_fisher,
    pass_output_fisher, pass_spectra, pass_truncation_loss, refine_block, refine_kl)
from rankwise.errors import RankwiseError, RankwiseWarning

DEFAULT_FACTORIZER, DEFAULT_ALLOCATOR = "svd-llm", "uniform"


def build_stage(entry: dict) -> Stage:
    """The stage a recipe entry {"stage": name, "options": {...}} names, with its options validated."""
    cls = find_stage(entry["stage"])
    return cls(cls.parse_options(dict(entry.get("options") or {})))


@dataclass
class Recipe:
    """One allocator, one factorizer, Linear correctors, block correctors and model correctors in order, and the
    whole-model passes: those the recipe lists and those its stages name (each once, the listed ones first)."""
    allocator: Allocator
    factorizer: Method
    correctors: list[Corrector] = field(default_factory=list)
    block_correctors: list[BlockCorrector] = field(default_factory=list)
    model_correctors: list[ModelCorrector] = field(default_factory=list)
    listed_passes: list[ModelPass] = field(default_factory=list)
    preset: str | None = None

    def __post_init__(self):
        named = dict.fromkeys(n for s in self.stages for n in s.model_passes)
        self.model_passes = list(self.listed_passes)
        for name in named:
            if not any(p.name == name for p in self.model_passes):
                if name not in PASSES:
                    raise RankwiseError(f"stage {self._asker(name)!r} needs the model pass {name!r}, which is "
                                        f"not registered")
                self.model_passes.append(PASSES[name]())

    def _asker(self, pass_name: str) -> str:
        return next(s.name for s in self.stages if pass_name in s.model_passes)

    @classmethod
    def from_entries(cls, entries: Iterable[dict], preset: str | None = None) -> "Recipe":
        """A recipe from its entries, in any order: at most one factorizer and one allocator (default svd-llm
        and uniform); correctors, block correctors, model correctors and passes keep their order."""
        by_kind: dict[str, list[Stage]] = {}
        for entry in entries:
            stage = build_stage(entry)
            by_kind.setdefault(stage.kind, []).append(stage)
        for kind in ("factorizer", "allocator"):
            if len(by_kind.get(kind, [])) > 1:
                names = ", ".join(s.name for s in by_kind[kind])
                raise RankwiseError(f"a recipe has one {kind}, this one has {len(by_kind[kind])} ({names})")
        return cls(allocator=(by_kind.get("allocator") or [build_stage({"stage": DEFAULT_ALLOCATOR})])[0],
                   factorizer=(by_kind.get("factorizer") or [build_stage({"stage": DEFAULT_FACTORIZER})])[0],
                   correctors=by_kind.get("corrector", []), block_correctors=by_kind.get("block corrector", []),
                   model_correctors=by_kind.get("model corrector", []), listed_passes=by_kind.get("pass", []),
                   preset=preset)

    @classmethod
    def from_config(cls, cfg) -> "Recipe":
        """The recipe the settings hold (given as `recipe`, or expanded from --method, --ranks, ...)."""
        return cls.from_entries(cfg.stages(), preset=cfg.preset if cfg.preset != "none" else None)

    @property
    def stages(self) -> list[Stage]:
        """Factorizer, allocator, correctors, block correctors, model correctors (`model_passes` run before all
        of them; a pass is named by the factorizer first, whose Fisher rows the spectra pass reads)."""
        return [self.factorizer, self.allocator, *self.correctors, *self.block_correctors, *self.model_correctors]

    def entries(self) -> list[dict[str, Any]]:
        """The resolved recipe as data: every stage with all its options (defaults filled in)."""
        return [{"stage": s.name, "options": s.options.model_dump(mode="json")}
                for s in [*self.model_passes, *self.stages]]

    @property
    def statistics(self) -> Statistics:
        out = Statistics()
        for s in self.stages:
            out = out | s.statistics
        return out

    @property
    def dense_stream(self) -> bool:
        return any(s.dense_stream for s in self.stages) or self.statistics.cross

    def name(self) -> str:
        """The pipeline in one line: each stage's label, and the preset it came from."""
        return pipeline_label([s.label() for s in self.stages], self.preset)

    def reserve(self, shapes) -> int:
        """Parameters the correctors add (EoRA's paths) when the matrices in `shapes` are factorized."""
        return sum(c.reserved_params(shapes) for c in [*self.correctors, *self.block_correctors,
                                                       *self.model_correctors])

    def base_ratio(self, ratio: float, shapes, factorized=None) -> float:
        """The ratio the factorization must reach so that what the correctors add to the `factorized` matrices
        (default: all) still fits in `ratio` of `shapes`."""
        reserve = self.reserve(shapes if factorized is None else factorized)
        return reserved_ratio(shapes, ratio, reserve) if reserve else ratio

    def factorize(self, work) -> None:
        """The factorizer's (B, A) of one Linear into `work` (or the module it replaces the Linear with)."""
        work.B, work.A = self.factorizer.factorize(work)

    def compressed_layer(self, layer: nn.Module, work) -> nn.Module:
        """The module that replaces `layer`: LowRankLinear(B, A) with the layer's bias and dtype, or the module
        the factorizer gave; with the residual path the correctors set (lora_B, lora_A) beside it."""
        new = work.module if work.module is not None else LowRankLinear.from_factors(
            work.B, work.A, getattr(layer, "bias", None), dtype=layer.weight.dtype)
        if work.lora_A is None:
            return new
        if isinstance(new, LowRankLinear):
            new.add_lora(work.lora_B, work.lora_A, dtype=layer.weight.dtype)  # the model's dtype, not the factors'
            return new
        wrapped = LoraLinear(new, work.lora_A.shape[0])
        with torch.no_grad():
            wrapped.lora_A.weight.copy_(work.lora_A)
            wrapped.lora_B.weight.copy_(work.lora_B)
        return wrapped

    def allocate(self, job, ratio: float) -> dict:
        """The allocator's ranks with the correctors' parameters inside `ratio`. Correctors add only to the
        matrices that get factorized, and an allocator may keep some dense (WeLore, loss-aware): reserving for
        every matrix would overshoot the ratio by the paths never built. So reserve for all, then for the
        ones factorized, and allocate again while the result still fits (a few rounds: the set settles)."""
        shapes = job.shapes
        if self.allocator.fixed_ranks:
            return self._recorded(self.allocator.allocate(job, ratio), None)
        budget = (1.0 - ratio) * dense_cost(shapes)   # parameters, or bytes (MatrixShape.price)
        asked = self.base_ratio(ratio, shapes)
        ranks = self.allocator.allocate(job, asked)
        for _ in range(4):
            factorized = {n: s for n, s in shapes.items() if ranks[n] is not None}
            again_ratio = self.base_ratio(ratio, shapes, factorized)
            again = self.allocator.allocate(job, again_ratio)
            kept = {n: s for n, s in shapes.items() if again[n] is not None}
            if again == ranks or total_cost(shapes, again) + path_cost(shapes, self.reserve(kept)) > budget:
                break
            ranks, asked = again, again_ratio
        return self._recorded(ranks, asked)

    def _recorded(self, ranks: dict, asked: float | None) -> dict:
        record = self.allocator.record
        record.ratio = asked
        record.factorized = sum(r is not None for r in ranks.values())
        record.dense = len(ranks) - record.factorized
        return ranks

    def result(self, cfg, shapes, ranks, modules: dict[str, ModuleSpec], params_before: int, params_after: int,
               stage_seconds: dict[str, float]) -> CompressionResult:
        """The CompressionResult of a run of this recipe: the parameter accounting, the modules, and every
        stage with its options and record. A stage's warning (e.g. reverted on every block) is issued once."""
        runs = [StageRun(stage=s.name, kind=s.kind, label=s.label(), options=s.options.model_dump(mode="json"),
                         record=s.record.model_dump(mode="json"), adds_paths=s.reserved_params(shapes) > 0)
                for s in [*self.model_passes, *self.stages]]
        for s in [*self.model_passes, *self.stages]:
            message = s.record.warning()
            if message:
                warnings.warn(message, RankwiseWarning, stacklevel=2)
        lora_params = sum(m.lora_params for m in modules.values())
        summary = summarize(shapes, ranks, extra=lora_params)
        return CompressionResult(
            method=self.factorizer.name, ranks_allocation=self.allocator.name, preset=self.preset, recipe=runs,
            ratio_requested=cfg.ratio, ratio_achieved=summary["ratio_achieved"],
            ratio_achieved_without_compensation=summarize(shapes, ranks)["ratio_achieved"],
            compensation_params=lora_params, targeted_params_before=summary["params_before"],
            targeted_params_after=summary["params_after"], model_params_before=params_before,
            model_params_after=params_after, model_ratio_achieved=1 - params_after / params_before,
            kept_dense=summary["kept_dense"],
            calibration=Calibration(source=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed),
            stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()}, modules=modules)
