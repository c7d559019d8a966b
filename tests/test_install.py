"""A non-editable install runs from outside the source tree: one import name, local tasks shipped as data."""
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_compresses_and_evaluates_a_local_task(tiny_dirs, austen_file, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)  # torch & co. from the host
    py = env_dir / "bin" / "python"
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))],
                   check=True, capture_output=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import rankwise.compress, rankwise.configs; "
                            "print(rankwise.compress.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the installed copy, not the source tree
    for name in ("cli", "calib", "eval", "compress"):  # no generic top-level names installed
        assert not (site / name).exists()

    cli = [str(py), "-m", "rankwise.cli.main"]
    subprocess.run(cli + ["model", str(tiny_dirs["llama"]), "-o", "out", "--method", "svd-llm", "--ratio", "0.3",
                          "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32"],
                   cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(cli + ["evaluate", "out", "--tasks", "austen_mc", "--limit", "4", "--json", "r.json"],
                   cwd=work, env=env, check=True, capture_output=True)
    result = json.loads((work / "r.json").read_text())
    assert 0.0 <= result["tasks"]["austen_mc"]["acc"] <= 1.0
