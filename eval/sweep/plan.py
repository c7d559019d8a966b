"""A run file expanded into jobs: each job's settings, its name, its folders.

Each job is resolved into a full CompressConfig (its extra="forbid" rejects unknown keys, so new compression
options just work) plus its evaluation settings (JobEval). The compression settings and the evaluation settings
are hashed apart:

    jobs/NAME_CHASH-EHASH/              the job's folder (job.json, result.json, error.json, log.txt)
    checkpoints/NAME_CHASH/model/       the compressed checkpoint, reused by every evaluation of it

NAME is readable (model, method, ratio and the non-default settings that change a checkpoint: see
readable_name); CHASH covers every compression setting, EHASH every evaluation setting, so a new evaluation
setting re-evaluates the existing checkpoints. Where a job runs (device, offload, streaming) is in neither hash.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from rankwise.compress.config import CompressConfig
from rankwise.errors import RankwiseError
from rankwise.eval.sweep.records import JobRecord, JobResult, read_job_result
from rankwise.eval.sweep.runfile import EvalBlock, JobEval, RunFile, load_yaml, validation_error

DENSE = "none"  # method name of the uncompressed baseline job
# Where and how a job runs does not change what it computes: these keys stay out of the job's hash, so a run
# can be resumed on another device (or with --stream-weights turned on).
UNHASHED = {"device", "offload", "stream_weights"}


@dataclass
class Job:
    """One compression (or the dense model) evaluated once. Its folder is jobs/NAME/, NAME = readable settings +
    COMPRESSION_HASH-EVALUATION_HASH; the checkpoint lives in checkpoints/CHECKPOINT_NAME/model (NAME without the
    evaluation hash), so a new evaluation setting re-evaluates the same checkpoint instead of recompressing."""
    name: str
    model: str
    compress: CompressConfig | None  # None for the dense baseline
    eval: JobEval
    checkpoint_name: str | None = None  # None: dense, nothing to compress
    keep_checkpoint: bool = True
    dir: Path = field(default=Path("."))
    checkpoint_dir: Path | None = None

    @property
    def method(self) -> str:
        return self.compress.method if self.compress else DENSE

    @property
    def devices(self) -> list[str]:
        """Where it compresses (unless dense) and where it evaluates."""
        return ([self.compress.device] if self.compress else []) + [self.eval.device]

    @property
    def wants_gpu(self) -> bool:
        return any(d.startswith("cuda") for d in self.devices)

    def on_device(self, device: str) -> Job:
        """The same job compressing and evaluating on `device` (Ray shows a task its one GPU as cuda:0)."""
        compress = self.compress.model_copy(update={"device": device}) if self.compress else None
        return Job(self.name, self.model, compress, self.eval.model_copy(update={"device": device}),
                   self.checkpoint_name, self.keep_checkpoint, self.dir, self.checkpoint_dir)

    def record(self) -> JobRecord:
        return JobRecord(name=self.name, model=self.model,
                         compress=self.compress.model_dump(mode="json") if self.compress else None,
                         eval=self.eval, checkpoint=self.checkpoint_name, keep_checkpoint=self.keep_checkpoint)

    @classmethod
    def from_record(cls, record: JobRecord, output_dir: Path) -> Job:
        """The job a job.json describes, with its folders under output_dir."""
        compress = CompressConfig(**record.compress) if record.compress is not None else None
        return cls(record.name, record.model, compress, record.eval, record.checkpoint,
                   record.keep_checkpoint).placed(output_dir)

    def placed(self, output_dir: Path) -> Job:
        """This job with its folders under output_dir: jobs/NAME and checkpoints/CHECKPOINT_NAME."""
        self.dir = output_dir / "jobs" / self.name
        self.checkpoint_dir = output_dir / "checkpoints" / self.checkpoint_name if self.checkpoint_name else None
        return self

    def result(self) -> JobResult | None:
        return read_job_result(self.dir, self.name)

    def status(self) -> str:
        """done (a valid result.json), failed (error.json of the last attempt) or pending. A truncated or foreign
        result.json does not count: the job is redone."""
        if self.result() is not None:
            return "done"
        return "failed" if (self.dir / "error.json").is_file() else "pending"


@dataclass
class Plan:
    path: Path
    output_dir: Path
    jobs: list[Job]
    ray: bool = False
    ray_address: str | None = None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(s).rstrip("/")).name).strip("-").lower()[:40] or "model"


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def readable_name(compress: CompressConfig | None) -> str:
    """The readable part of a job's name: what changes a checkpoint, from its recipe (CompressConfig.name_parts:
    the factorizer, the ratio, every other stage with its non-default options, the Linears kept dense); "dense"
    for the uncompressed model. Calibration settings are told apart by the hash and by their own report
    columns. The one place sweep names are made."""
    return "_".join(compress.name_parts()) if compress is not None else "dense"


def job_names(model: str, compress: CompressConfig | None, ev: JobEval) -> tuple[str, str]:
    """(checkpoint name, job name). The compression hash covers what changes the checkpoint, the evaluation
    hash what changes the numbers measured on it; where things run (device, offload, streaming) is in neither."""
    if compress is not None:
        settings = compress.model_dump(mode="json", exclude=UNHASHED)
        c_hash = _digest({"model": model, "compress": settings})
    else:  # the dense checkpoint is the model itself, loaded in the evaluation's dtype
        c_hash = _digest({"model": model, "dtype": ev.dtype})
    e_hash = _digest(ev.model_dump(exclude={"device"}))
    base = f"{_slug(model)}_{readable_name(compress)}_{c_hash}"
    return base, f"{base}-{e_hash}"


def _resolve(options: dict, origin: dict, ev: EvalBlock, keep: bool, path: Path, lines: dict) -> Job:
    dense = options.get("method") == DENSE or options.get("ratio") in (0, 0.0)
    probe = dict(options)
    if dense:  # still check every key and the model-level options, with placeholder compression settings
        probe.update(method="svd", ratio=0.5)
    try:
        cfg = CompressConfig(**probe)
    except ValidationError as e:
        err = min(e.errors(), key=lambda x: x["type"] != "extra_forbidden")  # a misspelt key first
        key = err["loc"][0] if err["loc"] else None
        loc = origin.get(key, (key,)) if key is not None else ()
        if err["type"] == "missing":
            raise RankwiseError(f"{path}: no {key!r} for a job (give it at the top level, in sweep: or jobs:)")
        raise validation_error(path, lines, err, loc, None if key is None else str(key)) from None
    job_eval = JobEval(**{**ev.model_dump(), "device": ev.device or cfg.device,
                          "trust_remote_code": cfg.trust_remote_code,
                          "dtype": cfg.dtype if dense and ev.dtype == "auto" else ev.dtype})
    compress = None if dense else cfg
    checkpoint, name = job_names(cfg.model, compress, job_eval)
    return Job(name, cfg.model, compress, job_eval, None if dense else checkpoint, keep)


def _matches(options: dict, match: dict) -> bool:
    return all(options.get(k) == v or (isinstance(v, list) and options.get(k) in v) for k, v in match.items())


def load_plan(path: str | Path) -> Plan:
    """Read, validate and expand a run file. Every job is checked here, before anything runs."""
    path = Path(path)
    data, lines = load_yaml(path)
    try:
        run = RunFile(**data)
    except ValidationError as e:
        err = min(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        raise validation_error(path, lines, err, tuple(err["loc"])) from None

    # defaults: top-level compression options, then the calib block; origin remembers each key's place
    base: dict = {}
    origin: dict = {}
    for key, value in (run.model_extra or {}).items():
        base[key], origin[key] = value, (key,)
    if isinstance(run.calib, str):
        base["calib"], origin["calib"] = run.calib, ("calib",)
    else:
        for key, value in run.calib.as_options().items():
            base[key] = value
            origin[key] = ("calib", "source" if key == "calib" else key)

    combos: list[tuple[dict, dict]] = []
    keys = list(run.sweep)
    for values in itertools.product(*(run.sweep[k] for k in keys)) if keys else [()]:
        idx = [run.sweep[k].index(v) for k, v in zip(keys, values)]
        combos.append(({**base, **dict(zip(keys, values))},
                       {**origin, **{k: ("sweep", k, i) for k, i in zip(keys, idx)}}))
    if run.jobs:
        if not keys:  # with only explicit jobs, the defaults alone are not a job
            combos = []
        for n, extra in enumerate(run.jobs):
            combos.append(({**base, **extra}, {**origin, **{k: ("jobs", n, k) for k in extra}}))
    if run.baseline:
        models = {c[0].get("model") for c in combos if c[0].get("model")}
        for m in sorted(models):
            combos.append(({**base, "model": m, "method": DENSE}, {**origin, "model": ("baseline",)}))

    jobs: list[Job] = []
    seen = set()
    out = Path(run.output_dir).expanduser()
    if not out.is_absolute():  # relative to where `compress run` is started, as the CLI's -o
        out = Path.cwd() / out
    for options, where in combos:
        for n, ov in enumerate(run.overrides):
            if _matches(options, ov.match):
                options = {**options, **ov.set}
                where = {**where, **{k: ("overrides", n, "set", k) for k in ov.set}}
        job = _resolve(options, where, run.eval, run.keep_checkpoints, path, lines)
        if job.name in seen:  # e.g. method none crossed with several ratios: one baseline
            continue
        seen.add(job.name)
        jobs.append(job.placed(out))
    if not jobs:
        raise RankwiseError(f"{path}: no jobs (give model and ratio, a sweep: or jobs:)")
    jobs.sort(key=lambda j: j.compress is not None)  # dense baselines first: the reference rows come in first
    return Plan(path, out, jobs, run.ray or bool(run.ray_address), run.ray_address)
