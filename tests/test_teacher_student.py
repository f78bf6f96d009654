"""The engine against Hiratani's closed forms (teacher-student, NeurIPS 2024)."""
import numpy as np
import pytest
import torch

from clbench import make_strategy, make_stream, run
from clbench.streams.teacher_student import theory

GRID = [(a, b) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)]


def _metrics(strategy: str, rho_a: float, rho_b: float, seed: int = 0, **stream_args) -> dict:
    stream = make_stream("teacher-student", rho_a=rho_a, rho_b=rho_b, seed=seed, **stream_args)
    name, _, args = strategy.partition(":")
    kwargs = dict(kv.split("=") for kv in args.split(",")) if args else {}
    kwargs = {k: float(v) for k, v in kwargs.items()}
    return run(stream, make_strategy(name, **kwargs), device="cpu", seed=seed, progress=False).metrics


def test_stream_matrices_follow_the_similarity_rule():
    s = make_stream("teacher-student", rho_a=0.6, rho_b=-0.3, input_dim=4000, latent_dim=50, output_dim=50)
    A1, A2 = (t.metadata["A"].double() for t in s)
    B1, B2 = (t.metadata["B"].double() for t in s)
    overlap = lambda X, Y: float((X * Y).sum() / (X * X).sum().sqrt() / (Y * Y).sum().sqrt())
    assert overlap(A1, A2) == pytest.approx(0.6, abs=0.02)
    assert overlap(B1, B2) == pytest.approx(-0.3, abs=0.05)
    assert A1.var().item() == pytest.approx(1 / 50, rel=0.05)


def test_exact_mode_is_the_expected_loss_and_the_papers_update():
    """One engine epoch (full batch SGD, lr = eta Ny / 2) equals W <- W + eta (B - W A) A^T."""
    s = make_stream("teacher-student", tasks=1, input_dim=200, latent_dim=10, output_dim=5)
    task = s[0]
    A, B = task.metadata["A"].double(), task.metadata["B"].double()
    # the training loss at W = 0 is ||B||_F^2 / Ny
    assert torch.nn.functional.mse_loss(torch.zeros_like(task.train_y), task.train_y).item() == pytest.approx(
        float((B**2).sum() / 5), rel=1e-5)
    strategy = make_strategy("finetune", epochs=1)
    result = run(s, strategy, device="cpu", progress=False)
    W = strategy.model[1].weight.detach().double()
    expected = 1e-3 * B @ A.T  # one step from W = 0
    torch.testing.assert_close(W, expected, rtol=1e-4, atol=1e-7)
    # score after one step: 1 - ||B - W A||^2 / ||B||^2
    score = 1 - float(((B - W @ A) ** 2).sum() / (B**2).sum())
    assert result.R[1][0] == pytest.approx(score, abs=1e-5)


def test_finetune_matches_closed_form_on_grid():
    """Transfer rho_a(2 rho_b - rho_a) and retention 1 - rho_a^2(rho_a^2 - 2 rho_a rho_b + 1), within 0.05."""
    for rho_a, rho_b in GRID:
        runs = [_metrics("finetune", rho_a, rho_b, seed=s, output_dim=100) for s in range(4)]
        expected = theory(rho_a, rho_b)
        for key in ("transfer", "retention"):
            measured = np.mean([m[key] for m in runs])
            assert measured == pytest.approx(expected[key], abs=0.05), (rho_a, rho_b, key, measured)


def test_ewc_full_keeps_retention_where_finetune_forgets():
    checked = 0
    for rho_a, rho_b in [(a, b) for a in (0.5, 0.8, 0.9) for b in (0.0, 0.5)]:
        if theory(rho_a, rho_b)["retention"] >= 0.5:
            continue
        fine = _metrics("finetune", rho_a, rho_b)
        ewc = _metrics("ewc-full:strength=1", rho_a, rho_b)
        assert fine["retention"] < 0.5
        assert ewc["retention"] >= 0.95, (rho_a, rho_b, ewc)
        checked += 1
    assert checked >= 3


def test_ewc_full_penalty_is_the_closed_form_quadratic():
    """For the linear student the exact Fisher penalty is strength/2 tr(dW A A^T dW^T) (online form)."""
    s = make_stream("teacher-student", input_dim=300, latent_dim=10, output_dim=4)
    strategy = make_strategy("ewc-full", strength=2.0, epochs=3, form="online")
    run(s, strategy, device="cpu", progress=False)
    W = strategy.model[1].weight
    with torch.no_grad():
        W.add_(torch.randn_like(W) * 0.1)
        A = s[1].metadata["A"]  # Fisher of the last task (task 2), anchor after task 2
        dW = (W - strategy.penalties[0][1].view_as(W)).double()
        # summed over both tasks (decay = 1)
        expected = sum(float(torch.trace(dW @ (t.metadata["A"].double() @ t.metadata["A"].double().T) @ dW.T))
                       for t in s)
        assert float(strategy.penalty()) == pytest.approx(expected, rel=1e-4)
    assert A.shape == (300, 10)


def test_activity_gating_trades_transfer_for_retention():
    means = {}
    for alpha in (0.2, 1.0):
        runs = [_metrics(f"activity-gating:alpha={alpha}", a, b) for a, b in GRID]
        means[alpha] = {k: np.mean([m[k] for m in runs]) for k in ("transfer", "retention")}
    assert means[0.2]["retention"] > means[1.0]["retention"] + 0.2
    assert means[0.2]["transfer"] < means[1.0]["transfer"]


def test_sampled_mode_converges_near_exact():
    exact = _metrics("finetune", 0.5, 0.5)
    sampled = _metrics("finetune", 0.5, 0.5, mode="sampled")
    assert sampled["transfer"] == pytest.approx(exact["transfer"], abs=0.05)
    assert sampled["retention"] == pytest.approx(exact["retention"], abs=0.05)
