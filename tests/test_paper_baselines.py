"""Baselines exact to their papers: replay determinism, EWC forms, LwF weighting, export labels."""
import numpy as np
import pytest
import torch
from fake_data import write_idx_dataset

from clbench import make_strategy, make_stream, run


@pytest.fixture
def mnist_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    return str(write_idx_dataset(tmp_path / "mnist", train=2000, test=200))


# --- replay -------------------------------------------------------------------------------------------
def test_replay_is_bit_reproducible_with_two_threads(mnist_root):
    """A small buffer makes samples of one batch draw the same reservoir slot often."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [run(make_stream("permuted-mnist", tasks=3, root=mnist_root),
                    make_strategy("replay", buffer_size=16, epochs=1, batch_size=256), device="cpu", seed=3,
                    progress=False, model_args={"widths": (64,)}).R for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1]


def test_replay_reservoir_matches_one_by_one_sampling():
    """The batched update equals Vitter's algorithm run sample by sample on the same draws (later wins)."""
    from clbench.strategies.replay import Replay

    task = type("T", (), {"id": 0})()
    replay = Replay(buffer_size=8)
    replay.buffer.add(x=torch.arange(8.0).unsqueeze(1), y=torch.zeros(8), task=task.id)
    x = torch.arange(8.0, 808.0).unsqueeze(1)
    torch.manual_seed(0)
    slots = (torch.rand(800) * torch.arange(9, 809)).long()  # the draws add makes after the same seed
    assert len(slots[slots < 8]) > len(slots[slots < 8].unique())  # repeated slots within the batch
    expected = replay.buffer["x"].clone()
    for i, slot in enumerate(slots.tolist()):
        if slot < 8:
            expected[slot] = x[i]
    torch.manual_seed(0)
    replay.buffer.add(x=x, y=torch.zeros(800), task=task.id)
    assert torch.equal(replay.buffer["x"], expected)


# --- LwF ----------------------------------------------------------------------------------------------
def test_lwf_weighs_distillation_by_lambda_o_without_a_hidden_t_squared(mnist_root):
    """Li & Hoiem: loss = task loss + lambda_o * soft cross-entropy at T (here as KL: same up to a constant)."""
    import torch.nn.functional as F

    from clbench.models.networks import build_model

    stream = make_stream("permuted-mnist", tasks=2, root=mnist_root)
    x, y = stream[1].inputs(stream[1].train_x[:64]), stream[1].train_y[:64]
    losses = {}
    for t_squared in (False, True):
        torch.manual_seed(0)
        lwf = make_strategy("lwf", alpha=0.7, temperature=2.0, t_squared=t_squared)
        lwf.setup(build_model("mlp", (1, 28, 28), 10, widths=(32,)), stream)
        lwf.after_task(stream[0])
        with torch.no_grad():
            for p in lwf.model.parameters():
                p.add_(0.1 * torch.randn_like(p))  # the model moves away from the stored old model
        losses[t_squared] = float(lwf.training_loss(x, y, stream[1]))
    task = F.cross_entropy(lwf.model(x), y)
    p_old, log_new = torch.softmax(lwf.old(x) / 2, 1), torch.log_softmax(lwf.model(x) / 2, 1)
    kl = (p_old * (p_old.log() - log_new)).sum(1).mean()
    assert losses[False] == pytest.approx(float(task + 0.7 * kl), rel=1e-5)
    assert losses[True] == pytest.approx(float(task + 0.7 * 4 * kl), rel=1e-5)


# --- EWC: per-task (Kirkpatrick et al. 2017) and online (Schwarz et al. 2018) ---------------------------
def _ewc_on_teacher_student(name, **args):
    """Three linear teacher-student tasks; returns the strategy, its weight W after a random move, the
    weights after each task and the input matrices A_k. The Fisher of task k is A_k A_k^T (x) I exactly."""
    stream = make_stream("teacher-student", tasks=3, rho_a=0.5, input_dim=40, latent_dim=6, output_dim=3)
    strategy = make_strategy(name, strength=2.0, epochs=5, lr=0.05, **args)
    solutions, after_task = [], strategy.after_task

    def record(task):
        after_task(task)
        solutions.append(strategy.model[1].weight.detach().double().clone())

    strategy.after_task = record
    run(stream, strategy, device="cpu", progress=False)
    W = strategy.model[1].weight
    with torch.no_grad():
        W.add_(torch.randn_like(W) * 0.1)
    return strategy, W.detach().double(), solutions, [t.metadata["A"].double() for t in stream]


def test_ewc_full_per_task_is_the_sum_of_per_task_quadratics():
    strategy, W, solutions, As = _ewc_on_teacher_student("ewc-full", fisher_form="exact")
    assert strategy.form == "per-task" and len(strategy.penalties) == 3
    expected = sum(float(torch.trace((W - Wk) @ A @ A.T @ (W - Wk).T)) for Wk, A in zip(solutions, As))
    assert float(strategy.penalty().detach()) == pytest.approx(expected, rel=1e-4)  # 0.5 * strength 2 = 1


def test_ewc_diag_per_task_is_the_sum_of_per_task_quadratics():
    strategy, W, solutions, As = _ewc_on_teacher_student("ewc-diag")
    expected = sum(float(((W - Wk) ** 2 * torch.diagonal(A @ A.T)).sum()) for Wk, A in zip(solutions, As))
    assert float(strategy.penalty().detach()) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["ewc-diag", "ewc-full"])
def test_ewc_online_is_one_decayed_sum_at_the_latest_solution(name):
    strategy, W, solutions, As = _ewc_on_teacher_student(name, form="online", decay=0.5)
    assert len(strategy.penalties) == 1
    F = sum(0.5 ** (2 - k) * A @ A.T for k, A in enumerate(As))
    dW = W - solutions[-1]
    expected = float(torch.trace(dW @ F @ dW.T)) if name == "ewc-full" else float((dW**2 * torch.diagonal(F)).sum())
    assert float(strategy.penalty().detach()) == pytest.approx(expected, rel=1e-4)


def test_ewc_full_kfac_per_task_keeps_each_tasks_blocks_and_anchor():
    """Reference: vec(dW_k)^T (A_k (x) G_k) vec(dW_k) with the Kronecker product written out, summed over tasks."""
    strategy, W, solutions, _ = _ewc_on_teacher_student("ewc-full", fisher_form="kfac")
    assert len(strategy.penalties) == 3
    expected = 0.0
    for ((form, [(_, A, G, weight)]), _), Wk in zip(strategy.penalties, solutions):
        assert form == "kfac" and weight == 1.0
        d = (W - Wk).T.reshape(-1)  # column-major vec(dW): (A (x) G) vec(dW) = vec(G dW A)
        expected += float(d @ torch.kron(A.double(), G.double()) @ d)
    assert float(strategy.penalty().detach()) == pytest.approx(expected, rel=1e-4)


def test_ewc_forms_agree_for_two_tasks_and_bad_form_is_named():
    from clbench import ClbenchError

    stream = lambda: make_stream("teacher-student", input_dim=40, latent_dim=6, output_dim=3)  # noqa: E731
    R = [run(stream(), make_strategy("ewc-diag", form=form, epochs=5, lr=0.05), device="cpu", progress=False).R
         for form in ("per-task", "online")]
    np.testing.assert_allclose(R[0], R[1], atol=1e-6)
    with pytest.raises(ClbenchError, match="per-task .*online"):
        make_strategy("ewc-diag", form="offline")
    with pytest.raises(ClbenchError, match="decay=0.9 applies to form=online"):
        make_strategy("ewc-full", decay=0.9)
