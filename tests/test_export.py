"""Export to plain torch datasets and to a real Avalanche benchmark."""
import pytest
import torch
from fake_data import write_idx_dataset

from clbench import make_stream


@pytest.fixture
def mnist_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    return str(write_idx_dataset(tmp_path / "mnist", train=1000, test=300))


def test_to_torch_applies_the_task_transform(mnist_root):
    s = make_stream("permuted-mnist", tasks=2, root=mnist_root)
    sets = s.to_torch()
    assert len(sets) == 2 and len(sets[1]["train"]) == 1000
    x, y, t = sets[1]["test"][5]
    torch.testing.assert_close(x, s[1].inputs(s[1].test_x[5:6])[0])
    assert int(y) == int(s[1].test_y[5]) and int(t) == 1


def test_avalanche_naive_learns_above_chance(mnist_root):
    from avalanche.training.supervised import Naive

    torch.manual_seed(0)
    bm = make_stream("split-mnist", root=mnist_root).to_avalanche()
    assert len(bm.train_stream) == 5
    assert [e.task_label for e in bm.train_stream] == [0, 0, 0, 0, 0]  # class-incremental: no task id
    assert sorted(bm.train_stream[2].classes_in_this_experience) == [4, 5]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=32,
                     train_epochs=2, device="cpu", evaluator=None)
    strategy.train(bm.train_stream[0])
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, _ in torch.utils.data.DataLoader(bm.test_stream[0].dataset, batch_size=100):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert correct / total > 0.8  # two classes: chance is 0.5


@pytest.mark.parametrize("name, scenario, labels", [
    ("permuted-mnist", "domain", [0, 0, 0]),   # as Avalanche's PermutedMNIST
    ("permuted-mnist", "task", [0, 1, 2]),     # the scenario gives the task id
    ("split-mnist", "class", [0] * 5),         # as Avalanche's SplitMNIST(return_task_id=False)
    ("split-mnist", "task", [0, 1, 2, 3, 4]),  # as SplitMNIST(return_task_id=True)
])
def test_avalanche_task_labels_follow_avalanches_convention(mnist_root, name, scenario, labels):
    stream = make_stream(name, scenario=scenario, root=mnist_root, **({"tasks": 3} if "permuted" in name else {}))
    bm = stream.to_avalanche()
    for split in (bm.train_stream, bm.test_stream):
        assert [e.task_label for e in split] == labels
        assert [sorted(set(e.dataset.targets_task_labels)) for e in split] == [[t] for t in labels]
    assert [int(ds["train"][0][2]) for ds in stream.to_torch()] == list(range(len(labels)))  # the task index


def test_regression_stream_refuses_avalanche(mnist_root):
    from clbench import ClbenchError

    s = make_stream("permuted-mnist", tasks=1, readout="latent", root=mnist_root)
    with pytest.raises(ClbenchError, match="regression stream"):
        s.to_avalanche()
