"""Suites, tuning and `clbench benchmark`: strict suite files, the validation split, resumable tuning that never
reads a test set, a plugin strategy ranked end to end, and the HTML page in a real headless browser."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import clbench
from clbench import ClbenchError
from clbench.cli import commands as cli
from clbench.experiments import suite as suites
from clbench.experiments import tune
from clbench.experiments.store import Store
from clbench.reporting import leaderboard, report

ROOT = Path(__file__).resolve().parents[1]
TINY = """\
version = 1
description = "tiny teacher-student suite for tests"
seeds = [0, 1, 2, 3, 4]
metric = "acc"
[training]
epochs = 20
lr = 0.05
[validation]
protocol = "holdout"
share = 0.2
seed = 3
[tuning]
trials = 4
seeds = [100]
[[stream]]
name = "{stream}"
args = {{ tasks = 3, rho_a = 0.9, rho_b = 0.0, mode = "sampled", latent_dim = 8, input_dim = 40, samples = 200{extra} }}
[[strategy]]
name = "finetune"
[[strategy]]
name = "l2"
"""
POISON_PLUGIN = '''
import torch
from clbench import make_stream, register_stream

@register_stream("poisonable-teacher-student")
def poisonable(poison: bool = False, tasks: int = 2, rho_a: float = 0.5, rho_b: float = 0.5, mode: str = "exact",
               latent_dim: int = 30, input_dim: int = 3000, samples: int = 3000, seed: int = 0):
    """Teacher-student; with poison=True every test target is replaced by noise."""
    stream = make_stream("teacher-student", tasks=tasks, rho_a=rho_a, rho_b=rho_b, mode=mode, latent_dim=latent_dim,
                         input_dim=input_dim, samples=samples, seed=seed)
    if poison:
        g = torch.Generator().manual_seed(999)
        for task in stream.tasks:
            task.test_y = 100 * torch.randn(task.test_y.shape, generator=g)
    return stream
'''


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These runs are tiny: one thread avoids the thread-pool overhead that dominates them on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_suite(root: Path, name: str = "tiny", stream: str = "teacher-student", extra: str = "", **replace) -> Path:
    text = TINY.format(stream=stream, extra=extra)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = root / "suites" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_suite_files_are_checked_strictly(tmp_path):
    good = suites.load(write_suite(tmp_path))
    assert good.name == "tiny" and good.version == 1 and re.fullmatch(r"[0-9a-f]{12}", good.protocol_hash)
    for bad, message in [("trials = 4", "trails = 4"), ("seeds = [0, 1, 2, 3, 4]", "seed = [0, 1, 2, 3, 4]"),
                         ("epochs = 20", "epoch = 20")]:
        path = write_suite(tmp_path, "bad", **{bad: message})
        key = message.split(" ")[0]
        with pytest.raises(ClbenchError, match=f"unknown key '{key}'; did you mean"):
            suites.load(path)
    with pytest.raises(ClbenchError, match="search space entry strength"):
        suites.load(write_suite(tmp_path, "bad", **{'name = "l2"\n': 'name = "l2"\nspace = { strength = ["log", 0, 1] }\n'}))
    with pytest.raises(ClbenchError, match="unknown suite 'permuted-fashion-mnst'. Did you mean 'permuted-fashion-mnist'"):
        suites.load("permuted-fashion-mnst")
    # the hash covers the protocol, not the strategy list
    more = suites.load(write_suite(tmp_path, "more", **{'name = "l2"\n': 'name = "l2"\n[[strategy]]\nname = "si"\n'}))
    other = suites.load(write_suite(tmp_path, "other", **{"share = 0.2": "share = 0.3"}))
    assert more.protocol_hash == good.protocol_hash != other.protocol_hash


def test_bad_suite_input_is_one_clear_cli_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "benchmark", "--suite", "permuted-fashion-mnst", "--strategy", "l2")
    assert code == 2 and err.startswith("clbench: error: unknown suite 'permuted-fashion-mnst'") and "Did you mean" in err
    code, _, err = run_cli(capsys, "tune", "--suite", str(write_suite(tmp_path, **{"trials = 4": "trails = 4"})))
    assert code == 2 and "unknown key 'trails'; did you mean 'trials'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "benchmark", "--suite", str(write_suite(tmp_path)), "--strategy", "l2,finetune",
                           "--set", "strength=1", "--store", str(tmp_path / "s"))
    assert code == 2 and "one --strategy at a time" in err


def test_committed_suites_load():
    names = sorted(p.stem for p in suites.SUITES_DIR.glob("*.toml"))
    assert {"permuted-fashion-mnist", "split-fashion-mnist-class", "split-fashion-mnist-task",
            "similarity-permuted-fashion-mnist", "split-cifar10", "split-cifar100"} <= set(names)
    for name in names:
        s = suites.load(name)
        assert len(s.spec["seeds"]) >= 5, name
        for entry in s.spec.get("strategy", []):
            clbench.core.registry.lookup("strategy", entry["name"])  # every listed strategy exists
            tune.search_space(s, entry["name"])  # and its space is valid


def test_holdout_replaces_the_test_set_by_held_out_training_data():
    stream = clbench.make_stream("teacher-student", tasks=2, mode="sampled", latent_dim=8, input_dim=40, samples=200)
    val = suites.holdout(stream, 0.25, seed=1)
    for before, after in zip(stream.tasks, val.tasks):
        assert len(after.train_x) == 150 and len(after.test_x) == 50
        rows = {tuple(r.tolist()) for r in before.train_x}
        assert all(tuple(r.tolist()) in rows for r in after.test_x)  # validation comes from the training data
        assert not {tuple(r.tolist()) for r in after.train_x} & {tuple(r.tolist()) for r in after.test_x}
    again = suites.holdout(stream, 0.25, seed=1)
    assert torch.equal(again.tasks[0].test_x, val.tasks[0].test_x)
    assert not torch.equal(suites.holdout(stream, 0.25, seed=2).tasks[0].test_x, val.tasks[0].test_x)
    assert val.provenance["evaluated_on"] == "validation"
    first = suites.task_range(clbench.make_stream("teacher-student", tasks=4, input_dim=40), 0, 2)
    rest = suites.task_range(clbench.make_stream("teacher-student", tasks=4, input_dim=40), 2)
    assert [t.id for t in first.tasks] == [0, 1] and [t.id for t in rest.tasks] == [0, 1]
    with pytest.raises(ClbenchError, match="leaves nothing"):
        suites.task_range(stream, 5)


def test_tuning_never_reads_a_test_set(tmp_path):
    plugin = tmp_path / "poison_plugin.py"
    plugin.write_text(POISON_PLUGIN)
    clbench.load_plugin(str(plugin))
    chosen = []
    for poison in ("false", "true"):
        path = write_suite(tmp_path / poison, stream="poisonable-teacher-student", extra=f", poison = {poison}")
        t = tune.tune(suites.load(path), "l2", tmp_path / poison / "store", progress=False)
        assert t["trials_counted"] == 4 and len(t["trials"]) == 4
        chosen.append((t["chosen"], t["validation_score"], [tr["value"] for tr in t["trials"]]))
    assert chosen[0] == chosen[1]  # same settings, same validation scores with garbage test targets
    # ... and the poison is real: a test-set evaluation sees it
    clean, poisoned = (clbench.make_stream("poisonable-teacher-student", poison=p, tasks=2, mode="sampled",
                                           latent_dim=8, input_dim=40, samples=200) for p in (False, True))
    strategy = lambda: clbench.make_strategy("l2", epochs=2, lr=0.05)  # noqa: E731
    a = clbench.run(clean, strategy(), progress=False, device="cpu").metrics["acc"]
    b = clbench.run(poisoned, strategy(), progress=False, device="cpu").metrics["acc"]
    assert abs(a - b) > 0.05


def test_a_killed_search_resumes(tmp_path):
    import optuna

    suite = suites.load(write_suite(tmp_path))
    store = tmp_path / "store"
    first = tune.tune(suite, "l2", store, max_new_trials=2, progress=False)
    assert first["trials_counted"] == 2 and not first["finished"]
    # a process killed mid-trial leaves a RUNNING trial behind
    study = optuna.load_study(study_name=first["study"], storage=first["storage"])
    stale = study.ask()
    stale_strength = stale.suggest_float("strength", 1e-4, 10.0, log=True)
    done = tune.tune(suite, "l2", store, progress=False, grace_period=1)  # the stale trial: no owner, 1 s old
    assert done["finished"] and done["trials_counted"] == 4
    assert [t["params"] for t in done["trials"][:2]] == [t["params"] for t in first["trials"]]  # kept, not rerun
    study = optuna.load_study(study_name=first["study"], storage=first["storage"])
    states = {t.number: t.state for t in study.trials}
    assert states[stale.number] == optuna.trial.TrialState.FAIL
    redone = [t for t in study.trials if t.number > stale.number and t.params["strength"] == stale_strength]
    assert redone and redone[0].state == optuna.trial.TrialState.COMPLETE  # the killed trial's settings, redone
    n = len(study.trials)
    again = tune.tune(suite, "l2", store, progress=False)
    assert len(optuna.load_study(study_name=first["study"], storage=first["storage"]).trials) == n
    assert again["chosen"] == done["chosen"]


@pytest.fixture(scope="module")
def ranked_store(tmp_path_factory):
    """The tiny suite's committed rows (finetune, l2), then a plugin strategy benchmarked against them."""
    root = tmp_path_factory.mktemp("bench")
    path = write_suite(root)
    committed = root / "leaderboards" / "results" / "tiny"
    code = cli.main(["benchmark", "--suite", str(path), "--store", str(committed), "--quiet"])
    assert code == 0
    return root, path, committed


def test_benchmark_ranks_a_plugin_strategy_end_to_end(ranked_store, capsys):
    root, path, committed = ranked_store
    mine = root / "mine"
    code, out, err = run_cli(capsys, "benchmark", "--suite", str(path), "--plugin", str(ROOT / "tests" / "plugin_strategy.py"),
                             "--strategy", "test-shrink", "--store", str(mine), "--quiet")
    assert code == 0, err
    assert "test-shrink: settings {'strength'" in out and "tuned, 4 trials" in out
    table = pd.read_csv(mine / "leaderboard.csv")
    assert sorted(table["strategy"]) == ["finetune", "l2", "test-shrink"]
    assert (table["n_seeds"] == 5).all() and table["acc_mean"].is_monotonic_decreasing
    assert table.loc[0, "tied_with_best"] == "best" and set(table["tied_with_best"]) <= {"best", "yes", "no"}
    lines = [line for line in out.splitlines() if "test-shrink" in line and "±" in line]
    assert len(lines) == 1 and lines[0][1] == ">"
    # the row's records: tuned settings, budget and validation score, suite tag
    records = list(Store(mine).records())
    assert len(records) == 5
    # no batched form: --jobs auto ran its runs in one worker process per core ($CLBENCH_THREADS), a thread each
    assert {r["config"]["threads"] for r in records} == {1} and os.getpid() not in {r["worker"]["pid"] for r in records}
    cell = records[0]["cell"]
    assert cell["suite"]["name"] == "tiny" and cell["suite"]["version"] == 1
    assert cell["tuning"]["trials"] == 4 and cell["tuning"]["searched"] == ["strength"]
    assert cell["tuning"]["validation_score"] is not None and "split" not in cell  # final rows: the test sets
    assert (mine / "leaderboard.png").stat().st_size > 5000
    # same budget for every tuned strategy
    summaries = [json.loads(p.read_text()) for p in list((committed / "tuning").glob("*.json")) + list((mine / "tuning").glob("*.json"))]
    assert {s["strategy"]: s["trials_counted"] for s in summaries} == {"finetune": 0, "l2": 4, "test-shrink": 4}
    # given settings skip tuning
    code, out, err = run_cli(capsys, "benchmark", "--suite", str(path), "--strategy", "test-shrink", "--set",
                             "strength=0.001", "--store", str(root / "given"), "--quiet")
    assert code == 0, err and "not tuned" in out
    assert len(pd.read_csv(root / "given" / "leaderboard.csv")) == 3


def test_paired_test_marks_ties():
    seeds = pd.Index(range(5))
    best = pd.Series([0.80, 0.82, 0.81, 0.79, 0.80], index=seeds)
    assert report.paired_tied(best, best - 0.05) is False  # consistently worse
    assert report.paired_tied(best, best + pd.Series([0.01, -0.01, 0.02, -0.02, 0.0], index=seeds)) is True
    assert report.paired_tied(best, best.iloc[:1]) is None


def test_leaderboard_refuses_to_mix_protocols(ranked_store, tmp_path, capsys):
    root, path, committed = ranked_store
    mixed = tmp_path / "mixed"
    shutil.copytree(committed, mixed)
    record = json.loads(next(mixed.glob("*.json")).read_text())
    record["cell"]["suite"] = {**record["cell"]["suite"], "version": 2, "protocol_hash": "0123456789ab"}
    record["id"] = "other"  # a store checks that a record's id is its file name
    Store(mixed).write("other", record)
    code, _, err = run_cli(capsys, "leaderboard", "--store", str(mixed), "--output", str(tmp_path / "x.csv"))
    assert code == 2 and "mixes records of different suite protocols" in err and "tiny v2" in err
    # and a benchmark refuses committed rows made under another protocol
    changed = path.read_text().replace("share = 0.2", "share = 0.25")
    path2 = root / "suites" / "tiny2.toml"
    path2.write_text(changed.replace("version = 1", "version = 2"))
    suite2 = suites.load(path2)
    assert suite2.results_dir == root / "leaderboards" / "results" / "tiny2-v2"  # a new version's records live apart
    shutil.copytree(committed, suite2.results_dir, dirs_exist_ok=True)
    from clbench import benchmark

    with pytest.raises(ClbenchError, match="never mixes protocols"):
        benchmark.suite_runs(suite2, tmp_path / "empty")


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and os.environ.get("CLBENCH_REQUIRE_BROWSER") == "1":
        pytest.fail("CLBENCH_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install chromium)")
    if not found:
        pytest.skip("needs a headless browser: apt-get install chromium")
    return found


def test_html_page_renders_and_sorts_in_a_headless_browser(ranked_store, tmp_path, capsys):
    browser = _chromium()
    _, _, committed = ranked_store
    page = tmp_path / "board.html"
    code, out, err = run_cli(capsys, "leaderboard", "--store", str(committed), "--output", str(tmp_path / "b.csv"),
                             "--html", str(page))
    assert code == 0, err
    text = page.read_text()
    assert "data:image/png;base64," in text and "<script" in text and "http" not in text.split("<body>")[1]
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert 'data-sorted-by="0"' in dom, proc.stderr[-2000:]  # the sort script ran in the browser
    board = dom.split('id="board"')[1].split("</table>")[0]
    body = board.split("<tbody>")[1]
    assert body.count("<tr>") == 2  # finetune and l2
    ranks = re.findall(r'<tr><td data-v="(\d+)"', body)
    assert ranks == ["1", "2"]
    assert "±" in body and "tiny" in dom and 'alt="ranked chart"' in dom


def test_first_tasks_protocol_tunes_on_the_first_tasks_and_reports_the_rest(tmp_path):
    from clbench import benchmark
    from clbench.experiments import sweep

    path = write_suite(tmp_path, **{'protocol = "holdout"\nshare = 0.2\nseed = 3': 'protocol = "first-tasks"\ntasks = 1',
                                    "trials = 4": "trials = 2", "seeds = [0, 1, 2, 3, 4]": "seeds = [0, 1]"})
    suite = suites.load(path)
    tuning_cell = suites.cells(suite, "l2", {"strength": 0.1}, [100], suites.tuning_split(suite))[0]
    assert len(sweep.run_cell(tuning_cell, "cpu")["R"][0]) == 1  # tuning sees task 1 only
    t = benchmark.final_rows(suite, "l2", tmp_path / "store", progress=False)
    assert t["trials_counted"] == 2
    records = list(Store(tmp_path / "store").records())
    assert len(records) == 2 and all(len(r["R"][0]) == 2 for r in records)  # reported on tasks 2 and 3
    assert records[0]["config"]["provenance"]["task_range"] == [1, None]



# Every committed suite board: (suite, version). A suite's records and board of version v >= 2 live in
# results/<suite>-v<v>/ and <suite>-v<v>.csv; an older version's stay readable beside the current one's.
SUITE_BOARDS = [("permuted-fashion-mnist", 1), ("split-fashion-mnist-class", 1), ("split-fashion-mnist-task", 1),
                ("similarity-permuted-fashion-mnist", 1), ("permuted-fashion-mnist", 2),
                ("similarity-permuted-fashion-mnist", 2), ("split-fashion-mnist-class", 2),
                ("split-fashion-mnist-task", 2), ("split-fashion-mnist-domain", 2)]


@pytest.mark.parametrize("name, version", SUITE_BOARDS)
def test_committed_suite_leaderboards_regenerate_from_committed_records(tmp_path, name, version):
    folder = name if version == 1 else f"{name}-v{version}"
    results = ROOT / "leaderboards" / "results" / folder
    committed = ROOT / "leaderboards" / f"{folder}.csv"
    assert committed.is_file() and results.is_dir(), f"run the regeneration in leaderboards/README.md for {folder}"
    out = tmp_path / "regen.csv"
    leaderboard.write(leaderboard.build(Store(results)), out)
    assert committed.read_bytes() == out.read_bytes()
    # the ranked table `clbench benchmark` printed regenerates too (times excepted: they are means of stored times)
    table = pd.read_csv(committed)
    assert (table["suite_version"] == version).all() and table["protocol_hash"].nunique() == 1
    metric = table["suite_metric"].iloc[0] if "suite_metric" in table else "acc"
    ranked = report.ranked(leaderboard.runs_table(Store(results)), metric)
    old = pd.read_csv(results / "leaderboard.csv")
    new = pd.read_csv(pd.io.common.StringIO(ranked.to_csv(index=False, float_format="%.6g")))
    assert old.drop(columns="wall_time_s_mean").equals(new.drop(columns="wall_time_s_mean"))
    assert (table["n_seeds"] >= 5).all()
    suite = suites.load(name)
    if suite.version != version:  # an older protocol's board: readable, but the suite file now defines another
        return
    # what a fair leaderboard carries: the suite's protocol, >= 5 seeds, every listed strategy, tuned settings and
    # the same budget for all
    assert (table["protocol_hash"] == suite.protocol_hash).all()
    assert set(table["strategy"]) == {e["name"] for e in suite.spec["strategy"]}
    budget = suite.spec["tuning"]["trials"]
    for row in table.itertuples():
        if tune.search_space(suite, row.strategy):
            assert row.tuning_trials == budget and row.tuned != "-" and row.validation_score != "-", row.strategy
    # no search stopped at the edge of its range (the best might lie beyond it)
    for path in sorted((results / "tuning").glob("*.json")):
        t = json.loads(path.read_text())
        space = {k: tuple(v) for k, v in t["space"].items()}
        assert not tune.at_edge(t["chosen"], space), (t["strategy"], t["chosen"], t["space"])


def test_grid_comparison_says_where_over_the_grid_a_strategy_wins_and_loses():
    grid_comparison = report.grid_comparison
    rng = np.random.default_rng(0)
    rows = []
    for rho_a, mine, theirs in ((0.0, 0.8, 0.5), (0.5, 0.5, 0.5), (1.0, 0.2, 0.6)):  # win, tie, loss
        args = json.dumps({"rho_a": rho_a, "tasks": 2}, sort_keys=True)
        for seed in range(5):
            noise = rng.normal(0, 0.01, 2)
            rows += [{"stream_args": args, "strategy": "mine", "strategy_args": "{}", "seed": seed,
                      "acc": mine + noise[0]},
                     {"stream_args": args, "strategy": "other", "strategy_args": "{}", "seed": seed,
                      "acc": theirs + noise[1]}]
    runs = pd.DataFrame(rows)
    text = grid_comparison(runs, "mine", "acc")
    assert "vs other: wins at rho_a=0.0; loses at rho_a=1.0; ties at 1" in text
    assert "wins at rho_a=1.0; loses at rho_a=0.0" in grid_comparison(runs, "mine", "acc", higher_is_better=False)
    assert grid_comparison(runs[runs["stream_args"] == runs["stream_args"].iloc[0]], "mine") == ""  # one config


GRID_SUITE = TINY.replace("rho_a = 0.9, rho_b = 0.0", "rho_a = [0.0, 1.0], rho_b = [0.0, 1.0]").replace(
    "latent_dim = 8", "latent_dim = [4, 8]").replace("tasks = 3", "tasks = 2").replace(
    "seeds = [0, 1, 2, 3, 4]", "seeds = [0, 1]").replace("trials = 4", "trials = 2").replace("epochs = 20", "epochs = 5")


def test_similarity_page_shows_each_strategys_maps_and_a_readable_tuning_table(tmp_path, capsys):
    """A grid suite's page: one map figure per value of the other varying stream argument (as the readout
    varies in the similarity suite), each with transfer, retention and retention minus finetune's; the
    maps' numbers are the means of the records; the tuning is a table of settings, not JSON."""
    from clbench.reporting import plots

    browser = _chromium()
    path = tmp_path / "grid.toml"
    path.write_text(GRID_SUITE.format(stream="teacher-student", extra=""))
    store, page = tmp_path / "store", tmp_path / "grid.html"
    assert cli.main(["benchmark", "--suite", str(path), "--store", str(store), "--quiet"]) == 0
    capsys.readouterr()
    runs = leaderboard.runs_table(Store(store))
    groups = plots.similarity_groups(runs)
    assert sorted(groups) == ["latent_dim=4", "latent_dim=8"]
    grids = plots.map_grids(groups["latent_dim=8"])
    assert list(grids) == ["transfer", "retention", "retention minus finetune"] and sorted(grids["retention"]) == ["finetune", "l2"]
    records = [r for r in Store(store).records() if r["cell"]["stream_args"]["latent_dim"] == 8
               and r["cell"]["stream_args"]["rho_a"] == 1.0 and r["cell"]["stream_args"]["rho_b"] == 0.0]
    mean = {s: np.mean([r["metrics"]["retention"] for r in records if r["cell"]["strategy"] == s]) for s in ("finetune", "l2")}
    assert grids["retention minus finetune"]["l2"].loc[1.0, 0.0] == pytest.approx(mean["l2"] - mean["finetune"], abs=1e-12)
    assert (grids["retention minus finetune"]["finetune"].to_numpy() == 0).all()
    code, _, err = run_cli(capsys, "leaderboard", "--store", str(store), "--output", str(tmp_path / "g.csv"),
                           "--html", str(page))
    assert code == 0, err
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    for group in ("latent_dim=4", "latent_dim=8"):
        assert f'alt="{group}: transfer, retention, retention minus finetune over (rho_a, rho_b)"' in dom
    tuned = dom.split('id="tuning"')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", tuned)
    assert [r[0] for r in rows] == ["finetune", "l2"]
    assert rows[1][1].startswith("strength = ") and rows[1][3] == "2 / 2" and float(rows[1][2]) > 0
    assert rows[0][1] == "nothing to tune"
    provenance = dom.split("<h2>Provenance</h2>")[1].split("</table>")[0]
    assert "{" not in provenance and "validation" in provenance
