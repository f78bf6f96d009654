"""OpenMP's long-spinning waiters make small-tensor training many times slower on a machine whose cores are
busy, and waiters that sleep at once make it slower on a quiet one (perf/bench_busy_machine.py): importing
clbench before torch makes them spin briefly, then sleep, unless the user chose."""
import os
import subprocess
import sys

import clbench

CODE = "import os, clbench, torch; print([os.environ.get(k) for k in clbench.WAIT_SETTINGS])"


def settings(env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if k not in clbench.WAIT_SETTINGS}
    return subprocess.run([sys.executable, "-c", CODE], env={**base, **env}, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_importing_clbench_first_makes_openmp_waiters_spin_briefly():
    assert settings({}) == "[None, '100000', '0']"


def test_a_users_own_wait_setting_is_kept():
    assert settings({"OMP_WAIT_POLICY": "ACTIVE"}) == "['ACTIVE', None, None]"
    assert settings({"GOMP_SPINCOUNT": "1000"}) == "[None, '1000', None]"
