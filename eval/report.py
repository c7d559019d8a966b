"""Tables and plots of a batch run: RUN_DIR/results.csv, results.md and RUN_DIR/plots/*.png.

Reads what the jobs left in RUN_DIR/jobs/*/ (typed records, eval/sweep/records.py): result.json (a finished
job: config, compression metadata, evaluation results, time, peak memory) or error.json + job.json (a failed
one). RUN_DIR/plan.json names the jobs of the current run file: only those are tabulated and plotted; job
folders of other run files (e.g. evaluations with other settings) are listed apart. Nothing here runs a model,
so `compress report` can be run at any time, also while a sweep is still going.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import matplotlib

from rankwise.compress.metadata import ModuleSpec
from rankwise.compress.peak_memory import PeakMemory

matplotlib.use("Agg")  # files only, no display (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from rankwise.eval.sweep.records import (JobError, JobRecord, JobResult, read_job_error,  # noqa: E402
                                         read_job_record, read_job_result, read_plan)

FIXED_COLUMNS = ["job", "status", "model", "method", "ratio_asked", "ratio_achieved", "model_ratio_achieved"]
# shown when a job has a byte budget (--size-ratio) or stores its factors in another dtype (--factor-dtype)
BYTES_COLUMNS = ["size_ratio_asked", "size_ratio_achieved"]
TAIL_COLUMNS = ["compress_s", "eval_s", "wall_s", "host_peak_gib", "gpu_peak_gib", "error"]
# Compression settings that are not a column of their own: named by the fixed columns, or not changing a
# checkpoint (where it runs).
NOT_SETTINGS = {"model", "method", "ratio", "size_ratio", "device", "offload", "stream_weights", "trust_remote_code"}
# The usual forward order of a decoder block's Linears: the heatmap's columns, whatever order a checkpoint lists
MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "o_proj", "out_proj", "dense",
                "gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "down_proj", "fc2", "c_proj"]
DENSE = "none"
Cell = Union[float, str, None]  # "" where a value does not apply (e.g. the time to compress a dense job)


@dataclass
class ReportRow:
    """One job of the table. `values` holds the measured columns: "ppl SOURCE", "TASK METRIC" and
    "TASK METRIC stderr", and against the dense job of the same model "ppl SOURCE x dense" and "Δ TASK METRIC"."""
    job: str
    status: str  # done, failed or pending
    model: str
    method: str
    ratio_asked: Optional[float]  # None: the budget was in bytes (size_ratio_asked)
    ratio_achieved: Cell = ""
    model_ratio_achieved: Cell = ""
    size_ratio_asked: Optional[float] = None
    size_ratio_achieved: Cell = ""  # stored bytes of the targeted Linears / the same at 16 bits per weight
    settings: Optional[dict[str, Any]] = None  # the compression settings (None: dense, or not known)
    values: dict[str, Optional[float]] = field(default_factory=dict)
    compress_s: Cell = ""
    eval_s: Cell = ""
    wall_s: Cell = ""
    host_peak_gib: Cell = ""
    gpu_peak_gib: Cell = ""
    error: str = ""
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    kept_dense: list[str] = field(default_factory=list)

    @property
    def dense(self) -> bool:
        return self.method == DENSE

    def cell(self, column: str) -> Cell:
        if column in FIXED_COLUMNS or column in BYTES_COLUMNS or column in TAIL_COLUMNS:
            return getattr(self, column)
        if column in self.values:
            return self.values[column]
        return setting_value(self.settings, column) if column in (self.settings or {}) else ""


@dataclass
class Report:
    rows: list[ReportRow]  # the current run file's jobs, dense baselines first
    earlier: list[tuple[str, str]] = field(default_factory=list)  # (job folder, status) of other run files
    files: list[Path] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)


def varying_settings(compress_settings: list[dict | None]) -> list[str]:
    """The compression settings (beside model, method and ratio) whose values differ between jobs: each gets
    its own column and goes into the plot's line labels."""
    present = [c for c in compress_settings if c]
    keys = [k for k in (present[0] if present else {}) if k not in NOT_SETTINGS]
    return [k for k in keys if len({setting_value(c, k) for c in present}) > 1]


def setting_value(compress: dict | None, key: str) -> str:
    if not compress or key not in compress:
        return ""
    v = compress[key]
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


def collect_rows(run_dir: str | Path) -> tuple[list[ReportRow], list[tuple[str, str]]]:
    """(rows of the current plan's jobs, (folder, status) of the other job folders). Without a plan.json
    (a folder written before plans were recorded) every job folder is current."""
    run_dir = Path(run_dir)
    plan = read_plan(run_dir)
    planned = {j.name: j for j in plan.jobs} if plan is not None else None
    rows, earlier = [], []
    folders = {d.name: d for d in sorted(Path(run_dir, "jobs").glob("*/"))}
    for name in (planned or folders):
        d = run_dir / "jobs" / name
        result, error = read_job_result(d, name), read_job_error(d)
        config = result.config if result else (planned or {}).get(name) or read_job_record(d)
        if result or error or planned:
            rows.append(_row(config, name, result, error if not result else None))
    for name, d in folders.items():
        if planned is not None and name not in planned:
            earlier.append((name, "done" if read_job_result(d) else "failed" if (d / "error.json").is_file()
                            else "pending"))
    return rows, earlier


def _row(config: JobRecord | None, name: str, result: JobResult | None, error: JobError | None) -> ReportRow:
    settings = config.compress if config else None
    unknown = "" if settings else 0.0  # a dense job removes nothing; a compressed one's numbers come with it
    row = ReportRow(job=name, status="done" if result else "failed" if error else "pending",
                    model=config.model if config else "",
                    method=settings["method"] if settings else DENSE if config else "",
                    ratio_asked=settings.get("ratio") if settings else 0.0, ratio_achieved=unknown,
                    model_ratio_achieved=unknown, size_ratio_asked=settings.get("size_ratio") if settings else None,
                    settings=settings, error=error.error if error else "")
    if result is None:
        return row
    ev = result.eval
    for source, r in ev.ppl.items():
        row.values[f"ppl {source}"] = r.ppl
    for task, t in ev.tasks.items():
        for metric, value in t.metrics.items():
            row.values[f"{task} {metric}"] = value
            row.values[f"{task} {metric} stderr"] = t.stderr.get(metric)
    row.eval_s, row.wall_s = ev.wall_seconds, result.wall_seconds
    peak = result.peak_memory
    meta = result.compress
    if meta is not None:
        row.ratio_achieved, row.model_ratio_achieved = meta.ratio_achieved, meta.model_ratio_achieved
        row.size_ratio_achieved = meta.size_ratio_achieved if meta.size_ratio_achieved is not None else ""
        row.compress_s = meta.wall_seconds if meta.wall_seconds is not None else ""
        row.modules, row.kept_dense = meta.modules, meta.kept_dense
        peak = peak.max(_checkpoint_peak(meta))
    elif not settings:
        row.compress_s = 0.0
    row.host_peak_gib = peak.host_gib or ""
    row.gpu_peak_gib = peak.gpu_gib or ""
    return row


def _checkpoint_peak(meta) -> PeakMemory:
    """The compression's own peaks, recorded in its checkpoint (the job's process may have started later)."""
    return PeakMemory(host_gib=meta.host_peak_gib or 0.0, gpu_gib=meta.gpu_peak_gib)


def add_dense_comparisons(rows: list[ReportRow]) -> None:
    """`ppl X x dense` (this ppl / the dense job's) and `Δ task metric` (this - dense), per model."""
    dense = {r.model: r for r in rows if r.dense and r.status == "done"}
    for r in rows:
        base = dense.get(r.model)
        if base is None or r.status != "done":
            continue
        for k, v in list(r.values.items()):
            b = base.values.get(k)
            if v is None or b is None or k.endswith(" stderr"):
                continue
            if k.startswith("ppl "):
                r.values[f"{k} x dense"] = v / b if b else None
            else:
                r.values[f"Δ {k}"] = v - b


def _columns(rows: list[ReportRow]) -> list[str]:
    settings = varying_settings([r.settings for r in rows])
    ppl, tasks = [], []
    for r in rows:
        for k in r.values:
            if k not in ppl and k not in tasks:
                (ppl if k.startswith("ppl ") else tasks).append(k)
    tail = [c for c in TAIL_COLUMNS if c == "error" or any(r.cell(c) not in ("", None) for r in rows)]
    return FIXED_COLUMNS + (BYTES_COLUMNS if _in_bytes(rows) else []) + settings + sorted(ppl) + _task_order(tasks) + tail


def _in_bytes(rows: list[ReportRow]) -> bool:
    """Whether a job was budgeted in bytes or stores its factors in a dtype of its own."""
    return any(r.size_ratio_asked is not None or (r.settings or {}).get("factor_dtype", "auto") != "auto"
               for r in rows)


def _task_order(columns: list[str]) -> list[str]:
    """Each task metric followed by its stderr and its delta."""
    values = [c for c in columns if not c.endswith(" stderr") and not c.startswith("Δ ")]
    return [c for v in values for c in (v, f"{v} stderr", f"Δ {v}") if c in columns]


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return "" if v is None else str(v)


def _short(column: str) -> str:
    """Column heads for humans: `ppl text:/long/path/wiki_eval.txt` -> `ppl wiki_eval.txt`."""
    return re.sub(r"(text|jsonl):(\S*/)?", "", column)


def _sort_key(r: ReportRow):
    settings = tuple(sorted((k, setting_value(r.settings, k)) for k in (r.settings or {}) if k not in NOT_SETTINGS))
    return (r.model, not r.dense, r.method, settings, r.ratio_asked is None, r.ratio_asked or 0.0,
            r.size_ratio_asked or 0.0)


def write_csv(rows: list[ReportRow], path: Path, columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.cell(k) for k in columns})


def write_markdown(report: Report, path: Path, columns: list[str]) -> None:
    rows = report.rows
    shown = [c for c in columns if c != "job"]
    lines = [f"# Results ({report.count('done')} done, {report.count('failed')} failed, {report.count('pending')} "
             "pending)", "",
             "ratio = fraction of the targeted Linear parameters removed (model_ratio: of all parameters); "
             + ("size_ratio = stored bytes of the targeted Linears / the same Linears at 16 bits per weight; "
                if _in_bytes(rows) else "") +
             "ppl = token perplexity; `x dense` = ppl / the dense model's; Δ = value - the dense model's; "
             "time in seconds; peak memory in GiB.", "",
             "| " + " | ".join(_short(c) for c in shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.cell(c)).replace("|", "/") for c in shown) + " |")
    lines += ["", "Job folders: `jobs/<job>/` (" + ", ".join(f"`{r.job}`" for r in rows) + ")."]
    if report.earlier:
        lines += ["", "## Job folders of other run files (not in the table)", ""]
        lines += [f"- `{name}` ({status})" for name, status in report.earlier]
    path.write_text("\n".join(lines) + "\n")


def line_label(row: ReportRow, settings: list[str], multi_model: bool) -> str:
    parts = [row.method] + [f"{k}={setting_value(row.settings, k)}" for k in settings]
    return " ".join(parts) + (f" ({Path(row.model).name})" if multi_model else "")


def _readable_y(ax, values: list[float]) -> None:
    """Log scale only over a wide range; tick labels as plain numbers (no 2x10^1, no offsets)."""
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > 4:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")


@dataclass(frozen=True)
class PlotAxis:
    """What a perplexity plot puts on x: each compressed job's budget (None: not on this plot) and the dense
    job's place."""
    label: str
    dense_at: float
    of: Callable[[ReportRow], Optional[float]]
    ticks_at_points: bool  # a tick at every value (asked budgets) or the plotting library's (achieved bytes)


RATIO_AXIS = PlotAxis("compression ratio (fraction of targeted parameters removed)", 0.0,
                      lambda r: r.ratio_asked, True)
BYTES_AXIS = PlotAxis("stored bytes of the targeted Linears / the same at 16 bits per weight", 1.0,
                      lambda r: r.size_ratio_achieved if isinstance(r.size_ratio_achieved, float) else None, False)


def plot_ppl_vs_ratio(rows: list[ReportRow], path: Path) -> bool:
    """Perplexity against the parameter ratio asked (jobs with a byte budget are on the bytes plot)."""
    return plot_ppl(rows, path, RATIO_AXIS)


def plot_ppl_vs_bytes(rows: list[ReportRow], path: Path) -> bool:
    """Perplexity against the stored bytes achieved, for runs that budget or store in bytes."""
    return _in_bytes(rows) and plot_ppl(rows, path, BYTES_AXIS)


def _points(done: list[ReportRow], suite: str, axis: PlotAxis, settings: list[str], multi_model: bool) -> dict:
    groups: dict[str, list] = {}
    for r in done:
        value, x = r.values.get(suite), axis.dense_at if r.dense else axis.of(r)
        if value is not None and math.isfinite(value) and x is not None:
            groups.setdefault(line_label(r, settings, multi_model) if not r.dense else
                              "dense" + (f" ({Path(r.model).name})" if multi_model else ""),
                              []).append((float(x), value))
    return groups


def plot_ppl(rows: list[ReportRow], path: Path, axis: PlotAxis) -> bool:
    """One panel per perplexity suite; a line per model, method and setting that differs; dense as a dashed
    line and a star at axis.dense_at."""
    done = [r for r in rows if r.status == "done"]
    suites = sorted({k for r in done for k in r.values if k.startswith("ppl ") and not k.endswith(" x dense")})
    if not suites or not any(not r.dense and axis.of(r) is not None for r in done):
        return False
    settings = varying_settings([r.settings for r in done])
    fig, axes = plt.subplots(1, len(suites), figsize=(6.5 * len(suites), 4.5), squeeze=False)
    multi_model = len({r.model for r in done}) > 1
    for ax, suite in zip(axes[0], suites):
        groups = _points(done, suite, axis, settings, multi_model)
        for label, pts in sorted(groups.items()):
            pts.sort()
            if label.startswith("dense"):
                ax.axhline(pts[0][1], ls="--", color="gray", lw=1)
                ax.plot([axis.dense_at], [pts[0][1]], "k*", label=label)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        values = [p[1] for pts in groups.values() for p in pts]
        if values:
            _readable_y(ax, values)
        if axis.ticks_at_points:
            ax.set_xticks(sorted({p[0] for pts in groups.values() for p in pts}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(axis.label)
        ax.set_ylabel("perplexity")
        ax.set_title(_short(suite))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _kind_order(kind: str) -> tuple:
    return (MODULE_ORDER.index(kind) if kind in MODULE_ORDER else len(MODULE_ORDER), kind)


def rank_grid(modules: dict[str, ModuleSpec], kept_dense: list[str] = ()) -> tuple[
        list[int], list[str], list[list[float]], list[list[float]]]:
    """(layers, module kinds in MODULE_ORDER, rank[layer][kind], kept fraction rank / min(in, out)) from the
    checkpoint's `modules`; NaN where a Linear was kept dense (`kept_dense`, or a rank of None) or is absent."""
    cells = {}
    for name in list(modules) + list(kept_dense):
        m = re.search(r"\.(\d+)\.(.+)$", name)
        spec = modules.get(name)
        if m:
            cells[(int(m.group(1)), m.group(2).split(".")[-1])] = spec if spec is not None and spec.rank else None
    layers = sorted({k[0] for k in cells})
    kinds = sorted({k[1] for k in cells}, key=_kind_order)
    ranks = [[float(cells[(i, k)].rank) if cells.get((i, k)) else float("nan") for k in kinds] for i in layers]
    frac = [[cells[(i, k)].rank / min(cells[(i, k)].in_features, cells[(i, k)].out_features) if cells.get((i, k))
             else float("nan") for k in kinds] for i in layers]
    return layers, kinds, ranks, frac


def plot_rank_heatmap(row: ReportRow, path: Path) -> bool:
    kept = " (hatched: kept dense)" if row.kept_dense else ""
    budget = f"ratio {row.ratio_asked:g}" if row.ratio_asked is not None else f"size {row.size_ratio_asked:g}"
    title = f"{row.method} {budget}{kept}\n{row.job}"
    return plot_module_ranks(row.modules, title, path, row.kept_dense)


def plot_module_ranks(modules: dict[str, ModuleSpec], title: str, path: Path, kept_dense: list[str] = ()) -> bool:
    """A layer x module-kind heatmap of kept rank / min(in, out), ranks written in the cells, the Linears in
    `kept_dense` hatched; False when no Linear was factorized."""
    layers, kinds, ranks, frac = rank_grid(modules, kept_dense)
    if not layers:
        return False
    dense_cells = {(int(m.group(1)), m.group(2).split(".")[-1])
                   for m in (re.search(r"\.(\d+)\.(.+)$", n) for n in kept_dense) if m}
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(kinds), max(3.2, 1.4 + 0.28 * len(layers))))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgray")  # kept dense: no rank
    im = ax.imshow(frac, aspect="auto", cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_ylabel("layer")
    legible = len(layers) * len(kinds) <= 400  # numbers in the cells while they stay legible
    for y, layer in enumerate(layers):
        for x, kind in enumerate(kinds):
            if (layer, kind) in dense_cells:
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="//", lw=0))
                if legible:
                    ax.text(x, y, "dense", ha="center", va="center", fontsize=6)
            elif legible and math.isfinite(ranks[y][x]):
                ax.text(x, y, f"{int(ranks[y][x])}", ha="center", va="center", fontsize=6,
                        color="white" if frac[y][x] < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="rank / min(in, out)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: str | Path) -> Report:
    """Write results.csv, results.md and the plots of the current plan's jobs."""
    run_dir = Path(run_dir)
    rows, earlier = collect_rows(run_dir)
    rows.sort(key=_sort_key)
    add_dense_comparisons(rows)
    report = Report(rows, earlier)
    columns = _columns(rows)
    report.files = [run_dir / "results.csv", run_dir / "results.md"]
    write_csv(rows, report.files[0], columns)
    write_markdown(report, report.files[1], columns)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    for stale in plots.glob("ranks_*.png"):  # heatmaps of jobs no longer in the plan
        stale.unlink()
    for name, plot in (("ppl_vs_ratio.png", plot_ppl_vs_ratio), ("ppl_vs_bytes.png", plot_ppl_vs_bytes)):
        (plots / name).unlink(missing_ok=True)  # a plot this run file no longer has
        if plot(rows, plots / name):
            report.files.append(plots / name)
    for r in rows:
        if r.status == "done" and r.modules and plot_rank_heatmap(r, plots / f"ranks_{r.job}.png"):
            report.files.append(plots / f"ranks_{r.job}.png")
    return report


def describe_files(files: list[Path]) -> str:
    """`DIR/results.csv, DIR/results.md and N plots in DIR/plots/` for the CLI's last line."""
    tables = [str(f) for f in files if f.suffix != ".png"]
    plots = [f for f in files if f.suffix == ".png"]
    return ", ".join(tables) + (f" and {len(plots)} plots in {plots[0].parent}/" if plots else "")
