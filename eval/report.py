"""Tables and plots of a batch run: RUN_DIR/results.csv, results.md and RUN_DIR/plots/*.png.

Reads what the jobs left in RUN_DIR/jobs/*/: result.json (a finished job: config, compression metadata,
evaluation results, time, peak memory) or error.json + job.json (a failed one). Nothing here runs a model,
so `compress report` can be run at any time, also while a sweep is still going.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import matplotlib

from rankwise.compress.metadata import ModuleSpec, parse_result

matplotlib.use("Agg")  # files only, no display (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

FIXED_COLUMNS = ["job", "status", "model", "method", "ranks", "compensate", "ratio_asked", "ratio_achieved",
                 "model_ratio_achieved"]
TAIL_COLUMNS = ["compress_s", "eval_s", "wall_s", "host_peak_gib", "gpu_peak_gib", "error"]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect_rows(run_dir: str | Path) -> list[dict]:
    """One row per job folder, finished or failed (pending ones have neither file and are left out)."""
    rows = []
    for d in sorted(Path(run_dir, "jobs").glob("*/")):
        result, error = _read(d / "result.json"), _read(d / "error.json")
        if result:
            rows.append(_row(result["config"], result, None))
        elif error:
            rows.append(_row(_read(d / "job.json") or {"name": d.name}, None, error))
    return rows


def _row(config: dict, result: dict | None, error: dict | None) -> dict:
    comp = config.get("compress") or {}
    section = (result or {}).get("compress")
    meta = parse_result(section, f"job {config.get('name', '')}") if section else None
    compressed = meta is not None
    row = {"job": config.get("name", ""), "status": "done" if result else "failed",
           "model": config.get("model", ""), "method": comp.get("method", "none") if config.get("model") else "",
           "ranks": comp.get("ranks", "") if comp else "", "compensate": comp.get("compensate", "") if comp else "",
           "ratio_asked": comp.get("ratio", 0.0) if comp else 0.0,
           "ratio_achieved": meta.ratio_achieved if compressed else (0.0 if not comp else ""),
           "model_ratio_achieved": meta.model_ratio_achieved if compressed else (0.0 if not comp else ""),
           "error": (error or {}).get("error", "")}
    if result:
        ev = result.get("eval") or {}
        for source, r in (ev.get("ppl") or {}).items():
            row[f"ppl {source}"] = r.get("ppl")
        for task, metrics in (ev.get("tasks") or {}).items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr") and isinstance(value, (int, float)):
                    row[f"{task} {metric}"] = value
        row["compress_s"] = meta.wall_seconds if compressed else (0.0 if not comp else "")
        row["eval_s"] = ev.get("wall_seconds", "")
        row["wall_s"] = result.get("wall_seconds", "")
        peak = result.get("peak_memory") or {}
        host = meta.host_peak_gib if compressed else None
        gpu = meta.gpu_peak_gib if compressed else None
        row["host_peak_gib"] = max(peak.get("host_gib", 0), host or 0) or ""
        row["gpu_peak_gib"] = max(peak.get("gpu_gib", 0), gpu or 0) or ""
        row["_modules"] = meta.modules if compressed else {}
    return row


def _columns(rows: list[dict]) -> list[str]:
    ppl, tasks = [], []
    for r in rows:
        for k in r:
            if k.startswith("ppl ") and k not in ppl:
                ppl.append(k)
            elif k not in FIXED_COLUMNS and k not in TAIL_COLUMNS and not k.startswith(("ppl ", "_")) \
                    and k not in tasks:
                tasks.append(k)
    return FIXED_COLUMNS + ppl + tasks + TAIL_COLUMNS


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return "" if v is None else str(v)


def _short(column: str) -> str:
    """Column heads for humans: `ppl text:/long/path/wiki_eval.txt` -> `ppl wiki_eval.txt`."""
    return re.sub(r"(text|jsonl):(\S*/)?", "", column)


def _sort_key(r: dict):
    return (r["model"], r["method"] != "none", r["method"], r["ranks"], r["compensate"], r["ratio_asked"])


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})


def write_markdown(rows: list[dict], path: Path, columns: list[str]) -> None:
    shown = [c for c in columns if c not in ("job", "error")]
    heads = [_short(c) for c in shown]
    lines = [f"# Results ({sum(r['status'] == 'done' for r in rows)} done, "
             f"{sum(r['status'] == 'failed' for r in rows)} failed)", "",
             "ratio = fraction of the targeted Linear parameters removed (model_ratio: of all parameters); "
             "ppl = token perplexity; time in seconds; peak memory in GiB.", "",
             "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in shown) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed jobs", ""] + [f"- `{r['job']}`: {r['error']}" for r in failed]
    lines += ["", "Job folders: `jobs/<job>/` (" + ", ".join(f"`{r['job']}`" for r in rows) + ")."]
    path.write_text("\n".join(lines) + "\n")


def plot_ppl_vs_ratio(rows: list[dict], path: Path) -> bool:
    """One panel per perplexity suite; a line per (model, method, ranks, compensation); dense at ratio 0."""
    done = [r for r in rows if r["status"] == "done"]
    suites = sorted({k for r in done for k in r if k.startswith("ppl ")})
    if not suites:
        return False
    fig, axes = plt.subplots(1, len(suites), figsize=(5.5 * len(suites), 4.2), squeeze=False)
    multi_model = len({r["model"] for r in done}) > 1
    for ax, suite in zip(axes[0], suites):
        groups: dict[tuple, list] = {}
        for r in done:
            if r.get(suite) is None or not math.isfinite(r[suite]):
                continue
            key = (r["model"], r["method"], r["ranks"], r["compensate"])
            groups.setdefault(key, []).append((float(r["ratio_asked"]), float(r[suite])))
        for (model, method, ranks, comp), pts in sorted(groups.items()):
            label = method + (f" {ranks}" if ranks not in ("", "uniform") else "") + \
                (f" +{comp}" if comp not in ("", "none") else "") + (f" ({Path(model).name})" if multi_model else "")
            pts.sort()
            if method == "none":
                ax.axhline(pts[0][1], ls="--", color="gray", lw=1)
                ax.plot([0], [pts[0][1]], "k*", label=f"dense{f' ({Path(model).name})' if multi_model else ''}")
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xlabel("compression ratio (fraction of targeted parameters removed)")
        ax.set_ylabel("perplexity")
        ax.set_title(_short(suite))
        if any(p[1] > 0 for pts in groups.values() for p in pts):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rank_grid(modules: dict[str, ModuleSpec]) -> tuple[list[int], list[str], list[list[float]], list[list[float]]]:
    """(layers, module kinds, rank[layer][kind], kept fraction rank / min(in, out)) from `rankwise.modules`;
    NaN where a Linear was kept dense."""
    cells = {}
    for name, spec in modules.items():
        m = re.search(r"\.(\d+)\.(.+)$", name)
        if not m or not spec.rank:
            continue
        cells[(int(m.group(1)), m.group(2).split(".")[-1])] = spec
    layers = sorted({k[0] for k in cells})
    kinds = list(dict.fromkeys(k[1] for k in cells))  # the model's own order (q, k, v, o, gate, ...)
    ranks = [[float(cells[(i, k)].rank) if (i, k) in cells else float("nan") for k in kinds] for i in layers]
    frac = [[cells[(i, k)].rank / min(cells[(i, k)].in_features, cells[(i, k)].out_features) if (i, k) in cells
             else float("nan") for k in kinds] for i in layers]
    return layers, kinds, ranks, frac


def plot_rank_heatmap(row: dict, path: Path) -> bool:
    title = f"{row['method']} {row['ranks']} ratio {row['ratio_asked']:g}\n{Path(row['model']).name}"
    return plot_module_ranks(row.get("_modules") or {}, title, path)


def plot_module_ranks(modules: dict[str, ModuleSpec], title: str, path: Path) -> bool:
    """A layer x module-kind heatmap of kept rank / min(in, out), ranks written in the cells; False when no
    Linear was factorized."""
    layers, kinds, ranks, frac = rank_grid(modules)
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.2 + 0.28 * len(layers)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_ylabel("layer")
    if len(layers) * len(kinds) <= 400:  # rank numbers in the cells while they stay legible
        for y, rr in enumerate(ranks):
            for x, v in enumerate(rr):
                if math.isfinite(v):
                    ax.text(x, y, f"{int(v)}", ha="center", va="center", fontsize=6,
                            color="white" if frac[y][x] < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="rank / min(in, out)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: str | Path) -> dict:
    """Write results.csv, results.md and the plots; returns {"rows", "files"}."""
    run_dir = Path(run_dir)
    rows = sorted(collect_rows(run_dir), key=_sort_key)
    columns = _columns(rows)
    files = [run_dir / "results.csv", run_dir / "results.md"]
    write_csv(rows, files[0], columns)
    write_markdown(rows, files[1], columns)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if plot_ppl_vs_ratio(rows, plots / "ppl_vs_ratio.png"):
        files.append(plots / "ppl_vs_ratio.png")
    for r in rows:
        if r["status"] == "done" and r.get("_modules") and plot_rank_heatmap(r, plots / f"ranks_{r['job']}.png"):
            files.append(plots / f"ranks_{r['job']}.png")
    return {"rows": rows, "files": files}


def describe_files(files: list[Path]) -> str:
    """`DIR/results.csv, DIR/results.md and N plots in DIR/plots/` for the CLI's last line."""
    tables = [str(f) for f in files if f.suffix != ".png"]
    plots = [f for f in files if f.suffix == ".png"]
    return ", ".join(tables) + (f" and {len(plots)} plots in {plots[0].parent}/" if plots else "")
