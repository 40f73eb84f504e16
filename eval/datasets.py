"""Data sets: scikit-learn's bundled digits (no download), MNIST idx files, CIFAR-10/100
python pickles. Every loader returns a :class:`Dataset` of float32 image tensors
(N, C, H, W), normalised per channel with the training set's mean and std, and int64
labels. Splits are deterministic. A missing or corrupt file raises an error naming the
file and what was expected."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DATASETS = ("digits", "mnist", "cifar10", "cifar100")


class DatasetError(ValueError):
    """A data file is missing or not what its format promises."""


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    def fingerprint(self) -> str:
        """A hash of the name and every sample and label of both splits (as loaded and
        normalised): two data sets share it only if they hold the same data."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(self.name.encode())
            for t in (self.train_x, self.train_y, self.test_x, self.test_y):
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def batches(self, split: str = "test", batch_size: int = 512, limit: Optional[int] = None):
        """(x, y) batches of a split, in order (``limit``: the first n samples only)."""
        x, y = (self.test_x, self.test_y) if split == "test" else (self.train_x, self.train_y)
        n = len(x) if limit is None else min(limit, len(x))
        return [(x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]) for i in range(0, n, batch_size)]


def load_dataset(name: str, data_dir: Optional[str] = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"dataset = {name!r} is invalid: expected one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits()
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir: a directory holding its files "
                         f"(they cannot be downloaded here)")
    if name == "mnist":
        return load_mnist(data_dir)
    return load_cifar(data_dir, 10 if name == "cifar10" else 100)


def _normalised(name, train_x, train_y, test_x, test_y, num_classes) -> Dataset:
    """uint8/float images (N, C, H, W) -> float32 standardised with training statistics."""
    train_x = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    test_x = torch.as_tensor(np.asarray(test_x, dtype=np.float32))
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Dataset(name, (train_x - mean) / std, torch.tensor(np.array(train_y), dtype=torch.int64),
                   (test_x - mean) / std, torch.tensor(np.array(test_y), dtype=torch.int64), num_classes)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 digits, split by a fixed permutation (80/20)."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = data.images.astype(np.float32)[:, None] / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(test_fraction * len(images)))
    test, train = order[:n_test], order[n_test:]
    return _normalised("digits", images[train], data.target[train], images[test], data.target[test], 10)


# -- MNIST idx ------------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a numpy array; errors name the file."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except EOFError:
        raise DatasetError(f"{path}: truncated gzip file (it ends before its compressed data does)") from None
    except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot read: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path}: not an idx file of unsigned bytes (expected magic 0x0000 08 nn)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated header: expected {ndim} dimension sizes")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: expected {expected} data bytes for shape {dims}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def check_labels(where, labels: np.ndarray, classes: int) -> None:
    """Labels must be class indices in [0, classes): anything else would crash training
    or quietly count as wrong answers."""
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise DatasetError(f"{where}: {bad.size} labels outside [0, {classes}) (the first, at index {bad[0]}, "
                           f"is {labels[bad[0]]}); this data set has {classes} classes")


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(f"{directory}: missing {stem} (or {stem}.gz)")


def load_mnist(data_dir: str) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four standard idx files in ``data_dir``."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DatasetError(f"{d}: not a directory")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))
        label_file = _find(d, f"{prefix}-labels-idx1-ubyte")
        labels = read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{d}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        check_labels(label_file, labels, 10)
        parts[split] = (images[:, None] / 255.0, labels)
    return _normalised("mnist", *parts["train"], *parts["test"], 10)


# -- CIFAR python pickles ----------------------------------------------------------------------
def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (expected a CIFAR python pickle batch)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as err:  # pickle raises many types on corrupt input
        raise DatasetError(f"{path}: not a readable CIFAR pickle batch: {type(err).__name__}: {err}") from None


def _cifar_batch(path: Path, label_key: bytes, classes: int) -> tuple:
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: expected a dict with b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} "
                           f"and {labels.shape}")
    check_labels(path, labels, classes)
    return data.reshape(-1, 3, 32, 32) / 255.0, labels


def load_cifar(data_dir: str, classes: int) -> Dataset:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) pickles, found in
    ``data_dir`` or its cifar-10-batches-py / cifar-100-python subdirectory."""
    d = Path(data_dir)
    sub = d / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    if sub.is_dir():
        d = sub
    if not d.is_dir():
        raise DatasetError(f"{d}: not a directory")
    if classes == 10:
        train = [_cifar_batch(d / f"data_batch_{i}", b"labels", classes) for i in range(1, 6)]
        test = _cifar_batch(d / "test_batch", b"labels", classes)
    else:
        train = [_cifar_batch(d / "train", b"fine_labels", classes)]
        test = _cifar_batch(d / "test", b"fine_labels", classes)
    train_x = np.concatenate([t[0] for t in train])
    train_y = np.concatenate([t[1] for t in train])
    return _normalised(f"cifar{classes}", train_x, train_y, test[0], test[1], classes)


def default_cache_dir() -> Path:
    """Where trained default models are cached: $XDG_CACHE_HOME/xbarsim or ~/.cache/xbarsim."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xbarsim"
