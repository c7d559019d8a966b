"""`compress run` on a real local Ray cluster (2 CPUs): same results as the sequential run; a killed worker."""
import csv
import json
import os
import shutil
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from test_sweep import write_run  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local cluster for the module (`compress run` joins a running one and leaves it running)."""
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ppl_by_job(out, source) -> dict:
    return {row["job"]: float(row[f"ppl {source}"]) for row in csv.DictReader(open(out / "results.csv"))}


def test_ray_sweep_equals_sequential(cli, tiny_dirs, austen_file, tmp_path, ray_cluster):
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, extra="baseline: true",
                    sweep="ratio: [0.3]\njobs:\n  - {ratio: 0.3, refit: true}")
    r = cli("run", run, "--ray")
    assert r.exit_code == 0 and "Ray tasks" in r.output, r.output
    on_ray = ppl_by_job(tmp_path / "out", f"text:{austen_file}")
    assert len(on_ray) == 3
    for job in on_ray:  # each ran as a task, its progress in its log
        assert (tmp_path / "out" / "jobs" / job / "worker.json").is_file()
        log = (tmp_path / "out" / "jobs" / job / "log.txt").read_text()
        assert "ppl text:" in log and log.rstrip().endswith("done"), log

    run.write_text(run.read_text().replace(str(tmp_path / "out"), str(tmp_path / "seq")))
    assert cli("run", run).exit_code == 0
    sequential = ppl_by_job(tmp_path / "seq", f"text:{austen_file}")
    assert sequential.keys() == on_ray.keys()
    for job, value in on_ray.items():
        assert value == pytest.approx(sequential[job], rel=1e-5), job


def test_killed_worker_is_recorded_and_rerun_completes_it(cli, tiny_dirs, austen_file, tmp_path, ray_cluster):
    from rankwise.eval.sweep.plan import load_plan
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, extra="baseline: true", sweep="ratio: [0.3]")
    dense, victim = load_plan(run).jobs  # the dense baseline comes first
    assert cli("run", run).exit_code == 0  # both done; then the victim's work is undone, to be redone on Ray
    (victim.dir / "result.json").unlink()
    shutil.rmtree(victim.checkpoint_dir)
    stamp = (dense.dir / "result.json").stat().st_mtime_ns
    killed = []

    def kill_when_started():
        for _ in range(1200):
            try:
                pid = json.loads((victim.dir / "worker.json").read_text())["pid"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    r = cli("run", run, "--jobs", "2")
    killer.join()
    assert killed and r.exit_code == 1, r.output
    assert not (victim.dir / "result.json").exists()
    assert "worker process died" in json.loads((victim.dir / "error.json").read_text())["error"]

    r = cli("run", run)  # sequential: no Ray needed
    assert r.exit_code == 0 and "1 to run" in r.output, r.output
    assert json.loads((victim.dir / "result.json").read_text())["job"] == victim.name
    assert (dense.dir / "result.json").stat().st_mtime_ns == stamp
    assert not list(victim.checkpoint_dir.glob(".model.*"))  # the killed save's leftovers are gone


def test_workers_die_with_a_killed_runner_and_the_folder_is_free_again(tiny_dirs, austen_file, tmp_path):
    import subprocess
    import sys
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="ratio: [0.3, 0.6]")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster, not the module's
    runner = subprocess.Popen([sys.executable, "-m", "rankwise.cli.main", "run", str(run), "--jobs", "2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker = None
        for _ in range(1200):
            found = list((tmp_path / "out" / "jobs").glob("*/worker.json"))
            if found:
                worker = json.loads(found[0].read_text())["pid"]
                break
            time.sleep(0.05)
        assert worker is not None
    finally:
        runner.kill()  # SIGKILL: no handler of its own runs
        runner.wait()
    for _ in range(300):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} outlived its runner")
    from rankwise.eval.sweep.runner import sole_runner
    with sole_runner(tmp_path / "out"):  # the lock went with the runner
        pass


def _gone(pid: int, seconds: float = 30.0) -> bool:
    for _ in range(int(seconds * 10)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_stops_a_parallel_sweep_with_exit_130_and_the_rerun_completes(cli, tiny_dirs, austen_file, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while both jobs of `--jobs 2` evaluate: exit
    130, no result and no half-written file, no job or Ray worker left; the rerun finishes both jobs."""
    import subprocess
    import sys
    long_text = tmp_path / "eval.txt"  # long enough that the evaluation is still running when Ctrl-C comes
    long_text.write_text(austen_file.read_text() * 10)
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="ratio: [0.3, 0.6]")
    run.write_text(run.read_text().replace(f'eval: {{ppl: ["text:{austen_file}"], seqlen: 32, max_windows: 3}}',
                                           f'eval: {{ppl: ["text:{long_text}"], seqlen: 32}}'))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    runner = subprocess.Popen([sys.executable, "-m", "rankwise.cli.main", "run", str(run), "--jobs", "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        for _ in range(3000):  # a job is running when its log shows evaluation progress
            if any("ppl text:" in log.read_text() for log in out.glob("jobs/*/log.txt")):
                break
            assert runner.poll() is None, runner.communicate()[0]
            time.sleep(0.1)
        else:
            pytest.fail("no job reached its evaluation")
        os.killpg(runner.pid, signal.SIGINT)
        output = runner.communicate(timeout=120)[0]
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode == 130 and "cancelled" in output, output
    workers = [json.loads(w.read_text()) for w in out.glob("jobs/*/worker.json")]
    assert workers and all(_gone(w["pid"]) and _gone(w["worker_pid"]) for w in workers)
    assert not list(out.glob("jobs/*/result.json"))
    assert not [p for p in out.rglob(".*") if p.name != ".run.lock"]  # no temporary left behind
    for written in out.rglob("*.json"):
        json.loads(written.read_text())  # every file is whole

    long_text.write_text(austen_file.read_text())  # the same run file, now quick to evaluate
    r = cli("run", run)
    assert r.exit_code == 0 and "2 to run" in r.output, r.output
    results = [json.loads(p.read_text()) for p in out.glob("jobs/*/result.json")]
    assert len(results) == 2 and all(res["eval"]["ppl"][f"text:{long_text}"]["ppl"] > 1 for res in results)
