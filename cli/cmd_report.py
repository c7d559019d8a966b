"""`compress report`: results.csv, results.md and plots of a batch run folder, at any time."""
from __future__ import annotations

from pathlib import Path

import typer

from rankwise.errors import RankwiseError
from rankwise.cli.common import app, out_console, user_errors


@app.command("report")
@user_errors
def report_cmd(run_dir: Path = typer.Argument(..., help="The output_dir of a `compress run`.")):
    """Tabulate and plot the jobs of the run folder's last run file (job folders of earlier ones listed apart)."""
    if not (run_dir / "jobs").is_dir():
        raise RankwiseError(f"{str(run_dir)!r} is not a run folder (it has no jobs/ folder)")
    from rankwise.eval.report import collect_rows, describe_files, write_report
    if collect_rows(run_dir) == ([], []):  # before writing anything into a folder that holds no run
        raise RankwiseError(f"{str(run_dir)!r} is not a run folder: neither plan.json nor jobs/ holds a job of "
                            f"`compress run`")
    report = write_report(run_dir)
    earlier = f" ({len(report.earlier)} job folders of other run files listed apart)" if report.earlier else ""
    out_console.print(f"{report.count('done')} done, {report.count('failed')} failed, {report.count('pending')} "
                      f"pending{earlier}; "
                      f"wrote {describe_files(report.files)}")
