"""The parts of a compression recipe, what each one declares it needs, and the records they work on.

A recipe is one rank allocator, one factorizer (compress/methods), an ordered list of Linear correctors, an
ordered list of block correctors and an ordered list of model correctors (run once on the whole model after
the block walk); whole-model passes (Fisher, spectra) run first when a stage names them.
Each stage is one file that registers itself here; the pipeline (compress/pipeline.py) only reads what the
stages declare: which whole-model passes to run, which input statistics to accumulate for every input group
(and so whether a dense stream is kept), and it calls the stages in a fixed order. docs/stages.md has the
contract in full.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from rankwise.calib.stats import Statistics
from rankwise.compress.arch import dense_weight
from rankwise.compress.numerics import MatrixShape, target_weight
from rankwise.errors import RankwiseError

if TYPE_CHECKING:
    from rankwise.calib.capture import BlockInputs
    from rankwise.calib.stats import InputStats
    from rankwise.compress.config import CompressConfig


class StageOptions(BaseModel):
    """A stage's options: the `options` of its recipe entry, validated (an unknown key is refused)."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageRecord(BaseModel):
    """What a stage did, stored in the checkpoint beside its options (JSON: finite numbers only)."""
    model_config = ConfigDict(extra="forbid")

    def warning(self) -> str | None:
        """One line to tell the user after the run (e.g. a stage that changed nothing), or None."""
        return None


class Stage:
    """What every stage declares. `statistics`: per-group input statistics it reads; `model_passes`: names of
    whole-model passes (PASSES) whose per-Linear results it reads; `dense_stream`: it needs the dense twin of
    each block and the dense model's hidden states even without the cross statistic (block correctors).
    `Options` types its recipe options (`self.options`), `Record` what it did (`self.record`, filled in as it
    runs and stored in the checkpoint)."""
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Options: ClassVar[type[StageOptions]] = StageOptions
    Record: ClassVar[type[StageRecord]] = StageRecord
    statistics: ClassVar[Statistics] = Statistics()
    model_passes: ClassVar[tuple[str, ...]] = ()
    dense_stream: ClassVar[bool] = False

    def __init__(self, options: StageOptions | dict | None = None, **values: Any):
        self.options = options if isinstance(options, self.Options) else self.parse_options(
            {**(options or {}), **values})
        self.record = self.Record()

    @classmethod
    def parse_options(cls, values: dict) -> StageOptions:
        """The typed options, or a one-line error naming the stage and the bad option."""
        try:
            return cls.Options.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise RankwiseError(f"stage {cls.name!r}: option {where!r}: {msg}" if where
                                else f"stage {cls.name!r}: {msg}") from None

    def label(self) -> str:
        """How the stage reads in a pipeline's name: its name and the options that differ from their defaults."""
        defaults = {k: f.default for k, f in self.Options.model_fields.items() if not f.is_required()}
        given = self.options.model_dump(mode="json")
        changed = [f"{k}={_short(v)}" for k, v in given.items() if k not in defaults
                   or v != _jsonable(defaults[k])]
        return " ".join([self.name, *changed])

    def reserved_params(self, shapes: dict[str, "MatrixShape"]) -> int:
        """Parameters this stage adds to the factorized matrices (a residual path), paid for inside --ratio."""
        return 0


def _jsonable(value):
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


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
    module: nn.Module | None = None  # the layer replacing the Linear when the factorizer gives one (not B A)
    _targets: dict = field(default_factory=dict)

    def compressed_weight(self) -> torch.Tensor:
        """What the compressed layer computes, as a dense [out, in] float64 matrix: B A, or the given module's."""
        if self.module is not None:
            return dense_weight(self.module).detach().double().to(self.weight.device)
        return self.B.double().to(self.weight.device) @ self.A.double().to(self.weight.device)

    def target(self, damp: float) -> torch.Tensor:
        """W G C^-1 (float64): the dense layer re-expressed on compressed inputs (numerics.target_weight), W when
        there is no dense stream; computed once per damping."""
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
    kind = "pass"
    streams: ClassVar[bool] = True  # False: needs every block at once (refused with --stream-weights)
    unsupported_reason: ClassVar[str] = ""

    def run(self, job: CompressionJob) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class AllocatorOptions(StageOptions):
    """Options every allocator takes."""
    rank_multiple: int = Field(1, ge=1, description="every rank rounded down to a multiple of this")
    keep_dense: list[str] = Field(default_factory=list, description="Linears left dense (name or suffix): the "
                                  "others make up the ratio")


class AllocationRecord(StageRecord):
    """The ratio the allocator was asked for (after the correctors' reserve; None: its ranks do not depend on
    one) and what it decided."""
    ratio: float | None = None
    factorized: int = 0
    dense: int = 0


class Allocator(Stage):
    """Ranks per targeted Linear (None: left dense) removing `ratio` of the targeted parameters."""
    kind = "allocator"
    Options = AllocatorOptions
    Record = AllocationRecord
    fixed_ranks: ClassVar[bool] = False  # True: the ranks do not depend on the ratio (nothing to reserve)

    def label(self) -> str:
        multiple = self.options.rank_multiple
        return f"{self.name} ranks" + (f" (multiple of {multiple})" if multiple > 1 else "")

    def allocate(self, job: CompressionJob, ratio: float) -> dict[str, int | None]:
        raise NotImplementedError


class Corrector(Stage):
    """Changes one Linear's factorization: before it (what is decomposed) and / or after it (B, A, a path)."""
    kind = "corrector"

    def before_factorize(self, work: LinearWork) -> None:
        pass

    def after_factorize(self, work: LinearWork) -> None:
        pass


class BlockCorrector(Stage):
    """Changes a whole block after its Linears are factorized (e.g. refines the factors on the block's
    outputs); runs before the block's outputs are propagated to the next block."""
    kind = "block corrector"
    dense_stream = True

    def correct_block(self, work: BlockWork) -> None:
        raise NotImplementedError


class ModelCorrector(Stage):
    """Changes the whole compressed model once, after the block walk (e.g. trains every factor end to end).
    `before_walk` runs before the first block is compressed, while the model is still dense (e.g. to keep
    what the dense model outputs); `correct_model` after the last block."""
    kind = "model corrector"
    streams: ClassVar[bool] = True  # False: needs every block at once (refused with --stream-weights)
    unsupported_reason: ClassVar[str] = ""

    def before_walk(self, job: CompressionJob) -> None:
        pass

    def correct_model(self, job: CompressionJob) -> None:
        raise NotImplementedError


PASSES: dict[str, type[ModelPass]] = {}
ALLOCATORS: dict[str, type[Allocator]] = {}
CORRECTORS: dict[str, type[Corrector]] = {}
BLOCK_CORRECTORS: dict[str, type[BlockCorrector]] = {}
MODEL_CORRECTORS: dict[str, type[ModelCorrector]] = {}
FACTORIZERS: dict[str, type[Stage]] = {}   # compress.methods registers into it (compress.methods.REGISTRY)
REGISTRIES = {"pass": PASSES, "allocator": ALLOCATORS, "factorizer": FACTORIZERS, "corrector": CORRECTORS,
              "block corrector": BLOCK_CORRECTORS, "model corrector": MODEL_CORRECTORS}


def registrar(registry: dict):
    """A class decorator factory: @register(name) sets cls.name and files the class in `registry`. A name
    belongs to one stage (a recipe entry names a stage by its name alone)."""
    def register(name: str):
        def deco(cls):
            other = next((k for k, r in REGISTRIES.items() if r is not registry and name in r), None)
            if other is not None:
                raise RankwiseError(f"stage name {name!r} is already a {other}")
            cls.name = name
            registry[name] = cls
            return cls
        return deco
    return register


def find_stage(name: str) -> type[Stage]:
    """The registered stage of that name, of any kind, or a one-line error listing the known ones."""
    for registry in REGISTRIES.values():
        if name in registry:
            return registry[name]
    known = ", ".join(sorted(n for r in REGISTRIES.values() for n in r))
    raise RankwiseError(f"unknown stage {name!r}: choose one of {known} (a stage of your own: --plugin MODULE)")


register_pass = registrar(PASSES)
register_allocator = registrar(ALLOCATORS)
register_corrector = registrar(CORRECTORS)
register_block_corrector = registrar(BLOCK_CORRECTORS)
register_model_corrector = registrar(MODEL_CORRECTORS)
