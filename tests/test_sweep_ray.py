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
                    sweep="ratio: [0.3, 0.6]\njobs:\n  - {ratio: 0.3, refit: true}")
    r = cli("run", run, "--ray")
    assert r.exit_code == 0 and "Ray tasks" in r.output, r.output
    on_ray = ppl_by_job(tmp_path / "out", f"text:{austen_file}")
    assert len(on_ray) == 4
    assert all((tmp_path / "out" / "jobs" / job / "worker.json").is_file() for job in on_ray)  # ran as tasks

    run.write_text(run.read_text().replace(str(tmp_path / "out"), str(tmp_path / "seq")))
    assert cli("run", run).exit_code == 0
    sequential = ppl_by_job(tmp_path / "seq", f"text:{austen_file}")
    assert sequential.keys() == on_ray.keys()
    for job, value in on_ray.items():
        assert value == pytest.approx(sequential[job], rel=1e-5), job


def test_killed_worker_is_recorded_and_rerun_completes_it(cli, tiny_dirs, austen_file, tmp_path, ray_cluster):
    from rankwise.cli.sweep import load_plan
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
    from rankwise.cli.sweep import sole_runner
    with sole_runner(tmp_path / "out"):  # the lock went with the runner
        pass


def test_ctrl_c_cancels_running_tasks_and_keeps_nothing_half_written(cli, tiny_dirs, austen_file, tmp_path,
                                                                      ray_cluster):
    from rankwise.cli.sweep import load_plan
    run = write_run(tmp_path, tiny_dirs["llama"], austen_file, sweep="ratio: [0.3]")
    (job,) = load_plan(run).jobs
    workers = []

    def interrupt_when_started():
        for _ in range(1200):
            try:
                workers.append(json.loads((job.dir / "worker.json").read_text())["pid"])
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
                continue
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends to `compress run`
            return

    interrupter = threading.Thread(target=interrupt_when_started)
    interrupter.start()
    r = cli("run", run, "--ray")
    interrupter.join()
    assert workers and r.exit_code == 130 and "cancelled" in r.output, r.output
    assert not (job.dir / "result.json").exists() and not (job.checkpoint_dir / "model").exists()
    for _ in range(300):
        try:
            os.kill(workers[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the cancelled task's worker is still running")
    assert cli("run", run).exit_code == 0 and job.status() == "done"
