"""What a Rankwise checkpoint is, as one typed record read from its metadata.

`checkpoint_summary` is the one place that reads the `rankwise` section of a checkpoint's config.json for
display: `compress inspect`, the summary of `compress model` and the header of `compress evaluate` all go
through it, so a change of the metadata's layout touches this module only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# an achieved ratio further than this from the requested one is reported (rank rounding, small matrices)
RATIO_TOLERANCE = 0.01


@dataclass(frozen=True)
class ModuleRank:
    name: str
    rank: int | None  # None: a dense layer that only carries an EoRA path (`compress compensate`)
    in_features: int
    out_features: int
    lora_rank: int = 0

    @property
    def layer(self) -> int | None:
        """Index of the decoder block (the first number in the name), None if there is none."""
        return next((int(p) for p in self.name.split(".") if p.isdigit()), None)

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class CheckpointSummary:
    source_model: str
    method: str
    ranks_allocation: str
    rank_multiple: int
    refit: bool
    compensate: str
    eora_rank: int
    ratio_requested: float
    ratio_achieved: float
    ratio_without_compensation: float
    compensation_params: int
    targeted_params_before: int
    targeted_params_after: int
    model_params_before: int
    model_params_after: int
    kept_dense: list[str]
    modules: list[ModuleRank]
    calibration: dict
    versions: dict = field(default_factory=dict)
    dtype: str | None = None
    method_options: dict = field(default_factory=dict)

    @property
    def model_ratio_achieved(self) -> float:
        return 1 - self.model_params_after / self.model_params_before

    @property
    def pipeline(self) -> str:
        """The whole pipeline in one line: method, allocation, refit, EoRA rank, rank multiple."""
        parts = [self.method + "".join(f" {k}={v}" for k, v in self.method_options.items()),
                 f"{self.ranks_allocation} ranks"]
        if self.rank_multiple > 1:
            parts[-1] += f" (multiple of {self.rank_multiple})"
        if self.refit:
            parts.append("refit")
        if self.compensate == "eora":
            parts.append(f"EoRA rank {self.eora_rank}")
        return " + ".join(parts)

    def ratio_warning(self) -> str | None:
        """One line when the achieved ratio misses the requested one by more than RATIO_TOLERANCE."""
        if abs(self.ratio_achieved - self.ratio_requested) <= RATIO_TOLERANCE:
            return None
        why = f" with --rank-multiple {self.rank_multiple}" if self.rank_multiple > 1 else ""
        return (f"achieved ratio {self.ratio_achieved:.2%} misses the requested {self.ratio_requested:.2%} by more "
                f"than {RATIO_TOLERANCE:.0%}: ranks are whole numbers{why} and the matrices are small")


def summary_from_meta(meta: dict) -> CheckpointSummary:
    modules = [ModuleRank(name, m.get("rank"), m["in"], m["out"], m.get("lora_rank") or 0)
               for name, m in meta["modules"].items()]
    return CheckpointSummary(
        source_model=str(meta.get("source_model", "")), method=meta["method"],
        ranks_allocation=meta.get("ranks_allocation", "uniform"), rank_multiple=meta.get("rank_multiple", 1),
        refit=bool(meta.get("refit")), compensate=meta.get("compensate", "none"),
        eora_rank=meta.get("eora_rank", 0), ratio_requested=meta["ratio_requested"],
        ratio_achieved=meta["ratio_achieved"],
        ratio_without_compensation=meta.get("ratio_achieved_without_compensation", meta["ratio_achieved"]),
        compensation_params=meta.get("compensation_params", 0),
        targeted_params_before=meta["targeted_params_before"], targeted_params_after=meta["targeted_params_after"],
        model_params_before=meta["model_params_before"], model_params_after=meta["model_params_after"],
        kept_dense=list(meta.get("kept_dense", [])), modules=modules, calibration=dict(meta.get("calibration", {})),
        versions=dict(meta.get("versions", {})), dtype=meta.get("dtype"),
        method_options=dict(meta.get("method_options") or {}))


def checkpoint_summary(path: str | Path) -> CheckpointSummary | None:
    """The summary of the checkpoint at `path`; None for a dense model (no `rankwise` metadata)."""
    from rankwise.compress.checkpoint import read_meta
    meta = read_meta(path)
    return summary_from_meta(meta) if meta else None
