"""`compress run` / `compress report`: YAML sweeps on a tiny model, resumable, with tables and plots."""
import csv
import json
from pathlib import Path

import pytest

from rankwise.errors import RankwiseError


def write_run(tmp_path: Path, model: Path, text: Path, extra: str = "", sweep: str = "ratio: [0.3, 0.6]") -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(f"""\
output_dir: {tmp_path / 'out'}
model: {model}
method: svd
device: cpu
calib: {{source: "text:{text}", nsamples: 4, seqlen: 32, batch_size: 4}}
eval: {{ppl: ["text:{text}"], seqlen: 32, max_windows: 3}}
{extra}
sweep:
  {sweep}
""")
    return p


def job_dirs(out: Path) -> list[Path]:
    return sorted(d for d in (out / "jobs").iterdir() if d.is_dir())


def test_two_job_sweep_resume_and_rerun_one(cli, tiny_dirs, austen_file, tmp_path):
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file)
    out = tmp_path / "out"
    r = cli("run", run)
    assert r.exit_code == 0, r.output
    dirs = job_dirs(out)
    assert len(dirs) == 2
    results = [json.loads((d / "result.json").read_text()) for d in dirs]
    assert sorted(x["compress"]["ratio_requested"] for x in results) == [0.3, 0.6]
    for x in results:
        assert x["eval"]["ppl"][f"text:{austen_file}"]["ppl"] > 1
        assert x["compress"]["modules"]
    for f in ("results.csv", "results.md", "plots/ppl_vs_ratio.png"):
        assert (out / f).stat().st_size > 0, f
    heatmaps = list((out / "plots").glob("ranks_*.png"))
    assert len(heatmaps) == 2 and all(h.stat().st_size > 0 for h in heatmaps)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["status"] for row in rows] == ["done", "done"]
    assert float(rows[0][f"ppl text:{austen_file}"]) > 1
    assert float(rows[0]["ratio_achieved"]) > 0.2

    # a rerun executes nothing: every result is untouched
    stamps = {d: (d / "result.json").stat().st_mtime_ns for d in dirs}
    r = cli("run", run)
    assert r.exit_code == 0, r.output
    assert {d: (d / "result.json").stat().st_mtime_ns for d in dirs} == stamps

    # deleting one result re-runs that job only (its checkpoint is reused, not recompressed)
    (dirs[0] / "result.json").unlink()
    r = cli("run", run)
    assert r.exit_code == 0, r.output
    again = json.loads((dirs[0] / "result.json").read_text())
    assert again["compress_resumed"] is True
    assert (dirs[1] / "result.json").stat().st_mtime_ns == stamps[dirs[1]]


def test_failing_job_is_recorded_and_others_complete(cli, tiny_dirs, austen_file, tmp_path):
    # ratio 0.99 leaves a rank of 0 in the tiny model's Linears -> that job fails; the dense one completes
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="ratio: [0, 0.3]")
    out = tmp_path / "out"
    broken = tmp_path / "broken"
    broken.mkdir()  # a "model" folder without config.json: the job fails at load
    run.write_text(run.read_text() + f"jobs:\n  - {{model: {broken}, ratio: 0.3}}\n")
    r = cli("run", run)
    assert r.exit_code == 1, r.output  # one job failed
    dirs = job_dirs(out)
    assert len(dirs) == 3
    failed = [d for d in dirs if (d / "error.json").exists()]
    assert len(failed) == 1 and not (failed[0] / "result.json").exists()
    assert json.loads((failed[0] / "error.json").read_text())["error"]
    assert sum((d / "result.json").exists() for d in dirs) == 2
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(row["status"] for row in rows) == ["done", "done", "failed"]
    dense = [row for row in rows if row["method"] == "none"]
    assert len(dense) == 1 and float(dense[0][f"ppl text:{austen_file}"]) > 1
    md = (out / "results.md").read_text()
    assert "1 failed" in md and "| failed |" in md and "cannot load model" in md  # the error column
    # report alone rebuilds the files
    (out / "results.md").unlink()
    r = cli("report", out)
    assert r.exit_code == 0, r.output
    assert (out / "results.md").stat().st_size > 0


def test_unknown_key_names_key_and_line(cli, tiny_dirs, austen_file, tmp_path):
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, extra="ratoi: 0.2")
    r = cli("run", run, "--dry-run")
    assert r.exit_code == 2
    assert "'ratoi'" in r.output and "line 7" in r.output
    nested = write_run(tmp_path, tiny_dirs["llama"], austen_file, extra="eval: {ppl: [wikitext2], windows: 3}")
    nested.write_text(nested.read_text().replace("eval: {ppl: [\"text", "#", 1))
    from rankwise.eval.sweep.plan import load_plan
    with pytest.raises(RankwiseError, match=r"line 7: unknown key 'windows'"):
        load_plan(nested)
    swept = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="methd: [svd, asvd]")
    with pytest.raises(RankwiseError, match=r"line 9: unknown key 'methd'"):
        load_plan(swept)
    bad_value = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="ratio: [0.3, 1.5]")
    with pytest.raises(RankwiseError, match=r"line 9: invalid ratio.*1.5"):
        load_plan(bad_value)
    assert not (tmp_path / "out").exists()


def test_dry_run_plan_dedup_and_env(cli, tiny_dirs, austen_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RW_TINY", str(tiny_dirs["llama"].parent))
    run = write_run(tmp_path, "${RW_TINY}/llama", austen_file, extra="baseline: true",
                    sweep="method: [none, svd, asvd]\n  ratio: [0.3, 0.6]")
    from rankwise.eval.sweep.plan import load_plan
    plan = load_plan(run)
    # none x 2 ratios and baseline: true collapse into one dense job, which runs first
    assert [j.method for j in plan.jobs][0] == "none"
    assert sorted(j.method for j in plan.jobs) == ["asvd", "asvd", "none", "svd", "svd"]
    assert all(j.model == str(tiny_dirs["llama"]) for j in plan.jobs)
    assert len({j.dir for j in plan.jobs}) == 5
    assert load_plan(run).jobs[1].name == plan.jobs[1].name  # names are stable hashes
    r = cli("run", run, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "5 to run" in r.output
    assert not (tmp_path / "out").exists()


def test_path_expansion(monkeypatch):
    from rankwise.eval.sweep.runfile import expand_vars as _expand
    monkeypatch.delenv("RW_NOPE", raising=False)
    monkeypatch.setenv("RW_SET", "/data")
    home = str(Path.home())
    assert _expand("${RW_SET:-~/x}/m") == "/data/m"
    assert _expand("${RW_NOPE:-~/x}/m") == f"{home}/x/m"
    assert _expand("text:${RW_NOPE:-~/t}/a.txt") == f"text:{home}/t/a.txt"
    assert _expand("$RW_SET/b") == "/data/b"
    assert _expand("${RW_NOPE}/b") == "${RW_NOPE}/b"  # unset and no default: left as written
    assert _expand("org/model") == "org/model"


def test_refit_jobs_apart_and_new_eval_setting_reuses_checkpoints(cli, tiny_dirs, austen_file, tmp_path):
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="refit: [false, true]\n  ratio: [0.3]")
    out = tmp_path / "out"
    r = cli("run", run, "--dry-run")
    assert r.exit_code == 0 and "refit" in r.output, r.output
    assert cli("run", run).exit_code == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and len({row["job"] for row in rows}) == 2
    assert sorted(row["refit"] for row in rows) == ["False", "True"]  # its own column
    assert any("refit" in row["job"] for row in rows)
    checkpoints = sorted((out / "checkpoints").glob("*/model/config.json"))
    assert len(checkpoints) == 2
    stamps = [c.stat().st_mtime_ns for c in checkpoints]

    run.write_text(run.read_text().replace("max_windows: 3", "max_windows: 2"))
    assert cli("run", run).exit_code == 0
    assert [c.stat().st_mtime_ns for c in sorted((out / "checkpoints").glob("*/model/config.json"))] == stamps
    new_rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(new_rows) == 2 and not {row["job"] for row in new_rows} & {row["job"] for row in rows}
    for row in new_rows:
        result = json.loads((out / "jobs" / row["job"] / "result.json").read_text())
        assert result["compress_resumed"] is True
        assert result["eval"]["ppl"][f"text:{austen_file}"]["windows"] == 2
    md = (out / "results.md").read_text()
    assert "other run files" in md and all(row["job"] in md.split("other run files")[1] for row in rows)


def test_truncated_result_is_redone_and_exit_code_is_one_on_failure(cli, tiny_dirs, austen_file, tmp_path):
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="ratio: [0.3]")
    out = tmp_path / "out"
    assert cli("run", run).exit_code == 0
    (job,) = job_dirs(out)
    text = (job / "result.json").read_text()
    (job / "result.json").write_text(text[: len(text) // 2])  # a crash of the storage mid-write
    r = cli("run", run)
    assert r.exit_code == 0 and "1 to run" in r.output, r.output
    assert json.loads((job / "result.json").read_text())["compress_resumed"] is True
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [row["status"] for row in rows] == ["done"]

    for n in range(3):  # three failing jobs: the exit code stays 1, not the count (2 means bad input)
        missing = tmp_path / f"no{n}"
        run.write_text(run.read_text() + ("jobs:\n" if n == 0 else "") + f"  - {{model: {missing}, ratio: 0.3}}\n")
    r = cli("run", run)
    assert r.exit_code == 1 and "3 of 4 jobs failed" in r.output, r.output


def test_a_second_runner_on_the_same_folder_is_refused(cli, tiny_dirs, austen_file, tmp_path):
    from rankwise.eval.sweep.runner import sole_runner
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="ratio: [0.3]")
    with sole_runner(tmp_path / "out"):
        r = cli("run", run)
    assert r.exit_code == 2 and "another `compress run`" in r.output, r.output
    assert not (tmp_path / "out" / "jobs").exists()


@pytest.mark.parametrize("body, message", [
    ("".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9 if i else ['x'] * 9)}]\n" for i in range(9)),
     "alias bomb"),
    ("a: &x\n  b: *x\n", "recursive alias"),
    ("output_dir: !!python/object/apply:os.system ['true']\n", "not allowed"),
    ("output_dir: !!python/name:os.system\n", "not allowed"),
    ("output_dir: a\nmodel: m\noutput_dir: b\n", "duplicate key 'output_dir'"),
])
def test_hostile_yaml_is_one_line_exit_2(cli, tmp_path, body, message):
    import time
    run = tmp_path / "run.yaml"
    run.write_text(body)
    t0 = time.perf_counter()
    r = cli("run", run, "--dry-run")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert time.perf_counter() - t0 < 10


def test_parallel_without_ray_says_what_to_install(cli, tiny_dirs, austen_file, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the `ray` extra were not installed
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file)
    for args in (["--jobs", "2"], ["--ray"]):
        r = cli("run", run, *args)
        assert r.exit_code == 2 and "pip install 'rankwise[ray]'" in r.output, r.output
    assert not (tmp_path / "out").exists()


def _fake_job(run_dir: Path, name: str, compress: dict | None, ppl: float, acc: float, modules=None, kept=(),
              size_achieved: float | None = None):
    """A finished job's folder as a sweep writes it, with chosen numbers."""
    from rankwise.compress.metadata import CompressionResult
    from rankwise.compress.peak_memory import PeakMemory
    from rankwise.eval.records import EvalResult, PplResult, TaskResult
    from rankwise.eval.sweep.records import JobRecord, JobResult
    d = run_dir / "jobs" / name
    d.mkdir(parents=True)
    meta = None
    if compress:
        meta = CompressionResult(
            method="svd", ranks_allocation="uniform", ratio_requested=compress["ratio"],
            ratio_achieved=compress["ratio"] or 0.5, ratio_achieved_without_compensation=compress["ratio"] or 0.5,
            size_ratio_requested=compress.get("size_ratio"), size_ratio_achieved=size_achieved,
            targeted_params_before=100, targeted_params_after=60, model_params_before=200, model_params_after=160,
            model_ratio_achieved=0.2, kept_dense=list(kept), calibration={"source": "s", "nsamples": 1, "seqlen": 2},
            modules=modules or {})
    windows = PplResult(ppl=ppl, ppl_finite_windows=ppl, nll_mean=1.0, windows=3, nonfinite_windows=0,
                        tokens_scored=93, seqlen=32, bos=False, seconds=1.0, tokens_per_second=96.0)
    task = TaskResult(metrics={"acc": acc}, stderr={"acc": 0.01}, samples=50, requests=100, seconds=2.0,
                      requests_per_second=50.0)
    ev = EvalResult(model="m", dtype="float32", device="cpu", ppl={"text:/x/wiki.txt": windows},
                    tasks={"piqa": task}, wall_seconds=1.0)
    result = JobResult(job=name, config=JobRecord(name=name, model="m", compress=compress, eval={"device": "cpu"}),
                       compress=meta, compress_resumed=False, eval=ev, peak_memory=PeakMemory(host_gib=1.0),
                       wall_seconds=1.0, finished="2026-11-30T12:00:00")
    (d / "result.json").write_text(json.dumps(result.to_json()))


def test_report_columns_against_dense_and_heatmap_order(tmp_path):
    from rankwise.compress.metadata import ModuleSpec
    from rankwise.eval.report import rank_grid, write_report
    spec = ModuleSpec(rank=4, in_features=8, out_features=8)
    modules = {f"model.layers.{i}.{part}": spec for i in (1, 0)
               for part in ("mlp.down_proj", "self_attn.v_proj", "self_attn.q_proj")}
    _fake_job(tmp_path, "dense", None, 20.0, 0.70)
    _fake_job(tmp_path, "svd", {"method": "svd", "ratio": 0.4, "refit": False}, 30.0, 0.60, modules,
              kept=["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"])
    report = write_report(tmp_path)
    rows = {row["job"]: row for row in csv.DictReader(open(tmp_path / "results.csv"))}
    assert [r.job for r in report.rows] == ["dense", "svd"]
    assert float(rows["svd"]["ppl text:/x/wiki.txt x dense"]) == pytest.approx(1.5)
    assert float(rows["svd"]["Δ piqa acc"]) == pytest.approx(-0.10)
    assert float(rows["svd"]["piqa acc stderr"]) == pytest.approx(0.01)
    header = next(csv.reader(open(tmp_path / "results.csv")))
    assert not [c for c in header if "requests" in c or "samples" in c or "gpu" in c or "size" in c]  # no noise
    assert not (tmp_path / "plots" / "ppl_vs_bytes.png").exists()
    layers, kinds, ranks, _ = rank_grid(modules, ["model.layers.0.self_attn.k_proj"])
    assert layers == [0, 1] and kinds == ["q_proj", "k_proj", "v_proj", "down_proj"]
    assert ranks[0][1] != ranks[0][1] and ranks[1][1] != ranks[1][1]  # kept dense / absent: NaN, no rank
    assert (tmp_path / "plots" / "ranks_svd.png").stat().st_size > 0


def test_report_of_byte_budgets(tmp_path):
    """A job budgeted in bytes (--size-ratio) has no parameter ratio asked: the table gives the byte fractions
    asked and achieved, the ratio plot leaves it out and a bytes plot shows every job at the bytes it stores."""
    from rankwise.eval.report import write_report
    _fake_job(tmp_path, "dense", None, 20.0, 0.70)
    _fake_job(tmp_path, "params", {"method": "svd", "ratio": 0.4, "factor_dtype": "auto"}, 30.0, 0.6,
              size_achieved=0.6)
    _fake_job(tmp_path, "bytes", {"method": "svd", "ratio": None, "size_ratio": 0.3, "factor_dtype": "int8"},
              25.0, 0.6, size_achieved=0.2971)
    report = write_report(tmp_path)
    rows = {row["job"]: row for row in csv.DictReader(open(tmp_path / "results.csv"))}
    assert [r.job for r in report.rows] == ["dense", "params", "bytes"]
    assert rows["bytes"]["ratio_asked"] == "" and float(rows["bytes"]["size_ratio_asked"]) == 0.3
    assert float(rows["bytes"]["size_ratio_achieved"]) == pytest.approx(0.2971)
    assert rows["params"]["size_ratio_asked"] == "" and float(rows["params"]["size_ratio_achieved"]) == 0.6
    assert rows["bytes"]["factor_dtype"] == "int8"
    assert {f.name for f in report.files} >= {"ppl_vs_ratio.png", "ppl_vs_bytes.png"}
    assert "size_ratio = stored bytes" in (tmp_path / "results.md").read_text()
