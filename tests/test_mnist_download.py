"""data.load_mnist / download_mnist on tiny fake IDX .gz files served from 127.0.0.1: download,
md5 checks, mirrors, interruptions, reuse, the offline error and malformed files. The mirrors and
md5 sums of data.MNIST are swapped for the fake ones, so nothing here leaves the machine."""
import argparse
import gzip
import http.server
import os
import re
import socket
import threading

import numpy as np
import pytest

import cli
import data
from test_download import md5
from utils import UserError

N_TRAIN, N_TEST = 20, 10
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx(array):
    """`array` (uint8) in the IDX format."""
    head = bytes((0, 0, 8, array.ndim)) + np.asarray(array.shape, ">u4").tobytes()
    return head + array.astype(np.uint8).tobytes()


class Mirror:
    """Serves `files` ({name: bytes}) at /<name> and counts requests; a name in `cut` gets half of
    its bytes and a closed connection; other names get a 404."""

    def __init__(self, files):
        self.files, self.cut, self.hits = dict(files), set(), 0
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                srv.hits += 1
                name = self.path.lstrip("/")
                blob = srv.files.get(name)
                if blob is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob[: len(blob) // 2] if name in srv.cut else blob)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def refused_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture(params=["mnist", "fashion_mnist"])
def fake(request, tmp_path, monkeypatch):
    """Tiny IDX .gz files of `name` (20 train, 10 test images), served locally and entered in data.MNIST."""
    name = request.param
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8), np.arange(N_TRAIN, dtype=np.uint8) % 10,
              rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8), np.arange(N_TEST, dtype=np.uint8)[::-1] % 10)
    gzs = {f + ".gz": gzip.compress(idx(a), mtime=0) for f, a in zip(IDX, arrays)}
    mirror = Mirror(gzs)
    spec = data.MNIST[name]._replace(mirrors=(mirror.url,), files=tuple((f, md5(b)) for f, b in gzs.items()))
    monkeypatch.setitem(data.MNIST, name, spec)
    monkeypatch.setattr(data, "DOWNLOAD_RETRIES", 0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    mirror.name, mirror.spec, mirror.arrays, mirror.gzs = name, spec, arrays, gzs
    mirror.data_dir = str(tmp_path / "data")
    mirror.raw = os.path.join(mirror.data_dir, spec.folder, "raw")
    yield mirror
    mirror.close()


def load(fake, **kw):
    return data.load_dataset(fake.name, fake.data_dir, **kw)


def swap(fake, monkeypatch, **fields):
    monkeypatch.setitem(data.MNIST, fake.name, fake.spec._replace(**fields))


def test_download_installs_torchvision_layout_and_is_reused(fake):
    ds = load(fake)
    assert fake.hits == 4
    assert sorted(os.listdir(fake.raw)) == sorted(IDX + tuple(fake.gzs))  # no partial or temporary files
    assert fake.raw == os.path.join(fake.data_dir, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[fake.name], "raw")
    assert ds.x_train.shape == (N_TRAIN, 28, 28, 1) and ds.x_test.shape == (N_TEST, 28, 28, 1)
    assert ds.input_shape == data.INPUT_SHAPES[fake.name] and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    x_tr, y_tr, x_te, y_te = fake.arrays
    np.testing.assert_array_equal(ds.x_train[..., 0], x_tr.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.x_test[..., 0], x_te.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    load(fake)
    assert fake.hits == 4  # the IDX files are reused
    for f in IDX:  # the IDX files deleted, the kept .gz files are extracted again without a request
        os.remove(os.path.join(fake.raw, f))
    np.testing.assert_array_equal(load(fake).x_train, ds.x_train)
    assert fake.hits == 4


def test_gz_files_alone_are_extracted_without_a_request(fake):
    os.makedirs(fake.raw)
    for f, blob in fake.gzs.items():
        with open(os.path.join(fake.raw, f), "wb") as out:
            out.write(blob)
    assert load(fake).x_test.shape == (N_TEST, 28, 28, 1)
    assert fake.hits == 0 and sorted(os.listdir(fake.raw)) == sorted(IDX + tuple(fake.gzs))


def test_a_gz_with_the_wrong_md5_on_disk_is_fetched_again(fake):
    os.makedirs(fake.raw)
    gz = IDX[0] + ".gz"
    with open(os.path.join(fake.raw, gz), "wb") as f:
        f.write(fake.gzs[gz][:100])  # cut short
    load(fake)
    assert fake.hits == 4
    with open(os.path.join(fake.raw, gz), "rb") as f:
        assert f.read() == fake.gzs[gz]


def test_existing_idx_files_are_never_overwritten(fake):
    os.makedirs(fake.raw)
    mine = idx(np.full((3, 28, 28), 255, np.uint8))
    with open(os.path.join(fake.raw, IDX[0]), "wb") as f:
        f.write(mine)
    with pytest.raises(UserError, match=f"{IDX[1]} holds 20 labels .* for each of the 3 images"):
        load(fake)
    assert fake.hits == 3  # only the three missing files
    with open(os.path.join(fake.raw, IDX[0]), "rb") as f:
        assert f.read() == mine


def test_wrong_md5_is_a_one_line_error_and_keeps_nothing(fake, monkeypatch):
    files = list(fake.spec.files)
    files[0] = (files[0][0], "0" * 32)
    swap(fake, monkeypatch, files=tuple(files))
    with pytest.raises(UserError, match="not the published one.*nothing was kept") as e:
        load(fake)
    assert "\n" not in str(e.value)
    assert not os.path.exists(fake.data_dir)  # not even the --data_dir it created
    files[0], files[2] = fake.spec.files[0], (files[2][0], "0" * 32)
    swap(fake, monkeypatch, files=tuple(files))
    with pytest.raises(UserError, match="not the published one"):
        load(fake)
    assert sorted(os.listdir(fake.raw)) == sorted(IDX[:2] + (IDX[0] + ".gz", IDX[1] + ".gz"))


def test_a_cut_transfer_leaves_no_partial_file_and_the_next_run_succeeds(fake):
    fake.cut = {IDX[2] + ".gz"}
    with pytest.raises(UserError, match="could not be downloaded") as e:
        load(fake)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(fake.raw)) == sorted(IDX[:2] + (IDX[0] + ".gz", IDX[1] + ".gz"))
    fake.cut = set()
    load(fake)
    assert fake.hits == 3 + 2  # the two files after the cut one, and it again


def test_interrupted_extraction_leaves_no_idx_file_and_the_next_run_succeeds(fake, monkeypatch):
    real_fsync, calls = os.fsync, []

    def fsync_then_interrupt(fd):
        calls.append(fd)
        if len(calls) == 2:  # while the second IDX file is written
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(data.os, "fsync", fsync_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        load(fake)
    monkeypatch.setattr(data.os, "fsync", real_fsync)
    assert sorted(os.listdir(fake.raw)) == sorted((IDX[0], IDX[0] + ".gz", IDX[1] + ".gz"))
    with pytest.raises(UserError, match=f"not found in {re.escape(fake.raw)} .*{IDX[1]}"):
        load(fake, download=False)
    load(fake)
    assert fake.hits == 4  # the verified .gz was reused


def test_partial_files_of_dead_runs_are_removed_live_ones_kept(fake, monkeypatch):
    os.makedirs(fake.raw)
    prefix = f".{IDX[0]}.partial-{socket.gethostname()}-"
    dead, live = (os.path.join(fake.raw, f"{prefix}{pid}-abcd") for pid in (12345678, os.getpid()))
    for p in (dead, live):
        with open(p, "wb") as f:
            f.write(b"cut short")
    monkeypatch.setattr(data, "_alive", lambda pid: pid == os.getpid())
    load(fake)
    assert not os.path.exists(dead) and os.path.exists(live)


def test_no_server_is_a_one_line_error_with_the_hint_and_leaves_no_data_dir(fake, monkeypatch):
    url = refused_url()
    swap(fake, monkeypatch, mirrors=(url,))
    with pytest.raises(UserError) as e:
        load(fake)
    msg = str(e.value)
    assert "\n" not in msg and f"{fake.name} is not in {fake.raw} and could not be downloaded (ConnectionError" in msg
    assert f"Download {', '.join(f + '.gz' for f in IDX)} from {url} into {fake.raw}" in msg
    assert msg.endswith("or use --dataset digits, which needs no download")
    assert not os.path.exists(fake.data_dir)
    os.makedirs(fake.data_dir)
    with pytest.raises(UserError, match="could not be downloaded"):
        load(fake)
    assert os.listdir(fake.data_dir) == []  # an existing --data_dir stays, without an empty MNIST/raw


def test_missing_files_without_download_are_an_error(fake):
    with pytest.raises(UserError, match=re.escape(f"{fake.name} not found in {fake.raw} (missing {', '.join(IDX)})")):
        load(fake, download=False)
    assert fake.hits == 0 and not os.path.exists(fake.data_dir)


def test_a_failing_mirror_falls_back_to_the_next(fake, monkeypatch):
    wrong = Mirror({f: gzip.compress(b"not it") for f in fake.gzs})  # serves files with other md5s
    missing = Mirror({})  # 404 for everything
    try:
        swap(fake, monkeypatch, mirrors=(refused_url(), missing.url, wrong.url, fake.url))
        assert load(fake).x_train.shape == (N_TRAIN, 28, 28, 1)
        assert (missing.hits, wrong.hits, fake.hits) == (4, 4, 4)
    finally:
        wrong.close()
        missing.close()


@pytest.mark.parametrize("fault", ["magic", "dims", "length", "labels"])
def test_a_malformed_idx_file_is_a_one_line_error_naming_it(fake, fault):
    load(fake)
    target = IDX[3] if fault == "labels" else IDX[2]
    blob = {"magic": b"\0\0\x09\x03" + idx(fake.arrays[2])[4:],  # signed bytes
            "dims": idx(np.zeros((N_TEST, 28, 27), np.uint8)),
            "length": idx(fake.arrays[2])[:-1],
            "labels": idx(np.full(N_TEST, 10, np.uint8))}[fault]
    with open(os.path.join(fake.raw, target), "wb") as f:
        f.write(blob)
    with pytest.raises(UserError, match=re.escape(os.path.join(fake.raw, target))) as e:
        load(fake)
    assert "\n" not in str(e.value)


def test_the_real_specs_and_the_scripts_dataset_choices():
    assert data.DATASETS[:3] == ("cifar10", "cifar100", "digits")
    assert set(data.CIFAR) | set(data.MNIST) | {"digits"} == set(data.DATASETS)
    parser = argparse.ArgumentParser()
    cli.add_network_args(parser)
    for name, folder in (("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")):
        assert name in cli.DATASETS and parser.parse_args(["--dataset", name]).dataset == name
        assert data.INPUT_SHAPES[name] == (28, 28, 1) and data.num_classes_of(name) == 10
        spec = data.MNIST[name]
        assert spec.folder == folder and [f for f, _ in spec.files] == [f + ".gz" for f in IDX]
        assert all(len(s) == 32 for _, s in spec.files) and all(m.endswith("/") for m in spec.mirrors)
