"""What a user sees: progress in logs, --quiet, --json summaries, `compress inspect`, ratio warnings, -h and
--version. Tiny Llama, a few calibration windows."""
import json
import os
import subprocess
import sys
import time

from rankwise import __version__
from rankwise.compress.describe import block_and_kind
from rankwise.compress.metadata import read_result

CALIB = dict(nsamples=4, seqlen=32, device="cpu", method="svd-llm")


def _options(austen_file, **kw):
    opts = {**CALIB, "calib": f"text:{austen_file}", **kw}
    return sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in opts.items()), [])


def test_redirected_output_gets_progress_lines_and_json_summary(tiny_dirs, austen_file, tmp_path):
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "rankwise.cli.main", "model", str(tiny_dirs["llama"]), "-o", str(tmp_path / "ck"),
           "--ratio", "0.3", "--json", str(tmp_path / "summary.json"), *_options(austen_file)]
    started = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "100"})
    elapsed = time.monotonic() - started
    text = log.read_text()
    assert rc == 0, text
    progress = [ln for ln in text.splitlines() if ln.split(" ", 1)[-1].startswith("compress: ")]
    assert progress and progress[-1].split(" ")[2] == "2/2,", text  # the tiny model has 2 blocks
    assert all("elapsed" in ln and "ETA" in ln for ln in progress)
    assert "\x1b[" not in text  # no terminal control codes in a log
    assert "warning" not in text  # 0.3 is reached within a point on this model
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["modules"] == json.loads((tmp_path / "ck" / "config.json").read_text())["rankwise"]["modules"]
    # the command's own time: compression and saving inside it, the process (imports, start-up) around it
    assert summary["compress_seconds"] + summary["save_seconds"] <= summary["wall_seconds"] < elapsed


def test_quiet_inspect_and_ratio_warning(cli, tiny_dirs, austen_file, tmp_path):
    ck = tmp_path / "ck"
    res = cli("model", tiny_dirs["llama"], "-o", ck, "--ratio", "0.3", "--quiet",
              *_options(austen_file, keep_dense="k_proj", rank_multiple=16))
    assert res.exit_code == 0, res.output
    assert not any("elapsed" in ln for ln in res.output.splitlines()), res.output
    info = read_result(ck)
    [warning] = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert f"{info.ratio_achieved:.2%}" in warning and "30.00%" in warning and "--rank-multiple 16" in warning
    assert "svd-llm + uniform ranks (multiple of 16)" in res.output  # the summary names the pipeline
    card = (ck / "README.md").read_text()  # published with the checkpoint: names, never local paths
    assert f"# {tiny_dirs['llama'].name} compressed with Rankwise" in card and f"| text:{austen_file.name}," in card
    assert str(tiny_dirs["llama"].parent) not in card and str(austen_file.parent) not in card

    res = cli("inspect", ck, "--plot", tmp_path / "ranks.png")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "pipeline: svd-llm + uniform ranks (multiple of 16)" in out
    assert f"kept dense: {', '.join(info.kept_dense)}" in out and "k_proj" in info.kept_dense[0]
    header = next(ln for ln in out.splitlines() if "block" in ln and "q_proj" in ln)
    kinds = [c.strip() for c in header.split("┃")[2:-1]]
    for layer in (0, 1):
        row = next(ln for ln in out.splitlines() if ln.split("│")[1:2] and ln.split("│")[1].strip() == str(layer))
        cells = dict(zip(kinds, (c.strip() for c in row.split("│")[2:-1])))
        assert cells["k_proj"] == "dense"
        for name, m in info.modules.items():
            block, kind = block_and_kind(name)
            if block == layer:
                assert cells[kind] == str(m.rank), (name, row)
    assert (tmp_path / "ranks.png").stat().st_size > 1000


def test_inspect_refuses_a_dense_model(cli, tiny_dirs):
    res = cli("inspect", tiny_dirs["llama"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "dense" in res.output


def test_short_help_version_and_80_column_help(cli):
    assert cli("--version").output.strip() == f"rankwise {__version__}"
    for command in ("model", "evaluate", "inspect", "export-peft", "compensate", "run"):
        res = cli(command, "-h")
        assert res.exit_code == 0 and "Usage:" in res.output
        assert max(len(ln) for ln in res.output.splitlines()) <= 80, command


def test_markdown_rows_stay_whole_through_a_pipe(cli, tiny_dirs, austen_file, tmp_path):
    """`compress evaluate ... | tee`: stdout is not a terminal (80 columns), and a longer row stays one line."""
    deep = tmp_path / ("a-folder-name-long-enough-to-push-the-table-row-past-eighty-columns" * 2)
    deep.mkdir()
    text = deep / "eval.txt"
    text.write_text(austen_file.read_text())
    res = cli("evaluate", tiny_dirs["llama"], "--ppl", f"text:{text}", "--seqlen", "16", "--max-windows", "2",
              "--quiet")
    assert res.exit_code == 0, res.output
    [row] = [ln for ln in res.output.splitlines() if ln.startswith(f"| text:{text} |")]
    assert row.endswith(" |") and row.count(" | ") == 5 and len(row) > 160
