"""Every bad input: one clear line naming the bad value, exit code 2, no traceback, nothing written."""
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]


def calib_args(austen_file):
    return ["--calib", f"text:{austen_file}", "--nsamples", "2", "--seqlen", "16"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """An encoder-decoder checkpoint: not a causal LM."""
    p = tmp_path_factory.mktemp("t5")
    transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(p)
    return p


CASES = {
    "ratio zero": (["--ratio", "0"], "ratio"),
    "ratio above one": (["--ratio", "1.5"], "1.5"),
    "unknown method": (["--ratio", "0.3", "--method", "tucker"], "tucker"),
    "seqlen beyond context": (["--ratio", "0.3", "--seqlen", "4096"], "4096"),
    "unknown calib source": (["--ratio", "0.3", "--calib", "wikitext9"], "wikitext9"),
    "missing calib file": (["--ratio", "0.3", "--calib", "text:/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    "bad device": (["--ratio", "0.3", "--device", "tpu"], "tpu"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_option(case, tiny_dirs, austen_file, tmp_path, cli):
    extra, needle = CASES[case]
    out = tmp_path / "out"
    base = calib_args(austen_file)
    # later options win in typer, so the case's own --seqlen/--calib override the defaults above
    res = cli("model", tiny_dirs["llama"], "-o", out, *base, *extra)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temp folder left behind"


def test_missing_checkpoint(tmp_path, cli, austen_file):
    out = tmp_path / "out"
    res = cli("model", tmp_path / "no-such-model", "-o", out, "--ratio", "0.3", *calib_args(austen_file))
    assert res.exit_code == 2 and "no-such-model" in res.output and not out.exists()
    res = cli("evaluate", tmp_path / "no-such-model", "--ppl", f"text:{austen_file}")
    assert res.exit_code == 2 and "no-such-model" in res.output


def test_unsupported_architecture(t5_dir, tmp_path, cli, austen_file):
    out = tmp_path / "out"
    res = cli("model", t5_dir, "-o", out, "--ratio", "0.3", *calib_args(austen_file))
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: unsupported model {str(t5_dir)!r}: ") and "T5Config" in res.output
    assert not out.exists()


def test_output_exists_is_refused_then_overwritten(tiny_dirs, tmp_path, cli, austen_file):
    out = tmp_path / "out"
    res = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.3", "--method", "svd", *calib_args(austen_file))
    assert res.exit_code == 0, res.output
    res = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.5", "--method", "svd", *calib_args(austen_file))
    assert res.exit_code == 2 and "already exists" in res.output and "--overwrite" in res.output
    assert json.loads((out / "config.json").read_text())["rankwise"]["ratio_requested"] == 0.3
    res = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.5", "--method", "svd", "--overwrite",
              *calib_args(austen_file))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["rankwise"]["ratio_requested"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left beside it"


def test_empty_calibration_text(tiny_dirs, tmp_path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    out = tmp_path / "out"
    res = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.3", "--calib", f"text:{empty}", "--seqlen", "16")
    assert res.exit_code == 2 and "empty" in res.output and str(empty) in res.output
    assert not out.exists()


def test_real_process_exit_code_and_no_traceback(tiny_dirs, tmp_path):
    """The installed entry point, as a user runs it (not the in-process runner)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rankwise.cli.main", "model", str(tiny_dirs["llama"]), "-o", str(out),
                           "--ratio", "2"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "ratio" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def command_float_options():
    """(command, flag) of every float option of every command: each one is checked, new ones included."""
    import typing

    import typer

    from rankwise.cli.main import app
    group = typer.main.get_command(app)
    found = []
    for name, command in sorted(group.commands.items()):
        hints = typing.get_type_hints(command.callback)
        found += [(name, max(p.opts, key=len)) for p in command.params
                  if float in (hints.get(p.name), *typing.get_args(hints.get(p.name)))]
    return found


REQUIRED = {"model": ["MODEL", "-o", "OUT", "--ratio", "0.3"], "evaluate": ["MODEL"]}


def test_float_options_are_all_listed():  # the check below covers what it should
    assert {("model", "--ratio"), ("model", "--refine-lr"), ("model", "--refit-damp"), ("model", "--alpha"),
            ("evaluate", "--limit")} <= set(command_float_options())


@pytest.mark.parametrize("command,flag", command_float_options())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused_naming_the_option(command, flag, value, tiny_dirs, tmp_path, cli):
    out = tmp_path / "out"
    args = [{"MODEL": tiny_dirs["llama"], "OUT": out}.get(a, a) for a in REQUIRED.get(command, [])]
    res = cli(command, *args, flag, value)
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: {flag} must be a finite number, got {float(value)}"
    assert list(tmp_path.iterdir()) == []


def test_jsonl_row_that_is_not_an_object(tiny_dirs, tmp_path, cli):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a row"}\n42\n')
    out = tmp_path / "out"
    res = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.3", "--calib", f"jsonl:{rows}", "--seqlen", "16")
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"error: {rows}:2: a jsonl row must be a JSON object with the field 'text', "
                                  f"got 42")
    assert not out.exists()


def test_report_on_a_folder_of_unrelated_json_writes_nothing(tmp_path, cli):
    for name, text in {"plan.json": '"a plan?"', "jobs/a/result.json": "[1, 2]", "jobs/b/result.json": '{"x": 1}',
                       "jobs/b/job.json": '{"y": 2}'}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = cli("report", tmp_path)
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"error: {str(tmp_path)!r} is not a run folder: neither plan.json nor jobs/ "
                                  f"holds a job of `compress run`")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_run_file_non_finite_numbers_are_refused_naming_the_option(tiny_dirs, austen_file, tmp_path, cli):
    run = tmp_path / "run.yaml"
    run.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: {tiny_dirs['llama']}\n"
                   f"calib: {{source: 'text:{austen_file}', nsamples: 2, seqlen: 16}}\n"
                   "jobs: [{method: svd-llm, ratio: 0.3, refine: true, refine_lr: .inf}]\n")
    res = cli("run", run, "--dry-run")
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"error: {run}: stage 'block-refine': option 'lr': Input should be a finite "
                                  f"number")
    assert not (tmp_path / "out").exists()


def _limited_file_size(limit: int):
    """In the child: files may not grow past `limit` bytes; a write beyond fails with EFBIG (File too large),
    as a full disk fails with ENOSPC, instead of killing the process."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_storage_refusing_a_checkpoint_or_json_names_the_output_and_leaves_nothing(tiny_dirs, austen_file, tmp_path):
    cli = [sys.executable, "-m", "rankwise.cli.main"]
    out = tmp_path / "out"
    proc = subprocess.run(cli + ["model", str(tiny_dirs["llama"]), "-o", str(out), "--ratio", "0.3", "--quiet",
                                 *calib_args(austen_file)], capture_output=True, text=True, cwd=tmp_path,
                          preexec_fn=_limited_file_size(16_000))
    assert proc.returncode == 2, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: could not write {str(out)!r}: File too large;") and "nothing half-written" in line
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "no output, no temporary folder"

    result = tmp_path / "r.json"
    proc = subprocess.run(cli + ["evaluate", str(tiny_dirs["llama"]), "--ppl", f"text:{austen_file}", "--seqlen", "16",
                                 "--max-windows", "2", "--quiet", "--json", str(result)], capture_output=True, text=True,
                          cwd=tmp_path, preexec_fn=_limited_file_size(200))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: could not write {str(result)!r}: File too large;"), proc.stderr
    assert list(tmp_path.iterdir()) == [], "no JSON, no Markdown, no temporary file"


def test_full_disk_while_writing_a_checkpoint(tiny_dirs, austen_file, tmp_path):
    """A real ENOSPC: a 200 kB tmpfs (needs the right to mount, as root in a container)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and the right to mount")
    try:
        out = disk / "out"
        proc = subprocess.run([sys.executable, "-m", "rankwise.cli.main", "model", str(tiny_dirs["llama"]), "-o",
                               str(out), "--ratio", "0.3", "--quiet", *calib_args(austen_file)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"error: could not write {str(out)!r}: No space left on device;" in proc.stderr, proc.stderr
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_unwritable_output_fails_before_the_work(tiny_dirs, austen_file, cli):
    """/proc accepts no new file, even from root (for whom os.access says yes)."""
    res = cli("model", tiny_dirs["llama"], "-o", "/proc/rankwise/out", "--ratio", "0.3", *calib_args(austen_file))
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: output folder '/proc/rankwise/out' cannot be written: no file can be "
                                 "created in '/proc'"), res.output
    assert "load:" not in res.output  # no progress line (the output is not a terminal): nothing was loaded


def _offline_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), **extra}


def test_unreachable_calibration_data_set_fails_before_the_model_loads(tiny_dirs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rankwise.cli.main", "model", str(tiny_dirs["llama"]), "-o",
                           str(tmp_path / "out"), "--ratio", "0.3", "--calib", "wikitext2", "--seqlen", "16"],
                          capture_output=True, text=True, cwd=tmp_path, env=_offline_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: could not load dataset 'wikitext2'") and "text:PATH" in proc.stderr
    assert "load:" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_is_said_at_once_in_one_line(austen_file, tmp_path):
    """No retries: a hub id that is not cached, with the hub unreachable (a closed local port as HF_ENDPOINT)."""
    proc = subprocess.run([sys.executable, "-m", "rankwise.cli.main", "model", "HuggingFaceTB/SmolLM2-135M", "-o",
                           str(tmp_path / "out"), "--ratio", "0.3", *calib_args(austen_file)],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=_offline_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: 'HuggingFaceTB/SmolLM2-135M' is not a local folder and the hub (http://127.0.0.1:9) cannot be "
        "reached: give a local checkpoint folder (offline, HF_HUB_OFFLINE=1 uses the hub cache only)"]


HEAVY = ("torch", "transformers", "lm_eval", "datasets", "ray", "matplotlib")


@pytest.mark.parametrize("args,code", [(["--help"], 0), (["model", "-h"], 0), (["evaluate", "-h"], 0),
                                       (["model", "M", "-o", "O", "--ratio", "nan"], 2),
                                       (["model", "M", "-o", "O", "--ratio", "0.3", "--no-such-option"], 2),
                                       (["evaluate", "M", "--limit", "many"], 2), (["report", "."], 2),
                                       (["evaluate", "M", "--tasks", "austen_mc,arc_eazy"], 2),
                                       (["inspect", "."], 2)])
def test_help_and_option_errors_import_no_heavy_library(args, code, tmp_path):
    """They answer at once: torch, transformers, lm-eval, datasets, ray and matplotlib load only in the
    commands that need them, after the options are checked."""
    probe = ("import sys\nfrom rankwise.cli.main import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
             f"    print(e.code, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stderr.splitlines()[-1] == f"{code} []", proc.stderr
    if "arc_eazy" in args:  # a misspelled lm-eval task name: found in none of lm-eval's task files
        assert proc.stderr.startswith("error: unknown task 'arc_eazy': not an lm-eval task name"), proc.stderr
