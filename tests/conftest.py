import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import AUSTEN, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def austen_file(tmp_path_factory) -> Path:
    """A 60 kB slice of Austen (enough windows for tiny calibration and evaluation)."""
    p = tmp_path_factory.mktemp("text") / "austen.txt"
    p.write_text(AUSTEN.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny Llama / Mistral / Qwen2 checkpoints saved to disk once per test run."""
    root = tmp_path_factory.mktemp("models")
    return {fam: save_tiny(root / fam, fam) for fam in ("llama", "mistral", "qwen2")}


@pytest.fixture
def cli():
    """Run the `compress` CLI in-process; returns typer's Result (exit_code, output)."""
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return run
