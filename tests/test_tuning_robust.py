"""Tuning under hostile conditions: failed trials that are the environment's fault, minimised metrics, several
processes on one store, names that would escape the store, settings that would change the protocol, resumed
searches, and bad suites and storage URLs as one-line errors."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

import clbench
from clbench import ClbenchError, benchmark
from clbench.cli import commands as cli
from clbench.core import metrics
from clbench.core.io import inside
from clbench.experiments import suite as suites
from clbench.experiments import trials, tune
from clbench.experiments.store import Store

ROOT = Path(__file__).resolve().parents[1]
FLAKY = str(ROOT / "tests" / "plugin_flaky.py")
STREAM_ARGS = '{ tasks = 2, rho_a = 0.9, rho_b = 0.0, mode = "sampled", latent_dim = 4, input_dim = 12, samples = 64 }'
SUITE = """\
version = 1
seeds = [0, 1]
metric = "acc"
[training]
epochs = 2
lr = 0.05
[validation]
share = 0.25
[tuning]
trials = 3
seeds = [100]
sampler_seed = 7
[[stream]]
name = "teacher-student"
args = {STREAM_ARGS}
[[strategy]]
name = "finetune"
[[strategy]]
name = "l2"
""".replace("{STREAM_ARGS}", STREAM_ARGS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    clbench.load_plugin(FLAKY)
    yield
    torch.set_num_threads(before)


def write_suite(root: Path, name: str = "tiny", **replace) -> Path:
    text = SUITE
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = root / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def study_of(summary):
    return optuna.load_study(study_name=summary["study"], storage=summary["storage"])


def test_environment_failures_are_retried_and_not_counted(tmp_path, monkeypatch):
    fault = tmp_path / "fault"
    fault.write_text("missing data")
    monkeypatch.setenv("CLBENCH_TEST_FAULT", str(fault))
    suite = suites.load(write_suite(tmp_path))
    store = tmp_path / "store"
    for _ in range(2):  # every run with the fault fails, and says it is retried
        with pytest.raises(ClbenchError, match="environment or the code.*data files are missing.*retried on the next"):
            tune.tune(suite, "test-flaky", store, progress=False)
    fault.unlink()  # the cause is fixed: the rerun succeeds with the full budget, retrying the failed setting
    done = tune.tune(suite, "test-flaky", store, progress=False)
    assert done["finished"] and done["trials_counted"] == 3 == len(done["trials"])
    assert all(t["state"] == "COMPLETE" for t in done["trials"])
    study = optuna.load_study(study_name=done["study"], storage=f"sqlite:///{store / 'tuning.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    # the whole budget is asked at once (batched tuning), so each of the two faulty runs failed all 3 trials
    assert len(failed) == 2 * 3 and all("data files are missing" in t.user_attrs["error"] for t in failed)
    settings = lambda trials: sorted(json.dumps(t, sort_keys=True) for t in trials)  # noqa: E731
    assert (settings(t.params for t in failed[:3]) == settings(t.params for t in failed[3:])
            == settings(t["params"] for t in done["trials"]))  # the same settings, retried
    # the same budget as an untroubled search of the same space, and the same points
    clean = tune.tune(suite, "test-flaky", tmp_path / "clean", progress=False)
    assert [t["params"] for t in clean["trials"]] == [t["params"] for t in done["trials"]]


def test_divergence_counts_as_a_result(tmp_path):
    path = write_suite(tmp_path, **{"sampler_seed = 7": 'sampler_seed = 7\nspace = { lr = ["log", 1e6, 1e8] }'})
    suite = suites.load(path)
    with pytest.raises(ClbenchError, match="every tuning trial of l2 diverged"):
        tune.tune(suite, "l2", tmp_path / "store", progress=False)
    study = optuna.load_study(study_name=tune.study_name(suite, "l2", {}, tune.search_space(suite, "l2")),
                              storage=f"sqlite:///{tmp_path / 'store' / 'tuning.db'}")
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    why = [t.user_attrs[trials.DIVERGED] for t in study.trials]  # a loss that became inf, or a score that did
    assert all(w.startswith(("TrainingDiverged", "the metric is undefined")) for w in why)
    assert any(w.startswith("TrainingDiverged") for w in why)
    with pytest.raises(ClbenchError, match="diverged"):  # counted: a rerun does not run them again
        tune.tune(suite, "l2", tmp_path / "store", progress=False)
    assert len(optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'store' / 'tuning.db'}")
               .trials) == 3


def test_forgetting_is_minimised_by_tuning_and_ranking(tmp_path):
    assert metrics.direction("forgetting") == "minimize" and metrics.direction("acc") == "maximize"
    suite = suites.load(write_suite(tmp_path, **{'metric = "acc"': 'metric = "forgetting"'}))
    t = tune.tune(suite, "l2", tmp_path / "store", progress=False)
    assert t["direction"] == "minimize" and study_of(t).direction == optuna.study.StudyDirection.MINIMIZE
    values = [trial["value"] for trial in t["trials"]]
    assert len(set(values)) == 3 and t["validation_score"] == min(values)
    out = benchmark.benchmark(suite, ["finetune", "l2"], tmp_path / "store", progress=False)
    table = pd.read_csv(out["csv"])
    assert len(table) == 2 and table["forgetting_mean"].is_monotonic_increasing  # the least forgetting first


def test_a_live_trial_of_another_process_is_left_alone_and_a_dead_ones_is_redone(tmp_path):
    suite = suites.load(write_suite(tmp_path))
    store = tmp_path / "store"
    first = tune.tune(suite, "l2", store, max_new_trials=1, progress=False)
    storage = trials.open_storage(first["storage"])
    study = optuna.load_study(study_name=first["study"], storage=storage)
    live = trials.ask(study, storage, 1, budget=3)[0]  # owned and beating, as another process's trial
    live.suggest_float("strength", 1e-4, 10.0, log=True)
    beating = trials.open_storage(first["storage"], heartbeat_interval=1, grace_period=2)
    with trials.heartbeats(study, beating, [live], interval=1):  # a trial longer than the grace period, alive
        time.sleep(4)
        trials.fail_stale(optuna.load_study(study_name=first["study"], storage=beating), grace_period=2)
        assert study_of(first).trials[live.number].state == optuna.trial.TrialState.RUNNING
    second = tune.tune(suite, "l2", store, max_new_trials=1, progress=False)
    assert second["trials_counted"] == 2
    assert study_of(first).trials[live.number].state == optuna.trial.TrialState.RUNNING  # not stolen
    time.sleep(2.5)  # no heartbeat for longer than the grace period below: its process is dead
    done = tune.tune(suite, "l2", store, progress=False, grace_period=2)
    assert done["finished"] and done["trials_counted"] == 3
    states = study_of(first).trials
    assert states[live.number].state == optuna.trial.TrialState.FAIL
    assert done["trials"][-1]["params"] == states[live.number].params  # its setting was run after all
    with pytest.raises((ValueError, RuntimeError)):  # the dead process, coming back, cannot tell a result any more
        study.tell(live, 0.5)


def test_three_processes_tune_one_fresh_store_together(tmp_path):
    path = write_suite(tmp_path, **{"trials = 3": "trials = 5"})
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "clbench", "tune", "--suite", str(path), "--strategy", "l2",
                               "--store", str(store), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, out, err in results:
        assert code == 0, err
        assert "5/5 trials" in out
    summary = json.loads(next((store / "tuning").glob("*.json")).read_text())
    study = optuna.load_study(study_name=summary["study"], storage=summary["storage"])
    counted = [t for t in study.trials if trials.counts(t)]
    assert len(counted) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    assert {t.number for t in counted} == {t["number"] for t in summary["trials"]}
    others = [t for t in study.trials if not trials.counts(t)]
    assert all(t.state == optuna.trial.TrialState.FAIL and "budget" in t.user_attrs["error"] for t in others)


def test_a_resumed_search_samples_the_points_of_an_uninterrupted_one(tmp_path, monkeypatch):
    suite = suites.load(write_suite(tmp_path, **{"trials = 3": "trials = 5"}))
    whole = tune.tune(suite, "test-flaky", tmp_path / "whole", progress=False)
    store = tmp_path / "pieces"
    tune.tune(suite, "test-flaky", store, max_new_trials=1, progress=False)
    tune.tune(suite, "test-flaky", store, max_new_trials=1, progress=False)
    fault = tmp_path / "fault"
    fault.write_text("interrupt")
    monkeypatch.setenv("CLBENCH_TEST_FAULT", str(fault))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the third trial: it does not count, and is redone
        tune.tune(suite, "test-flaky", store, progress=False)
    pieces = tune.tune(suite, "test-flaky", store, progress=False)
    assert pieces["trials_counted"] == whole["trials_counted"] == 5
    assert [t["params"] for t in pieces["trials"]] == [t["params"] for t in whole["trials"]]
    assert [t["value"] for t in pieces["trials"]] == pytest.approx([t["value"] for t in whole["trials"]])
    other = tune.tune(suites.load(write_suite(tmp_path, "other", **{"sampler_seed = 7": "sampler_seed = 8"})),
                      "test-flaky", tmp_path / "other", max_new_trials=1, progress=False)
    assert other["trials"][0]["params"] != whole["trials"][0]["params"]  # the seed matters


@pytest.mark.parametrize("name", ["../../../../tmp/x", "a/b", ".hidden", "", "a b", 3])
def test_names_that_could_leave_the_store_are_refused(tmp_path, name):
    text = f"name = {json.dumps(name)}\n" + SUITE
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ClbenchError, match=re.escape("letters, digits, '-', '_', '+' and '.'")):
        suites.load(path)
    for register in (clbench.register_strategy, clbench.register_stream, clbench.register_model):
        with pytest.raises(ClbenchError, match="letters, digits"):
            register(name)


def test_every_path_stays_inside_its_store(tmp_path):
    store = Store(tmp_path / "store")
    assert store.path("ok--run") == tmp_path / "store" / "ok--run.json"
    for bad in ("../escape", "a/../../escape", "/etc/passwd"):
        with pytest.raises(ClbenchError, match="outside"):
            store.path(bad)
    (tmp_path / "store" / "link").symlink_to(tmp_path)
    with pytest.raises(ClbenchError, match="outside"):
        inside(tmp_path / "store", "link", "x.json")
    assert inside(tmp_path / "store", "tuning", "x.json") == tmp_path / "store" / "tuning" / "x.json"


def test_set_cannot_change_the_protocol_and_the_store_is_checked_first(tmp_path):
    path = write_suite(tmp_path, **{'name = "l2"': 'name = "l2"\nargs = { strength = 0.1 }\n'
                                                   '[[strategy]]\nname = "test-flaky"'})
    suite = suites.load(path)
    store = tmp_path / "store"
    for settings in ({"epochs": 50}, {"lr": 1.0}, {"strength": 5.0}):  # [training], and l2's fixed args
        with pytest.raises(ClbenchError, match="fixes it as part of its protocol"):
            benchmark.benchmark(suite, ["l2"], store, settings=settings, progress=False)
    assert not store.exists()
    benchmark.check_settings(suite, "test-flaky", {"strength": 0.01})  # choosing instead of tuning: allowed
    out = benchmark.benchmark(suite, ["finetune"], store, progress=False)
    assert len(out["table"]) == 1
    n = len(list(store.glob("*.json")))
    other = suites.load(write_suite(tmp_path, "other", **{"share = 0.25": "share = 0.5"}))
    with pytest.raises(ClbenchError, match="never mixes protocols"):
        benchmark.benchmark(other, ["l2", "test-flaky"], store, progress=False)
    assert len(list(store.glob("*.json"))) == n and not list((store / "tuning").glob("*l2*"))  # no work done


def test_storage_passwords_are_redacted():
    assert trials.redact("postgresql://user:s3cret@db.example:5432/clbench") == \
        "postgresql://user:***@db.example:5432/clbench"
    assert trials.redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    assert "s3cret" not in trials.redact("not a url user:s3cret@host")


def test_a_written_summary_names_its_storage_relative_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a committed summary must not carry the path of the clone that wrote it
    suite = suites.load(write_suite(tmp_path))
    summary = tune.tune(suite, "l2", Path("results") / "tiny", progress=False)
    written = json.loads(Path(summary["path"]).read_text())
    assert written["storage"] == "sqlite:///results/tiny/tuning.db"
    assert str(tmp_path) not in Path(summary["path"]).read_text()
    assert len(study_of(summary).trials) == 3  # the returned summary still opens the study from anywhere
    assert tune.portable("postgresql://u:***@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert tune.portable("sqlite:////elsewhere/t.db") == "sqlite:////elsewhere/t.db"


BAD_SUITES = [
    ({"version = 1": "version = true"}, "version = N"),
    ({"seeds = [0, 1]": "seeds = [true, 1]"}, "seeds must be a non-empty list of integers"),
    ({"trials = 3": "trials = true"}, "trials must be a non-negative integer"),
    ({'name = "finetune"': 'name = ""'}, "needs a name, a non-empty string"),
    ({'name = "finetune"': "name = 3"}, "needs a name, a non-empty string"),
    ({'name = "finetune"': 'name = "l2"'}, "strategy 'l2' is listed twice"),
    ({"share = 0.25": 'share = "x"'}, "share must be a number"),
    ({"share = 0.25": "share = true"}, "share must be a number"),
    ({"sampler_seed = 7": 'sampler_seed = "x"'}, "sampler_seed must be an integer"),
    ({"seeds = [100]": 'seeds = "x"'}, r"\[tuning\]: seeds must be"),
    ({"epochs = 2": 'epochs = "x"'}, "epochs must be a whole number"),
    ({"lr = 0.05": "lr = -1"}, "lr must be a positive number"),
    ({"[[stream]]": "[stream]"}, "stream must be \\[\\[stream\\]\\] tables"),
    ({STREAM_ARGS: "3"}, "args must be a table"),
    ({'metric = "acc"': 'metric = "forgeting"'}, "did you mean|unknown; use one of"),
    ({'metric = "acc"': "metric = 1"}, "unknown; use one of"),
    ({"version = 1": 'version = 1\ndevice = 3'}, "device must be a string"),
    ({"[[strategy]]\nname = \"finetune\"": "[[strategy]]\nname = \"finetune\"\nargs = 5"}, "args must be a table"),
]


@pytest.mark.parametrize("replace,message", BAD_SUITES, ids=[m for _, m in BAD_SUITES])
def test_a_bad_suite_file_is_one_line_error(tmp_path, capsys, replace, message):
    path = write_suite(tmp_path, **replace)
    for command in ("tune", "benchmark"):
        code = cli.main([command, "--suite", str(path), "--store", str(tmp_path / "store"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("clbench: error: ") and err.count("\n") == 1, err
        assert pd.Series([err]).str.contains(message).all(), err


def _bad_inputs(tmp_path: Path) -> tuple[str, list[tuple[list[str], str]]]:
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "latin1.toml").write_bytes("name = \"caf\xe9\"\n".encode("latin-1"))
    (tmp_path / "notadb.db").write_text("hello, not a database\n" * 100)
    (tmp_path / "afile").write_text("x")
    suite = str(write_suite(tmp_path))
    s = ["--suite", suite, "--strategy", "l2"]
    return suite, [
        (["--suite", str(tmp_path / "folder.toml")], "is a folder"),
        (["--suite", str(tmp_path / "latin1.toml")], "not valid TOML"),
        (s + ["--storage", "nonsense"], "not a database URL|cannot open the Optuna storage"),
        (s + ["--storage", "sqlite:////nonexistent/dir/t.db"], "does not exist"),
        (s + ["--storage", f"sqlite:///{tmp_path}"], "is a folder"),
        (s + ["--storage", f"sqlite:///{tmp_path / 'notadb.db'}"], "cannot open the Optuna storage"),
        (s + ["--storage", "sqlite://"], "names no database file"),
        (s + ["--storage", "mysql://user:s3cret@localhost:1/db"], "cannot open the Optuna storage"),
        (s + ["--storage", "postgresql://user:s3cret@localhost:1/db"], "cannot open the Optuna storage"),
        (s + ["--storage", "redis://localhost:1"], "cannot open the Optuna storage|not a database URL"),
        (s + ["--device", "nonsense"], "unknown device"),
        (s + ["--jobs", "0"], "--jobs takes auto or a whole number"),
        (s + ["--store", str(tmp_path / "afile")], "is a file"),
        (s + ["--address", "localhost:1"], "--address applies to --executor ray"),
        (["--suite", suite, "--strategy", "no-such-strategy"], "unknown strategy"),
        (["--suite", suite, "--strategy", "l2", "--plugin", str(tmp_path / "missing.py")], "not found"),
    ]


def test_bad_tune_and_benchmark_input_is_one_line_error(tmp_path, capsys):
    store = ["--store", str(tmp_path / "store")]
    suite, cases = _bad_inputs(tmp_path)
    cases.append((["--suite", suite, "--strategy", "l2", "--max-new-trials", "0"], "at least 1"))
    for args, message in cases:
        for command in ("tune", "benchmark"):
            if command == "benchmark" and "--max-new-trials" in args:
                continue
            full = [command, *args, *([] if "--store" in args else store), "--quiet"]
            code = cli.main(full)
            err = capsys.readouterr().err
            assert code == 2 and err.startswith("clbench: error: ") and err.count("\n") == 1, (full, err)
            assert pd.Series([err]).str.contains(message).all(), (full, err)
            assert "s3cret" not in err


def test_batched_tuning_gives_each_setting_the_value_of_its_own_runs(tmp_path, monkeypatch):
    """Trials asked together and trained as one batched model (the default) score each setting as running it
    alone does: with a budget inside TPE's random start-up, both searches try the same points (each trial's
    random state comes from its place), so their values must agree to float rounding."""
    path = write_suite(tmp_path, **{"trials = 3": "trials = 4", "lr = 0.05\n": "",
                                    "[tuning]\n": '[tuning]\nspace = { lr = ["log", 0.01, 0.2] }\n'})
    suite = suites.load(path)
    from clbench.experiments import batching
    sizes = []
    real = batching.run_batched
    monkeypatch.setattr(batching, "run_batched", lambda members, **kw: sizes.append(len(members)) or real(members, **kw))
    together = tune.tune(suite, "l2", tmp_path / "batched", progress=False)
    assert sizes == [4]  # the four trials trained as one batched model
    alone = tune.tune(suite, "l2", tmp_path / "alone", progress=False, batch="off")
    assert [t["params"] for t in together["trials"]] == [t["params"] for t in alone["trials"]]
    assert len({t["params"]["lr"] for t in together["trials"]}) == 4  # learning rates differ within the batch
    assert [t["value"] for t in together["trials"]] == pytest.approx([t["value"] for t in alone["trials"]], abs=1e-6)
    assert together["chosen"] == alone["chosen"]
    assert sizes == [4]  # batch="off" ran each trial alone


def test_batched_trials_asked_together_are_shared_out_among_the_jobs(tmp_path, monkeypatch):
    """``--batch auto --jobs 2``: TPE is asked 8 trials at once (as with one job), and each of the two workers
    trains half of them as one batched model."""
    path = write_suite(tmp_path, **{"trials = 3": "trials = 8"})
    from clbench.experiments import batching
    calls = []
    real = batching.sweep_outcomes
    monkeypatch.setattr(batching, "sweep_outcomes", lambda todo, device, commit, jobs, batch: calls.append(
        [len(b) for b in batching.plan(todo, batch, jobs)]) or real(todo, device, commit, 1, batch))
    summary = tune.tune(suites.load(path), "l2", tmp_path / "store", progress=False, jobs=2)
    assert calls == [[4, 4]] and summary["trials_counted"] == 8


def test_tuning_runs_on_the_stream_subset_the_suite_names(tmp_path, monkeypatch):
    """``[tuning] streams`` (e.g. a grid's corners): tuning trains on those configs only, and a trial's value is
    the mean of its runs there; the final rows still cover the whole grid."""
    grid = STREAM_ARGS.replace("rho_a = 0.9", "rho_a = [0.0, 0.5, 1.0]")
    path = write_suite(tmp_path, **{STREAM_ARGS: grid, "sampler_seed = 7": "sampler_seed = 7\nstreams = { rho_a = [0.0, 1.0] }"})
    suite = suites.load(path)
    assert [c["stream_args"]["rho_a"] for c in suite.tuning_streams()] == [0.0, 1.0]
    assert len(suite.streams()) == 3
    from clbench.experiments import sweep
    seen = []
    real = sweep._serial
    monkeypatch.setattr(sweep, "_serial", lambda todo, *a: seen.extend(todo) or real(todo, *a))
    summary = tune.tune(suite, "l2", tmp_path / "store", progress=False, batch="off")
    assert {c["stream_args"]["rho_a"] for c in seen} == {0.0, 1.0} and len(seen) == 2 * 3  # 2 configs x 3 trials
    strength = summary["trials"][0]["params"]["strength"]
    cells = [c for c in seen if c["strategy_args"]["strength"] == strength]
    alone = [next(iter(real([c], "cpu", None, None)))[1]["metrics"]["acc"] for c in cells]
    assert summary["trials"][0]["value"] == pytest.approx(sum(alone) / 2, abs=1e-9)
    assert suite.protocol_hash != suites.load(write_suite(tmp_path, "whole", **{STREAM_ARGS: grid})).protocol_hash


def test_a_trial_evaluates_only_what_its_metric_reads(tmp_path, monkeypatch):
    """Scored by final ACC, a trial's runs skip R's middle rows and the suite's continual evaluation; its value
    is still the ACC of the full run (all rows, continual evaluation on) of the same cell."""
    path = write_suite(tmp_path, **{"tasks = 2,": "tasks = 3,", "[[stream]]": "[continual]\neval_every = 2\n\n[[stream]]"})
    suite = suites.load(path)
    from clbench.experiments import sweep
    seen = []
    real = sweep._serial
    monkeypatch.setattr(sweep, "_serial", lambda todo, *a: seen.extend(todo) or real(todo, *a))
    summary = tune.tune(suite, "l2", tmp_path / "store", progress=False, batch="off")
    assert seen and all(c["final_only"] and "continual" not in c for c in seen)
    cell = seen[0]
    full = {k: v for k, v in cell.items() if k != "final_only"} | {"continual": {"eval_every": 2}}
    record = next(iter(real([full], "cpu", None, None)))[1]
    assert record["curves"] and not any(v is None for v in record["R"][1])  # the middle rows and curves ran
    assert summary["trials"][0]["value"] == record["metrics"]["acc"]


@pytest.mark.parametrize("subset, message", [
    ("streams = { rho = [0.0] }", "unknown key 'rho'; did you mean"),
    ("streams = { rho_a = [0.3] }", "matches none of the suite's stream configs"),
    ("streams = { rho_a = 0.0 }", "streams must be a table of stream arguments"),
])
def test_a_bad_tuning_subset_is_one_line_error(tmp_path, subset, message):
    path = write_suite(tmp_path, **{"sampler_seed = 7": f"sampler_seed = 7\n{subset}"})
    with pytest.raises(ClbenchError, match=re.escape(message)):
        suites.load(path)


def test_a_best_setting_at_the_edge_of_its_range_is_flagged(tmp_path, capsys):
    """A best setting at an end of its range means the range cut the search short: the summary, `clbench tune`
    and the page say so."""
    assert tune.at_edge({"strength": 0.0011}, {"strength": ("log", 0.001, 10.0)}) == {"strength": "lower"}
    assert tune.at_edge({"strength": 9.0}, {"strength": ("log", 0.001, 10.0)}) == {"strength": "upper"}
    assert tune.at_edge({"strength": 0.1}, {"strength": ("log", 0.001, 10.0)}) == {}
    assert tune.at_edge({"w": 0.97}, {"w": ("float", 0.0, 1.0)}) == {"w": "upper"}
    assert tune.at_edge({"k": "a"}, {"k": ("choice", ["a", "b"])}) == {}
    # l2 on a task where no penalty is best, over a range far above it: the first trial (queued at the lower
    # end) is best, at the edge
    path = write_suite(tmp_path, **{'name = "l2"': 'name = "l2"\nspace = { strength = ["log", 1000.0, 1000000.0] }'})
    suite = suites.load(path)
    name = tune.study_name(suite, "l2", {}, tune.search_space(suite, "l2"))
    (tmp_path / "s").mkdir()
    optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 's' / 'tuning.db'}",
                        direction="maximize").enqueue_trial({"strength": 1001.0})
    code = cli.main(["tune", "--suite", str(path), "--strategy", "l2", "--store", str(tmp_path / "s"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "warning: the best setting lies at the edge of the searched range (strength at the lower end" in out
    written = json.loads(next((tmp_path / "s" / "tuning").glob("*l2*.json")).read_text())
    assert written["at_edge"] == {"strength": "lower"}
