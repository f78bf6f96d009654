"""The data layer on files written in the real formats."""
import gzip

import numpy as np
import pytest
import torch
from fake_data import write_cifar, write_idx_dataset

from clbench import ClbenchError
from clbench.data import datasets as data


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "cache"))


def test_idx_roundtrip_gz_and_plain(tmp_path):
    for gz in (True, False):
        root = write_idx_dataset(tmp_path / f"mnist{gz}", gz=gz)
        d = data.load("mnist", root=root)
        assert d["train_x"].shape == (600, 28, 28) and d["train_x"].dtype == torch.uint8
        assert d["test_y"].shape == (200,) and d["test_y"].dtype == torch.int64
        assert sorted(d["train_y"].unique().tolist()) == list(range(10))


def test_decoded_cache_is_written_and_reused(tmp_path):
    root = write_idx_dataset(tmp_path / "kmnist")
    first = data.load("kmnist", root=root)
    cached = list((tmp_path / "cache" / "decoded").glob("kmnist-*.pt"))
    assert len(cached) == 1
    assert torch.equal(data.load("kmnist", root=root)["train_x"], first["train_x"])


def test_torchvision_layout_in_the_cache_is_found(tmp_path):
    write_idx_dataset(tmp_path / "cache" / "MNIST" / "raw")
    assert len(data.load("mnist")["train_x"]) == 600


def test_truncated_idx_names_the_file_and_the_fix(tmp_path):
    root = write_idx_dataset(tmp_path / "m", gz=False)
    f = root / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ClbenchError, match=r"train-images-idx3-ubyte is truncated or corrupt.*clbench data download"):
        data.load("mnist", root=root)


def test_corrupt_gzip_and_bad_magic(tmp_path):
    root = write_idx_dataset(tmp_path / "m")
    f = root / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ClbenchError, match="t10k-labels-idx1-ubyte.gz.*corrupt or truncated"):
        data.load("mnist", root=root)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04" * 10))
    with pytest.raises(ClbenchError, match="bad magic number"):
        data.load("mnist", root=root)


def test_mismatched_counts_are_caught(tmp_path):
    from fake_data import idx_bytes

    root = write_idx_dataset(tmp_path / "m", gz=False)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(599, dtype=np.uint8)))
    with pytest.raises(ClbenchError, match="600 images but 599 labels"):
        data.load("mnist", root=root)


def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(ClbenchError) as info:
        data.load("kmnist")
    message = str(info.value)
    assert "not found" in message and str(tmp_path / "cache") in message
    assert "clbench data download kmnist" in message
    with pytest.raises(ClbenchError) as info:  # an explicit root is the only place looked (tests/test_bad_input.py)
        data.load("kmnist", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and str(tmp_path / "cache") not in str(info.value)


def test_cifar10_and_cifar100_pickles(tmp_path):
    root = write_cifar(tmp_path / "c10")
    d = data.load("cifar10", root=root)
    assert d["train_x"].shape == (500, 3, 32, 32) and d["test_x"].shape == (100, 3, 32, 32)
    root = write_cifar(tmp_path / "c100", hundred=True)
    d = data.load("cifar100", root=root)
    assert d["train_x"].shape == (500, 3, 32, 32)
    assert torch.equal(d["train_coarse"], d["train_y"] // 5)


def test_corrupt_cifar_pickle(tmp_path):
    root = write_cifar(tmp_path / "c10")
    f = root / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(ClbenchError, match="data_batch_3.*corrupt or truncated"):
        data.load("cifar10", root=root)


def test_real_fashion_mnist_is_found(real_fashion_mnist):
    d = data.load("fashion-mnist")
    assert d["train_x"].shape == (60000, 28, 28) and d["test_x"].shape == (10000, 28, 28)
    assert torch.bincount(d["train_y"]).tolist() == [6000] * 10


def test_data_cli_lists_the_real_files(cli, real_fashion_mnist):
    code, out, err = cli("data", "list")
    assert code == 0 and "fashion-mnist" in out and str(real_fashion_mnist) in out


def test_data_cli_refuses_unknown_datasets(cli):
    code, out, err = cli("data", "download", "imagenet")
    assert code == 2 and "unknown dataset 'imagenet'" in err
