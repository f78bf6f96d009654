"""The command line: demo, single runs, list, plugins and one-line errors."""
import json
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_single_run_writes_json(cli, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, stderr = cli("run", "--stream", "teacher-student", "--strategy", "ewc-full",
                               "--stream-arg", "rho_a=0.8", "--stream-arg", "rho_b=0.0", "--stream-arg", "input_dim=1000",
                               "--strategy-arg", "strength=1", "--output", str(out), "--quiet", "--device", "cpu")
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert len(data["R"]) == 3 and len(data["R"][0]) == 2
    assert {"acc", "bwt", "fwt", "forgetting", "transfer", "retention"} <= set(data["metrics"])
    assert data["metrics"]["retention"] > 0.9
    assert data["config"]["stream_args"]["rho_a"] == 0.8 and data["config"]["strategy"] == "ewc-full"
    assert data["wall_time_s"] > 0 and data["peak_memory_mb"] > 0


def test_list_shows_every_kind_with_arguments(cli):
    code, stdout, _ = cli("list")
    assert code == 0
    for name in ("teacher-student", "finetune", "joint", "l2", "ewc-diag", "ewc-full", "activity-gating", "mlp"):
        assert name in stdout
    assert "rho_a=0.5" in stdout and "strength=1.0" in stdout


def test_plugin_strategy_runs_through_the_cli(cli, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, stderr = cli("--plugin", str(HERE / "plugin_strategy.py"), "run", "--stream", "teacher-student",
                               "--strategy", "test-shrink", "--strategy-arg", "strength=0.2", "--stream-arg",
                               "input_dim=300", "--output", str(out), "--device", "cpu")
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["config"]["strategy"] == "test-shrink" and data["extra"]["tasks_seen"] == 2
    assert "test-shrink on teacher-student" in stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--stream", "nope"], "unknown stream 'nope'"),
    (["run", "--strategy", "ewc"], "unknown strategy 'ewc'"),
    (["run", "--stream", "teacher-student", "--stream-arg", "rho_a=1.5"], "rho_a must be in [-1, 1]"),
    (["run", "--stream", "teacher-student", "--stream-arg", "rho_a"], "malformed --stream-arg 'rho_a'"),
    (["run", "--strategy", "l2", "--strategy-arg", "=3"], "malformed --strategy-arg"),
    (["run", "--strategy", "l2", "--strategy-arg", "weight=3"], "has no argument 'weight'"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["--plugin", "missing_file.py", "list"], "plugin file 'missing_file.py' not found"),
])
def test_bad_arguments_give_one_line_and_exit_2(cli, args, message):
    code, stdout, stderr = cli(*args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("clbench: error:")
    assert "Traceback" not in stderr
    if message:
        assert message in lines[0]


def test_demo_runs_and_prints_the_table(cli):
    code, stdout, stderr = cli("run")
    assert code == 0, stderr
    for label in ("finetune", "joint", "l2", "ewc-diag", "ewc-full", "activity-gating"):
        assert label in stdout
    assert "transfer" in stdout and "retention" in stdout and "acc" in stdout
