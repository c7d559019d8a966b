"""Sweep jobs as Ray tasks (the optional extra `rankwise[ray]`).

Each job is one task with its resources: one GPU for a CUDA job, CPUs otherwise. The task runs the job in a
process of its own (`python -m rankwise.eval.sweep.job_process`) whose output is the job's log.txt: torch and the
model never live in a Ray worker, so a worker stays small, nothing of a job outlives it, and a job's exit never
races Ray's threads. A task gets a fresh worker (max_calls=1) that exits with it. `--jobs N` starts a local
cluster for this run and shuts it down at the end (its processes die with this one if it is killed);
`--ray-address` / RAY_ADDRESS connects to an existing cluster, whose nodes must all see `output_dir` (shared
storage) and have Rankwise installed.

Semantics are the sequential ones: a job is done when its result.json is written (atomically, by the job's
process); a job's exception is recorded by that process (error.json); a job process or worker that died (killed,
out of memory, node lost) is recorded here. Ctrl-C cancels the running tasks (their job processes die with their
workers), waits until they are gone, and raises SweepInterrupted.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rankwise.errors import RankwiseError, first_line

if TYPE_CHECKING:  # a Ray worker imports this module to run _run_task: it stays free of torch
    from rankwise.eval.sweep.plan import Job

RAY_MISSING = "running jobs in parallel (--jobs N, --ray) needs Ray: pip install 'rankwise[ray]'"
# Jobs exchange only their settings and an error line through Ray: a small object store is plenty.
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20
# How often the driver looks up from waiting on its tasks (for Ctrl-C), and how long it waits for cancelled
# tasks to be gone.
POLL_SECONDS = 0.2
CANCEL_WAIT_SECONDS = 30.0


@dataclass
class RayTarget:
    """Which cluster, and how many jobs at once (None: as many as its resources allow)."""
    address: str | None = None  # None: start a local cluster for this run (--ray-address, RAY_ADDRESS)
    max_parallel: int | None = None
    local_cpus: int | None = None  # local cluster size (default: every local CPU)


def ray_target(plan, jobs: int, ray: bool, ray_address: str | None) -> RayTarget | None:
    """Where a plan's jobs run: None for one after another in this process (no Ray needed), else the cluster of
    --ray-address / the run file's ray_address / RAY_ADDRESS, or a local one (--jobs N, --ray, `ray: true`)."""
    address = ray_address or plan.ray_address
    if not (ray or plan.ray or address or jobs > 1):
        return None  # RAY_ADDRESS alone does not send a sequential sweep to Ray
    address = address or os.environ.get("RAY_ADDRESS")
    import_ray()  # missing extra: one line before anything runs
    return RayTarget(address=address, max_parallel=jobs if jobs > 1 else None)


def import_ray():
    try:
        import ray
    except ImportError:
        raise RankwiseError(RAY_MISSING) from None
    return ray


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        return []


def _die_with_parent() -> None:
    """In the job process, before exec: the kernel kills it when the worker that started it dies (a cancelled
    or killed task), so no job keeps writing into a folder a rerun uses."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker's own cleanup has to do
        pass


def _run_task(job_dir: str, device: str | None) -> int:
    """A Ray task's body: run the job of JOB_DIR/job.json in a process of its own (on `device` when given),
    its output into JOB_DIR/log.txt; returns that process's exit code (negative: the signal that killed it)."""
    from rankwise.compress.outputs import write_text_atomic
    folder = Path(job_dir)
    command = [sys.executable, "-m", "rankwise.eval.sweep.job_process", job_dir] + (["--device", device]
                                                                                   if device else [])
    with open(folder / "log.txt", "wb") as log:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent)
        write_text_atomic(folder / "worker.json", json.dumps({"pid": child.pid, "worker_pid": os.getpid(),
                                                              "host": os.uname().nodename}) + "\n")
        try:
            return child.wait()
        except KeyboardInterrupt:  # a cancelled task: its job goes with it
            child.kill()
            child.wait()
            raise


def _task_device(job: Job) -> str | None:
    """Ray shows a task its one GPU as cuda:0: a job asking for cuda:N runs on "cuda" there."""
    return "cuda" if job.wants_gpu else None


def _job_error(job: Job, code: int) -> str | None:
    """None when the job process succeeded, else the error line its error.json holds, or the one recorded here
    when it died without writing one."""
    from rankwise.eval.sweep.records import read_job_error
    from rankwise.eval.sweep.runner import record_failure
    if code == 0:
        return None
    error = read_job_error(job.dir) if code == 1 else None
    if error is not None:
        return error.error
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return record_failure(job, RuntimeError(f"worker process died ({how}); its output is in {job.dir}/log.txt"))


def _resources(job: Job, cluster_gpus: float, cpus_per_job: int) -> dict:
    if job.wants_gpu or (cluster_gpus and "auto" in job.devices):
        if not cluster_gpus:
            raise RankwiseError(f"job {job.name} asks for device {job.eval.device!r} but the Ray cluster "
                                "has no GPU")
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": cpus_per_job}


def _connect(ray, target: RayTarget) -> bool:
    """Join or start a cluster; True when this process started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if target.address:
            ray.init(address=target.address, **quiet)
        else:  # "local": a new cluster for this run, never one found on the machine; no idle workers kept
            ray.init(address="local", num_cpus=target.local_cpus or os.cpu_count(), num_gpus=len(visible_gpus()),
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet,
                     _system_config={"enable_worker_prestart": False})
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"connect to Ray at {target.address!r}" if target.address else "start a local Ray cluster"
        raise RankwiseError(f"cannot {where}: {first_line(e, 300)}") from None
    return True


@contextmanager
def _ctrl_c_flag():
    """Ctrl-C sets an event instead of raising inside Ray's blocking calls (which can swallow it); a second
    Ctrl-C raises at once. Outside the main thread, signals cannot be handled here: nothing changes."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def handler(signum, frame):
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _cancel(ray, running: dict) -> None:
    """Cancel the running tasks (killing their workers, and so their job processes) and wait until they are
    gone, so nothing writes into the output folder after this returns."""
    for ref in running:
        ray.cancel(ref, force=True)
    pending = list(running)
    try:
        ray.wait(pending, num_returns=len(pending), timeout=CANCEL_WAIT_SECONDS)
    except ray.exceptions.RayError:  # pragma: no cover - the cluster itself went away
        pass


def run_on_ray(jobs: list[Job], target: RayTarget, on_done) -> None:
    """Run the jobs as Ray tasks; on_done(job, error_or_None) as each finishes. Raises SweepInterrupted on
    Ctrl-C after cancelling the running tasks (their jobs stay pending: nothing of them is kept)."""
    from rankwise.eval.sweep.runner import SweepInterrupted, write_json_atomic
    ray = import_ray()
    started = _connect(ray, target)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        cpus_per_job = max(1, cpus // target.max_parallel) if target.max_parallel else 1
        resources = [_resources(job, gpus, cpus_per_job) for job in jobs]  # refuse before submitting any
        # retries stay off: a job that kills its worker (out of memory) would only do it again
        task = ray.remote(max_calls=1, max_retries=0)(_run_task)
        waiting = list(zip(jobs, resources))
        running: dict = {}
        with _ctrl_c_flag() as ctrl_c:
            try:
                while waiting or running:
                    while waiting and (target.max_parallel is None or len(running) < target.max_parallel):
                        job, res = waiting.pop(0)
                        job.dir.mkdir(parents=True, exist_ok=True)
                        write_json_atomic(job.dir / "job.json", job.record().model_dump(mode="json"))
                        running[task.options(**res).remote(str(job.dir), _task_device(job))] = job
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                    if ctrl_c.is_set():
                        raise KeyboardInterrupt
                    for ref in ready:
                        _finish(ray, ref, running.pop(ref), on_done)
            except KeyboardInterrupt:
                _cancel(ray, running)
                raise SweepInterrupted(len(running)) from None
    finally:
        if started:
            ray.shutdown()


def _finish(ray, ref, job: Job, on_done) -> None:
    from rankwise.eval.sweep.runner import record_failure
    try:
        error = _job_error(job, ray.get(ref))
    except ray.exceptions.RayError as e:  # the worker died: the task wrote nothing that counts
        error = record_failure(job, RuntimeError(f"worker process died ({type(e).__name__}: "
                                                 f"{first_line(e, 200)})"))
    on_done(job, error)
