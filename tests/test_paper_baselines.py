"""Baselines exact to their papers (issue 13): replay determinism, EWC forms, LwF weighting, export labels."""
import pytest
import torch

from clbench import make_strategy, make_stream, run
from fake_data import write_idx_dataset


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
    replay._add(torch.arange(8.0).unsqueeze(1), torch.zeros(8), task)
    x = torch.arange(8.0, 808.0).unsqueeze(1)
    torch.manual_seed(0)
    slots = (torch.rand(800) * torch.arange(9, 809)).long()  # the draws _add makes after the same seed
    assert len(slots[slots < 8]) > len(slots[slots < 8].unique())  # repeated slots within the batch
    expected = replay.x.clone()
    for i, slot in enumerate(slots.tolist()):
        if slot < 8:
            expected[slot] = x[i]
    torch.manual_seed(0)
    replay._add(x, torch.zeros(800), task)
    assert torch.equal(replay.x, expected)


# --- LwF ----------------------------------------------------------------------------------------------
def test_lwf_weighs_distillation_by_lambda_o_without_a_hidden_t_squared(mnist_root):
    """Li & Hoiem: loss = task loss + lambda_o * soft cross-entropy at T (here as KL: same up to a constant)."""
    import torch.nn.functional as F

    from clbench.models import build_model

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
