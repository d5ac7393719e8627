"""Datasets as in-memory arrays: images NHWC float32 in [0, 1], labels int32.

- cifar10 / cifar100: torchvision's on-disk python layout under `data_dir`. The batch
  files are read with numpy; torchvision is imported only to download missing archives
  and to verify the files against its checksums.
- digits: scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1], 1 channel,
  with a fixed split: a permutation with seed 0, the first 1497 for training and the
  last 300 for testing. It needs no download, so everything runs offline on it.
"""
from __future__ import annotations

import hashlib
import os
import socket
import warnings
from typing import NamedTuple

import numpy as np

from utils import UserError, restricted_load

# Image shape (H, W, C) of each dataset, known without loading it.
INPUT_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "digits": (8, 8, 1)}
DATASETS = tuple(INPUT_SHAPES)
DIGITS_TEST_SIZE = 300

_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# Seconds a download may wait on a silent connection: an offline machine fails fast, not never.
DOWNLOAD_TIMEOUT_S = 30


class Dataset(NamedTuple):
    name: str
    x_train: np.ndarray  # [N, H, W, C] float32 in [0, 1]
    y_train: np.ndarray  # [N] int32
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])


def num_classes_of(name):
    return {"cifar10": 10, "cifar100": 100, "digits": 10}[name]


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torchvision_cls(name):
    import torchvision  # only for download and checksums
    return {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]


def _cifar_files(name):
    """(train files, test files) with md5s, as torchvision lists them."""
    cls = _torchvision_cls(name)
    return cls.train_list, cls.test_list


def _read_batch(path, label_key):
    d = restricted_load(path)
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int32)[: len(data)]
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def load_cifar(name, data_dir, download=True):
    folder = os.path.join(data_dir, _CIFAR_DIRS[name])
    train_list, test_list = _cifar_files(name)
    missing = [f for f, _ in train_list + test_list if not os.path.exists(os.path.join(folder, f))]
    if missing:
        if not download:
            raise UserError(f"{name} not found in {folder}")
        cls = _torchvision_cls(name)
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen sets none of its own
        try:
            cls(root=data_dir, train=True, download=True)
        except Exception as e:  # network errors come in many types
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise UserError(
                f"{name} is not in {folder} and could not be downloaded ({reason}). Download {cls.url} "
                f"and extract it into --data_dir (it holds '{_CIFAR_DIRS[name]}/'), or use --dataset digits, "
                f"which needs no download"
            ) from None
        finally:
            socket.setdefaulttimeout(timeout)
    bad = [f for f, md5 in train_list + test_list if _md5(os.path.join(folder, f)) != md5]
    if bad:
        warnings.warn(f"{name} files in {folder} do not match torchvision's checksums "
                      f"({', '.join(bad)}): not the canonical set", stacklevel=2)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    parts = [_read_batch(os.path.join(folder, f), label_key) for f, _ in train_list]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_batch(os.path.join(folder, test_list[0][0]), label_key)
    return Dataset(name, _to_float(x_tr), y_tr, _to_float(x_te), y_te, num_classes_of(name))


def _to_float(images_uint8):
    return (images_uint8.astype(np.float32) / 255.0)


def load_digits_dataset():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]  # [1797, 8, 8, 1]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:-DIGITS_TEST_SIZE], perm[-DIGITS_TEST_SIZE:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10)


def load_dataset(name, data_dir="./data", download=True):
    """Load `name` ('cifar10', 'cifar100' or 'digits') as a `Dataset` of numpy arrays."""
    if name == "digits":
        return load_digits_dataset()
    if name in _CIFAR_DIRS:
        return load_cifar(name, data_dir, download)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def balanced_indices(labels, per_class, seed, num_classes=None):
    """`per_class` indices of each class, without replacement, seeded, class 0 first.

    Returns int64 indices into `labels`, grouped by class in increasing order.
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise UserError(f"class {c} has only {len(pool)} images, fewer than the {per_class} per class requested")
        out.append(np.sort(rng.choice(pool, per_class, replace=False)))
    return np.concatenate(out).astype(np.int64)


def balanced_subset(x, y, size, seed, num_classes, what="subset"):
    """A class-balanced seeded subset of `size` images (size must divide by num_classes)."""
    if size % num_classes:
        raise UserError(f"{what} size {size} is not divisible by the number of classes ({num_classes})")
    idx = balanced_indices(y, size // num_classes, seed, num_classes)
    return x[idx], y[idx], idx


def batches(x, y, batch_size, seed=None):
    """Yield `(x_batch, y_batch)` over the arrays; shuffled with a seeded Generator when
    `seed` is given, in order otherwise. The last partial batch is kept."""
    n = len(x)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def num_batches(n, batch_size):
    return -(-n // batch_size)
