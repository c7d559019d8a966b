"""Every bad input: one clear line naming the bad value, exit code 2, no traceback, nothing written."""
import json
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
    assert "T5Config" in res.output or "unsupported" in res.output
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
