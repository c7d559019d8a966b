"""YAML batch runs: schema, expansion into jobs, and the resumable runner behind `compress run`.

A run file names defaults (any `compress model` option, same names), a `calib:` and an `eval:` block, a
`sweep:` of lists whose cartesian product gives the jobs, optional `jobs:` (extra jobs, not crossed) and
`overrides:` ({match: {...}, set: {...}}: settings for the jobs that match). Each job is resolved into a full
CompressConfig (its extra="forbid" rejects unknown keys, so new compression options just work) plus evaluation
settings, and lives in OUTPUT_DIR/jobs/NAME-HASH/, HASH being a short hash of its resolved settings:

    job.json     the resolved job (a worker subprocess needs nothing else)
    model/       the compressed checkpoint (reused if a crash came after it was written)
    result.json  written atomically at the end: the job is done when it exists
    error.json   the failure of the last attempt (the job is retried on the next run)

It sits in cli/ because it is configuration: it drives compress and eval and nothing imports it back.
"""
from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rankwise.errors import RankwiseError, first_line

DENSE = "none"  # method name of the uncompressed baseline job
# Where and how a job runs does not change what it computes: these keys stay out of the job's hash, so a run
# can be resumed on another device (or with --stream-weights turned on).
UNHASHED = {"device", "offload", "stream_weights"}


# ---------------------------------------------------------------- YAML with line numbers

def _expand(s: str) -> str:
    """${VAR}, ${VAR:-default} and $VAR from the environment, then a leading ~ (also after text:/jsonl:)."""
    def var(m):
        name, default = m.group(1) or m.group(3), m.group(2)
        return os.environ.get(name) or (default if default is not None else m.group(0))
    s = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", var, s)
    return re.sub(r"(^|^text:|^jsonl:)~(?=/|$)", lambda m: m.group(1) + os.path.expanduser("~"), s)


def load_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """The document (env-expanded strings) and the line of every key / list item, keyed by its path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RankwiseError(f"cannot read run file {str(path)!r}: {e.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise RankwiseError(f"{path}: not valid YAML: {str(e).splitlines()[0]} "
                            f"(line {getattr(getattr(e, 'problem_mark', None), 'line', -1) + 1})") from None
    lines: dict[tuple, int] = {}
    constructor = yaml.SafeLoader("")

    def build(node, where: tuple):
        if isinstance(node, yaml.MappingNode):
            out = {}
            for k, v in node.value:
                key = constructor.construct_object(k, deep=True)
                lines[where + (key,)] = k.start_mark.line + 1
                out[key] = build(v, where + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[where + (i,)] = item.start_mark.line + 1
            return [build(item, where + (i,)) for i, item in enumerate(node.value)]
        value = constructor.construct_object(node, deep=True)
        return _expand(value) if isinstance(value, str) else value

    data = build(root, ()) if root is not None else {}
    if not isinstance(data, dict):
        raise RankwiseError(f"{path}: the run file must be a mapping of keys (output_dir, model, sweep, ...)")
    return data, lines


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), 0, -1):  # the deepest part of the path that is in the file
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return None


def _validation_error(path: Path, lines: dict, err: dict, loc: tuple, name: str | None = None) -> RankwiseError:
    """One line naming the file, the line, the key (`name`, else the YAML path) and what is wrong."""
    line = _line_of(lines, loc)
    where = f"{path}" + (f" line {line}" if line else "")
    name = name or ".".join(str(x) for x in loc)
    if err["type"] == "extra_forbidden":
        return RankwiseError(f"{where}: unknown key {name.rsplit('.', 1)[-1]!r}"
                             + (f" (in {name})" if "." in name else ""))
    msg = err["msg"].removeprefix("Value error, ")
    return RankwiseError(f"{where}: invalid {name}: {msg}")


# ---------------------------------------------------------------- schema

class CalibBlock(BaseModel):
    """`calib:` maps onto the compression options calib (source), nsamples, seqlen, seed, batch_size."""
    model_config = ConfigDict(extra="forbid")
    source: Optional[str] = None
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: Optional[int] = None
    batch_size: Optional[int] = None

    def as_options(self) -> dict:
        out = self.model_dump(exclude_none=True)
        if "source" in out:
            out["calib"] = out.pop("source")
        return out


class EvalBlock(BaseModel):
    """`eval:`: the options of `compress evaluate`. device defaults to the job's device."""
    model_config = ConfigDict(extra="forbid")
    ppl: list[str] = Field(default_factory=lambda: ["wikitext2"])
    tasks: list[str] = Field(default_factory=list)
    seqlen: int = Field(2048, ge=2)
    max_windows: Optional[int] = Field(None, ge=1)
    limit: Optional[Union[int, float]] = Field(None, gt=0, description="examples per task, or a fraction below 1")
    batch_size: Union[int, Literal["auto"]] = 1
    bos: Optional[bool] = None  # None: as the tokenizer does in normal use
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: Optional[str] = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        from rankwise.compress.loading import DTYPE_ALIASES
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("ppl", "tasks", mode="before")
    @classmethod
    def _comma_list(cls, v):
        if isinstance(v, str):  # "wikitext2,c4" as on the command line
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: dict[str, Any] = Field(default_factory=dict)
    set: dict[str, Any]


class RunFile(BaseModel):
    """The run file's own keys; every other top-level key is a compression option (checked per job)."""
    model_config = ConfigDict(extra="allow")
    output_dir: str
    calib: Union[str, CalibBlock] = Field(default_factory=CalibBlock)
    eval: EvalBlock = Field(default_factory=EvalBlock)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    jobs: list[dict[str, Any]] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    baseline: bool = Field(False, description="add a dense (uncompressed) job per model")
    keep_checkpoints: bool = Field(True, description="False: delete each compressed model once evaluated")

    @field_validator("sweep", mode="before")
    @classmethod
    def _scalars_are_lists(cls, v):
        return {k: x if isinstance(x, list) else [x] for k, x in v.items()} if isinstance(v, dict) else v


# ---------------------------------------------------------------- jobs

@dataclass
class Job:
    name: str
    model: str
    compress: dict | None  # CompressConfig fields; None for the dense baseline
    eval: dict
    keep_checkpoint: bool = True
    dir: Path = field(default=Path("."))

    @property
    def method(self) -> str:
        return self.compress["method"] if self.compress else DENSE

    def to_json(self) -> dict:
        return {"name": self.name, "model": self.model, "compress": self.compress, "eval": self.eval,
                "keep_checkpoint": self.keep_checkpoint}

    def status(self) -> str:
        if (self.dir / "result.json").is_file():
            return "done"
        return "failed" if (self.dir / "error.json").is_file() else "pending"


@dataclass
class Plan:
    path: Path
    output_dir: Path
    jobs: list[Job]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(s).rstrip("/")).name).strip("-").lower()[:40] or "model"


def _job_name(model: str, compress: dict | None, ev: dict) -> str:
    hashed = {"model": model, "eval": {k: v for k, v in ev.items() if k not in UNHASHED},
              "compress": {k: v for k, v in compress.items() if k not in UNHASHED} if compress else None}
    digest = hashlib.sha1(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    what = f"{compress['method']}_{compress['ratio']:g}" if compress else "dense"
    return f"{_slug(model)}_{what}_{digest}"


def _resolve(options: dict, origin: dict, ev: EvalBlock, keep: bool, path: Path, lines: dict) -> Job:
    from rankwise.compress.config import CompressConfig
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
        raise _validation_error(path, lines, err, loc, str(key)) from None
    evald = ev.model_dump()
    evald["device"] = evald["device"] or cfg.device
    evald["trust_remote_code"] = cfg.trust_remote_code
    compress = None if dense else cfg.model_dump(mode="json")
    if dense:
        evald["dtype"] = evald["dtype"] if ev.dtype != "auto" else cfg.dtype
    return Job(_job_name(cfg.model, compress, evald), cfg.model, compress, evald, keep)


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
        raise _validation_error(path, lines, err, tuple(err["loc"])) from None

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
        job.dir = out / "jobs" / job.name
        jobs.append(job)
    if not jobs:
        raise RankwiseError(f"{path}: no jobs (give model and ratio, a sweep: or jobs:)")
    return Plan(path, out, jobs)


# ---------------------------------------------------------------- running

def _atomic_json(path: Path, obj: dict) -> None:
    from rankwise.eval.results import write_text_atomic
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def run_job(job: Job, progress=None) -> dict:
    """Compress (unless dense or already compressed by an earlier attempt), evaluate, write result.json."""
    import torch

    from rankwise.compress.config import CompressConfig
    from rankwise.compress.job import run_compress
    from rankwise.compress.metadata import read_result
    from rankwise.eval.evaluate import evaluate_model
    t0 = time.perf_counter()
    job.dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(job.dir / "job.json", job.to_json())
    for stale in job.dir.glob(".model.*"):  # leftovers of a save interrupted by a crash
        shutil.rmtree(stale, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ckpt = job.dir / "model"
    meta, resumed = None, False
    model_ref = job.model
    if job.compress:
        meta = read_result(ckpt)
        resumed = meta is not None
        if not resumed:
            meta = run_compress(CompressConfig(**job.compress), ckpt, overwrite=ckpt.exists(), progress=progress)
        model_ref = str(ckpt)
    ev = dict(job.eval)
    result_eval = evaluate_model(model_ref, ppl=ev.pop("ppl"), tasks=ev.pop("tasks"), progress=progress, **ev)
    result_eval.pop("rankwise", None)  # the compression metadata is kept once, under "compress"
    peak = {"host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        peak["gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    result = {"job": job.name, "config": job.to_json(), "compress": meta and meta.to_json(),
              "compress_resumed": resumed,
              "eval": result_eval, "peak_memory": peak, "wall_seconds": round(time.perf_counter() - t0, 2),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _atomic_json(job.dir / "result.json", result)
    (job.dir / "error.json").unlink(missing_ok=True)
    if not job.keep_checkpoint and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def record_failure(job: Job, exc: BaseException) -> str:
    msg = first_line(exc)
    if not isinstance(exc, RankwiseError):
        msg = f"{type(exc).__name__}: {msg}"
    job.dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(job.dir / "error.json", {"job": job.name, "error": msg, "type": type(exc).__name__,
                                          "traceback": traceback.format_exc(),
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return msg


def _free_memory():
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def run_in_process(job: Job, progress=None) -> str | None:
    """Run one job here; None on success, else the recorded error line."""
    try:
        run_job(job, progress)
        return None
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return record_failure(job, e)
    finally:
        _free_memory()


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        return []


def gpu_slots(jobs: list[Job], n: int, gpus: list[str]) -> list[str | None]:
    """One worker slot per GPU (CUDA_VISIBLE_DEVICES value), or plain CPU slots when no job uses a GPU."""
    wants_gpu = any(j.eval["device"].startswith("cuda") or (j.compress or {}).get("device", "").startswith("cuda")
                    or (j.eval["device"] == "auto" and gpus) for j in jobs)
    if not wants_gpu:
        return [None] * n
    if n > len(gpus):
        raise RankwiseError(f"--jobs {n} needs {n} GPUs, but {len(gpus)} are visible "
                            f"(CUDA_VISIBLE_DEVICES={','.join(gpus) or 'none'})")
    return gpus[:n]


def run_in_subprocesses(jobs: list[Job], slots: list[str | None], on_done) -> None:
    """Run the jobs on len(slots) worker subprocesses (each: `python -m rankwise.cli.sweep JOB_DIR`, its log in
    JOB_DIR/log.txt); on_done(job, error_or_None) is called as each finishes."""
    free: Queue = Queue()
    for s in slots:
        free.put(s)

    def work(job: Job):
        slot = free.get()
        try:
            job.dir.mkdir(parents=True, exist_ok=True)
            _atomic_json(job.dir / "job.json", job.to_json())
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
                env["RANKWISE_ONE_GPU"] = "1"
            with open(job.dir / "log.txt", "w") as log:
                rc = subprocess.call([sys.executable, "-m", "rankwise.cli.sweep", str(job.dir)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
            if rc == 0 and (job.dir / "result.json").is_file():
                on_done(job, None)
                return
            err = job.dir / "error.json"
            msg = json.loads(err.read_text())["error"] if err.is_file() else f"worker exited with code {rc}"
            if not err.is_file():
                record_failure(job, RuntimeError(msg))
            on_done(job, msg)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        list(pool.map(work, jobs))


def _worker(job_dir: str) -> int:
    """Entry point of a worker subprocess: run the job described by JOB_DIR/job.json."""
    d = json.loads((Path(job_dir) / "job.json").read_text())
    job = Job(d["name"], d["model"], d["compress"], d["eval"], d.get("keep_checkpoint", True), Path(job_dir))
    if os.environ.get("RANKWISE_ONE_GPU"):  # the one visible GPU is cuda:0 whatever its number outside
        for part in (job.compress, job.eval):
            if part and str(part.get("device", "")).startswith("cuda:"):
                part["device"] = "cuda"
    return 0 if run_in_process(job) is None else 1


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
