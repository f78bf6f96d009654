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
