"""Permuted and split streams: the similarity dials measured on the built tasks."""
import numpy as np
import pytest
import torch
from fake_data import write_cifar, write_idx_dataset

from clbench import ClbenchError, make_stream
from clbench.streams.permuted import next_label_map, next_permutation


@pytest.fixture
def mnist_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    return str(write_idx_dataset(tmp_path / "mnist"))


@pytest.mark.parametrize("rho_a", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0])
def test_pixel_share_that_moves_is_one_minus_rho_a(rho_a):
    rng = np.random.default_rng(1)
    perm = rng.permutation(784)
    for _ in range(5):
        new = next_permutation(perm, rho_a, rng)
        moved = int((new != perm).sum())
        assert abs(moved - 784 * (1 - rho_a)) <= 1
        assert sorted(new) == list(range(784))  # still a permutation
        perm = new


def test_stream_permutations_are_applied_on_the_device(mnist_root):
    s = make_stream("permuted-mnist", tasks=3, rho_a=0.5, root=mnist_root)
    x = s[0].train_x[:4]
    for a, b in zip(s.tasks, s.tasks[1:]):
        pa, pb = a.metadata["permutation"], b.metadata["permutation"]
        assert abs(int((pa != pb).sum()) - 392) <= 1
        xa, xb = a.inputs(x).flatten(1), b.inputs(x).flatten(1)
        torch.testing.assert_close(xb, x.flatten(1).float()[:, torch.from_numpy(pb)] / 255)
    assert np.array_equal(s[0].metadata["permutation"], np.arange(784))


@pytest.mark.parametrize("rho_b", [0.0, 0.3, 0.7, 0.9, 1.0])
def test_label_map_keeps_rho_b_share_in_expectation(rho_b):
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(3000):
        labels = rng.permutation(10)
        new = next_label_map(labels, rho_b, rng)
        assert sorted(new) == list(range(10))
        kept.append(np.mean(new == labels))
    assert np.mean(kept) == pytest.approx(rho_b, abs=0.015)


@pytest.mark.parametrize("rho_b", [0.0, 0.5, 0.8])
def test_latent_readout_keeps_rho_b_share_of_entries(mnist_root, rho_b):
    shares = []
    for seed in range(60):
        s = make_stream("permuted-mnist", tasks=2, rho_b=rho_b, readout="latent", root=mnist_root, seed=seed)
        B1, B2 = (t.metadata["readout_matrix"] for t in s)
        shares.append(float((B1 == B2).float().mean()))
    assert np.mean(shares) == pytest.approx(rho_b, abs=0.04)


def test_latent_targets_are_the_code_times_b(mnist_root):
    from clbench.streams.permuted import latent_codes

    s = make_stream("permuted-mnist", tasks=2, readout="latent", root=mnist_root)
    assert s.loss == "mse" and s.num_outputs == 10
    codes = latent_codes()
    assert codes[5].tolist() == [-0.5, 0.5, -0.5, 0.5]  # 5 = 0101
    t = s[1]
    labels = make_stream("permuted-mnist", tasks=1, root=mnist_root)[0].train_y
    torch.testing.assert_close(t.train_y, codes[labels] @ t.metadata["readout_matrix"].T)


def test_same_seed_same_stream_other_seed_differs(mnist_root):
    kw = dict(tasks=3, rho_a=0.3, rho_b=0.5, root=mnist_root)
    a, b = make_stream("permuted-mnist", seed=1, **kw), make_stream("permuted-mnist", seed=1, **kw)
    c = make_stream("permuted-mnist", seed=2, **kw)
    for ta, tb in zip(a, b):
        assert np.array_equal(ta.metadata["permutation"], tb.metadata["permutation"])
        assert torch.equal(ta.train_y, tb.train_y)
    assert not np.array_equal(a[2].metadata["permutation"], c[2].metadata["permutation"])


def test_task_incremental_permuted_has_one_head_per_task(mnist_root):
    s = make_stream("permuted-mnist", tasks=3, scenario="task", root=mnist_root)
    assert s.num_outputs == 30 and s[2].head.tolist() == list(range(20, 30))


def test_split_streams_class_and_task_incremental(mnist_root, tmp_path):
    s = make_stream("split-mnist", root=mnist_root)
    assert len(s) == 5 and s.scenario == "class" and s.num_outputs == 10
    assert set(s[1].train_y.tolist()) == {2, 3} and s[1].head is None
    t = make_stream("split-mnist", scenario="task", shuffle_classes=True, seed=3, root=mnist_root)
    assert set(t[0].train_y.tolist()) == {0, 1}
    assert t[0].head.tolist() == t[0].classes and sorted(sum((x.classes for x in t), [])) == list(range(10))
    assert t.provenance["class_order"] != list(range(10))
    c100 = make_stream("split-cifar100", classes_per_task=20, root=str(write_cifar(tmp_path / "c", hundred=True)))
    assert len(c100) == 5 and c100.input_shape == (3, 32, 32)
    assert c100[0].inputs(c100[0].train_x[:2], train=True).shape == (2, 3, 32, 32)
    with pytest.raises(ClbenchError, match="must divide 100"):
        make_stream("split-cifar100", classes_per_task=7, root=str(tmp_path / "c"))


def test_domain_incremental_split_shares_one_head_of_the_task_size(mnist_root):
    from clbench import make_strategy, run

    class_il = make_stream("split-mnist", shuffle_classes=True, seed=3, root=mnist_root)
    s = make_stream("split-mnist", scenario="domain", shuffle_classes=True, seed=3, root=mnist_root)
    assert s.scenario == "domain" and s.num_outputs == 2 and all(t.head is None for t in s)
    for a, b in zip(class_il, s):  # the same samples; the target is the class's position in its task
        first, second = a.metadata["classes"]
        assert torch.equal(a.train_x, b.train_x)
        assert torch.equal(b.train_y, (a.train_y == second).long()) and set(a.train_y.tolist()) == {first, second}
    result = run(s, make_strategy("finetune", epochs=1), seed=0, progress=False)
    assert len(result.R) == 6 and all(0.0 <= v <= 1.0 for v in result.R[-1])


def test_augmentation_crops_and_flips_on_the_device():
    from clbench.data.transforms import RandomCropFlip

    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = RandomCropFlip(padding=0, flip=True)(x)
    for i in range(2):  # no padding: each image is itself or its mirror
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = RandomCropFlip(padding=2, flip=False)(x)
    assert out.shape == x.shape
    # every output image is a shifted window of the zero-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))


def test_models_for_images_run(tmp_path):
    from clbench.models.networks import build_model

    x = torch.randn(2, 3, 32, 32)
    assert build_model("resnet18-reduced", (3, 32, 32), 10)(x).shape == (2, 10)
    assert build_model("vit-tiny", (3, 32, 32), 7)(x).shape == (2, 7)


def test_cli_run_on_real_permuted_fashion_mnist(cli, real_fashion_mnist):
    code, out, err = cli("run", "--stream", "permuted-fashion-mnist", "--strategy", "finetune",
                         "--stream-arg", "tasks=3", "--strategy-arg", "epochs=1", "--device", "cpu")
    assert code == 0, err
    last = [line for line in out.splitlines() if line.strip().startswith("3 ")][0]
    assert min(float(v) for v in last.split()[1:]) > 0.6  # every task well above chance after training


@pytest.mark.parametrize("rho_a, rho_b", [(0.0, 0.0), (0.6, 0.0), (0.6, 1.0), (1.0, 0.5), (1.0, 1.0)])
def test_similar_cifar100_dials(tmp_path, monkeypatch, rho_a, rho_b):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    root = str(write_cifar(tmp_path / "c", hundred=True))  # fake coarse label = class // 5
    s = make_stream("similar-cifar100", tasks=3, classes_per_task=5, rho_a=rho_a, rho_b=rho_b, root=root, seed=2)
    used = sum((t.classes for t in s), [])
    assert len(used) == len(set(used)) == 15  # no class is reused
    for prev, cur in zip(s.tasks, s.tasks[1:]):
        pc, cc = prev.metadata["classes"], cur.metadata["classes"]
        siblings = [k for k in range(5) if cc[k] // 5 == pc[k] // 5]
        assert len(siblings) == round(rho_a * 5)  # input dial: share of sibling classes
        others = set(range(5)) - set(siblings)
        assert not {cc[k] // 5 for k in others} & {c // 5 for c in pc}
        labels = cur.metadata["labels"]
        kept = [k for k in siblings if labels[k] == k]
        assert len(kept) == round(rho_b * len(siblings))  # readout dial: siblings keeping their sibling's unit
        # targets follow the label map
        for k in range(5):
            mask = cur.train_y == labels[k]
            assert mask.any()
    assert s.num_outputs == 5


def test_similar_cifar100_refuses_impossible_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))
    root = str(write_cifar(tmp_path / "c", hundred=True))
    with pytest.raises(ClbenchError, match="no unused class left"):
        make_stream("similar-cifar100", tasks=6, classes_per_task=5, rho_a=1.0, root=root)
