"""The parts of a compression recipe, what each one declares it needs, and the records they work on.

A recipe is one rank allocator, one factorizer (compress/methods), an ordered list of Linear correctors and an
ordered list of block correctors; whole-model passes (Fisher, spectra) run first when a stage names them.
Each stage is one file that registers itself here; the pipeline (compress/pipeline.py) only reads what the
stages declare: which whole-model passes to run, which input statistics to accumulate for every input group
(and so whether a dense stream is kept), and it calls the stages in a fixed order. docs/stages.md has the
contract in full.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from rankwise.calib.stats import Statistics

if TYPE_CHECKING:
    from rankwise.calib.capture import BlockInputs
    from rankwise.calib.stats import InputStats
    from rankwise.compress.allocate import MatrixShape
    from rankwise.compress.config import CompressConfig


class Stage:
    """What every stage declares. `statistics`: per-group input statistics it reads; `model_passes`: names of
    whole-model passes (PASSES) whose per-Linear results it reads; `dense_stream`: it needs the dense twin of
    each block and the dense model's hidden states even without the cross statistic (block correctors)."""
    name: ClassVar[str] = ""
    statistics: ClassVar[Statistics] = Statistics()
    model_passes: ClassVar[tuple[str, ...]] = ()
    dense_stream: ClassVar[bool] = False


class LinearStatistics:
    """What a stage reads about one Linear: its group's input statistics (shared by q/k/v, so quantities
    derived from them are computed once per group, `cache`) and the whole-model passes' values for it."""

    def __init__(self, group: "InputStats | None", passes: dict[str, torch.Tensor] | None = None):
        self.group, self.passes = group, passes or {}
        self._cache: dict = {}

    def _need(self, what: str):
        if self.group is None:
            raise RuntimeError(f"{what} was read but no stage of the recipe declared input statistics")
        return self.group

    @property
    def cache(self) -> dict:
        return self.group.cache if self.group is not None else self._cache

    @property
    def covariance(self) -> torch.Tensor:
        return self._need("the input covariance").covariance

    @property
    def abs_mean(self) -> torch.Tensor:
        return self._need("mean |x|").abs_mean

    @property
    def cross(self) -> torch.Tensor | None:
        return getattr(self.group, "cross", None)

    @property
    def cross_covariance(self) -> torch.Tensor:
        return self._need("the dense/compressed cross covariance").cross_covariance

    @property
    def fisher(self) -> torch.Tensor:
        return self.passes["fisher"]


@dataclass
class LinearWork:
    """One Linear being compressed. Correctors may set `decompose_from` before the factorization (the matrix
    the factorizer decomposes, W by default), and change B, A or set the residual path (lora_B, lora_A) after."""
    name: str
    weight: torch.Tensor             # dense W [out, in] on the compute device
    stats: LinearStatistics
    rank: int
    decompose_from: torch.Tensor | None = None
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    _targets: dict = field(default_factory=dict)

    def target(self, damp: float) -> torch.Tensor:
        """W G C^-1 (float64): the dense layer re-expressed on compressed inputs (compress.correct), W when
        there is no dense stream; computed once per damping."""
        from rankwise.compress.correct import target_weight
        if damp not in self._targets:
            self._targets[damp] = target_weight(self.weight, self.stats, damp)
        return self._targets[damp]


@dataclass
class BlockWork:
    """One decoder block after all its Linears were factorized and corrected, before propagation.
    inputs / dense_inputs hold this block's inputs on the compressed / dense stream (dense_block and
    dense_inputs are None unless a stage asked for the dense stream)."""
    index: int
    prefix: str                      # e.g. "model.layers.3"
    block: nn.Module
    inputs: "BlockInputs | None"
    dense_block: nn.Module | None
    dense_inputs: "BlockInputs | None"
    device: torch.device
    factorized: list[str]            # local names of the Linears replaced in this block


@dataclass
class CompressionJob:
    """What the whole-model passes and the allocator see: the model, the calibration tokens, the settings,
    the targeted shapes and the results of the passes that already ran."""
    model: nn.Module
    calib_ids: torch.Tensor
    cfg: "CompressConfig"
    device: torch.device
    storage: torch.device
    shapes: dict[str, "MatrixShape"]
    factorizer: object
    block_source: object = None
    progress: Callable[[str, int, int], None] | None = None
    passes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def pass_values(self, full_name: str) -> dict[str, torch.Tensor]:
        """The passes' values for one Linear (e.g. {"fisher": row sums})."""
        return {p: values[full_name] for p, values in self.passes.items() if full_name in values}


class ModelPass(Stage):
    """A pass over the whole model before any block is compressed; returns a value per targeted Linear."""
    streams: ClassVar[bool] = True  # False: needs every block at once (refused with --stream-weights)
    unsupported_reason: ClassVar[str] = ""

    def run(self, job: CompressionJob) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Allocator(Stage):
    """Ranks per targeted Linear (None: left dense) removing `ratio` of the targeted parameters."""

    def __init__(self, cfg: "CompressConfig"):
        self.cfg = cfg

    def allocate(self, job: CompressionJob, ratio: float) -> dict[str, int | None]:
        raise NotImplementedError


class Corrector(Stage):
    """Changes one Linear's factorization: before it (what is decomposed) and / or after it (B, A, a path)."""

    def __init__(self, cfg: "CompressConfig"):
        self.cfg = cfg

    def reserved_params(self, shapes: dict[str, "MatrixShape"]) -> int:
        """Parameters this corrector adds, paid for inside --ratio (the allocator removes more)."""
        return 0

    def before_factorize(self, work: LinearWork) -> None:
        pass

    def after_factorize(self, work: LinearWork) -> None:
        pass


class BlockCorrector(Stage):
    """Changes a whole block after its Linears are factorized (e.g. refines the factors on the block's
    outputs); runs before the block's outputs are propagated to the next block."""
    dense_stream = True

    def __init__(self, cfg: "CompressConfig"):
        self.cfg = cfg

    def reserved_params(self, shapes: dict[str, "MatrixShape"]) -> int:
        return 0

    def correct_block(self, work: BlockWork) -> None:
        raise NotImplementedError

    def result_fields(self) -> dict:
        """Fields this stage adds to the CompressionResult (e.g. {"refine": Refinement(...)}), after the walk."""
        return {}


PASSES: dict[str, type[ModelPass]] = {}
ALLOCATORS: dict[str, type[Allocator]] = {}
CORRECTORS: dict[str, type[Corrector]] = {}
BLOCK_CORRECTORS: dict[str, type[BlockCorrector]] = {}


def registrar(registry: dict):
    """A class decorator factory: @register(name) sets cls.name and files the class in `registry`."""
    def register(name: str):
        def deco(cls):
            cls.name = name
            registry[name] = cls
            return cls
        return deco
    return register


register_pass = registrar(PASSES)
register_allocator = registrar(ALLOCATORS)
register_corrector = registrar(CORRECTORS)
register_block_corrector = registrar(BLOCK_CORRECTORS)
