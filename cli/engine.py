"""Where the jobs of a sweep run: one after another in this process, or as Ray tasks.

Ray (the optional extra `rankwise[ray]`) runs each job as one task with its resources: one GPU for a CUDA job,
CPUs otherwise. A task gets a worker process of its own (max_calls=1), so the host and GPU memory a job leaves
behind go away with it. `--jobs N` starts a local cluster for this run (its processes die with this one);
`--ray-address` / RAY_ADDRESS connects to an existing cluster, whose nodes must all see `output_dir` (shared
storage) and have Rankwise installed. Semantics are the sequential ones: a job is done when its result.json is
written (atomically, by the task); a task's exception is recorded by the task (error.json), a worker that died
(killed, out of memory, node lost) is recorded here; Ctrl-C cancels the running tasks.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rankwise.cli.sweep import Job, record_failure, run_in_process
from rankwise.errors import RankwiseError, first_line

RAY_MISSING = "running jobs in parallel (--jobs N, --ray) needs Ray: pip install 'rankwise[ray]'"
# Jobs exchange only their settings and an error line through Ray: a small object store is plenty.
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a Ray sweep, after the running tasks were cancelled."""

    def __init__(self, cancelled: int):
        super().__init__(f"{cancelled} running Ray tasks cancelled")


@dataclass
class RayTarget:
    """Which cluster, and how many jobs at once (None: as many as its resources allow)."""
    address: str | None = None  # None: start a local cluster for this run (--ray-address, RAY_ADDRESS)
    max_parallel: int | None = None
    local_cpus: int | None = None  # local cluster size (default: every local CPU)


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


def _run_task(job: Job) -> str | None:
    """A Ray task's body, in its own worker process: the job's output goes to JOB_DIR/log.txt."""
    job.dir.mkdir(parents=True, exist_ok=True)
    log = os.open(job.dir / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # the worker serves this task only (max_calls=1): its stdout/stderr can be the job's
    os.dup2(log, 2)
    (job.dir / "worker.json").write_text(f'{{"pid": {os.getpid()}, "host": "{os.uname().nodename}"}}\n')
    if os.environ.get("CUDA_VISIBLE_DEVICES") and job.wants_gpu:
        for part in (job.compress, job.eval):  # Ray shows the task its one GPU as cuda:0
            if part and str(part.get("device", "")).startswith("cuda:"):
                part["device"] = "cuda"
    return run_in_process(job)


def _resources(job: Job, cluster_gpus: float, cpus_per_job: int) -> dict:
    if job.wants_gpu or (cluster_gpus and "auto" in (job.eval["device"], (job.compress or {}).get("device"))):
        if not cluster_gpus:
            raise RankwiseError(f"job {job.name} asks for device {job.eval['device']!r} but the Ray cluster "
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
        else:  # "local": a new cluster for this run, never one found on the machine
            ray.init(address="local", num_cpus=target.local_cpus or os.cpu_count(), num_gpus=len(visible_gpus()),
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"connect to Ray at {target.address!r}" if target.address else "start a local Ray cluster"
        raise RankwiseError(f"cannot {where}: {first_line(e, 300)}") from None
    return True


def run_on_ray(jobs: list[Job], target: RayTarget, on_done) -> None:
    """Run the jobs as Ray tasks; on_done(job, error_or_None) as each finishes. Raises SweepInterrupted on
    Ctrl-C after cancelling the running tasks (their jobs stay pending: nothing of them is kept)."""
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
        try:
            while waiting or running:
                while waiting and (target.max_parallel is None or len(running) < target.max_parallel):
                    job, res = waiting.pop(0)
                    running[task.options(**res).remote(job)] = job
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        error = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died: the task wrote nothing that counts
                        error = record_failure(job, RuntimeError(f"worker process died ({type(e).__name__}: "
                                                                 f"{first_line(e, 200)})"))
                    on_done(job, error)
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=True)
            raise SweepInterrupted(len(running)) from None
    finally:
        if started:
            ray.shutdown()

