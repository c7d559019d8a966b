"""What a compression produced, as typed records: the pipeline returns a CompressionResult, the checkpoint's
`config.json` holds it under `rankwise`, and the loader, `compress evaluate`, the sweep report and
`compress compensate` read it back through `read_result` / `parse_result`, the one place that validates it.

`format_version` numbers the layout of that section (compress/lowrank.py's FORMAT_VERSION; sections written
before the field existed have the layout of version 1). Version 2 stores the resolved recipe: every stage with
its options and its record (`recipe`, a list of StageRun); a version-1 section (method, ranks_allocation,
refit, compensate, eora_rank, refine as fields) is read into the same form. A checkpoint written by a newer
Rankwise is refused with one line rather than half-read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rankwise.compress.lowrank import FORMAT_VERSION, RANKWISE_KEY, LowRankLinear, checkpoint_file
from rankwise.errors import RankwiseError


class ModuleSpec(BaseModel):
    """One changed Linear: its factorization rank (None: left dense, e.g. a pruned layer given an EoRA path),
    shape, bias, the rank of its EoRA path (0: none) and how its factors are stored (factor_dtype, one of
    lowrank.FACTOR_DTYPES, None: in the model's dtype; group_size: int4's group of inputs). Stored as
    {"rank", "in", "out", "bias", "lora_rank"} (+ "factor_dtype", "group_size" when set), the mapping
    modeling_rankwise.py reads."""
    model_config = ConfigDict(populate_by_name=True, frozen=True)

    rank: int | None
    in_features: int = Field(alias="in")
    out_features: int = Field(alias="out")
    bias: bool = False
    lora_rank: int = 0
    factor_dtype: str | None = None
    group_size: int = 0

    @classmethod
    def of(cls, layer) -> "ModuleSpec":
        """The spec of a compressed layer: a LowRankLinear, or a dense layer carrying a path (LoraLinear)."""
        if isinstance(layer, LowRankLinear):
            return cls(rank=layer.rank, in_features=layer.in_features, out_features=layer.out_features,
                       bias=layer.B.bias is not None, lora_rank=layer.lora_rank, factor_dtype=layer.factor_dtype,
                       group_size=layer.group_size)
        return cls(rank=None, in_features=layer.in_features, out_features=layer.out_features,
                   bias=getattr(layer.base, "bias", None) is not None, lora_rank=layer.lora_rank)

    def to_json(self) -> dict:
        """The stored mapping; factor_dtype and group_size only when the factors are stored in another dtype
        (checkpoints in the model's dtype keep the layout they always had)."""
        out = self.model_dump(mode="json", by_alias=True)
        return {k: v for k, v in out.items() if k not in ("factor_dtype", "group_size") or v}

    @property
    def lora_params(self) -> int:
        return self.lora_rank * (self.in_features + self.out_features)


class Calibration(BaseModel):
    source: str
    nsamples: int
    seqlen: int
    seed: int = 0
    bos: bool = False  # every window started with BOS (as the tokenizer does in normal use)
    chat: str | None = None  # the conversations file of the chat-templated windows (calib/chat.py)
    chat_windows: int = 0    # how many windows were chat-templated conversations


class StageRun(BaseModel):
    """One stage of the recipe that ran: its name and kind, how it reads in the pipeline's name, its options
    (all of them, defaults filled in) and its record (what it did; the stage's own typed Record, as JSON).
    adds_paths: the stage adds residual paths to the factorized Linears (EoRA)."""
    model_config = ConfigDict(extra="forbid")

    stage: str
    kind: str
    label: str
    options: dict[str, Any] = Field(default_factory=dict)
    record: dict[str, Any] = Field(default_factory=dict)
    adds_paths: bool = False

    def typed_record(self, record_cls: type[BaseModel]):
        """The record read back through the stage's own Record class."""
        return record_cls.model_validate(self.record)


class CompressionResult(BaseModel):
    """The `rankwise` section of a checkpoint: settings, parameter accounting, per-module ranks, costs."""
    model_config = ConfigDict(extra="forbid")  # a field nobody reads is an error, not silently dropped

    format_version: int = FORMAT_VERSION
    method: str               # the factorizer's name ("external": `compress compensate` of a foreign model)
    ranks_allocation: str     # the allocator's name
    preset: str | None = None
    recipe: list[StageRun] = Field(default_factory=list)
    ratio_requested: float | None = None   # None: the budget was in bytes (size_ratio_requested)
    ratio_achieved: float
    ratio_achieved_without_compensation: float
    compensation_params: int = 0
    targeted_params_before: int
    targeted_params_after: int
    model_params_before: int
    model_params_after: int
    model_ratio_achieved: float
    kept_dense: list[str] = Field(default_factory=list)
    # stored bytes of the targeted Linears: before at 16 bits per weight, after as stored (storage.stored_bytes)
    size_ratio_requested: float | None = None
    size_ratio_achieved: float | None = None
    targeted_bytes_before: int | None = None
    targeted_bytes_after: int | None = None
    calibration: Calibration
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

    @model_validator(mode="before")
    @classmethod
    def _from_version_1(cls, data):
        """A version-1 section (no recipe: the stages as fields) in the version-2 form."""
        if isinstance(data, dict) and data.get("format_version", 1) < 2 and "recipe" not in data:
            data = dict(data)
            data["recipe"] = _version_1_recipe(data)
            data["format_version"] = FORMAT_VERSION  # the layout it has now (written back as such)
            for old in ("method_options", "rank_multiple", "refit", "compensate", "eora_rank", "refine"):
                data.pop(old, None)
        return data

    def stage_run(self, stage: str) -> StageRun | None:
        """The recipe's stage of that name, if it ran."""
        return next((r for r in self.recipe if r.stage == stage), None)

    def without_compensation(self) -> "CompressionResult":
        """The record of the checkpoint once its residual paths (EoRA) are removed: the stages that added them
        leave the recipe, and layers that were dense with only a path leave the modules."""
        lora = self.compensation_params
        modules = {n: m.model_copy(update={"lora_rank": 0}) for n, m in self.modules.items() if m.rank is not None}
        after = self.model_params_after - lora
        return self.model_copy(update={
            "recipe": [r for r in self.recipe if not r.adds_paths], "compensation_params": 0, "modules": modules,
            "targeted_params_after": self.targeted_params_after - lora, "model_params_after": after,
            "ratio_achieved": self.ratio_achieved_without_compensation,
            "model_ratio_achieved": 1 - after / self.model_params_before})

    def to_json(self) -> dict:
        """The JSON form (module shapes under "in" / "out"; unset optional fields left out, but a module's
        rank is always written: null is a layer left dense)."""
        out = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["modules"] = {n: s.to_json() for n, s in self.modules.items()}
        return out


def _version_1_recipe(data: dict) -> list[dict]:
    """The recipe a version-1 section describes, with the labels that version's pipeline name used."""
    options = data.get("method_options") or {}
    method = data.get("method", "")
    multiple = data.get("rank_multiple", 1)
    allocation = data.get("ranks_allocation", "")
    runs = [dict(stage=method, kind="factorizer", options=options,
                 label=method + "".join(f" {k}={v:g}" for k, v in options.items())),
            dict(stage=allocation, kind="allocator", options={"rank_multiple": multiple},
                 label=f"{allocation} ranks" + (f" (multiple of {multiple})" if multiple > 1 else ""))]
    if data.get("refit"):
        runs.append(dict(stage="refit", kind="corrector", label="refit"))
    if data.get("compensate") == "eora":
        rank = data.get("eora_rank", 0)
        runs.append(dict(stage="eora", kind="corrector", label=f"EoRA rank {rank}", options={"rank": rank},
                         adds_paths=True))
    refine = data.get("refine")
    if isinstance(refine, dict):
        runs.append(dict(stage="block-refine", kind="block corrector", label="block-refine",
                         options={k: refine[k] for k in ("steps", "lr", "seed") if k in refine},
                         record={"blocks": refine.get("blocks", {})}))
    return runs


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
