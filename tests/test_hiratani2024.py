"""Hiratani (NeurIPS 2024): the authors' settings reachable in clbench, and the reproduction."""
import numpy as np
import pytest

from clbench import ClbenchError, make_strategy, make_stream, run
from clbench.strategies.l2 import strength_from_gamma


@pytest.mark.parametrize("name", ["l2", "ewc-diag"])
def test_anchor_initial_learns_task_one_to_the_regularised_minimum(name):
    """Penalty on task 1 towards W = 0: W1 = B A^T (A A^T + lambda M)^-1 (M = I or diag(A A^T)), lambda from gamma."""
    stream = make_stream("teacher-student", rho_a=0.5, rho_b=0.5, input_dim=600, seed=2)
    gamma = 0.5
    r = run(stream, make_strategy(name, anchor_initial=True, gamma=gamma, epochs=60, lr=0.05), device="cpu", seed=2,
            progress=False)
    A, B = (stream.tasks[0].metadata[k].double().numpy() for k in ("A", "B"))
    lam = (600 / 30) * (1 / gamma - 1)
    M = np.eye(600) if name == "l2" else np.diag(np.diag(A @ A.T))
    W1 = B @ A.T @ np.linalg.inv(A @ A.T + lam * M)
    expected = ((B - W1 @ A) ** 2).sum() / 10
    assert np.array(r.extra["raw"])[1, 0] == pytest.approx(expected, rel=1e-3)
    assert 0.15 < expected / r.extra["raw"][0][0] < 0.35  # about (1 - gamma)^2: task 1 learned to the fraction gamma
    plain = run(make_stream("teacher-student", rho_a=0.5, rho_b=0.5, input_dim=600, seed=2),
                make_strategy(name, gamma=gamma, epochs=60, lr=0.05), device="cpu", seed=2, progress=False)
    assert plain.extra["raw"][1][0] < 1e-3  # without the anchor task 1 is learned fully


def test_strength_from_gamma_and_bad_input():
    stream = make_stream("teacher-student")
    assert strength_from_gamma(0.5, stream) == pytest.approx(2 * 100 * 1.0 / 10)
    assert strength_from_gamma(0.25, stream, "fisher") == pytest.approx(2 * 3.0 / 10)
    assert strength_from_gamma(1.0, stream) == 0.0
    with pytest.raises(ClbenchError, match="gamma must be in"):
        strength_from_gamma(0.0, stream)
    with pytest.raises(ClbenchError, match="anchor_initial is implemented for ewc-diag"):
        run(stream, make_strategy("ewc-full", anchor_initial=True, epochs=1), device="cpu", progress=False)
