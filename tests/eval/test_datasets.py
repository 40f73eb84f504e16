import gzip
import pickle
import struct

import numpy as np
import pytest

from eval.datasets import DatasetError, load_cifar, load_dataset, load_digits, load_mnist, read_idx


def write_idx(path, array, compress=False):
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_mnist(d, n_train=30, n_test=10, compress=False):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), compress)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_round_trip(tmp_path, compress):
    make_mnist(tmp_path, compress=compress)
    data = load_mnist(str(tmp_path))
    assert data.input_shape == (1, 28, 28) and len(data.train_x) == 30 and len(data.test_y) == 10
    assert abs(data.train_x.mean().item()) < 1e-5 and abs(data.train_x.std().item() - 1) < 1e-3
    raw = read_idx(tmp_path / ("train-labels-idx1-ubyte" + (".gz" if compress else "")))
    assert np.array_equal(raw, data.train_y.numpy())


def test_mnist_truncated_corrupt_and_missing(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*expected 23520 data bytes"):
        load_mnist(str(tmp_path))
    path.write_bytes(b"\x01\x02garbage")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte: not an idx file"):
        load_mnist(str(tmp_path))
    path.unlink()
    with pytest.raises(DatasetError, match="missing train-images-idx3-ubyte"):
        load_mnist(str(tmp_path))
    write_idx(path, np.zeros((30, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9))
    with pytest.raises(DatasetError, match="t10k images .* do not match"):
        load_mnist(str(tmp_path))


def write_cifar(d, classes, n=8):
    rng = np.random.default_rng(1)
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles(tmp_path, classes):
    sub = tmp_path / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    sub.mkdir()
    write_cifar(sub, classes)
    data = load_dataset(f"cifar{classes}", str(tmp_path))
    assert data.input_shape == (3, 32, 32) and data.num_classes == classes
    assert len(data.train_x) == (40 if classes == 10 else 8) and len(data.test_x) == 8


def test_cifar_corrupt_and_missing(tmp_path):
    write_cifar(tmp_path, 10)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3: not a readable CIFAR pickle"):
        load_cifar(str(tmp_path), 10)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_3: expected data of shape \(N, 3072\)"):
        load_cifar(str(tmp_path), 10)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3: missing"):
        load_cifar(str(tmp_path), 10)


def test_digits_and_dataset_errors():
    a, b = load_digits(), load_digits()
    assert a.input_shape == (1, 8, 8) and len(a.train_x) + len(a.test_x) == 1797
    assert (a.test_y == b.test_y).all()  # deterministic split
    with pytest.raises(ValueError, match="dataset = 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")


def test_truncated_and_corrupted_gzip_name_the_file(tmp_path):
    make_mnist(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: truncated gzip file"):
        load_mnist(str(tmp_path))
    corrupted = bytearray(whole)
    corrupted[20:60] = b"\xff" * 40  # inside the deflate stream
    path.write_bytes(bytes(corrupted))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_mnist(str(tmp_path))


def test_labels_outside_the_classes_are_refused(tmp_path):
    make_mnist(tmp_path)
    labels = np.zeros(10, np.uint8)
    labels[4] = 12  # would crash training, or quietly count as a wrong answer
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: 1 labels outside \[0, 10\) .*index 4.* is 12"):
        load_mnist(str(tmp_path))
    write_cifar(tmp_path, 10)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}, f)
    with pytest.raises(DatasetError, match=r"test_batch: 1 labels outside \[0, 10\)"):
        load_cifar(str(tmp_path), 10)
