"""Datasets as in-memory arrays: images NHWC float32 in [0, 1], labels int32.

- cifar10 / cifar100: torchvision's on-disk python layout under `data_dir`
  (`cifar-10-batches-py/`, `cifar-100-python/`), so folders torchvision filled are used as
  they are. The batch files are read with numpy. Missing files are downloaded with pooch
  (md5-checked, retried, with a progress bar) and extracted atomically (`download_cifar`).
- mnist / fashion_mnist: torchvision's layout too (`MNIST/raw/`, `FashionMNIST/raw/`), the four
  IDX files read with numpy; a missing one is gunzipped from its .gz, downloaded first if absent
  (md5-checked, retried, from the next mirror when one fails) and renamed into place
  (`download_mnist`).
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
INPUT_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "digits": (8, 8, 1),
                "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1)}
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


class IdxFiles(NamedTuple):
    """Where an MNIST-style dataset comes from: its folder, mirrors and the md5 sums of its .gz files."""
    folder: str  # directory under data_dir, as torchvision names it; the files are in its raw/
    mirrors: tuple  # base URLs, tried in order
    files: tuple  # ((.gz name, md5), ...): train images, train labels, test images, test labels


# torchvision's mirrors and md5 sums (torchvision/datasets/mnist.py). Tests swap in entries.
_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST = {
    "mnist": IdxFiles(
        folder="MNIST",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files=tuple(zip(_IDX_NAMES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                     "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")))),
    "fashion_mnist": IdxFiles(
        folder="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=tuple(zip(_IDX_NAMES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                     "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")))),
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
    return {"cifar10": 10, "cifar100": 100, "digits": 10, "mnist": 10, "fashion_mnist": 10}[name]


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
    folder, missing = missing_files(name, data_dir)
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
    with _made_dirs(data_dir, f"--data_dir {data_dir}"):
        _remove_dead_partials(data_dir, spec.folder)
        archive = _fetch(name, os.path.join(data_dir, spec.folder), spec.archive, spec.md5, (spec.url,), data_dir,
                         f"Download {spec.url} and extract it into --data_dir (it holds '{spec.folder}/')")
    _install(spec, archive, data_dir)


@contextlib.contextmanager
def _made_dirs(path, what):
    """Create `path` and its missing parents; a UserError inside removes those still empty, so a
    failed download leaves no trace, not even an empty --data_dir."""
    created, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} ({_reason(e)})") from None
    try:
        yield
    except UserError:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(d)  # removes it only if it is still empty
        raise


def _fetch(name, where, file, md5, urls, dest, by_hand):
    """`dest/file`, downloaded by pooch from the first of `urls` that serves it with `md5`.

    pooch streams it to a temporary file and renames it into place only once its md5 matches;
    a file already there with that md5 is reused, one with another is fetched again. Failed or
    corrupted downloads are retried `DOWNLOAD_RETRIES` times per URL. Errors are one-line
    UserErrors; `where` and `by_hand` word the one for no network.
    """
    import pooch  # imported here: only a download needs them
    import requests
    from tqdm import tqdm

    def download(url, output_file, pooch_):
        # pooch's own HTTPDownloader opens its bar before connecting and leaves it open when
        # the transfer fails (tqdm then prints it after the error message): this one shows a
        # bar only once the server answers, and closes it.
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            response.raise_for_status()
            size = int(response.headers.get("content-length", 0)) or None
            with open(output_file, "wb") as out, tqdm(total=size, desc=file, unit="B",
                                                      unit_scale=True, unit_divisor=1024) as bar:
                for chunk in response.iter_content(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))

    logger = pooch.get_logger()  # quiet: the bar says what is downloaded, errors say the rest
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        for url in urls:
            fetcher = pooch.create(path=dest, base_url="", registry={file: f"md5:{md5}"}, urls={file: url},
                                   retry_if_failed=DOWNLOAD_RETRIES)
            try:
                return fetcher.fetch(file, downloader=download)
            except (requests.exceptions.RequestException, ValueError):
                if url == urls[-1]:
                    raise  # else the next mirror
    except requests.exceptions.RequestException as e:  # no network, refused, cut short, HTTP error
        raise UserError(f"{name} is not in {where} and could not be downloaded ({_reason(e)}). {by_hand}, "
                        f"or use --dataset digits, which needs no download") from None
    except ValueError as e:  # pooch: the downloaded archive's md5 is not the published one
        raise UserError(f"the archive downloaded from {url} is not the published one "
                        f"({_reason(e)}); nothing was kept") from None
    except OSError as e:
        raise UserError(f"cannot save {file} in {dest} ({_reason(e)})") from None
    finally:
        logger.setLevel(level)


def _reason(e):
    """One line naming the error, with requests' wrapping (and urllib3's object reprs) peeled off."""
    inner = getattr(e.args[0], "reason", None) if e.args else None  # urllib3's MaxRetryError
    text = re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>: ", "", str(e if inner is None else inner))
    return " ".join(f"{type(e).__name__}: {text}".split())


def _install(spec, archive, data_dir):
    folder = os.path.join(data_dir, spec.folder)
    partial = _partial_path(data_dir, spec.folder)
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


def _partial_prefix(name):
    return f".{name}.partial-{socket.gethostname()}-"


def _partial_path(parent, name):
    """A hidden path in `parent` to write `name` to before renaming it, unique to this run."""
    return os.path.join(parent, f"{_partial_prefix(name)}{os.getpid()}-{secrets.token_hex(4)}")


def _remove_dead_partials(parent, name):
    """Delete the partial directories or files of `name` that killed runs on this host left in `parent`."""
    prefix = _partial_prefix(name)
    for entry in os.listdir(parent):
        pid = entry[len(prefix):].split("-")[0]
        if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            path = os.path.join(parent, entry)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _idx_files(name, data_dir):
    """`name`'s raw folder under `data_dir` and its [(IDX file path, .gz name, md5), ...]."""
    raw = os.path.join(data_dir, MNIST[name].folder, "raw")
    return raw, [(os.path.join(raw, gz.removesuffix(".gz")), gz, md5) for gz, md5 in MNIST[name].files]


def missing_files(name, data_dir):
    """(folder, [names of the files `load_dataset(name, data_dir)` reads that are not on disk]);
    digits needs none."""
    if name in CIFAR:
        spec = CIFAR[name]
        folder = os.path.join(data_dir, spec.folder)
        return folder, [f for f, _ in spec.train + spec.test if not os.path.isfile(os.path.join(folder, f))]
    if name in MNIST:
        raw, files = _idx_files(name, data_dir)
        return raw, [os.path.basename(p) for p, _, _ in files if not os.path.isfile(p)]
    return data_dir, []


def load_mnist(name, data_dir, download=True):
    raw, files = _idx_files(name, data_dir)
    paths = [path for path, _, _ in files]
    _, missing = missing_files(name, data_dir)
    if missing:
        if not download:
            raise UserError(f"{name} not found in {raw} (missing {', '.join(missing)})")
        download_mnist(name, data_dir)
    image_shape = INPUT_SHAPES[name][:2]
    x_tr, y_tr, x_te, y_te = (_read_idx(p, s) for p, s in zip(paths, (image_shape, (), image_shape, ())))
    n_classes = num_classes_of(name)
    for x, y, path in ((x_tr, y_tr, paths[1]), (x_te, y_te, paths[3])):
        if len(y) != len(x) or y.max(initial=0) >= n_classes:
            raise UserError(f"{path} holds {len(y)} labels up to {y.max(initial=0)}, not one in 0..{n_classes - 1} "
                            f"for each of the {len(x)} images")
    return Dataset(name, _to_float(x_tr[..., None]), y_tr.astype(np.int32), _to_float(x_te[..., None]),
                   y_te.astype(np.int32), n_classes)


def _read_idx(path, shape):
    """The IDX file `path` of unsigned bytes shaped [N, *shape], as a uint8 array."""
    with open(path, "rb") as f:
        raw = f.read()
    head = 8 + 4 * len(shape)
    dims = tuple(int(d) for d in np.frombuffer(raw[4:head], ">u4")) if len(raw) >= head else ()
    if raw[:4] != bytes((0, 0, 8, len(shape) + 1)) or dims[1:] != shape or len(raw) != head + int(np.prod(dims)):
        raise UserError(f"{path} is not an IDX file of [N{''.join(f', {d}' for d in shape)}] unsigned bytes "
                        f"(header {raw[:head].hex() or 'missing'}, {len(raw)} bytes); delete it and run again")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def download_mnist(name, data_dir):
    """Fetch the .gz of each IDX file missing from `data_dir/<folder>/raw/` and gunzip it there.

    Each .gz is downloaded (`_fetch`: md5-checked, retried, mirror after mirror) next to its IDX
    file and kept, as torchvision keeps it; one already there with the published md5 is used
    without a download. It is gunzipped to a hidden `.<file>.partial-<host>-<pid>-*` file that
    is renamed into place, so a run killed at any point leaves no IDX file cut short (the next
    download removes the partial files of dead runs). IDX files there are never overwritten.
    """
    mirrors = MNIST[name].mirrors
    raw, files = _idx_files(name, data_dir)
    missing = [f for f in files if not os.path.isfile(f[0])]
    by_hand = f"Download {', '.join(gz for _, gz, _ in missing)} from {mirrors[0]} into {raw}"
    with _made_dirs(raw, raw):
        for path, gz, md5 in missing:
            _remove_dead_partials(raw, os.path.basename(path))
            _gunzip(_fetch(name, raw, gz, md5, tuple(m + gz for m in mirrors), raw, by_hand), path)


def _gunzip(archive, path):
    """Write the gunzipped `archive` to `path` through a partial file renamed into place."""
    partial = _partial_path(*os.path.split(path))
    try:
        with gzip.open(archive, "rb") as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)  # atomic
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError: caught first
        raise UserError(f"{archive} is not a readable .gz ({_reason(e)}); delete it and run again") from None
    except OSError as e:
        raise UserError(f"cannot write {path} ({_reason(e)})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


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
    """Load `name` (one of `DATASETS`) as a `Dataset` of numpy arrays."""
    if name == "digits":
        return load_digits_dataset()
    if name in CIFAR:
        return load_cifar(name, data_dir, download)
    if name in MNIST:
        return load_mnist(name, data_dir, download)
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
