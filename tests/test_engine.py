"""Engine behaviour: determinism, result contents, errors, user plugins."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import clbench
from clbench import ClbenchError, TrainingDiverged, make_strategy, make_stream, run
from clbench.core.registry import load_plugin

HERE = Path(__file__).parent


def small_stream(**kw):
    return make_stream("teacher-student", input_dim=200, latent_dim=10, output_dim=5, **kw)


def test_same_seed_same_matrix_other_seed_differs():
    kw = dict(mode="sampled", samples=300, seed=3)
    r1 = run(small_stream(**kw), make_strategy("finetune"), device="cpu", seed=3, progress=False)
    r2 = run(small_stream(**kw), make_strategy("finetune"), device="cpu", seed=3, progress=False)
    r3 = run(small_stream(mode="sampled", samples=300, seed=4), make_strategy("finetune"), device="cpu", seed=4,
             progress=False)
    assert r1.R == r2.R
    assert r1.R != r3.R


def test_result_contents_and_json(tmp_path):
    r = run(small_stream(tasks=3), make_strategy("l2", epochs=4), device="cpu", progress=False)
    R = np.array(r.R)
    assert R.shape == (4, 3)
    assert np.allclose(R[0], 0.0)  # W = 0 before training: normalised score 0
    assert len(r.loss_curves) == 3 and all(len(c) == 4 for c in r.loss_curves)
    assert r.loss_curves[0][-1] < r.loss_curves[0][0]
    assert r.parameter_count == 5 * 200
    assert r.wall_time_s > 0 and r.peak_memory_mb > 0
    assert r.config["epochs"] == 4 and r.config["lr"] == pytest.approx(1e-3 * 5 / 2) and r.config["strategy"] == "l2"
    assert set(r.metrics) == {"acc", "bwt", "fwt", "forgetting", "forgetting_last"}
    assert r.metrics["acc"] == pytest.approx(R[3].mean())
    assert {"clbench", "torch"} <= set(r.versions)
    path = tmp_path / "r.json"
    r.to_json(path)
    data = json.loads(path.read_text())
    assert data["R"] == r.R and data["metrics"]["fwt"] == pytest.approx(r.metrics["fwt"])


def test_joint_trains_on_all_seen_tasks():
    s = small_stream(rho_a=1.0, rho_b=0.0)  # same inputs, conflicting readouts
    fine = run(s, make_strategy("finetune"), device="cpu", progress=False).metrics
    joint = run(s, make_strategy("joint"), device="cpu", progress=False).metrics
    assert joint["retention"] > fine["retention"] + 0.5


def test_joint_descends_the_mean_of_the_task_losses():
    """Two identical tasks, full batch: joint's step (the mean of the two tasks' losses) is finetune's step on one
    of them, so the runs agree; a sum would double the step."""
    s = make_stream("teacher-student", tasks=2, rho_a=1.0, rho_b=1.0, mode="exact", input_dim=30, latent_dim=6)
    assert torch.equal(s[0].train_x, s[1].train_x) and torch.equal(s[0].train_y, s[1].train_y)
    fine = run(s, make_strategy("finetune", epochs=5, lr=0.5), device="cpu", seed=0, progress=False)
    joint = run(s, make_strategy("joint", epochs=5, lr=0.5), device="cpu", seed=0, progress=False)
    assert np.allclose(joint.R, fine.R, atol=1e-6)
    doubled = run(s, make_strategy("finetune", epochs=5, lr=1.0), device="cpu", seed=0, progress=False)
    assert not np.allclose(doubled.R[1], joint.R[1], atol=1e-4)


def test_divergence_keeps_computed_rows():
    with pytest.raises(TrainingDiverged, match="lower the learning rate") as info:
        run(small_stream(), make_strategy("finetune", lr=50.0), device="cpu", progress=False)
    partial = info.value.partial
    assert not partial.complete
    assert np.allclose(partial.R[0], 0.0)  # row 0 was computed before the failure
    assert all(math.isnan(v) for v in partial.R[1])


def test_scenario_mismatch_is_refused():
    s = small_stream()
    s.scenario = "class"
    with pytest.raises(ClbenchError, match="supports the task/domain"):
        run(s, make_strategy("activity-gating"), device="cpu", progress=False)


@pytest.mark.parametrize("bad, message", [
    (lambda: make_stream("teacher-student", rho_a=1.5), "rho_a must be in"),
    (lambda: make_stream("teacher-student", rho_bb=0.5), "Did you mean 'rho_b'"),
    (lambda: make_stream("teacher-stuent"), "Did you mean 'teacher-student'"),
    (lambda: make_strategy("ewc-full", strenght=1), "no argument 'strenght'"),
    (lambda: make_stream("teacher-student", mode="noisy"), "mode must be"),
    (lambda: make_strategy("activity-gating", alpha=0), "alpha must be > 0"),
])
def test_bad_arguments_raise_clear_errors(bad, message):
    with pytest.raises(ClbenchError, match=message):
        bad()


def test_ewc_full_refuses_models_too_large_and_names_kfac():
    s = small_stream()
    with pytest.raises(ClbenchError, match="Kronecker-factored"):
        run(s, make_strategy("ewc-full", fisher_form="exact", max_entries=1000, epochs=1), device="cpu", progress=False)


def test_ewc_diag_fisher_is_the_diagonal_of_the_full_fisher():
    from clbench.fisher import estimators as fisher

    s = small_stream()
    strategy = make_strategy("ewc-full", epochs=2)
    run(s, strategy, device="cpu", progress=False)
    form, rows = fisher.full(strategy, s[0], 1000)
    full_matrix = rows.T @ rows if form == "rows" else rows
    torch.testing.assert_close(torch.diagonal(full_matrix), fisher.diagonal(strategy, s[0], 1000), rtol=1e-4,
                               atol=1e-6)


def test_user_strategy_registers_and_runs_through_the_api():
    load_plugin(str(HERE / "plugin_strategy.py"))
    assert "test-shrink" in clbench.core.registry.names("strategy")
    r = run(small_stream(), make_strategy("test-shrink", strength=0.1), device="cpu", progress=False)
    assert r.extra["tasks_seen"] == 2
    plain = run(small_stream(), make_strategy("finetune"), device="cpu", progress=False)
    assert r.R[1][0] < plain.R[1][0]  # the penalty shrinks the solution: lower score on task 1


def test_custom_model_registers():
    @clbench.register_model("test-tiny")
    def tiny(input_shape, num_outputs, hidden: int = 3):
        """A tiny test network."""
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, num_outputs))

    r = run(small_stream(), make_strategy("finetune", epochs=2), model_name="test-tiny", model_args={"hidden": 4},
            device="cpu", progress=False)
    assert r.parameter_count == 200 * 4 + 4 + 4 * 5 + 5


def test_arguments_of_an_unhashable_builder():
    """Signatures are cached per function; a builder that cannot be a cache key (an instance of a dataclass,
    which defines __eq__ and so no hash) is still read, and a wrong argument still named."""
    from dataclasses import dataclass

    @dataclass
    class Tiny:
        scale: float = 1.0

        def __call__(self, input_shape, num_outputs, hidden: int = 3):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, num_outputs))

    clbench.register_model("test-unhashable")(Tiny())
    r = run(small_stream(), make_strategy("finetune", epochs=1), model_name="test-unhashable",
            model_args={"hidden": 4}, device="cpu", progress=False)
    assert r.parameter_count == 200 * 4 + 4 + 4 * 5 + 5
    with pytest.raises(ClbenchError, match="hiden"):
        run(small_stream(), make_strategy("finetune", epochs=1), model_name="test-unhashable",
            model_args={"hiden": 4}, device="cpu", progress=False)
