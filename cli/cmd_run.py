"""`compress run`: a YAML batch of compression + evaluation jobs, resumable, with a results table and plots."""
from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.table import Table

from rankwise.errors import RankwiseError
from rankwise.cli.common import Bars, app, console, out_console, quiet_option, user_errors


def plan_table(plan, statuses: dict) -> Table:
    t = Table(title=f"{len(plan.jobs)} jobs from {plan.path}", caption=f"job folders: {plan.output_dir}/jobs/")
    for col in ("#", "status", "model", "method", "ratio", "job folder"):
        t.add_column(col, justify="right" if col in ("#", "ratio") else "left",
                     overflow="fold" if col in ("model", "job folder") else "ellipsis")
    for i, job in enumerate(plan.jobs, 1):
        ratio = f"{job.compress['ratio']:g}" if job.compress else "-"
        t.add_row(str(i), statuses[job.name], job.model, job.method, ratio, job.name)
    return t


@app.command("run")
@user_errors
def run_cmd(
    config: Path = typer.Argument(..., help="Run file (YAML): output_dir, model, calib:, eval:, sweep:, jobs:."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and their folders; run nothing."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Jobs at once, each in its own process on its own GPU "
                                                      "(1: one after another in this process)."),
    quiet: bool = quiet_option(),
):
    """Run every job of a sweep (skipping finished ones), then write results.csv, results.md and plots."""
    from rankwise.cli.sweep import gpu_slots, load_plan, run_in_process, run_in_subprocesses, visible_gpus
    from rankwise.eval.report import describe_files, write_report
    if jobs < 1:
        raise RankwiseError(f"--jobs must be at least 1, got {jobs}")
    plan = load_plan(config)
    statuses = {j.name: j.status() for j in plan.jobs}
    todo = [j for j in plan.jobs if statuses[j.name] != "done"]
    if dry_run:
        out_console.print(plan_table(plan, statuses))
        out_console.print(f"{len(todo)} to run, {len(plan.jobs) - len(todo)} already done")
        return
    slots = gpu_slots(todo, min(jobs, len(todo)), visible_gpus()) if jobs > 1 and todo else []
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, plan.output_dir / "run.yaml")  # what produced these results
    console.print(f"{len(plan.jobs)} jobs: {len(plan.jobs) - len(todo)} done already, {len(todo)} to run")
    failed: dict[str, str] = {}
    finished = 0

    def on_done(job, error):
        nonlocal finished
        finished += 1
        if error:
            failed[job.name] = error
            console.print(f"[red]failed[/] [{finished}/{len(todo)}] {job.name}: {error}", highlight=False)
        else:
            console.print(f"[green]done[/]   [{finished}/{len(todo)}] {job.name}", highlight=False)

    if slots:
        console.print(f"running {len(todo)} jobs on {len(slots)} workers "
                      f"({'GPUs ' + ','.join(slots) if slots[0] is not None else 'CPU'}); logs in each job folder")
        run_in_subprocesses(todo, slots, on_done)
    else:
        for job in todo:
            console.print(f"[{finished + 1}/{len(todo)}] {job.name}: {job.method} "
                          f"{'' if not job.compress else job.compress['ratio']} on {job.model}", highlight=False)
            with Bars(quiet) as bars:
                error = run_in_process(job, bars)
            on_done(job, error)
    report = write_report(plan.output_dir)
    out_console.print(f"wrote {describe_files(report['files'])}")
    if failed:
        console.print(f"[red]{len(failed)} of {len(plan.jobs)} jobs failed[/]; rerun to retry them "
                      f"(errors in {plan.output_dir}/jobs/*/error.json)", highlight=False)
        raise typer.Exit(min(len(failed), 125))  # the exit code is the number of failed jobs
