"""What a compression produced, as typed records: the pipeline returns a CompressionResult, the checkpoint's
`config.json` holds it under `rankwise`, and the loader, `compress evaluate`, the sweep report and
`compress compensate` read it back through `read_result` / `parse_result`, the one place that validates it.

`format_version` numbers the layout of that section (compress/lowrank.py's FORMAT_VERSION; sections written
before the field existed have the layout of version 1). A checkpoint written by a newer Rankwise is refused
with one line rather than half-read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rankwise.compress.lowrank import FORMAT_VERSION, RANKWISE_KEY, checkpoint_file
from rankwise.errors import RankwiseError


class ModuleSpec(BaseModel):
    """One changed Linear: its factorization rank (None: left dense, e.g. a pruned layer given an EoRA path),
    shape, bias, and the rank of its EoRA path (0: none). Stored as {"rank", "in", "out", "bias", "lora_rank"},
    the mapping modeling_rankwise.py reads."""
    model_config = ConfigDict(populate_by_name=True, frozen=True)

    rank: int | None
    in_features: int = Field(alias="in")
    out_features: int = Field(alias="out")
    bias: bool = False
    lora_rank: int = 0

    @property
    def lora_params(self) -> int:
        return self.lora_rank * (self.in_features + self.out_features)


class Calibration(BaseModel):
    source: str
    nsamples: int
    seqlen: int
    seed: int = 0
    bos: bool = False  # every window started with BOS (as the tokenizer does in normal use)


class BlockRefinement(BaseModel):
    """One block's output error (mean squared, calibration set) before and after refinement; kept: whether the
    refined factors were kept (only when they lowered it)."""
    mse_before: float
    mse_after: float
    kept: bool


class Refinement(BaseModel):
    """Block refinement's settings and what it did to each block (prefix -> BlockRefinement)."""
    steps: int
    lr: float
    seed: int
    blocks: dict[str, BlockRefinement] = Field(default_factory=dict)


class CompressionResult(BaseModel):
    """The `rankwise` section of a checkpoint: settings, parameter accounting, per-module ranks, costs."""
    model_config = ConfigDict(extra="ignore")  # fields of older layouts that were dropped are skipped

    format_version: int = FORMAT_VERSION
    method: str
    method_options: dict[str, float] = Field(default_factory=dict)
    ranks_allocation: str
    rank_multiple: int = 1
    refit: bool = False
    compensate: str = "none"
    eora_rank: int = 0
    ratio_requested: float
    ratio_achieved: float
    ratio_achieved_without_compensation: float
    compensation_params: int = 0
    targeted_params_before: int
    targeted_params_after: int
    model_params_before: int
    model_params_after: int
    model_ratio_achieved: float
    kept_dense: list[str] = Field(default_factory=list)
    calibration: Calibration
    refine: Refinement | None = None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    modules: dict[str, ModuleSpec]
    # filled in by the job around the pipeline
    source_model: str = ""
    compressed_model: str | None = None  # `compress compensate`: the checkpoint the paths were added to
    dtype: str | None = None
    compress_seconds: float | None = None
    save_seconds: float | None = None
    wall_seconds: float | None = None
    host_peak_gib: float | None = None
    gpu_peak_gib: float | None = None
    versions: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON form (module shapes under "in" / "out"; unset optional fields left out, but a module's
        rank is always written: null is a layer left dense)."""
        out = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["modules"] = {n: s.model_dump(mode="json", by_alias=True) for n, s in self.modules.items()}
        return out


def parse_result(section: dict, where: str = "checkpoint") -> CompressionResult:
    """Validate a `rankwise` section (from config.json or a sweep's result.json); one-line error if bad."""
    version = section.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RankwiseError(f"{where}: rankwise format_version {version!r} is newer than this Rankwise reads "
                            f"({FORMAT_VERSION}): upgrade rankwise")
    try:
        return CompressionResult.model_validate(section)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise RankwiseError(f"{where}: invalid rankwise metadata at {field!r}: {err['msg']}") from None


def read_result(path: str | Path) -> CompressionResult | None:
    """The validated `rankwise` section of a checkpoint (a local folder, or a hub id through the hub cache /
    the hub), or None for a dense checkpoint, or a hub id whose config.json cannot be had."""
    if os.path.isdir(path):
        cfg = Path(path) / "config.json"
    else:
        try:
            found = checkpoint_file(str(path), "config.json", required=False)
        except Exception:  # not a valid hub id, offline without a cached copy, ...: no record to show
            return None
        cfg = Path(found) if found else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        section = json.loads(cfg.read_text()).get(RANKWISE_KEY)
    except (OSError, ValueError) as e:
        raise RankwiseError(f"{cfg}: unreadable config.json ({e})") from None
    return None if section is None else parse_result(section, str(path))
