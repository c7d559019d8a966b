"""A sweep's pending jobs run: one after another in this process, or as Ray tasks (ray_tasks.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from rankwise.eval.sweep.plan import Job, Plan
from rankwise.eval.sweep.ray_tasks import RayTarget, run_on_ray
from rankwise.eval.sweep.runner import run_in_process, write_plan


@dataclass
class SweepOutcome:
    """What a sweep's pending jobs came to: job name -> error line for the ones that failed."""
    finished: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def run_sweep(plan: Plan, todo: list[Job], target: Optional[RayTarget] = None,
              on_start: Optional[Callable[[Job, int], None]] = None,
              on_done: Optional[Callable[[Job, Optional[str], int], None]] = None,
              progress_for: Optional[Callable[[Job], object]] = None) -> SweepOutcome:
    """Run the pending jobs: in this process one after another (target None) or as Ray tasks on `target`
    (a RayTarget). on_start(job, n) / on_done(job, error_or_None, n_finished) report; progress_for(job) is a
    context manager giving the in-process job's progress callback. Ctrl-C stops the running jobs and raises
    SweepInterrupted (or KeyboardInterrupt for the in-process one); their jobs stay pending."""
    outcome = SweepOutcome()

    def done(job: Job, error: str | None) -> None:
        outcome.finished += 1
        if error:
            outcome.failed[job.name] = error
        if on_done:
            on_done(job, error, outcome.finished)

    write_plan(plan)
    if target is not None:
        run_on_ray(todo, target, done)
        return outcome
    for job in todo:
        if on_start:
            on_start(job, outcome.finished + 1)
        if progress_for is None:
            done(job, run_in_process(job))
            continue
        with progress_for(job) as progress:
            error = run_in_process(job, progress)
        done(job, error)
    return outcome
