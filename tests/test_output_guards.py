"""Every file a command writes is guarded as `-o` is: never an input, never inside one, never inside the
command's own output folder, never an existing file unless --overwrite; --overwrite replaces only what Rankwise
wrote; an interrupted swap never leads to a replacement without --overwrite."""
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CALIB = ["--nsamples", "2", "--seqlen", "16"]


def calib(austen_file):
    return ["--calib", f"text:{austen_file}", *CALIB]


def ppl(austen_file):
    return ["--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1"]


def refused(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.output, res.output


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tiny_dirs, austen_file, tmp_path_factory):
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    out = tmp_path_factory.mktemp("guards") / "ck"
    res = CliRunner().invoke(app, ["model", str(tiny_dirs["llama"]), "-o", str(out), "--method", "svd",
                                   "--ratio", "0.3", "--compensate", "eora", "--eora-rank", "2", *calib(austen_file)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def ck(checkpoint, tmp_path):
    """A private copy of the checkpoint (a test may try to damage it)."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ck"))


@pytest.fixture
def model(tiny_dirs, tmp_path):
    return Path(shutil.copytree(tiny_dirs["llama"], tmp_path / "model"))


# ---------------------------------------------------------------- compress evaluate

def test_evaluate_json_into_the_checkpoint_is_refused(ck, austen_file, cli):
    before = snapshot(ck)
    for target in (ck / "config.json", ck / "results.json"):
        refused(cli("evaluate", ck, *ppl(austen_file), "--json", target, "--overwrite"), "input")
    assert snapshot(ck) == before


def test_evaluate_output_path_and_samples_into_the_checkpoint_are_refused(ck, austen_file, cli):
    before = snapshot(ck)
    refused(cli("evaluate", ck, *ppl(austen_file), "--output-path", ck), "input")
    refused(cli("evaluate", ck, *ppl(austen_file), "--output-path", ck / "results.json", "--log-samples"), "input")
    assert snapshot(ck) == before


def test_evaluate_output_path_naming_a_file_is_refused(ck, austen_file, tmp_path, cli):
    notes = tmp_path / "notes.txt"
    notes.write_text("user data")
    refused(cli("evaluate", ck, *ppl(austen_file), "--output-path", notes), "notes.txt")
    assert notes.read_text() == "user data"


def test_evaluate_json_never_replaces_an_existing_file_without_overwrite(ck, austen_file, tmp_path, cli):
    for existing in ("r.json", "r.md"):  # the JSON, or the user's Markdown beside it
        (tmp_path / existing).write_text("user data")
        refused(cli("evaluate", ck, *ppl(austen_file), "--json", tmp_path / "r.json"), existing, "--overwrite")
        assert (tmp_path / existing).read_text() == "user data"
        (tmp_path / existing).unlink()
    (tmp_path / "r.md").write_text("user data")
    res = cli("evaluate", ck, *ppl(austen_file), "--json", tmp_path / "r.json", "--overwrite")
    assert res.exit_code == 0, res.output
    assert "token ppl" in (tmp_path / "r.md").read_text()


def test_evaluate_json_never_replaces_the_baseline(ck, austen_file, tmp_path, cli):
    base = tmp_path / "b.json"
    assert cli("evaluate", ck, *ppl(austen_file), "--json", base).exit_code == 0
    before = base.read_bytes()
    refused(cli("evaluate", ck, "--baseline", base, "--json", base, "--overwrite"), "input", "b.json")
    assert base.read_bytes() == before


# ---------------------------------------------------------------- compress model

def test_model_json_never_reaches_an_input(model, austen_file, tmp_path, cli):
    before = snapshot(model)
    refused(cli("model", model, "-o", tmp_path / "out", "--ratio", "0.3", "--method", "svd", "--overwrite",
                "--json", model / "config.json", *calib(austen_file)), "input")
    refused(cli("model", model, "-o", tmp_path / "out", "--ratio", "0.3", "--method", "svd", "--overwrite",
                "--json", austen_file, *calib(austen_file)), "input")
    assert snapshot(model) == before and not (tmp_path / "out").exists()


def test_model_json_inside_its_own_output_is_refused(tiny_dirs, austen_file, tmp_path, cli):
    out = tmp_path / "J"
    refused(cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.3", "--method", "svd",
                "--json", out / "config.json", *calib(austen_file)), "output folder")
    assert not out.exists()


# ---------------------------------------------------------------- --overwrite of a folder

def test_overwrite_refuses_a_checkpoint_holding_user_files(ck, tiny_dirs, austen_file, cli):
    (ck / "notes.txt").write_text("user data")
    refused(cli("model", tiny_dirs["llama"], "-o", ck, "--ratio", "0.3", "--method", "svd", "--overwrite",
                *calib(austen_file)), "notes.txt")
    assert (ck / "notes.txt").read_text() == "user data"


def test_overwrite_refuses_a_checkpoint_holding_another_checkpoint(ck, checkpoint, tiny_dirs, austen_file, cli):
    shutil.copytree(checkpoint, ck / "nested")
    refused(cli("model", tiny_dirs["llama"], "-o", ck, "--ratio", "0.3", "--method", "svd", "--overwrite",
                *calib(austen_file)), "nested")
    assert (ck / "nested" / "config.json").is_file()


def test_export_peft_overwrite_replaces_its_own_export(ck, tmp_path, cli):
    adapter = tmp_path / "adapter"
    assert cli("export-peft", ck, "-o", adapter).exit_code == 0
    res = cli("export-peft", ck, "-o", adapter, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (adapter / "base" / "config.json").is_file()
    (adapter / "notes.txt").write_text("user data")
    refused(cli("export-peft", ck, "-o", adapter, "--overwrite"), "notes.txt")


# ---------------------------------------------------------------- an interrupted swap

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_interrupted_swap_is_restored_and_not_replaced_without_overwrite(ck, tiny_dirs, austen_file, tmp_path,
                                                                         cli):
    """A run killed between the two renames of an --overwrite swap leaves the previous checkpoint in
    `.ck.old-*` and no `ck`: the next run puts it back, and then replaces it only with --overwrite."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    old = tmp_path / f".ck.old-{dead_pid()}-{host}-zz9"
    old.mkdir()
    ck.rename(old / "ck")
    before = snapshot(old / "ck")
    res = cli("model", tiny_dirs["llama"], "-o", ck, "--ratio", "0.5", "--method", "svd", *calib(austen_file))
    refused(res, "already exists", "--overwrite")
    assert snapshot(ck) == before and not old.exists()


# ---------------------------------------------------------------- compress inspect, compress run

def test_inspect_plot_is_guarded(ck, tmp_path, cli):
    before = snapshot(ck)
    refused(cli("inspect", ck, "--plot", ck / "ranks.png"), "input")
    assert snapshot(ck) == before
    png = tmp_path / "ranks.png"
    png.write_text("user data")
    refused(cli("inspect", ck, "--plot", png), "ranks.png", "--overwrite")
    assert png.read_text() == "user data"
    assert cli("inspect", ck, "--plot", png, "--overwrite").exit_code == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_run_refuses_to_replace_user_files_in_its_output_dir(tmp_path, tiny_dirs, cli):
    out = tmp_path / "sweep"
    out.mkdir()
    run = tmp_path / "run.yaml"
    run.write_text(f"output_dir: {out}\nmodel: {tiny_dirs['llama']}\nsweep:\n  method: [svd]\n  ratio: [0.3]\n")
    for name in ("results.md", "results.csv", "run.yaml"):
        (out / name).write_text("user data")
        refused(cli("run", run), name)
        assert (out / name).read_text() == "user data"
        (out / name).unlink()


FILE_SIZE_LIMITED_WRITE = """
import resource, signal, sys
from pathlib import Path
from rankwise.compress.outputs import write_texts_atomic
from rankwise.errors import RankwiseError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
folder = Path(sys.argv[1])
try:
    write_texts_atomic({folder / "r.json": "{}", folder / "r.md": "x" * 10000})
except RankwiseError as e:
    print(e)
    sys.exit(2)
"""


def test_a_json_and_its_markdown_are_written_together_or_not_at_all(tmp_path):
    """The storage refuses the second file (a file size limit stands in for a full disk): the first is not
    published alone, an existing pair stays as it was, and no temporary is left."""
    (tmp_path / "r.json").write_text("old json")
    (tmp_path / "r.md").write_text("old md")
    res = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED_WRITE, str(tmp_path)], capture_output=True,
                         text=True)
    assert res.returncode == 2, res.stderr
    assert "File too large" in res.stdout and "r.md" in res.stdout
    assert snapshot(tmp_path) == {"r.json": b"old json", "r.md": b"old md"}
