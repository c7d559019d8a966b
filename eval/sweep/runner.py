"""Running sweep jobs: one job end to end (compress unless done, evaluate, write result.json), its failure record,
its progress as log lines, and the lock that keeps a second runner out of the folder.

Every file a job writes is written to a temporary sibling and renamed, so a job that is stopped (Ctrl-C, a
killed worker) leaves at most a hidden temporary, which its next attempt removes.
"""
from __future__ import annotations

import fcntl
import gc
import os
import shutil
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from rankwise.errors import RankwiseError, first_line
from rankwise.eval.sweep.plan import Job, Plan
from rankwise.eval.sweep.records import JobError, JobResult, PlanRecord


def write_json_atomic(path: Path, obj: dict) -> None:
    """Valid JSON only (no NaN / Infinity), written to a temporary sibling and renamed."""
    from rankwise.compress.outputs import json_text, write_text_atomic
    write_text_atomic(path, json_text(obj, path.name, indent=2, default=str))


def write_plan(plan: Plan) -> None:
    """run.yaml (the run file that produced these results) and plan.json (its jobs: the report shows those)."""
    if Path(plan.path).resolve() != (plan.output_dir / "run.yaml").resolve():
        shutil.copyfile(plan.path, plan.output_dir / "run.yaml")
    record = PlanRecord(run_file=str(plan.path), jobs=[j.record() for j in plan.jobs])
    write_json_atomic(plan.output_dir / "plan.json", record.model_dump(mode="json"))


def _existing_checkpoint(ckpt: Path):
    """The CompressionResult of a checkpoint an earlier attempt (or another evaluation of it) finished, else
    None."""
    from rankwise.compress.metadata import read_result
    from rankwise.compress.outputs import remove_stale_temporaries
    remove_stale_temporaries(ckpt)  # a killed save's leftovers (or the checkpoint it was swapping out)
    try:
        return read_result(ckpt)
    except RankwiseError:  # an unreadable config.json or metadata: compress again
        return None


def run_job(job: Job, progress=None) -> JobResult:
    """Compress (unless dense or already compressed), evaluate, write result.json."""
    from rankwise.compress.job import run_compress
    from rankwise.compress.loading import resolve_device
    from rankwise.compress.peak_memory import peak_memory, reset_peak_memory
    from rankwise.eval.evaluate import evaluate_model
    t0 = time.perf_counter()
    job.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job.dir / "job.json", job.record().model_dump(mode="json"))
    (job.dir / "result.json").unlink(missing_ok=True)  # only an invalid one can be here: the job is redone
    device = resolve_device(job.eval.device)
    reset_peak_memory(device)
    meta, resumed = None, False
    model_ref = job.model
    if job.compress:
        ckpt = job.checkpoint_dir / "model"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        meta = _existing_checkpoint(ckpt)
        resumed = meta is not None
        if not resumed:
            meta = run_compress(job.compress, ckpt, overwrite=ckpt.exists(), progress=progress)
        model_ref = str(ckpt)
    result_eval = evaluate_model(model_ref, progress=progress, **job.eval.model_dump())
    peak = peak_memory(device)
    result = JobResult(job=job.name, config=job.record(), compress=meta, compress_resumed=resumed,
                       eval=result_eval, peak_memory=peak, wall_seconds=round(time.perf_counter() - t0, 2),
                       finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json_atomic(job.dir / "result.json", result.to_json())
    (job.dir / "error.json").unlink(missing_ok=True)
    if not job.keep_checkpoint and job.checkpoint_dir is not None:
        shutil.rmtree(job.checkpoint_dir / "model", ignore_errors=True)
    return result


def record_failure(job: Job, exc: BaseException) -> str:
    """Write the job's error.json; the error's one line."""
    msg = first_line(exc)
    if not isinstance(exc, RankwiseError):
        msg = f"{type(exc).__name__}: {msg}"
    job.dir.mkdir(parents=True, exist_ok=True)
    error = JobError(job=job.name, error=msg, type=type(exc).__name__, traceback=traceback.format_exc(),
                     time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json_atomic(job.dir / "error.json", error.model_dump())
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


class LogProgress:
    """Progress as plain lines (a job's log.txt): one when a stage starts, ends, or moves by a tenth."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.last: tuple[str, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if self.last and self.last[0] == stage and done < total and done - self.last[1] < step:
            return
        self.last = (stage, done)
        print(f"{time.strftime('%H:%M:%S')} {stage} {done}/{total}", file=self.stream, flush=True)


@contextmanager
def sole_runner(output_dir: Path):
    """Hold an exclusive lock on OUTPUT_DIR/.run.lock while a sweep runs: a second `compress run` on the same
    folder is refused instead of racing the first (the lock goes with the process, however it ends)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = open(output_dir / ".run.lock", "a+")
    except OSError as e:
        raise RankwiseError(f"cannot write into output_dir {str(output_dir)!r}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RankwiseError(f"another `compress run` ({holder}) is running on {output_dir}: "
                            "wait for it or stop it first") from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, after the running jobs were stopped; says how many."""

    def __init__(self, stopped: int):
        super().__init__(f"{stopped} running job{'s' if stopped != 1 else ''} cancelled")
        self.stopped = stopped
