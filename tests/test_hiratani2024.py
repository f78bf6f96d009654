"""Hiratani (NeurIPS 2024): the authors' settings reachable in clbench, and the reproduction."""
import math

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


def _engine(strategy_name, **args):
    import torch

    stream = make_stream("teacher-student", rho_a=0.7, rho_b=0.4, input_dim=300, seed=4)
    strategy = make_strategy(strategy_name, epochs=30, **args)
    r = run(stream, strategy, device="cpu", seed=4, progress=False)
    return torch.tensor(r.extra["raw"], dtype=torch.float64), strategy, r


def test_latent_form_of_the_reproduction_matches_the_engine_seed_by_seed():
    """The reproduction's fast simulator gives the engine's raw errors with clbench's strategies and gates."""
    from clbench.reproduce import hiratani2024 as h
    from clbench.strategies.activity_gating import random_gate

    T = h.mix(h.base_teachers([4], input_dim=300), 0.7, 0.4)
    check = lambda raw, sim: np.testing.assert_allclose(raw.numpy(), sim["raw"][0].numpy(), atol=2e-4)  # noqa: E731
    check(_engine("finetune")[0], h.simulate("vanilla", T, [4], epochs=30))
    check(_engine("l2", anchor_initial=True, gamma=0.5)[0], h.simulate("l2", T, [4], epochs=30, gamma=0.5))
    check(_engine("ewc-full", gamma=0.3)[0], h.simulate("ewc-full", T, [4], epochs=30, gamma=0.3))
    raw, s, _ = _engine("activity-gating", alpha=0.5, sampling="bernoulli", rescale=False)
    check(raw, h.simulate("gating", T, [4], epochs=30, gates=(s.gates[0][0][None].double(), s.gates[1][0][None].double())))
    raw, s, r = _engine("adaptive-gating", alpha=0.5, sampling="bernoulli", rescale=False)
    sim = h.simulate("adaptive", T, [4], epochs=30, gates=(s.gates[0][0][None].double(), s.gates[1][0][None].double()))
    check(raw, sim)
    assert float(sim["rho_g"][0]) == pytest.approx(r.extra["gate_reuse_probability"]["1"], abs=1e-4)
    raw, s, _ = _engine("plasticity-gating", alpha=0.5)
    masks = [random_gate(300, 0.5, s.base_seed + 7919 * t, False)[None].double() for t in (0, 1)]
    check(raw, h.simulate("plasticity", T, [4], epochs=30, gates=tuple(masks)))


def test_reproduce_quick_matches_the_closed_forms_within_seed_noise(tmp_path):
    from clbench.reproduce import hiratani2024 as h
    from clbench.reproduce import reproduce

    path = reproduce("hiratani2024", tmp_path / "report", quick=True)
    import json

    results = json.loads((tmp_path / "report" / "results.json").read_text())
    for panel, d in results["deviations"].items():
        assert d["outside_noise"] == 0, (panel, d)  # within 3 SE + 2 Ns/Nx of the closed forms at every point
    assert results["deviations"]["vanilla"]["max_deviation"] < 0.2
    full = {r["gamma"]: r["retention"][0] for r in results["regularisers"]["ewc-full"]}
    l2 = {r["gamma"]: r["retention"][0] for r in results["regularisers"]["l2"]}
    assert full[0.2] > 0.95 and l2[0.2] < 0.6  # the paper: full Fisher retains whatever the similarity, L2 does not
    text = path.read_text()
    assert "Largest deviations from theory" in text and "What differs from the paper" in text
    assert all((tmp_path / "report" / f).stat().st_size > 1000 for f in ("vanilla_grid.png", "gating.png", "regularisers.png"))
    assert h.gating_average(1.0) == pytest.approx((1 / 6, 1 - (1 / 5 - 1 / 4 + 1 / 3)))
    with pytest.raises(ClbenchError, match="unknown paper"):
        reproduce("nope", tmp_path)


def test_permuted_stream_options_of_the_authors(tmp_path, monkeypatch):
    """pm/pm_data.py: any derangement of the chosen pixels; task 1 already a partial permutation of the raw images."""
    from fake_data import write_idx_dataset

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    root = str(write_idx_dataset(tmp_path / "m", train=50, test=20))
    make = lambda **kw: make_stream("permuted-mnist", tasks=3, rho_a=0.75, root=root, readout="latent", **kw)  # noqa: E731
    default = make()
    assert (default.tasks[0].metadata["permutation"] == np.arange(784)).all()
    cycles = []
    for kind in ("cycle", "derangement"):
        s = make(permutation=kind, first_task="permuted", seed=3)
        perms = [np.arange(784)] + [t.metadata["permutation"] for t in s.tasks]
        for before, after in zip(perms, perms[1:]):
            assert int((before != after).sum()) == 196  # exactly (1 - rho_a) 784 pixels move, none stays
        moved = perms[1] != perms[0]
        seen, p, n = set(), int(np.flatnonzero(moved)[0]), 0
        while p not in seen:  # follow the cycle through the first moved pixel
            seen.add(p)
            p, n = int(perms[1][p]), n + 1
        cycles.append(n)
    assert cycles[0] == 196 and cycles[1] < 196  # one cycle vs a uniform derangement (almost never one cycle)
    with pytest.raises(ClbenchError, match="permutation must be"):
        make(permutation="swap")
    with pytest.raises(ClbenchError, match="first_task must be"):
        make(first_task="x")


def test_small_mlp_init_and_unshuffled_training():
    from clbench.models.networks import build_model

    model = build_model("mlp", (1, 28, 28), 10, widths=(1500,), init="small")
    w = model[1].weight
    assert float(w.detach().std()) == pytest.approx(1 / 784, rel=0.02) and float(model[3].weight.detach().std()) == pytest.approx(1 / 1500, rel=0.05)
    with pytest.raises(ClbenchError, match="init must be"):
        build_model("mlp", (4,), 2, init="big")
    glorot = build_model("mlp", (1, 28, 28), 10, widths=(400, 400), init="xavier")
    for layer in (glorot[1], glorot[3], glorot[5]):  # uniform on +-sqrt(6 / (fan_in + fan_out)), zero bias
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert not layer.bias.detach().any()
    R = {}
    for shuffle in (True, False):
        for seed in (0, 1):
            stream = make_stream("teacher-student", mode="sampled", samples=200, input_dim=100, seed=0)
            R[shuffle, seed] = run(stream, make_strategy("finetune", epochs=2, batch_size=50, shuffle=shuffle),
                                   device="cpu", seed=seed, progress=False).R
    assert R[False, 0] == R[False, 1]  # zero init, same order: the seed no longer matters
    assert R[True, 0] != R[True, 1]


def test_layerwise_fisher_gradient_is_the_authors_update():
    """pm_model.py update_wr_fim: dW2_reg = dW2 Phi / ||Phi||, dW1_reg = D W2^T W2 D dW1 X / (||W2^T W2|| ||X||)."""
    import torch

    from clbench.core.types import Stream, Task, TrainDefaults
    from clbench.fisher.layerwise import layerwise
    from clbench.models.networks import build_model

    torch.manual_seed(0)
    x = torch.randn(64, 12)
    task = Task(id=0, train_x=x, train_y=torch.zeros(64, 3), test_x=x, test_y=torch.zeros(64, 3))
    stream = Stream(name="s", tasks=[task], scenario="domain", loss="mse", input_shape=(12,), num_outputs=3,
                    defaults=TrainDefaults(model="mlp", model_args={}, epochs=1, batch_size=8, lr=0.1, optimizer="sgd"))
    strategy = make_strategy("ewc-full", fisher_form="layerwise", strength=0.7)
    strategy.setup(build_model("mlp", (12,), 3, widths=(9,)), stream)
    (m1, A1, G1), (m2, A2, G2) = layerwise(strategy, task, 64)
    strategy.after_task(task)
    W1, W2 = m1.weight.detach().double(), m2.weight.detach().double()
    z = x.double() @ W1.T + m1.bias.detach().double()
    phi, dphi = z.clamp(min=0), (z > 0).double()
    X, Phi, D = x.double().T @ x.double() / 64, phi.T @ phi / 64, torch.diag(dphi.mean(0))
    norm = lambda M: torch.linalg.matrix_norm(M, 2)  # noqa: E731
    dW1, dW2 = torch.randn(9, 12, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    with torch.no_grad():
        m1.weight += dW1.float()
        m2.weight += dW2.float()
        m1.bias += 1.0  # biases are not regularised
    strategy.penalty().backward()
    expected1 = 0.7 * D @ W2.T @ W2 @ D @ dW1 @ X / (norm(W2.T @ W2) * norm(X))
    expected2 = 0.7 * dW2 @ Phi / norm(Phi)
    torch.testing.assert_close(m1.weight.grad.double(), expected1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m2.weight.grad.double(), expected2, rtol=1e-4, atol=1e-6)
    assert float(m1.bias.grad.abs().max()) == 0.0
