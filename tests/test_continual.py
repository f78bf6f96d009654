"""Continual evaluation: the recorded curves (against gradient descent in closed form and against the engine's
own evaluation) and their metrics (against slow references written from the paper's formulas)."""
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from fake_data import write_idx_dataset

from clbench import ClbenchError, evaluate, make_strategy, make_stream, run
from clbench.core import metrics
from clbench.core.continual import subsample

# --- metrics against slow references ------------------------------------------------------------------------------

def random_curves(rng, T, per_task, every):
    """Curves shaped as the engine records them: step 0, every ``every`` steps, each task's end; seen + next task."""
    steps, rows, boundaries = [], [], []
    step = 0
    for i in range(T):
        boundaries.append(step)
        marks = [0] if i == 0 else []
        marks += [s for s in range(step + 1, step + per_task[i] + 1) if s % every == 0 or s == step + per_task[i]]
        for s in marks:
            row = [float(rng.random()) if j <= i + 1 else math.nan for j in range(T)]
            steps.append(s)
            rows.append(row)
        step += per_task[i]
    return steps, rows, boundaries


def ref_min_acc(steps, rows, boundaries):
    T = len(boundaries)
    lows = []
    for j in range(T - 1):
        low = math.inf
        for s, row in zip(steps, rows):
            if s > boundaries[j + 1] and not math.isnan(row[j]):
                low = min(low, row[j])
        lows.append(low)
    return sum(lows) / len(lows)


def ref_windowed(steps, rows, boundaries, w, rise):
    T = len(boundaries)
    total = 0.0
    for j in range(T):
        a = [row[j] for s, row in zip(steps, rows) if s >= boundaries[j] and not math.isnan(row[j])]
        best = 0.0
        for p in range(len(a)):
            for q in range(p + 1, min(p + w, len(a))):
                best = max(best, a[q] - a[p] if rise else a[p] - a[q])
        total += best
    return total / T


def ref_gaps(steps, rows, boundaries):
    T = len(boundaries)
    G = [[math.nan] * T for _ in range(T)]
    for k in range(1, T):
        end = boundaries[k + 1] if k + 1 < T else math.inf
        for j in range(k):
            before = [row[j] for s, row in zip(steps, rows) if s <= boundaries[k] and not math.isnan(row[j])][-1]
            low = min(row[j] for s, row in zip(steps, rows) if boundaries[k] < s <= end)
            G[k][j] = before - low
    return G


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_slow_references_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(2, 6))
    per_task = [int(rng.integers(3, 40)) for _ in range(T)]
    steps, rows, boundaries = random_curves(rng, T, per_task, every=int(rng.integers(1, 8)))
    args = (steps, rows, boundaries)
    lo = ref_min_acc(*args)
    assert metrics.min_acc(*args) == pytest.approx(lo, abs=1e-12)
    assert metrics.wc_acc(*args) == pytest.approx(rows[-1][T - 1] / T + (1 - 1 / T) * lo, abs=1e-12)
    for w in (2, 5, 10):
        assert metrics.windowed_forgetting(*args, w=w) == pytest.approx(ref_windowed(*args, w, False), abs=1e-12)
        assert metrics.windowed_plasticity(*args, w=w) == pytest.approx(ref_windowed(*args, w, True), abs=1e-12)
    np.testing.assert_allclose(metrics.stability_gaps(*args), ref_gaps(*args), atol=1e-12)
    summary = metrics.continual_summary({"step": steps, "score": rows, "boundaries": boundaries})
    assert summary["wf10"] == pytest.approx(ref_windowed(*args, 10, False), abs=1e-12)
    assert summary["stability_gap"] == pytest.approx(np.nanmean(ref_gaps(*args)), abs=1e-12)


def test_metrics_on_a_hand_made_stability_gap():
    # task 1 learns to 0.9, collapses to 0.3 when task 2 starts, recovers to 0.7
    steps, boundaries = [0, 1, 2, 3, 4, 5], [0, 2]
    rows = [[0.1, 0.1], [0.5, 0.1], [0.9, 0.1], [0.3, 0.4], [0.6, 0.7], [0.7, 0.8]]
    args = (steps, rows, boundaries)
    assert metrics.min_acc(*args) == pytest.approx(0.3)
    assert metrics.wc_acc(*args) == pytest.approx(0.5 * 0.8 + 0.5 * 0.3)
    assert metrics.stability_gaps(*args)[1, 0] == pytest.approx(0.6)
    # task 1's largest drop 0.9 -> 0.3; task 2's series starts at its boundary (step 2: 0.1 -> 0.8)
    assert metrics.windowed_forgetting(*args) == pytest.approx((0.6 + 0.0) / 2)
    assert metrics.windowed_plasticity(*args) == pytest.approx((0.8 + 0.7) / 2)
    assert metrics.windowed_plasticity(*args, w=2) == pytest.approx((0.4 + 0.3) / 2)


def test_bad_curves_and_windows_are_clear_errors():
    with pytest.raises(ClbenchError, match="boundaries"):
        metrics.min_acc([0, 1], [[0.1, 0.2], [0.3, 0.4]], [0])
    with pytest.raises(ClbenchError, match="window"):
        metrics.windowed_forgetting([0, 1], [[0.1], [0.2]], [0], w=1)
    with pytest.raises(ClbenchError, match="training order"):
        metrics.min_acc([1, 0], [[0.1, 0.2], [0.3, 0.4]], [0, 0])


# --- curves against theory and against the engine ------------------------------------------------------------------

def test_teacher_student_curve_follows_gradient_descent_in_closed_form():
    Ns, Nx, Ny, eta, epochs = 6, 60, 3, 0.02, 25
    stream = make_stream("teacher-student", tasks=2, rho_a=0.6, rho_b=0.2, latent_dim=Ns, input_dim=Nx,
                         output_dim=Ny, seed=5)
    # SGD at lr = eta * Ny / 2 on ||B - W A||^2 / Ny is W <- W + eta (B - W A) A^T (see the stream)
    r = run(stream, make_strategy("finetune", epochs=epochs, lr=eta * Ny / 2), device="cpu", progress=False,
            eval_every=1)
    A = [t.metadata["A"].double() for t in stream]
    B = [t.metadata["B"].double() for t in stream]

    def W_at(W0, A2, B2, t):
        # E_t = B2 - W_t A2 = E_0 (I - eta A2^T A2)^t, so W_t = W0 + E_0 V diag((1 - (1 - eta s^2)^t) / s^2) V^T A2^T
        _, s, Vh = torch.linalg.svd(A2, full_matrices=False)
        factor = (1 - (1 - eta * s**2) ** t) / s**2
        return W0 + (B2 - W0 @ A2) @ Vh.T @ torch.diag(factor) @ Vh @ A2.T

    def error(W, j):
        return float(((B[j] - W @ A[j]) ** 2).sum() / Ny)

    W0 = torch.zeros(Ny, Nx, dtype=torch.float64)
    W1 = W_at(W0, A[0], B[0], epochs)
    init = [error(W0, 0), error(W0, 1)]
    c = r.curves
    assert c["boundaries"] == [0, epochs] and c["step"] == list(range(2 * epochs + 1))
    score = np.array(c["score"], dtype=float)
    for n, step in enumerate(c["step"]):
        W = W_at(W0, A[0], B[0], step) if step <= epochs else W_at(W1, A[1], B[1], step - epochs)
        expect = [1 - error(W, 0) / init[0], 1 - error(W, 1) / init[1]]
        np.testing.assert_allclose(score[n], expect, rtol=0, atol=2e-5)
    np.testing.assert_allclose(c["error_at_init"], init, rtol=1e-5)
    # the end-of-task evaluations are R's rows (the subsample is the whole test set here)
    np.testing.assert_allclose(score[[epochs, 2 * epochs]], np.array(r.R)[1:], atol=1e-6)
    assert r.metrics["min_acc"] == pytest.approx(score[epochs + 1:, 0].min())


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return str(write_idx_dataset(tmp_path_factory.mktemp("mnist"), train=300, test=120))


# one forward for all tasks; the same with per-task heads selected afterwards; one forward per task (gates)
@pytest.mark.parametrize("name,strategy", [("permuted-mnist", "finetune"), ("split-mnist", "finetune"),
                                           ("permuted-mnist", "activity-gating")])
def test_curves_equal_the_engine_evaluation_on_the_subsample_and_leave_training_alone(mnist_root, name, strategy):
    if name == "split-mnist":
        split = make_stream(name, scenario="task", root=mnist_root)
        image_stream = dataclasses.replace(split, tasks=split.tasks[:3])
    else:
        image_stream = make_stream(name, tasks=3, root=mnist_root, seed=1)
    n_train, n_test = len(image_stream[0].train_x), len(image_stream[0].test_x)
    kw = dict(epochs=2, batch_size=32)
    plain = run(image_stream, make_strategy(strategy, **kw), device="cpu", seed=3, progress=False)
    trained = make_strategy(strategy, **kw)
    r = run(image_stream, trained, device="cpu", seed=3, progress=False, eval_every=4, eval_samples=20)
    assert r.R == plain.R  # evaluating on the way consumes no randomness and changes no weight
    c = r.curves
    score = np.array(c["score"], dtype=float)
    steps_per_task = 2 * math.ceil(n_train / 32)
    assert c["boundaries"] == [0, steps_per_task, 2 * steps_per_task]
    assert c["step"][:3] == [0, 4, 8] and c["step"][-1] == 3 * steps_per_task
    # seen tasks and the next one: NaN exactly for tasks beyond i + 1
    for s, row in zip(c["step"], score):
        i = min(max(0, np.searchsorted(c["boundaries"], s, side="left") - 1), 2)
        assert np.isnan(row[i + 2:]).all() and not np.isnan(row[:i + 2]).any()
    # the last evaluation against the engine's own evaluate() on a stream cut down to the same subsample
    picked = [subsample(len(t.test_x), 20, 3, j) for j, t in enumerate(image_stream)]
    assert n_test > 20 and all(len(p) == 20 and len(set(p.tolist())) == 20 for p in picked)
    cut = [dataclasses.replace(t, test_x=t.test_x[p], test_y=t.test_y[p]) for t, p in zip(image_stream, picked)]
    assert (cut[0].head is not None) == (name == "split-mnist")
    np.testing.assert_allclose(score[-1], evaluate(trained, cut, "ce"), atol=1e-12)
    assert {"min_acc", "wc_acc", "wf10", "wp10", "stability_gap"} <= set(r.metrics)


def test_subsample_depends_on_seed_and_task_only():
    a, b = subsample(1000, 100, 7, 2), subsample(1000, 100, 7, 2)
    assert (a == b).all() and (np.diff(a) > 0).all()
    assert not (a == subsample(1000, 100, 8, 2)).all() and not (a == subsample(1000, 100, 7, 3)).all()
    assert (subsample(30, 100, 7, 0) == np.arange(30)).all()


def test_bad_options_are_clear_errors():
    s = make_stream("teacher-student", input_dim=20, latent_dim=4, output_dim=2)
    for kw, word in (({"eval_every": -1}, "eval_every"), ({"eval_every": 2.5}, "eval_every"),
                     ({"eval_every": 5, "eval_samples": 0}, "eval_samples")):
        with pytest.raises(ClbenchError, match=word):
            run(s, make_strategy("finetune", epochs=1), device="cpu", progress=False, **kw)
    assert run(s, make_strategy("finetune", epochs=1), device="cpu", progress=False, eval_every=0).curves is None


# --- command line, sweeps, suites, reports -------------------------------------------------------------------------

TS = ["--stream", "teacher-student", "--stream-arg", "tasks=3", "--stream-arg", "input_dim=40",
      "--stream-arg", "latent_dim=6", "--stream-arg", "rho_a=0.9", "--stream-arg", "rho_b=0.0"]


def cli_main(capsys, *args):
    from clbench.cli import commands as cli

    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_run_records_curves_and_plots_them(tmp_path, capsys):
    result, png = tmp_path / "r.json", tmp_path / "c.png"
    code, _, err = cli_main(capsys, "run", *TS, "--strategy-arg", "epochs=12", "--eval-every", "5", "--output",
                            str(result), "--quiet")
    assert code == 0, err
    data = json.loads(result.read_text())
    assert data["curves"]["step"] == [0, 5, 10, 12, 15, 20, 24, 25, 30, 35, 36]
    assert data["curves"]["boundaries"] == [0, 12, 24] and data["metrics"]["min_acc"] is not None
    code, out, err = cli_main(capsys, "plot", "curves", str(result), "--output", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli_main(capsys, "run", *TS, "--strategy-arg", "epochs=2", "--output", str(result), "--quiet")
    code, _, err = cli_main(capsys, "plot", "curves", str(result), "--output", str(png))
    assert code == 2 and "no continual-evaluation curves" in err and "--eval-every" in err
    code, _, err = cli_main(capsys, "run", *TS, "--eval-samples", "10", "--quiet")
    assert code == 2 and "give --eval-every" in err


def test_sweep_with_continual_evaluation_stores_curves_and_leaderboard_columns(tmp_path, capsys):
    from clbench.experiments.store import Store
    from clbench.reporting import leaderboard

    common = ["sweep", *TS, "--strategy", "finetune,l2", "--strategy-arg", "epochs=6", "--seeds", "0,1", "--quiet"]
    code, _, err = cli_main(capsys, *common, "--eval-every", "2", "--eval-samples", "4", "--store", str(tmp_path / "c"))
    assert code == 0, err
    records = list(Store(tmp_path / "c").records())
    assert len(records) == 4 and all(r["cell"]["continual"] == {"eval_every": 2, "eval_samples": 4} for r in records)
    assert all(r["extra"]["batched_members"] == 2 for r in records)  # each strategy's two seeds ran as one batch
    # the stored curves are the engine's for the same run (batched: to float tolerance)
    r = next(r for r in records if r["cell"]["strategy"] == "l2" and r["cell"]["seed"] == 1)
    stream = make_stream("teacher-student", tasks=3, input_dim=40, latent_dim=6, rho_a=0.9, rho_b=0.0, seed=1)
    direct = run(stream, make_strategy("l2", epochs=6), device="cpu", seed=1, progress=False, eval_every=2,
                 eval_samples=4)
    np.testing.assert_allclose(np.array(r["curves"]["score"], dtype=float), direct.curves["score"], atol=1e-6)
    board = leaderboard.build(Store(tmp_path / "c"))
    assert {"min_acc_mean", "min_acc_ci95", "wc_acc_mean"} <= set(board.columns)
    assert board["min_acc_mean"].notna().all()
    code, _, err = cli_main(capsys, *common, "--store", str(tmp_path / "plain"))
    assert code == 0, err
    assert not {"min_acc_mean", "wc_acc_mean"} & set(leaderboard.build(Store(tmp_path / "plain")).columns)


def test_continual_tables_in_sweep_files_and_suites_are_checked(tmp_path):
    from clbench.experiments import suite as suites
    from clbench.experiments import sweep

    spec = {"stream": [{"name": "teacher-student"}], "strategy": [{"name": "finetune"}]}
    with pytest.raises(ClbenchError, match="unknown key 'eval_evry'; did you mean 'eval_every'"):
        sweep.expand({**spec, "continual": {"eval_evry": 5}})
    with pytest.raises(ClbenchError, match="eval_samples must be"):
        sweep.expand({**spec, "continual": {"eval_every": 5, "eval_samples": -1}})
    assert "continual" not in sweep.expand(spec)[0]  # cells without it keep their ids
    assert sweep.expand({**spec, "continual": {"eval_every": 5}})[0]["continual"] == {"eval_every": 5,
                                                                                      "eval_samples": 1000}
    text = ('version = 1\nseeds = [0]\nmetric = "{metric}"\n{table}\n[[stream]]\nname = "teacher-student"\n'
            '[[strategy]]\nname = "finetune"\n')
    path = tmp_path / "s.toml"
    plain_text = text.format(metric="acc", table="")
    path.write_text(plain_text)
    plain = suites.load(path)
    path.write_text(text.format(metric="wc_acc", table="[continual]\neval_every = 10"))
    with_curves = suites.load(path)
    assert with_curves.protocol_hash != plain.protocol_hash
    cell = suites.cells(with_curves, "finetune", {}, [0], None)[0]
    assert cell["continual"] == {"eval_every": 10, "eval_samples": 1000}
    assert "continual" not in suites.cells(plain, "finetune", {}, [0], None)[0]
    path.write_text(text.format(metric="acc", table="[continual]\neval_every = 10\nsamples = 5"))
    with pytest.raises(ClbenchError, match="unknown key 'samples'"):
        suites.load(path)
    path.write_text(text.format(metric="min_acc", table=""))
    with pytest.raises(ClbenchError, match="needs continual evaluation"):
        suites.load(path)


# --- the batched path --------------------------------------------------------------------------------------------

CONTINUAL_METRICS = ("min_acc", "wc_acc", "wf10", "wp10", "stability_gap")


@pytest.fixture
def one_thread():
    """Tiny models: one thread avoids the thread-pool overhead that dominates them on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batched_against_engine(specs, eval_every, eval_samples, atol=1e-5, **model):
    """specs: (stream, strategy name, its arguments, seed) per member; the batched curves against each member's
    own engine run."""
    from clbench.batched import Member, run_batched

    members = [Member(stream, make_strategy(name, **args), seed) for stream, name, args, seed in specs]
    batched = run_batched(members, device="cpu", eval_every=eval_every, eval_samples=eval_samples, **model)
    for (stream, name, args, seed), got in zip(specs, batched):
        assert not isinstance(got, Exception), got
        want = run(stream, make_strategy(name, **args), device="cpu", seed=seed, progress=False,
                   eval_every=eval_every, eval_samples=eval_samples, **model)
        assert got.extra["batched_members"] == len(specs)
        for key in ("step", "boundaries", "eval_every", "eval_samples"):
            assert got.curves[key] == want.curves[key], key
        np.testing.assert_allclose(np.array(got.curves["score"], dtype=float),
                                   np.array(want.curves["score"], dtype=float), atol=atol, rtol=0)
        if "error_at_init" in want.curves:
            np.testing.assert_allclose(got.curves["error_at_init"], want.curves["error_at_init"], rtol=1e-6)
        for key in CONTINUAL_METRICS:
            assert got.metrics[key] == pytest.approx(want.metrics[key], abs=atol), key
    assert len({round(r.metrics["stability_gap"], 6) for r in batched}) > 1  # the members really differ
    return batched


def test_batched_curves_equal_each_members_engine_curves_regression(one_thread):
    """ewc-diag at three strengths on three (rho_a, rho_b) points and seeds of the teacher-student (MSE): the
    steps, boundaries, scores and every derived metric of each member are those of its own run."""
    def ts(a, b, seed):
        return make_stream("teacher-student", rho_a=a, rho_b=b, input_dim=60, latent_dim=8, output_dim=3, tasks=3,
                           mode="sampled", samples=200, seed=seed)

    kw = {"epochs": 3, "batch_size": 32}  # 7 steps a task: evaluations at every 4th step and at task ends
    specs = [(ts(a, b, seed), "ewc-diag", {"strength": s, **kw}, seed)
             for (a, b), seed, s in (((0.0, 1.0), 0, 0.1), ((0.5, 0.5), 1, 1.0), ((1.0, 0.0), 2, 10.0),
                                     ((0.5, 0.5), 1, 10.0))]
    batched = batched_against_engine(specs, eval_every=4, eval_samples=50)
    assert batched[0].curves["boundaries"] == [0, 21, 42] and batched[0].curves["step"][:3] == [0, 4, 8]


@pytest.mark.parametrize("name,scenario,args", [("replay", "task", {"buffer_size": 60}),
                                                ("activity-gating", "domain", {})])
def test_batched_curves_equal_each_members_engine_curves_classification(mnist_root, name, scenario, args, one_thread):
    """Permuted images (cross-entropy): task heads selected after one forward (replay, whose batches depend on
    the order), and one forward per task for task gates (activity gating); members differ in seed and
    rho_a, and share stored images."""
    kw = {"epochs": 2, "batch_size": 32, "lr": 0.05}
    specs = [(make_stream("permuted-mnist", tasks=3, root=mnist_root, seed=seed, scenario=scenario, rho_a=rho_a),
              name, {**args, **kw}, seed) for seed, rho_a in ((0, 0.5), (1, 0.5), (0, 0.0))]
    batched_against_engine(specs, eval_every=3, eval_samples=40, model_name="mlp", model_args={"widths": (32, 32)})


# --- reports of continual sweeps and suites -----------------------------------------------------------------------

GRID_ARGS = ["--stream", "teacher-student", "--stream-arg", "tasks=2", "--stream-arg", "input_dim=40",
             "--stream-arg", "latent_dim=6", "--stream-arg", "rho_a=0.5,1.0", "--stream-arg", "rho_b=0.0,1.0"]


def test_plot_similarity_draws_the_stability_gap_map_of_a_continual_sweep(tmp_path, capsys, one_thread):
    from clbench.experiments.store import Store
    from clbench.reporting import leaderboard, plots

    store = tmp_path / "s"
    code, _, err = cli_main(capsys, "sweep", *GRID_ARGS, "--strategy", "finetune,l2", "--strategy-arg", "epochs=6",
                            "--seeds", "0,1", "--eval-every", "2", "--eval-samples", "20", "--store", str(store),
                            "--quiet")
    assert code == 0, err
    out = tmp_path / "sim.png"
    code, printed, err = cli_main(capsys, "plot", "similarity", "--store", str(store), "--output", str(out))
    assert code == 0, err
    gap_png = tmp_path / "sim-stability-gap.png"
    assert str(gap_png) in printed and gap_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each cell of the map: the mean over seeds of the gap recomputed from the stored curves
    grids = plots.similarity_grids(leaderboard.runs_table(Store(store)), "stability_gap")
    assert sorted(grids) == ["finetune", "l2"]  # one config each: named by the strategy alone
    for r in Store(store).records():
        c = r["curves"]
        score = np.array(c["score"], dtype=float)
        assert metrics.stability_gaps(c["step"], score, c["boundaries"])[1, 0] == pytest.approx(
            r["metrics"]["stability_gap"], abs=1e-12)
    for label, grid in grids.items():
        for a in (0.5, 1.0):
            for b in (0.0, 1.0):
                gaps = [r["metrics"]["stability_gap"] for r in Store(store).records()
                        if r["cell"]["strategy"] == label.split()[0] and r["cell"]["stream_args"] == {"tasks": 2, "input_dim": 40,
                                                                                            "latent_dim": 6, "rho_a": a,
                                                                                            "rho_b": b}]
                assert len(gaps) == 2 and grid.loc[a, b] == pytest.approx(np.mean(gaps), abs=1e-12)
    assert grids["finetune"].loc[1.0, 0.0] > grids["finetune"].loc[1.0, 1.0]  # the catastrophic corner drops most
    # a sweep without curves draws no gap map, and asking for one says how to get it
    plain = tmp_path / "plain"
    cli_main(capsys, "sweep", *GRID_ARGS, "--strategy", "finetune", "--strategy-arg", "epochs=2", "--store", str(plain),
             "--quiet")
    code, printed, err = cli_main(capsys, "plot", "similarity", "--store", str(plain), "--output", str(tmp_path / "p.png"))
    assert code == 0 and "stability-gap" not in printed and not (tmp_path / "p-stability-gap.png").exists()
    with pytest.raises(ClbenchError, match="eval_every"):
        plots.stability_gap_maps(leaderboard.runs_table(Store(plain)), tmp_path / "g.png")


CONTINUAL_SUITE = """\
version = 1
description = "teacher-student with continual evaluation, for tests"
seeds = [0, 1]
metric = "wc_acc"
[training]
epochs = 6
[validation]
protocol = "holdout"
share = 0.2
seed = 3
[tuning]
trials = 2
seeds = [100]
[continual]
eval_every = 2
eval_samples = 20
[[stream]]
name = "teacher-student"
args = { tasks = 2, rho_a = [0.5, 1.0], rho_b = 0.0, input_dim = 40, latent_dim = 6 }
[[strategy]]
name = "finetune"
"""


def test_suite_page_with_continual_evaluation_shows_worst_case_columns_in_a_headless_browser(tmp_path, capsys,
                                                                                             one_thread):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None and os.environ.get("CLBENCH_REQUIRE_BROWSER") == "1":
        pytest.fail("CLBENCH_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install chromium)")
    if browser is None:
        pytest.skip("needs a headless browser: apt-get install chromium")
    from clbench.experiments.store import Store

    suite, store, page = tmp_path / "cont.toml", tmp_path / "store", tmp_path / "board.html"
    suite.write_text(CONTINUAL_SUITE)
    code, _, err = cli_main(capsys, "benchmark", "--suite", str(suite), "--store", str(store), "--quiet")
    assert code == 0, err
    code, _, err = cli_main(capsys, "leaderboard", "--store", str(store), "--output", str(tmp_path / "b.csv"),
                            "--html", str(page))
    assert code == 0, err
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert 'data-sorted-by="0"' in dom, proc.stderr[-2000:]  # the page's script ran
    board = dom.split('id="board"')[1].split("</table>")[0]
    headers = re.findall(r"<th[^>]*>([^<]+)</th>", board.split("<tbody>")[0])
    assert {"wc_acc_mean", "min_acc_mean", "stability_gap_mean"} <= set(headers)
    # the page's min-ACC: the mean over seeds of each seed's mean over the stream configs of the stored metric
    records = list(Store(store).records())
    by_seed = [np.mean([r["metrics"]["min_acc"] for r in records if r["cell"]["seed"] == s]) for s in (0, 1)]
    cells = re.findall(r'<td data-v="([^"]*)"', board.split("<tbody>")[1])
    assert float(cells[headers.index("min_acc_mean")]) == pytest.approx(np.mean(by_seed), abs=1e-9)
    assert 'alt="transfer, retention, stability gap over (rho_a, rho_b)"' in dom  # one panel row per strategy


def test_committed_stability_gap_records_learn_every_task_and_show_the_readout_effect():
    """leaderboards/stability-gap.toml's records: every task learned before its gap is read, the stored gap is
    the one of the stored curves, and the gap grows as readout similarity falls at the same input similarity."""
    from pathlib import Path

    from clbench.experiments.store import Store
    from clbench.experiments.sweep import cell_id, expand, load_spec

    root = Path(__file__).resolve().parents[1] / "leaderboards"
    records = list(Store(root / "results" / "stability-gap", create=False).records())
    cells = expand(load_spec(root / "stability-gap.toml"))
    assert sorted(r["id"] for r in records) == sorted(cell_id(c) for c in cells)  # every cell of the file, no other
    gaps: dict = {}
    for r in records:
        assert r["complete"] and r["R"][1][0] > 0.75 and r["R"][2][1] > 0.7  # tasks 1 and 2 learned
        assert r["extra"]["batched_members"] > 1 and r["config"]["provenance"]["dataset"] == "fashion-mnist"
        c = r["curves"]
        G = metrics.stability_gaps(c["step"], np.array(c["score"], dtype=float), c["boundaries"])
        assert G[1, 0] == pytest.approx(r["metrics"]["stability_gap"], abs=1e-12)
        key = (r["cell"]["strategy"], r["cell"]["stream_args"]["rho_a"], r["cell"]["stream_args"]["rho_b"])
        gaps.setdefault(key, []).append(G[1, 0])
    mean = {k: np.mean(v) for k, v in gaps.items()}
    assert all(len(v) == 3 for v in gaps.values())
    for strategy in ("finetune", "ewc-diag", "replay"):
        for rho_a in (0.0, 0.5, 1.0):
            assert mean[strategy, rho_a, 0.0] > mean[strategy, rho_a, 1.0]
