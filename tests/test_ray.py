"""`clbench sweep --executor ray` against a real Ray head started on loopback (127.0.0.1) by this test."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clbench.experiments import sweep
from clbench.experiments.store import Store

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
# Ray would otherwise advertise this machine's interface address; keep every socket on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
CELLS = ["--stream", "teacher-student", "--stream-arg", "rho_a=0,1", "--stream-arg", "input_dim=300",
         "--strategy", "finetune,test-shrink", "--seeds", "0,1", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs, in its own process group; stopped afterwards."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, **LOOPBACK)
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 600  # generous: only a head that never starts fails here
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                pytest.fail(f"the Ray head did not start: {head.stderr.read()[-2000:]}")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    head.terminate()  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=30)
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything left behind
        except ProcessLookupError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def _sweep(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.Popen([sys.executable, "-m", "clbench", "--plugin", str(ROOT / "tests" / "plugin_strategy.py"),
                             "sweep", *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def test_ray_sweep_matches_local_runs_and_resumes(ray_head, tmp_path):
    store = tmp_path / "ray"
    done, driver_pid = _sweep(*CELLS, "--store", str(store), "--executor", "ray", "--address", ray_head)
    assert done.returncode == 0, done.stderr
    assert "8 cells, ran 8, skipped 0" in done.stdout
    records = {r["id"]: r for r in Store(store).records()}
    assert len(records) == 8
    for r in records.values():  # each cell ran in a Ray worker process, not in the driver
        assert r["worker"]["executor"] == "ray" and r["worker"]["pid"] != driver_pid
    assert {r["cell"]["strategy"] for r in records.values()} == {"finetune", "test-shrink"}
    assert all(r["extra"]["tasks_seen"] == 2 for r in records.values() if r["cell"]["strategy"] == "test-shrink")

    local = tmp_path / "local"
    done, _ = _sweep(*CELLS, "--store", str(local), "--threads", "1")  # batched as on Ray: one task a batch
    assert done.returncode == 0, done.stderr
    for r in Store(local).records():  # the determinism contract: same seed + same thread count = same bits
        ray_record = records[r["id"]]
        assert r["worker"]["executor"] == "local"
        assert r["config"]["threads"] == ray_record["config"]["threads"] == 1  # Ray: --cpus-per-run 1 (default)
        assert r["R"] == ray_record["R"]

    next(store.glob("*.json")).unlink()  # lose one record: the rerun runs that cell only
    done, _ = _sweep(*CELLS, "--store", str(store), "--executor", "ray", "--address", ray_head)
    assert done.returncode == 0, done.stderr
    assert "8 cells, ran 1, skipped 7" in done.stdout
    assert len(list(Store(store).records())) == 8


def test_ray_failed_cell_is_reported_and_the_others_stored(ray_head, tmp_path):
    done, _ = _sweep("--stream", "teacher-student", "--stream-arg", "input_dim=300", "--strategy", "finetune",
                     "--strategy-arg", "lr=0.0025,50", "--store", str(tmp_path), "--executor", "ray",
                     "--address", ray_head, "--quiet")
    assert done.returncode == 2
    assert "1 of 2 runs failed" in done.stderr and "TrainingDiverged" in done.stderr
    assert len(Store(tmp_path).ids()) == 1
    json.loads(next(tmp_path.glob("*.json")).read_text())


def test_unreachable_ray_head_is_one_clear_error(tmp_path):
    done, _ = _sweep(*CELLS, "--store", str(tmp_path), "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}")
    assert done.returncode == 2
    assert "no Ray head answers at 127.0.0.1:" in done.stderr and "ray start --head" in done.stderr
    assert not list(tmp_path.glob("*.json"))


def test_executor_is_checked_before_any_run(tmp_path):
    with pytest.raises(sweep.ClbenchError, match="unknown executor 'dask'"):
        sweep.run_sweep(sweep.expand(sweep.inline_spec(["teacher-student"], {}, ["finetune"], {}, [0])),
                        Store(tmp_path), executor="dask", progress=False)


def test_ray_only_options_need_the_ray_executor(cli, tmp_path):
    code, _, err = cli("sweep", *CELLS[:4], "--strategy", "finetune", "--store", str(tmp_path), "--address", "h:1")
    assert code == 2 and "apply to --executor ray only" in err
    code, _, err = cli("sweep", *CELLS[:4], "--strategy", "finetune", "--store", str(tmp_path), "--executor", "ray",
                       "--jobs", "2")
    assert code == 2 and "--jobs applies to local processes" in err
    assert not list(tmp_path.glob("*.json"))


def test_ray_runs_tuning_trials_like_local_processes(ray_head, tmp_path):
    from test_suite import write_suite

    suite = write_suite(tmp_path)
    summaries = []
    for name, extra in (("ray", ["--executor", "ray", "--address", ray_head]), ("local", [])):
        env = dict(os.environ, PYTHONPATH=str(ROOT), **LOOPBACK)
        done = subprocess.run([sys.executable, "-m", "clbench", "tune", "--suite", str(suite), "--strategy", "l2",
                               "--store", str(tmp_path / name), "--jobs", "2", "--quiet", *extra], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "4/4 trials" in done.stdout
        summaries.append(json.loads(next((tmp_path / name / "tuning").glob("*l2*.json")).read_text()))
    ray, local = summaries
    assert ray["chosen"] == local["chosen"]
    assert [t["value"] for t in ray["trials"]] == pytest.approx([t["value"] for t in local["trials"]], rel=1e-5)
