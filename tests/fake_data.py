"""Write small datasets in the real on-disk formats (IDX, CIFAR pickle batches)."""
import gzip
import pickle
from pathlib import Path

import numpy as np

from clbench.data.datasets import IDX_FILES


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def class_images(labels: np.ndarray, shape, rng, seed: int = 0) -> np.ndarray:
    """Noisy images around one prototype per class (the same in every split), so a model can learn them."""
    size = int(np.prod(shape))
    prototypes = np.random.default_rng(seed + 1000).integers(0, 256, size=(labels.max() + 1, size))
    noise = rng.integers(-40, 41, size=(len(labels), size))
    return np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8).reshape(len(labels), *shape)


def write_idx_dataset(folder: Path, train: int = 600, test: int = 200, gz: bool = True, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", train), ("test", test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = class_images(y, (28, 28), rng, seed), y.astype(np.uint8)
    for key, stem in IDX_FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return folder


def write_cifar(folder: Path, hundred: bool = False, per_batch: int = 100, seed: int = 0) -> Path:
    sub = folder / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = 100 if hundred else 10

    def batch(n):
        y = np.arange(n) % classes
        d = {b"data": class_images(y, (3072,), rng, seed), b"batch_label": b"fake"}
        if hundred:
            d[b"fine_labels"], d[b"coarse_labels"] = y.tolist(), (y // 5).tolist()
        else:
            d[b"labels"] = y.tolist()
        return d

    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        with open(sub / name, "wb") as f:
            pickle.dump(batch(per_batch * (5 if hundred and name == "train" else 1)), f)
    return folder
