"""Datasets as compact uint8 tensors: MNIST, Fashion-MNIST, KMNIST (IDX files) and
CIFAR-10 / CIFAR-100 (python pickle batches).

Lookup: an explicit ``root`` is the only place looked (its folder and the
usual sub-folders below it): nothing else is used in its stead. Without a root:
``$CLBENCH_DATA`` (default ~/.cache/clbench), then known system locations
(Debian's ``dataset-fashion-mnist`` installs /usr/share/datasets/fashion-mnist),
then, only when asked, torchvision's checksummed download. The loaded data
carries its provenance (``data["source"]``: the folder, and each raw file's
path, size and SHA-256), which the streams record. Raw files are decoded once
and cached as a ``.pt`` file beside the cache, keyed on the raw files' SHA-256; shape, dtype and counts are
checked. CIFAR's pickle batches are read with an unpickler that builds only
what real batches hold (dicts, lists, bytes, str, int, numpy arrays) and refuses
anything else, so a crafted file cannot run code. A missing dataset says where
it looked and the command that fixes it; a corrupt or truncated file names the
file and the fix.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clbench.core.errors import ClbenchError
from clbench.core.io import atomic_write, check_writable_folder, sha256


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str              # "idx" or "cifar"
    dirs: tuple[str, ...]  # sub-folders where the raw files may sit below a root
    train: int             # expected counts
    test: int
    classes: int
    torchvision: str       # torchvision class name (for download)
    system: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "idx", ("", "mnist", "MNIST/raw"), 60000, 10000, 10, "MNIST"),
    "fashion-mnist": DatasetInfo("fashion-mnist", "idx", ("", "fashion-mnist", "FashionMNIST/raw"), 60000, 10000, 10,
                                 "FashionMNIST", ("/usr/share/datasets/fashion-mnist",)),
    "kmnist": DatasetInfo("kmnist", "idx", ("", "kmnist", "KMNIST/raw"), 60000, 10000, 10, "KMNIST"),
    "cifar10": DatasetInfo("cifar10", "cifar", ("cifar-10-batches-py",), 50000, 10000, 10, "CIFAR10"),
    "cifar100": DatasetInfo("cifar100", "cifar", ("cifar-100-python",), 50000, 10000, 100, "CIFAR100"),
}
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def cache_dir() -> Path:
    """``$CLBENCH_DATA`` or ~/.cache/clbench (a ClbenchError if it names something that is not a folder)."""
    folder = Path(os.environ.get("CLBENCH_DATA") or Path.home() / ".cache" / "clbench")
    if folder.exists() and not folder.is_dir():
        raise ClbenchError(f"the data folder ($CLBENCH_DATA) {folder} is a file, not a folder; point CLBENCH_DATA "
                           "at a folder (datasets and their decoded copies are kept there)")
    return folder


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ClbenchError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _fix(name: str) -> str:
    return (f"run `clbench data download {name}` when online, or copy the raw files into "
            f"{cache_dir() / name} (or pass root=DIR / set CLBENCH_DATA)")


# ---- raw formats ---------------------------------------------------------------------------
def read_idx(path: Path, name: str = "", limit: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode one IDX file (optionally gzipped) into a uint8 array, checking its header and length.

    The header is read first (a gzipped file is decompressed as a stream) and checked against ``limit``,
    the largest shape the file may declare (e.g. (60000, 28, 28)): same number of dimensions, none larger.
    Only then is the data read, exactly as many bytes as declared, so a small crafted file cannot make
    clbench allocate gigabytes."""
    fix = f"delete it and {_fix(name)}"
    try:
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise ClbenchError(f"{path} is not an unsigned-byte IDX file (bad magic number); {fix}")
            ndim = head[3]
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise ClbenchError(f"{path} is truncated (header cut short); {fix}")
            dims = tuple(int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim))
            if limit is not None and (ndim != len(limit) or any(d > m for d, m in zip(dims, limit))):
                raise ClbenchError(f"{path}: its header declares an array of shape {dims}, but {name or 'this'} "
                                   f"file holds at most {limit}; the file is corrupt or not the one expected: {fix}")
            expected = math.prod(dims)
            raw = f.read(expected)
            extra = len(f.read(1))
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ClbenchError(f"cannot read {path}: {e}; the file is corrupt or truncated: {fix}") from None
    if len(raw) != expected or extra:
        held = f"{len(raw)}" if not extra else f"more than {expected}"
        raise ClbenchError(f"{path} is truncated or corrupt: header says {dims} ({expected} bytes of data) but it "
                           f"holds {held}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


class _Refused(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds: containers, bytes, str, numbers and numpy arrays.

    Real batches reference nothing but numpy's array reconstruction; any other global
    (``os.system``, ``builtins.eval``, ...) is refused before it is looked up.
    """

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol 2 writes bytes from Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        import warnings

        with warnings.catch_warnings():  # numpy 2 warns about the numpy.core path old batches use
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r}")


def _unpickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise ClbenchError(f"refusing to load CIFAR batch {path}: it asks for {e.what}, which a CIFAR batch never "
                           "holds (only dicts, lists, bytes, str, int and numpy arrays); the file may be malicious "
                           f"and nothing in it was run: delete it and {_fix(name)}") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, RecursionError) as e:
        raise ClbenchError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}; the file is corrupt or "
                           f"truncated: delete it and {_fix(name)}") from None
    if not isinstance(batch, dict):
        raise ClbenchError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch (a dict); delete it and "
                           f"{_fix(name)}")
    if any(isinstance(v, np.ndarray) and v.dtype.hasobject for v in batch.values()):
        raise ClbenchError(f"{path} holds an array of Python objects, which a CIFAR batch never does; delete it "
                           f"and {_fix(name)}")
    return batch


def _cifar_split(paths: list[Path], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    xs, ys, coarse = [], [], []
    for path in paths:
        batch = _unpickle(path, name)
        label_key = b"labels" if b"labels" in batch else b"fine_labels"
        if b"data" not in batch or label_key not in batch:
            raise ClbenchError(f"{path} lacks the 'data' or labels entry of a CIFAR batch; delete it and {_fix(name)}")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ClbenchError(f"{path}: data has shape {data.shape}, expected (N, 3072); delete it and {_fix(name)}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
        if b"coarse_labels" in batch:
            coarse.append(np.asarray(batch[b"coarse_labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), (np.concatenate(coarse) if coarse else None)


# ---- finding and caching -------------------------------------------------------------------
def _raw_files(info: DatasetInfo, folder: Path) -> dict[str, list[Path]] | None:
    """The raw files of ``info`` in ``folder``, or None if any is missing."""
    if info.kind == "idx":
        found = {}
        for key, stem in IDX_FILES.items():
            hits = [folder / f"{stem}{ext}" for ext in ("", ".gz") if (folder / f"{stem}{ext}").is_file()]
            if not hits:
                return None
            found[key] = hits[:1]
        return found
    if info.name == "cifar10":
        train = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test = [folder / "test_batch"]
    else:
        train, test = [folder / "train"], [folder / "test"]
    return {"train": train, "test": test} if all(p.is_file() for p in train + test) else None


def candidate_dirs(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Every folder searched for ``name``'s raw files, in order: below ``root`` only, when one is given."""
    info = _info(name)
    if root:
        return list(dict.fromkeys(Path(root) / sub if sub else Path(root) for sub in info.dirs))
    roots = [cache_dir(), cache_dir() / name]
    dirs = [r / sub if sub else r for r in roots for sub in info.dirs] + [Path(p) for p in info.system]
    return list(dict.fromkeys(dirs))


def locate(name: str, root: str | os.PathLike | None = None) -> tuple[Path, dict[str, list[Path]]] | None:
    """The first folder holding all raw files of ``name``, with those files; None if none does."""
    info = _info(name)
    for folder in candidate_dirs(name, root):
        files = _raw_files(info, folder)
        if files:
            return folder, files
    return None


def source(name: str, folder: Path, files: dict[str, list[Path]]) -> dict:
    """Provenance of the data used: the folder and each raw file's path, size and SHA-256."""
    used = sorted({p.resolve() for ps in files.values() for p in ps})
    return {"dataset": name, "folder": str(folder.resolve()),
            "files": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in used]}


def _decode(info: DatasetInfo, files: dict[str, list[Path]]) -> dict[str, torch.Tensor]:
    if info.kind == "idx":
        n = {"train": info.train, "test": info.test}
        limits = {k: (n[k.split("_")[0]], 28, 28) if k.endswith("_x") else (n[k.split("_")[0]],) for k in files}
        arrays = {k: read_idx(v[0], info.name, limits[k]) for k, v in files.items()}
        out = {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}
    else:
        out = {}
        for split in ("train", "test"):
            x, y, coarse = _cifar_split(files[split], info.name)
            out[f"{split}_x"], out[f"{split}_y"] = torch.from_numpy(x), torch.from_numpy(y)
            if coarse is not None:
                out[f"{split}_coarse"] = torch.from_numpy(coarse)
    _check(info, out, files)
    out["train_y"], out["test_y"] = out["train_y"].long(), out["test_y"].long()
    return out


def _check(info: DatasetInfo, data: dict[str, torch.Tensor], files) -> None:
    where = ", ".join(str(p[0].parent) for p in list(files.values())[:1])
    for split in ("train", "test"):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        if len(x) != len(y):
            raise ClbenchError(f"{info.name} in {where}: {split} has {len(x)} images but {len(y)} labels; "
                               f"the files are corrupt: {_fix(info.name)}")
        if x.dtype != torch.uint8 or (info.kind == "idx" and tuple(x.shape[1:]) != (28, 28)):
            raise ClbenchError(f"{info.name} in {where}: {split} images have shape {tuple(x.shape)}, expected "
                               f"(N, 28, 28) uint8; {_fix(info.name)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= info.classes):
            raise ClbenchError(f"{info.name} in {where}: {split} labels outside 0..{info.classes - 1}; "
                               f"the files are corrupt: {_fix(info.name)}")


def load(name: str, root: str | os.PathLike | None = None, download: bool = False) -> dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "test_x", "test_y"}`` (+ ``*_coarse`` for CIFAR-100) as uint8/int64 tensors,
    and ``"source"``: where they came from (see :func:`source`).

    Images are (N, 28, 28) for the MNIST family and (N, 3, 32, 32) for CIFAR. An
    explicit ``root`` is the only place looked.
    """
    info = _info(name)
    hit = locate(name, root)
    if hit is None and download:
        fetch(name)
        hit = locate(name, root)
    if hit is None and root:
        missing = "" if Path(root).is_dir() else " (it does not exist)"
        raise ClbenchError(f"dataset {name!r} not found in root={str(root)!r}{missing}; looked in: "
                           f"{'; '.join(str(d) for d in candidate_dirs(name, root))}. An explicit root is the only "
                           "place looked (no copy elsewhere is used instead): put the raw files there, or leave "
                           "root out to use $CLBENCH_DATA and the system copies")
    if hit is None:
        raise ClbenchError(f"dataset {name!r} not found. Looked in: {'; '.join(str(d) for d in candidate_dirs(name, root))}. "
                           f"Fix: {_fix(name)}" + (" (or `apt-get install dataset-fashion-mnist`)"
                                                  if name == "fashion-mnist" else ""))
    folder, files = hit
    used = source(name, folder, files)
    # keyed on the raw files' contents (their SHA-256, computed for the provenance anyway), never on size and
    # time: a file rewritten with the same size and time (cp -p, rsync -t) must not give the old tensors
    roles = sorted((key, p.resolve().name) for key, ps in files.items() for p in ps)
    digests = {Path(f["path"]).name: f["sha256"] for f in used["files"]}
    stamp = hashlib.sha256(repr([(key, digests[n]) for key, n in roles]).encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{name}-{stamp}.pt"
    if cached.is_file():
        try:
            return {**torch.load(cached, weights_only=True), "source": used}
        except Exception:  # a broken cache entry is rebuilt from the raw files
            cached.unlink(missing_ok=True)
    data = _decode(info, files)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, lambda f: torch.save(data, f))
    except OSError:
        pass  # read-only cache: decode again next time
    return {**data, "source": used}


def fetch(name: str) -> Path:
    """Download ``name`` with torchvision (checksummed) into the cache; returns the cache folder."""
    import torchvision

    info = _info(name)
    target = check_writable_folder(cache_dir(), "the data folder ($CLBENCH_DATA)")
    cls = getattr(torchvision.datasets, info.torchvision)
    try:
        for train in (True, False):
            cls(str(target), train=train, download=True)
    except Exception as e:  # no network, server down, checksum mismatch
        raise ClbenchError(f"downloading {name} failed ({type(e).__name__}: {e}); check the network, or copy "
                           f"the raw files into {target / name}") from None
    return target


def available() -> list[tuple[str, str]]:
    """(name, folder or 'missing') for every known dataset."""
    out = []
    for name in DATASETS:
        hit = locate(name)
        out.append((name, str(hit[0]) if hit else "missing"))
    return out
