"""Datasets as in-memory arrays: images NHWC float32 in [0, 1], labels int32.

- cifar10 / cifar100: torchvision's on-disk python layout under `data_dir`
  (`cifar-10-batches-py/`, `cifar-100-python/`), so folders torchvision filled are used as
  they are. The batch files are read with numpy. Missing files are downloaded with pooch
  (md5-checked, retried, with a progress bar) and extracted atomically (`download_cifar`).
- digits: scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1], 1 channel,
  with a fixed split: a permutation with seed 0, the first 1497 for training and the
  last 300 for testing. It needs no download, so everything runs offline on it.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import posixpath
import re
import secrets
import shutil
import socket
import tarfile
import warnings
import zlib
from typing import NamedTuple

import numpy as np

from utils import Notice, UserError, restricted_load

# Image shape (H, W, C) of each dataset, known without loading it.
INPUT_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "digits": (8, 8, 1)}
DATASETS = tuple(INPUT_SHAPES)
DIGITS_TEST_SIZE = 300


class CifarFiles(NamedTuple):
    """Where a CIFAR archive comes from and what it holds, with md5 sums of each file."""
    folder: str  # directory under data_dir, as the archive (and torchvision) names it
    url: str
    md5: str  # of the .tar.gz archive
    train: tuple  # ((file name, md5), ...) in reading order
    test: tuple
    meta: tuple  # (file name, md5): the class names; checked, not read
    label_key: str

    @property
    def archive(self):
        return self.url.rsplit("/", 1)[-1]

    @property
    def files(self):
        return self.train + self.test + (self.meta,)


# The published URLs and md5 sums, the ones torchvision checks (torchvision/datasets/cifar.py),
# so folders torchvision downloaded pass as they are. Tests swap in entries for a fake archive.
CIFAR = {
    "cifar10": CifarFiles(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key="labels"),
    "cifar100": CifarFiles(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key="fine_labels"),
}
# Seconds a download may wait on a silent connection: an offline machine fails fast, not never.
DOWNLOAD_TIMEOUT_S = 30
# Further attempts after a failed or corrupted download (pooch waits 1 s, then 2 s, ... between).
DOWNLOAD_RETRIES = 2


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


def _read_batch(path, label_key):
    d = restricted_load(path)
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int32)[: len(data)]
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def load_cifar(name, data_dir, download=True):
    spec = CIFAR[name]
    folder = os.path.join(data_dir, spec.folder)
    missing = [f for f, _ in spec.train + spec.test if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        if not download:
            raise UserError(f"{name} not found in {folder} (missing {', '.join(missing)})")
        download_cifar(name, data_dir)
    present = [(f, md5) for f, md5 in spec.files if os.path.isfile(os.path.join(folder, f))]
    bad = [f for f, md5 in present if _md5(os.path.join(folder, f)) != md5]
    if bad:
        warnings.warn(f"{name} files in {folder} do not match the published md5 sums "
                      f"({', '.join(bad)}): not the canonical set", Notice, stacklevel=2)
    parts = [_read_batch(os.path.join(folder, f), spec.label_key) for f, _ in spec.train]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_batch(os.path.join(folder, spec.test[0][0]), spec.label_key)
    return Dataset(name, _to_float(x_tr), y_tr, _to_float(x_te), y_te, num_classes_of(name))


def download_cifar(name, data_dir):
    """Fetch `name`'s archive into `data_dir` and install its files in `data_dir/<folder>/`.

    pooch streams the archive to a temporary file, checks its md5 and only then renames it to
    `data_dir/<archive>` (kept, as torchvision keeps it: an archive already there with the right
    md5 is reused, one with another md5, e.g. cut short, is fetched again); failed or corrupted
    downloads are retried `DOWNLOAD_RETRIES` times. The files of the archive are written to a
    hidden `.<folder>.partial-<host>-<pid>-*` directory, each checked against its md5, and that
    directory is renamed to `<folder>` in one step, so a run killed at any point leaves no
    `<folder>` with files missing or cut short (and the next download removes the partial
    directories of dead runs). If `<folder>` already exists, only its missing files are added,
    each renamed into place; files there are never overwritten.
    """
    spec = CIFAR[name]
    created = not os.path.isdir(data_dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --data_dir {data_dir} ({_reason(e)})") from None
    _remove_dead_partials(data_dir, spec.folder)
    try:
        archive = _fetch_archive(name, spec, data_dir)
    except UserError:
        if created:  # a failed download leaves no trace, not even an empty --data_dir
            with contextlib.suppress(OSError):
                os.rmdir(data_dir)  # removes it only if it is still empty
        raise
    _install(spec, archive, data_dir)


def _fetch_archive(name, spec, data_dir):
    import pooch  # imported here: only a download needs them
    import requests
    from tqdm import tqdm

    fetcher = pooch.create(path=data_dir, base_url="", registry={spec.archive: f"md5:{spec.md5}"},
                           urls={spec.archive: spec.url}, retry_if_failed=DOWNLOAD_RETRIES)

    def download(url, output_file, pooch_):
        # pooch's own HTTPDownloader opens its bar before connecting and leaves it open when
        # the transfer fails (tqdm then prints it after the error message): this one shows a
        # bar only once the server answers, and closes it.
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            response.raise_for_status()
            size = int(response.headers.get("content-length", 0)) or None
            with open(output_file, "wb") as out, tqdm(total=size, desc=spec.archive, unit="B",
                                                      unit_scale=True, unit_divisor=1024) as bar:
                for chunk in response.iter_content(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))

    logger = pooch.get_logger()  # quiet: the bar says what is downloaded, errors say the rest
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return fetcher.fetch(spec.archive, downloader=download)
    except requests.exceptions.RequestException as e:  # no network, refused, cut short, HTTP error
        folder = os.path.join(data_dir, spec.folder)
        raise UserError(
            f"{name} is not in {folder} and could not be downloaded ({_reason(e)}). Download {spec.url} "
            f"and extract it into --data_dir (it holds '{spec.folder}/'), or use --dataset digits, "
            f"which needs no download") from None
    except ValueError as e:  # pooch: the downloaded archive's md5 is not the published one
        raise UserError(f"the archive downloaded from {spec.url} is not the published one "
                        f"({_reason(e)}); nothing was kept") from None
    except OSError as e:
        raise UserError(f"cannot save {spec.archive} in {data_dir} ({_reason(e)})") from None
    finally:
        logger.setLevel(level)


def _reason(e):
    """One line naming the error, with requests' wrapping (and urllib3's object reprs) peeled off."""
    inner = getattr(e.args[0], "reason", None) if e.args else None  # urllib3's MaxRetryError
    text = re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>: ", "", str(e if inner is None else inner))
    return " ".join(f"{type(e).__name__}: {text}".split())


def _install(spec, archive, data_dir):
    folder = os.path.join(data_dir, spec.folder)
    partial = os.path.join(data_dir, f"{_partial_prefix(spec.folder)}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(partial)
    try:
        _extract(spec, archive, partial)
        try:
            os.rename(partial, folder)  # atomic; fails if `folder` exists and is not empty
        except OSError:
            if not os.path.isdir(folder):
                raise
            for f, _ in spec.files:  # a folder partly filled (by hand, or by a run that was first)
                if not os.path.exists(os.path.join(folder, f)):
                    os.replace(os.path.join(partial, f), os.path.join(folder, f))
    except OSError as e:
        raise UserError(f"cannot write {folder} ({_reason(e)})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _extract(spec, archive, dest):
    """Write the archive's `spec.files` (and nothing else) into `dest`, checking their md5s."""
    want = {f"{spec.folder}/{f}": f for f, _ in spec.files}
    got = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                f = want.get(posixpath.normpath(member.name))
                if f is None or not member.isfile():
                    continue
                h = hashlib.md5()
                with tar.extractfile(member) as src, open(os.path.join(dest, f), "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                got[f] = h.hexdigest()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{archive} is not a readable .tar.gz ({_reason(e)}); delete it and run again") from None
    bad = [f for f, md5 in spec.files if got.get(f) != md5]
    if bad:
        raise UserError(f"{archive} has its published md5 but not the expected files: {', '.join(bad)} "
                        f"missing or with other md5 sums than published")


def _partial_prefix(folder):
    return f".{folder}.partial-{socket.gethostname()}-"


def _remove_dead_partials(data_dir, folder):
    """Delete the partial directories that killed runs on this host left in `data_dir`."""
    prefix = _partial_prefix(folder)
    for entry in os.listdir(data_dir):
        pid = entry[len(prefix):].split("-")[0]
        if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(data_dir, entry), ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


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
    if name in CIFAR:
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
