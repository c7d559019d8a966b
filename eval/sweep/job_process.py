"""`python -m rankwise.eval.sweep.job_process JOB_DIR [--device DEVICE]`: one sweep job in a process of its own.

A Ray task starts this process and waits for it, so the job's model, torch and its threads never share a process
with Ray's own threads, and all the job's memory is gone when it exits. stdout and stderr are the job's log.txt
(progress lines, warnings, the traceback of a crash). Exit 0: result.json written; 1: error.json written.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from rankwise.eval.sweep.plan import Job
    from rankwise.eval.sweep.records import read_job_record
    from rankwise.eval.sweep.runner import LogProgress, run_in_process
    job_dir = Path(argv[0])
    record = read_job_record(job_dir)
    if record is None:
        print(f"{job_dir}/job.json is missing or not a job", file=sys.stderr)
        return 2
    job = Job.from_record(record, job_dir.parent.parent)
    if len(argv) == 3 and argv[1] == "--device":  # where Ray placed it (its one GPU is cuda:0 there)
        job = job.on_device(argv[2])
    print(f"job {job.name}: {job.method} on {job.model}", flush=True)
    error = run_in_process(job, LogProgress())
    print(f"failed: {error}" if error else "done", flush=True)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
