"""Validated settings of one compression job (the CLI and YAML runs build this; the pipeline reads it)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rankwise.compress.defaults import EORA_RANK_DEFAULT
from rankwise.compress.methods import REGISTRY

DTYPES = ("auto", "fp32", "fp16", "bf16")

# One recommended pipeline by one name: the combination that measures best in bench/quality.py (see
# bench/README.md, "Quality"). Options given explicitly beside a preset override its values.
PRESETS: dict[str, dict] = {
    "best": {"method": "svd-llm", "ranks": "loss-aware", "refine": True},
}


class CompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="hub id or local path of a causal LM")
    preset: Literal["none", "best"] = Field("none", description="a recommended pipeline; explicit options override it")
    method: str = Field("svd-llm", description="factorization method")
    ratio: float = Field(description="fraction of the targeted Linear parameters removed, in (0, 1)")
    ranks: Literal["uniform", "welore", "loss-aware"] = Field("uniform", description="rank allocation")
    compensate: Literal["none", "eora"] = Field("none", description="residual low-rank path after truncation")
    eora_rank: int = Field(EORA_RANK_DEFAULT, ge=1, description="rank of the EoRA path (its parameters count in the ratio)")
    refit: bool = Field(False, description="re-solve B by least squares on the dense layer's outputs")
    refit_damp: float = Field(1.0, ge=0, description="ridge damping of refit / EoRA solves, relative (1.0: chosen on austen.txt)")
    refine: bool = Field(False, description="train each block's low-rank factors (Adam, MSE) to match the dense "
                         "block's outputs on the dense stream")
    refine_steps: int = Field(32, ge=1, description="refinement: optimizer steps per block (one calibration batch each)")
    refine_lr: float = Field(1e-4, gt=0, description="refinement: Adam's peak learning rate (cosine decay)")
    calib: str = "wikitext2"
    nsamples: int = Field(256, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    bos: bool | None = Field(None, description="start every calibration window with BOS (None: as the tokenizer "
                             "does in normal use)")
    batch_size: int = Field(4, ge=1, description="calibration sequences per forward")
    alpha: float = Field(0.5, gt=0, description="ASVD exponent on mean |x|")
    rank_multiple: int = Field(1, ge=1)
    keep_dense: list[str] = Field(default_factory=list, description="Linears left dense (name or suffix, e.g. "
                                  "k_proj): the others make up the ratio")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: str = "auto"
    offload: bool = Field(False, description="keep calibration activations and statistics on CPU")
    stream_weights: bool = Field(False, description="read each decoder block from the checkpoint's safetensors "
                                 "only when it is compressed (models larger than host memory)")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        """The preset's values under the options given explicitly (those present in the input)."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"ratio must be in (0, 1) (fraction of targeted parameters removed), got {v}")
        return v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        from rankwise.compress.loading import DTYPE_ALIASES
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown method {v!r}: choose one of {', '.join(sorted(REGISTRY))}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda or cuda:N")
        return v

    def method_options(self) -> dict:
        return {"alpha": self.alpha} if self.method == "asvd" else {}
