"""`compress evaluate`: token ppl + lm-eval zero-shot on the shipped local task, result files, baseline deltas,
bad input. Tiny models, a handful of examples: seconds each (offline: conftest sets HF_DATASETS_OFFLINE)."""
import json
import math
import shutil
from pathlib import Path

import pytest

from rankwise.eval.evaluate import evaluate_ppl
from rankwise.eval.zeroshot import LOCAL_TASK_DIR, load_local_task_config

LIMIT, SEQLEN, WINDOWS = 6, 64, 4


def run_eval(cli, model, out_json, *extra):
    r = cli("evaluate", model, "--json", out_json, "--device", "cpu", "--seqlen", SEQLEN,
            "--max-windows", WINDOWS, *extra)
    assert r.exit_code == 0, r.output
    return json.loads(Path(out_json).read_text())


def test_local_task_result_json_markdown_and_foundation_ppl(cli, tiny_dirs, austen_file, tmp_path):
    out = tmp_path / "res" / "base.json"
    res = run_eval(cli, tiny_dirs["llama"], out, "--ppl", f"text:{austen_file}", "--tasks", "austen_mc",
                   "--limit", LIMIT, "--batch-size", "2")
    task = res["tasks"]["austen_mc"]
    assert task["samples"] == LIMIT and task["requests"] == 4 * LIMIT  # four choices per item
    # accuracy over LIMIT items, its stderr the sample standard deviation's (lm-eval's mean_stderr)
    hits = round(task["acc"] * LIMIT)
    assert task["acc"] == pytest.approx(hits / LIMIT)
    assert task["acc_stderr"] == pytest.approx(math.sqrt(hits * (LIMIT - hits) / (LIMIT - 1)) / LIMIT, abs=1e-9)
    assert task["requests_per_second"] >= task["requests"] / task["seconds"]  # model time is within the task's
    assert res["settings"]["limit"] == LIMIT and res["package_versions"]["lm_eval"]
    assert res["rankwise"] is None
    # the ppl numbers are exactly those of the foundation's evaluator
    src = f"text:{austen_file}"
    ref = evaluate_ppl(str(tiny_dirs["llama"]), [src], SEQLEN, device="cpu", max_windows=WINDOWS)[src]
    got = res["ppl"][src]
    assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-9) and got["windows"] == WINDOWS
    assert got["tokens_scored"] == WINDOWS * (SEQLEN - 1) and got["nonfinite_windows"] == 0
    assert res["wall_seconds"] >= got["seconds"] + task["seconds"]
    md = (tmp_path / "res" / "base.md").read_text()
    assert "austen_mc" in md and "| acc |" in md and "token ppl" in md and f"{got['ppl']:.4f}" in md


def test_results_json_reads_as_lm_eval_output(cli, tiny_dirs, tmp_path, monkeypatch, capfd):
    """lm-eval's own sections beside ours; a fractional --limit, --seed, torch's dtype spelling, the
    --output-path layout with samples; no git noise outside a repository."""
    monkeypatch.chdir(tmp_path)  # not a git repository
    out = tmp_path / "r.json"
    res = run_eval(cli, tiny_dirs["llama"], out, "--tasks", "austen_mc", "--limit", "0.5", "--seed", "7",
                   "--dtype", "float32", "--output-path", tmp_path / "lm", "--log-samples")
    block = res["results"]["austen_mc"]
    for key in ("acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"):
        assert isinstance(block[key], float), key
    assert block["acc,none"] == res["tasks"]["austen_mc"]["acc"]
    assert res["versions"]["austen_mc"] is not None and res["n-shot"]["austen_mc"] == 0
    assert res["higher_is_better"]["austen_mc"]["acc"] is True
    assert res["config"]["random_seed"] == 7 and res["config"]["limit"] == 0.5
    n = res["n-samples"]["austen_mc"]
    assert n["effective"] == -(-n["original"] // 2) == res["tasks"]["austen_mc"]["samples"]
    assert res["dtype"] == "float32" and res["settings"]["dtype"] == "fp32"
    assert "samples" not in res  # per-sample logs go to their own files
    folder = tmp_path / "lm" / str(tiny_dirs["llama"]).replace("/", "__")
    [results_file] = folder.glob("results_*.json")
    assert json.loads(results_file.read_text())["results"] == res["results"]
    [samples_file] = folder.glob("samples_austen_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == n["effective"]
    assert res["tasks"]["austen_mc"]["acc"] == pytest.approx(sum(s["acc"] for s in samples) / len(samples))
    assert "not a git repository" not in capfd.readouterr().err


def test_baseline_adds_deltas_and_repeats_its_evaluations(cli, tiny_dirs, austen_file, tmp_path):
    base = run_eval(cli, tiny_dirs["llama"], tmp_path / "base.json", "--ppl", f"text:{austen_file}",
                    "--tasks", "austen_mc", "--limit", LIMIT)
    # another model, no --ppl/--tasks: the baseline's sources and tasks are evaluated again
    res = run_eval(cli, tiny_dirs["qwen2"], tmp_path / "other.json", "--baseline", tmp_path / "base.json")
    src = f"text:{austen_file}"
    assert set(res["ppl"]) == {src} and set(res["tasks"]) == {"austen_mc"}
    assert res["ppl"][src]["ppl"] != base["ppl"][src]["ppl"]
    assert res["deltas"]["ppl"][src] == pytest.approx(res["ppl"][src]["ppl"] - base["ppl"][src]["ppl"])
    for metric in ("acc", "acc_norm"):
        assert res["deltas"]["tasks"]["austen_mc"][metric] == pytest.approx(
            res["tasks"]["austen_mc"][metric] - base["tasks"]["austen_mc"][metric])
    assert res["baseline"]["model"] == str(tiny_dirs["llama"])
    assert "Δ" in (tmp_path / "other.md").read_text()


def test_local_yaml_data_files_resolve_against_the_yaml(tmp_path, monkeypatch):
    d = tmp_path / "mytasks"
    d.mkdir()
    shutil.copy(LOCAL_TASK_DIR / "austen_mc.yaml", d / "austen_mc.yaml")
    (d / "austen_mc.jsonl").write_text((LOCAL_TASK_DIR / "austen_mc.jsonl").read_text().splitlines()[0] + "\n")
    monkeypatch.chdir(tmp_path)  # a different working directory than the YAML's folder
    cfg = load_local_task_config("mytasks/austen_mc.yaml")
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((d / "austen_mc.jsonl").resolve())
    (d / "austen_mc.jsonl").unlink()
    from rankwise.errors import RankwiseError
    with pytest.raises(RankwiseError, match="austen_mc.jsonl"):
        load_local_task_config(d / "austen_mc.yaml")


def test_shipped_task_data_is_well_formed():
    rows = [json.loads(line) for line in (LOCAL_TASK_DIR / "austen_mc.jsonl").read_text().splitlines()]
    assert 100 <= len(rows) <= 300
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
        assert r["context"] not in r["choices"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_task_is_named(tiny_dirs):
    """A task name that is neither local nor lm-eval's (here: a task set without lm-eval's 15k built-in tasks,
    which take tens of seconds to index)."""
    from rankwise.errors import RankwiseError
    from rankwise.eval.evaluate import evaluate_model
    from rankwise.eval.zeroshot import TaskSet
    with pytest.raises(RankwiseError, match="unknown task 'nosuch_task'"):
        evaluate_model(str(tiny_dirs["llama"]), tasks=["austen_mc", "nosuch_task"], device="cpu",
                       task_set=TaskSet(builtin=False))


@pytest.mark.parametrize("case", ["missing_yaml", "bad_baseline", "limit0", "limit1.5", "missing_model",
                                  "samples_nowhere", "dtype"])
def test_bad_input_exits_2_with_one_line(cli, tiny_dirs, tmp_path, case):
    model, args = str(tiny_dirs["llama"]), ["--tasks", "austen_mc", "--limit", "2"]
    expect = {"missing_yaml": "nope.yaml", "bad_baseline": "baseline", "limit0": "--limit", "limit1.5": "1.5",
              "missing_model": "no_model_here", "samples_nowhere": "--output-path", "dtype": "float8"}[case]
    if case == "missing_yaml":
        args = ["--tasks", str(tmp_path / "nope.yaml")]
    elif case == "bad_baseline":
        args += ["--baseline", _write(tmp_path / "b.json", "{not json")]
    elif case in ("limit0", "limit1.5"):
        args = ["--tasks", "austen_mc", "--limit", case.removeprefix("limit")]
    elif case == "samples_nowhere":
        args += ["--log-samples"]
    elif case == "dtype":
        args += ["--dtype", "float8"]
    else:
        model = str(tmp_path / "no_model_here")
    r = cli("evaluate", model, *args, "--json", tmp_path / "out.json")
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.output
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.md").exists()


def test_hub_data_offline_names_the_task_and_the_local_way(cli, tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yaml_path = _write(tmp_path / "hubtask.yaml", (LOCAL_TASK_DIR / "austen_mc.yaml").read_text()
                       .replace("task: austen_mc", "task: hub_only_task")
                       .replace("dataset_path: json", "dataset_path: rankwise-test/not-cached-anywhere")
                       .replace("  data_files:\n    test: austen_mc.jsonl\n", "  {}\n"))
    r = cli("evaluate", tiny_dirs["llama"], "--tasks", yaml_path, "--limit", "2", "--device", "cpu")
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "hub_only_task" in lines[0] and "dataset_path: json" in lines[0], r.output
