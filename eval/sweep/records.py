"""What a sweep writes into its folders, as typed records: a resolved job (job.json, plan.json), its result
(result.json) and the failure of its last attempt (error.json).

A job is done when its result.json validates and names the job: a truncated or empty file, one of another job, or
one whose compression record does not validate counts as missing (the job is redone).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_serializer, field_validator

from rankwise.compress.metadata import CompressionResult, parse_result
from rankwise.compress.peak_memory import PeakMemory
from rankwise.errors import RankwiseError
from rankwise.eval.records import EvalResult, finite_or_str
from rankwise.eval.sweep.runfile import JobEval


class JobRecord(BaseModel):
    """A resolved job, all a worker process needs: job.json, an entry of plan.json, result.json's `config`."""
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str
    compress: Optional[dict[str, Any]]  # the CompressConfig fields as written (None: the dense baseline)
    eval: JobEval
    checkpoint: Optional[str] = None  # the folder under checkpoints/ (None: dense, nothing to compress)
    keep_checkpoint: bool = True


class PlanRecord(BaseModel):
    """plan.json: the run file and the jobs of the last `compress run` (the report shows those)."""
    run_file: str
    jobs: list[JobRecord]


class JobResult(BaseModel):
    """result.json: the job, its checkpoint's compression record (None: dense), its evaluation (without the
    compression record, kept once under `compress`), the peak memory of the job's process and its times."""
    job: str
    config: JobRecord
    compress: Optional[CompressionResult]
    compress_resumed: bool  # the checkpoint was there already: only evaluated
    eval: EvalResult
    peak_memory: PeakMemory
    wall_seconds: float
    finished: str

    @field_validator("compress", mode="before")
    @classmethod
    def _compression_record(cls, v):
        return parse_result(v, "result.json") if isinstance(v, dict) else v

    @field_serializer("compress")
    def _compression_json(self, v: CompressionResult | None):
        return v.to_json() if v is not None else None

    @field_serializer("peak_memory")
    def _peak_json(self, v: PeakMemory):
        return v.model_dump(exclude_none=True)

    def to_json(self) -> dict:
        """The JSON form: the evaluation without its copy of the compression record (kept once, under
        `compress`), inf/nan as strings."""
        out = self.model_dump(mode="python", exclude={"eval"})
        out["eval"] = self.eval.to_json()
        out["eval"].pop("rankwise")
        return finite_or_str({k: out[k] for k in type(self).model_fields})


class JobError(BaseModel):
    """error.json: the failure of a job's last attempt (the job is retried on the next run)."""
    job: str
    error: str  # one line
    type: str
    traceback: str
    time: str


def read_json(path: Path):
    """The parsed file, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_job_result(job_dir: Path, name: str | None = None) -> JobResult | None:
    """A job's result.json if it is complete and names the job (its folder's name by default), else None."""
    data = read_json(job_dir / "result.json")
    try:
        result = JobResult.model_validate(data)
    except (ValidationError, RankwiseError):
        return None
    return result if result.job == (name or job_dir.name) else None


def read_job_error(job_dir: Path) -> JobError | None:
    try:
        return JobError.model_validate(read_json(job_dir / "error.json"))
    except ValidationError:
        return None


def read_job_record(job_dir: Path) -> JobRecord | None:
    try:
        return JobRecord.model_validate(read_json(job_dir / "job.json"))
    except ValidationError:
        return None


def read_plan(run_dir: Path) -> PlanRecord | None:
    try:
        return PlanRecord.model_validate(read_json(run_dir / "plan.json"))
    except ValidationError:
        return None
