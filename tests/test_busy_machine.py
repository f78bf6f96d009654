"""OpenMP's spinning waiters make small-tensor training many times slower on a machine whose cores are busy
(perf/bench_busy_machine.py): importing clbench before torch makes them sleep, unless the user chose."""
import os
import subprocess
import sys

CODE = "import os, clbench, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def policy(env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", CODE], env={**base, **env}, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_importing_clbench_first_makes_openmp_waiters_sleep():
    assert policy({}) == "PASSIVE"


def test_a_users_own_wait_policy_is_kept():
    assert policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
