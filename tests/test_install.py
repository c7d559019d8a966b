"""A non-editable install runs from outside the source tree: one import name, local tasks shipped as data."""
import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nested_env(env_dir: Path) -> Path:
    """A venv whose own site-packages comes first, then the site-packages of the interpreter running the suite
    (torch & co.; a venv's, not its base interpreter's: `system_site_packages` would give the base's). The
    outer folders are plain path lines of a .pth, so their own .pth files (an editable install of Rankwise)
    do not run there."""
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    own = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip())
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (own / "outer-site-packages.pth").write_text("".join(f"{p}\n" for p in outer))
    return py


def test_wheel_install_compresses_and_evaluates_a_local_task(tiny_dirs, austen_file, tmp_path):
    py = nested_env(tmp_path / "venv")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                              *map(str, wheels.glob("*.whl"))], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    installed = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import rankwise.compress, rankwise.configs; "
                            "print(rankwise.compress.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(installed)), where  # the installed copy, not the source tree
    for name in ("cli", "calib", "eval", "compress"):  # no generic top-level names installed
        assert not (installed / name).exists()

    cli = [str(py), "-m", "rankwise.cli.main"]
    for args in (["model", str(tiny_dirs["llama"]), "-o", "out", "--method", "svd-llm", "--ratio", "0.3",
                  "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32"],
                 ["evaluate", "out", "--tasks", "austen_mc", "--limit", "4", "--json", "r.json"]):
        proc = subprocess.run(cli + args, cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((work / "r.json").read_text())
    task = result["tasks"]["austen_mc"]
    assert task["source"] == str(installed / "rankwise" / "configs" / "tasks" / "austen_mc.yaml")  # shipped as data
    assert (task["samples"], task["requests"]) == (4, 16)  # 4 questions of 4 choices each
    assert task["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
