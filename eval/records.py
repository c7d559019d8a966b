"""What an evaluation measured, as typed records: token perplexity per source, lm-eval metrics per task (with
their throughput), the settings, and the comparison with a baseline.

The JSON form is the one `compress evaluate --json` writes and a sweep's result.json holds under `eval`:
Rankwise's sections beside lm-eval's own top-level sections ("results", "versions", "n-shot", "configs",
"config", ...), so that tools reading lm-eval output read it too. A task's metrics are flat there:
{"acc": x, "acc_stderr": s, ..., "samples": n, "requests": n, "seconds": t, "requests_per_second": r,
"source": ...}.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer, \
    model_validator

from rankwise.compress.metadata import CompressionResult, parse_result
from rankwise.eval.generation import GenerationCheck

STDERR = "_stderr"
# a task's bookkeeping keys beside its metrics
TASK_INFO = ("samples", "requests", "seconds", "requests_per_second", "source")


def finite_or_str(o):
    """JSON has no inf/nan: written as strings ("inf"), never as invalid JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: finite_or_str(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_or_str(v) for v in o]
    return o


class PplResult(BaseModel):
    """Token perplexity of one text source by the papers' protocol (eval/ppl.py); ppl is inf when any window's
    NLL is not finite (ppl_finite_windows: over the finite ones)."""
    ppl: float
    ppl_finite_windows: float
    nll_mean: float
    windows: int
    nonfinite_windows: int
    tokens_scored: int
    seqlen: int
    bos: bool
    seconds: float
    tokens_per_second: float

    def measured_like(self, other: PplResult) -> bool:
        """Comparable: the same window length, BOS and number of windows."""
        return (self.seqlen, self.bos, self.windows) == (other.seqlen, other.bos, other.windows)


class TaskResult(BaseModel):
    """One lm-eval task: metric -> value (None where lm-eval gives N/A), metric -> standard error, and what it
    took (samples scored, model requests, seconds, requests per second of model time, where the task came
    from: "lm-eval" or the YAML's path)."""
    metrics: dict[str, Optional[float]]
    stderr: dict[str, Optional[float]] = Field(default_factory=dict)
    samples: Optional[int] = None
    requests: int = 0
    seconds: float = 0.0
    requests_per_second: float = 0.0
    source: str = "lm-eval"

    @model_validator(mode="before")
    @classmethod
    def _from_flat(cls, data):
        if not isinstance(data, dict) or "metrics" in data:
            return data
        out: dict[str, Any] = {"metrics": {}, "stderr": {}}
        for key, value in data.items():
            if key in TASK_INFO:
                out[key] = value
            elif key.endswith(STDERR):
                out["stderr"][key[: -len(STDERR)]] = value
            else:
                out["metrics"][key] = value
        return out

    @model_serializer
    def _flat(self) -> dict:
        out: dict[str, Any] = {}
        for metric, value in self.metrics.items():
            out[metric] = value
            if metric in self.stderr:
                out[metric + STDERR] = self.stderr[metric]
        out.update(samples=self.samples, requests=self.requests, seconds=self.seconds,
                   requests_per_second=self.requests_per_second, source=self.source)
        return out

    @property
    def from_yaml(self) -> bool:
        return self.source != "lm-eval"


class EvalSettings(BaseModel):
    """How the evaluation was run (what --baseline repeats)."""
    ppl: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=list)
    seqlen: int = 2048
    max_windows: Optional[int] = None
    limit: Optional[Union[int, float]] = None
    batch_size: Union[int, str] = 1
    bos: Optional[bool] = None
    num_fewshot: int = 0
    bootstrap_iters: int = 1000
    dtype: str = "auto"
    device: str = "auto"
    seed: Optional[int] = None
    generation: bool = False  # the generation check ran


class BaselineRef(BaseModel):
    """The baseline a result is compared with, and why some of its numbers were not compared."""
    path: str
    model: str
    notes: list[str] = Field(default_factory=list)


class Deltas(BaseModel):
    """This run minus the baseline: ppl per source (inf where either is not finite), metric per task."""
    ppl: dict[str, float] = Field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = Field(default_factory=dict)


class EvalResult(BaseModel):
    """All evaluations of one model. lm-eval's own sections are kept as extra top-level fields."""
    model_config = ConfigDict(extra="allow")
    model: str
    gguf_file: Optional[str] = None
    rankwise: Optional[CompressionResult] = None  # the checkpoint's compression record (None: dense, GGUF)
    dtype: str
    device: str
    device_name: str = ""
    parameters: int = 0
    ppl: dict[str, PplResult] = Field(default_factory=dict)
    tasks: dict[str, TaskResult] = Field(default_factory=dict)
    generation: Optional[GenerationCheck] = None  # the generation check (--generation-check)
    settings: EvalSettings = Field(default_factory=EvalSettings)
    package_versions: dict[str, str] = Field(default_factory=dict)
    wall_seconds: float = 0.0
    baseline: Optional[BaselineRef] = None
    deltas: Optional[Deltas] = None
    samples: dict[str, list] = Field(default_factory=dict, exclude=True)  # per-sample logs: files of their own

    @field_validator("rankwise", mode="before")
    @classmethod
    def _compression_record(cls, v):
        return parse_result(v, "evaluation result") if isinstance(v, dict) else v

    @field_serializer("rankwise")
    def _compression_json(self, v: Optional[CompressionResult]):
        return v.to_json() if v is not None else None

    @property
    def lm_eval(self) -> dict[str, Any]:
        """lm-eval's own sections ("results", "versions", "n-shot", "configs", "config", ...)."""
        return dict(self.model_extra or {})

    def to_json(self) -> dict:
        """The JSON form: no baseline sections unless compared, inf/nan as strings."""
        return finite_or_str(self.model_dump(mode="python", exclude_none=False,
                                             exclude={k for k in ("baseline", "deltas")
                                                      if getattr(self, k) is None}))
