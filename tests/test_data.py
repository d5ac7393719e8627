"""data.py: CIFAR from a tiny on-disk copy the test writes, digits, subsets, batches."""
import os
import pickle
import warnings

import numpy as np
import pytest

import data
from utils import UserError


def write_tiny_cifar10(root, n_per_batch=20, seed=0, with_str_keys=False):
    """A CIFAR-10 directory in torchvision's python layout, with random images."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        imgs = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n_per_batch) % 10]
        d = {"data": imgs, "labels": labels} if with_str_keys else {b"data": imgs, b"labels": labels}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
    return folder


def test_cifar_loads_as_nhwc_float_and_warns_about_checksums(tmp_path):
    folder = write_tiny_cifar10(tmp_path)
    with pytest.warns(UserWarning, match="not the canonical set"):
        ds = data.load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_test.shape == (20, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
    # Channel order: pixel (0, 0) of image 0 reads bytes 0, 1024 and 2048 of its row.
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        raw = pickle.load(f)[b"data"][0]
    np.testing.assert_allclose(ds.x_train[0, 0, 0] * 255, [raw[0], raw[1024], raw[2048]], atol=1e-3)


def test_cifar_str_keys_and_truncated_label_lists(tmp_path):
    write_tiny_cifar10(tmp_path, with_str_keys=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.load_dataset("cifar10", str(tmp_path), download=False)
    assert len(ds.x_train) == len(ds.y_train) == 100


def test_missing_cifar_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.load_dataset("cifar10", str(tmp_path), download=False)


def test_digits_shapes_range_and_fixed_split():
    ds = data.load_dataset("digits")
    assert ds.x_train.shape == (1497, 8, 8, 1) and ds.x_test.shape == (300, 8, 8, 1)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    again = data.load_dataset("digits")
    np.testing.assert_array_equal(ds.y_test, again.y_test)


def test_balanced_indices_are_balanced_seeded_and_class0_first():
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    idx = data.balanced_indices(labels, 7, seed=3, num_classes=10)
    assert len(idx) == 70 and len(set(idx)) == 70
    np.testing.assert_array_equal(labels[idx], np.repeat(np.arange(10), 7))
    np.testing.assert_array_equal(idx, data.balanced_indices(labels, 7, seed=3, num_classes=10))
    assert not np.array_equal(idx, data.balanced_indices(labels, 7, seed=4, num_classes=10))
    with pytest.raises(UserError, match="fewer than"):
        data.balanced_indices(labels, 1000, seed=0, num_classes=10)
    with pytest.raises(UserError, match="not divisible"):
        data.balanced_subset(labels, labels, 15, 0, 10)


def test_batches_are_seeded_and_keep_the_last_partial_batch():
    x = np.arange(10)[:, None].astype(np.float32)
    y = np.arange(10)
    a = [yb.tolist() for _, yb in data.batches(x, y, 4, seed=1)]
    b = [yb.tolist() for _, yb in data.batches(x, y, 4, seed=1)]
    c = [yb.tolist() for _, yb in data.batches(x, y, 4, seed=2)]
    assert a == b and a != c
    assert [len(v) for v in a] == [4, 4, 2]
    assert sorted(sum(a, [])) == list(range(10))
    assert [yb.tolist() for _, yb in data.batches(x, y, 4)][0] == [0, 1, 2, 3]
