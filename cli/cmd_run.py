"""`compress run`: a YAML batch of compression + evaluation jobs, resumable, with a results table and plots."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from rankwise.errors import RankwiseError
from rankwise.cli.common import Bars, app, console, out_console, quiet_option, user_errors


def plan_table(plan, statuses: dict) -> Table:
    from rankwise.eval.report import setting_value, varying_settings
    settings = varying_settings([j.record().compress for j in plan.jobs])
    t = Table(title=f"{len(plan.jobs)} jobs from {plan.path}", caption=f"job folders: {plan.output_dir}/jobs/")
    for col in ("#", "status", "model", "method", "ratio", *settings, "job folder"):
        t.add_column(col, justify="right" if col in ("#", "ratio") else "left",
                     overflow="fold" if col in ("model", "job folder") else "ellipsis")
    for i, job in enumerate(plan.jobs, 1):
        compress = job.record().compress
        ratio = job.compress.budget_label if job.compress else "-"
        t.add_row(str(i), statuses[job.name], job.model, job.method, ratio,
                  *(setting_value(compress, s) for s in settings), job.name)
    return t


@app.command("run")
@user_errors
def run_cmd(
    config: Path = typer.Argument(..., help="Run file (YAML): output_dir, model, calib:, eval:, sweep:, jobs:."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and their folders; run nothing."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Jobs at once, each a Ray task in its own process (one GPU "
                                                      "each for CUDA jobs) on a local Ray cluster; 1: one after "
                                                      "another in this process, no Ray needed."),
    ray: bool = typer.Option(False, "--ray", help="Run the jobs as Ray tasks (YAML `ray: true`): on the cluster "
                                                  "of --ray-address or RAY_ADDRESS, else on a local one."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="An existing Ray cluster (e.g. "
                                              "ray://head:10001 or auto); output_dir must be on storage every "
                                              "node sees."),
    quiet: bool = quiet_option(),
):
    """Run every job of a sweep (skipping finished ones), then write results.csv, results.md and plots.
    Exit code 0 when every job succeeded, 1 when any failed (the count is printed), 2 for bad input."""
    from rankwise.eval.report import describe_files, write_report
    from rankwise.eval.sweep.plan import load_plan
    from rankwise.eval.sweep.ray_tasks import ray_target
    from rankwise.eval.sweep.run import run_sweep
    from rankwise.eval.sweep.runner import sole_runner
    if jobs < 1:
        raise RankwiseError(f"--jobs must be at least 1, got {jobs}")
    plan = load_plan(config)
    statuses = {j.name: j.status() for j in plan.jobs}
    todo = [j for j in plan.jobs if statuses[j.name] != "done"]
    if dry_run:
        out_console.print(plan_table(plan, statuses))
        out_console.print(f"{len(todo)} to run, {len(plan.jobs) - len(todo)} already done")
        return
    from rankwise.compress.outputs import check_run_output_dir
    check_run_output_dir(plan.output_dir, plan.path)  # a user's results.md / results.csv / run.yaml stay
    target = ray_target(plan, jobs, ray, ray_address) if todo else None

    def on_start(job, n):
        ratio = f" {job.compress.budget_label}" if job.compress else ""
        console.print(f"[{n}/{len(todo)}] {job.name}: {job.method}{ratio} on {job.model}", highlight=False)

    def on_done(job, error, finished):
        if error:
            console.print(f"[red]failed[/] [{finished}/{len(todo)}] {job.name}: {escape(error)}", highlight=False)
        else:
            console.print(f"[green]done[/]   [{finished}/{len(todo)}] {job.name}", highlight=False)

    @contextmanager
    def bars_for(job):
        with Bars(quiet) as bars:
            yield bars

    with sole_runner(plan.output_dir):
        console.print(f"{len(plan.jobs)} jobs: {len(plan.jobs) - len(todo)} done already, {len(todo)} to run")
        if target is not None:
            console.print(f"running {len(todo)} jobs as Ray tasks ({target.address or 'local cluster'}"
                          f"{f', {target.max_parallel} at once' if target.max_parallel else ''}); "
                          "logs in each job folder", highlight=False)
        try:
            outcome = run_sweep(plan, todo, target, on_start, on_done, bars_for)
        except KeyboardInterrupt as e:  # the running jobs were stopped; their results are atomic, never partial
            write_report(plan.output_dir)
            console.print(f"interrupted ({e or 'the running job was stopped'}); finished jobs are kept: "
                          "rerun to continue", highlight=False)
            raise typer.Exit(130)
        report = write_report(plan.output_dir)
    out_console.print(f"wrote {describe_files(report.files)}")
    if outcome.failed:
        console.print(f"[red]{len(outcome.failed)} of {len(plan.jobs)} jobs failed[/]; rerun to retry them "
                      f"(errors in results.md and {plan.output_dir}/jobs/*/error.json)", highlight=False)
        raise typer.Exit(1)
