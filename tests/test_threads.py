"""The commands' default thread count follows the cores other processes leave idle (clbench.core.threads)."""
import json
import os

import pytest
import torch

from clbench.cli.commands import main
from clbench.core.errors import ClbenchError
from clbench.core import threads
from clbench.core.threads import default_threads, idle_cores, runnable_now


@pytest.mark.parametrize("load, cores, idle", [
    (0.0, 2, 2),   # quiet
    (1.0, 2, 2),   # only the caller runs
    (2.0, 2, 1),   # the caller and one other process
    (3.0, 2, 1),   # others on every core: one thread, never zero
    (2.4, 4, 3),   # rounded to the nearest core
    (2.6, 4, 2),
    (0.0, 1, 1),
])
def test_idle_cores_are_the_cores_less_the_others_load(load, cores, idle):
    assert idle_cores(load, cores) == idle


def test_the_load_is_what_runs_now_not_the_last_minutes_average(tmp_path, monkeypatch):
    """After a job ends, the 1-minute load average still counts it for about a minute; /proc/loadavg's running
    count does not. The median of a few reads ignores a passing spike."""
    reads = iter(["1.93 1.40 0.80 1/250 999\n", "1.93 1.40 0.80 7/250 999\n", "1.93 1.40 0.80 1/250 999\n"])
    path = tmp_path / "loadavg"
    real_sleep = threads.time.sleep
    monkeypatch.setattr(threads.time, "sleep", lambda s: path.write_text(next(reads, "1.93 1.40 0.80 1/250 999\n")))
    path.write_text("1.93 1.40 0.80 1/250 999\n")
    assert runnable_now(str(path), samples=3) == 1.0  # the caller alone: 1.93 would have said another core busy
    assert idle_cores(runnable_now(str(path), samples=3), 2) == 2
    monkeypatch.setattr(threads.time, "sleep", real_sleep)
    path.write_text("0.10 0.05 0.01 3/250 999\n")  # two others just started: not in the average yet
    assert idle_cores(runnable_now(str(path), samples=3), 4) == 2
    assert runnable_now(str(tmp_path / "absent")) is None
    path.write_text("no numbers here\n")
    assert runnable_now(str(path)) is None


def test_default_threads_share_the_cores_among_jobs(monkeypatch):
    monkeypatch.setenv("CLBENCH_THREADS", "1")
    assert default_threads(1) == 1 and default_threads(3) == 1
    monkeypatch.delenv("CLBENCH_THREADS")
    monkeypatch.setattr(threads, "current_load", lambda: 1.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_threads(1) == 4 and default_threads(2) == 2 and default_threads(8) == 1
    monkeypatch.setattr(threads, "current_load", lambda: 4.0)
    assert default_threads(1) == 1


@pytest.mark.parametrize("raw", ["two", "0", "-1", "1.5"])
def test_a_bad_thread_count_in_the_environment_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv("CLBENCH_THREADS", raw)
    with pytest.raises(ClbenchError, match=r"CLBENCH_THREADS"):
        default_threads()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_run_on_a_busy_machine_uses_fewer_threads_and_says_so(monkeypatch, tmp_path, capsys, restore_threads):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: there is no thread to give up")
    torch.set_num_threads(2)
    monkeypatch.delenv("CLBENCH_THREADS")
    monkeypatch.setattr(threads, "current_load", lambda: 9.0)  # every core busy with others' work
    out = tmp_path / "r.json"
    args = ["run", "--stream", "teacher-student", "--strategy", "finetune", "--output", str(out)]
    assert main(args) == 0
    assert "torch uses 1 thread(s) instead of 2" in capsys.readouterr().err
    assert json.loads(out.read_text())["config"]["threads"] == 1

    torch.set_num_threads(2)  # --threads wins over the load
    assert main(args + ["--threads", "2", "--quiet"]) == 0
    assert json.loads(out.read_text())["config"]["threads"] == 2

    torch.set_num_threads(2)  # a quiet machine keeps torch's default, without a word
    monkeypatch.setattr(threads, "current_load", lambda: 0.5)
    assert main(args) == 0
    assert "thread" not in capsys.readouterr().err
    assert json.loads(out.read_text())["config"]["threads"] == 2


def test_jobs_auto_gives_a_process_per_core_on_the_cpu(monkeypatch, tmp_path):
    from clbench.core.registry import load_plugin, register_strategy
    from clbench.core.strategy import Strategy
    from clbench.experiments.batching import resolve_jobs

    monkeypatch.setenv("CLBENCH_THREADS", "2")
    assert resolve_jobs("auto", "icarl") == 2          # no batched form: a process per core
    assert resolve_jobs("auto", "ewc-diag") == 2       # batched: one batched model a process
    assert resolve_jobs("auto", "ewc-diag", batch="off") == 2
    assert resolve_jobs("auto", "icarl", device="cuda") == 1
    assert resolve_jobs("auto", "icarl", executor="ray") == 1
    assert resolve_jobs(3, "icarl") == 3 and resolve_jobs("3", "ewc-diag") == 3
    monkeypatch.setenv("CLBENCH_THREADS", "1")
    assert resolve_jobs("auto", "icarl") == 1
    monkeypatch.setenv("CLBENCH_THREADS", "2")

    @register_strategy("test-jobs-local", replace=True)
    class Local(Strategy):  # registered by this process only: a fresh worker would not know the name
        pass

    assert resolve_jobs("auto", "test-jobs-local") == 1
    plugin = tmp_path / "jobs_plugin.py"
    plugin.write_text("from clbench import Strategy, register_strategy\n\n"
                      "@register_strategy('test-jobs-plugin', replace=True)\nclass P(Strategy):\n    pass\n")
    load_plugin(str(plugin))
    assert resolve_jobs("auto", "test-jobs-plugin") == 2  # the workers load the plugin again
    for bad in (0, "0", "two", -1):
        with pytest.raises(ClbenchError, match="--jobs takes auto or a whole number"):
            resolve_jobs(bad, "icarl")
