"""data.download_cifar on a fake CIFAR-10 archive served from 127.0.0.1: download, md5 checks,
retries, interruptions (a cut connection, Ctrl-C during extraction, SIGKILL mid-download) and reuse.
Nothing here leaves the machine: the table of URLs and md5 sums is swapped for the fake one."""
import hashlib
import http.server
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import warnings

import numpy as np
import pytest

import data
from conftest import ROOT
from test_data import write_tiny_cifar10
from utils import UserError

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"


def md5(blob):
    return hashlib.md5(blob).hexdigest()


class Server:
    """Serves `payload` at /cifar-10-python.tar.gz. `cut` next requests get half of it and a closed
    connection; with `stall` set, a request gets half, then waits until `release` is set."""

    def __init__(self, payload):
        self.payload, self.cut, self.stall, self.hits = payload, 0, False, 0
        self.stalled, self.release = threading.Event(), threading.Event()
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                srv.hits += 1
                if self.path != "/" + ARCHIVE:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(srv.payload)))
                self.end_headers()
                half = srv.payload[: len(srv.payload) // 2]
                if srv.cut > 0:
                    srv.cut -= 1
                    self.wfile.write(half)
                elif srv.stall:
                    self.wfile.write(half)
                    self.wfile.flush()
                    srv.stalled.set()
                    srv.release.wait(60)
                else:
                    self.wfile.write(srv.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{ARCHIVE}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A tiny CIFAR-10 archive (with batches.meta), served locally and entered in data.CIFAR."""
    src = tmp_path / "src"
    folder = write_tiny_cifar10(src)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f, protocol=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=FOLDER)
    payload = buf.getvalue()
    sums = {f: md5(open(os.path.join(folder, f), "rb").read()) for f in os.listdir(folder)}
    server = Server(payload)
    real = data.CIFAR["cifar10"]
    spec = real._replace(url=server.url, md5=md5(payload),
                         train=tuple((f, sums[f]) for f, _ in real.train),
                         test=tuple((f, sums[f]) for f, _ in real.test),
                         meta=(real.meta[0], sums[real.meta[0]]))
    monkeypatch.setitem(data.CIFAR, "cifar10", spec)
    monkeypatch.setattr(data, "DOWNLOAD_RETRIES", 0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server.spec, server.src, server.data_dir = spec, folder, str(tmp_path / "data")
    yield server
    server.close()


def load(fake, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete, verified download loads without the subset warning
        return data.load_dataset("cifar10", fake.data_dir, **kw)


def leftovers(data_dir):
    """Entries of data_dir besides the archive and the dataset folder (partial dirs, temp files)."""
    return sorted(set(os.listdir(data_dir)) - {ARCHIVE, FOLDER})


def test_download_installs_torchvision_layout_and_is_reused(fake):
    ds = load(fake)
    assert fake.hits == 1
    assert sorted(os.listdir(os.path.join(fake.data_dir, FOLDER))) == sorted(f for f, _ in fake.spec.files)
    assert leftovers(fake.data_dir) == []
    with open(os.path.join(fake.data_dir, ARCHIVE), "rb") as f:
        assert f.read() == fake.payload  # kept, as torchvision keeps it
    # Same arrays as reading the source folder directly (download=False never downloads).
    direct = data.load_dataset("cifar10", os.path.dirname(fake.src), download=False)
    for a, b in zip(ds[1:5], direct[1:5]):
        np.testing.assert_array_equal(a, b)
    assert ds.x_train.shape == (100, 32, 32, 3)
    load(fake)
    assert fake.hits == 1  # the folder is reused
    # The folder deleted, the kept archive is extracted again without a download.
    for f in os.listdir(os.path.join(fake.data_dir, FOLDER)):
        os.remove(os.path.join(fake.data_dir, FOLDER, f))
    os.rmdir(os.path.join(fake.data_dir, FOLDER))
    load(fake)
    assert fake.hits == 1


def test_wrong_archive_md5_is_an_error_and_keeps_nothing(fake, monkeypatch):
    monkeypatch.setitem(data.CIFAR, "cifar10", fake.spec._replace(md5="0" * 32))
    with pytest.raises(UserError, match="not the published one.*nothing was kept") as e:
        data.load_dataset("cifar10", fake.data_dir)
    assert "\n" not in str(e.value)
    assert not os.path.exists(fake.data_dir)  # not even the --data_dir it created
    os.makedirs(fake.data_dir)
    with pytest.raises(UserError, match="not the published one"):
        data.load_dataset("cifar10", fake.data_dir)
    assert os.listdir(fake.data_dir) == []  # an existing --data_dir stays, empty


def test_wrong_file_md5_in_a_good_archive_is_an_error_and_installs_nothing(fake, monkeypatch):
    spec = fake.spec._replace(test=(("test_batch", "0" * 32),))
    monkeypatch.setitem(data.CIFAR, "cifar10", spec)
    with pytest.raises(UserError, match="test_batch"):
        data.load_dataset("cifar10", fake.data_dir)
    assert os.listdir(fake.data_dir) == [ARCHIVE]


def test_a_cut_connection_is_retried(fake, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_RETRIES", 1)
    fake.cut = 1
    load(fake)
    assert fake.hits == 2 and leftovers(fake.data_dir) == []


def test_a_cut_connection_without_retries_is_a_clean_error_then_refetched(fake):
    fake.cut = 1
    with pytest.raises(UserError, match="could not be downloaded") as e:
        data.load_dataset("cifar10", fake.data_dir)
    assert "\n" not in str(e.value)
    assert not os.path.exists(fake.data_dir)  # neither a half archive nor a folder
    load(fake)
    assert fake.hits == 2


def test_a_truncated_archive_on_disk_is_fetched_again(fake):
    os.makedirs(fake.data_dir)
    with open(os.path.join(fake.data_dir, ARCHIVE), "wb") as f:
        f.write(fake.payload[: len(fake.payload) // 2])
    load(fake)
    assert fake.hits == 1
    with open(os.path.join(fake.data_dir, ARCHIVE), "rb") as f:
        assert f.read() == fake.payload


def test_interrupted_extraction_leaves_no_folder(fake, monkeypatch):
    calls = []
    real_fsync = os.fsync

    def fsync_then_interrupt(fd):
        calls.append(fd)
        if len(calls) == 3:  # after the third of seven files is written
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(data.os, "fsync", fsync_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset("cifar10", fake.data_dir)
    monkeypatch.setattr(data.os, "fsync", real_fsync)
    assert os.listdir(fake.data_dir) == [ARCHIVE]  # verified archive kept; no folder, no partial dir
    with pytest.raises(UserError, match="not found"):
        data.load_dataset("cifar10", fake.data_dir, download=False)
    load(fake)
    assert fake.hits == 1


def test_sigkill_mid_download_leaves_nothing_taken_for_data(fake):
    fake.stall = True
    script = ("import ast, sys; import data; "
              "data.CIFAR['cifar10'] = data.CifarFiles(*ast.literal_eval(sys.argv[1])); "
              "data.load_dataset('cifar10', sys.argv[2])")
    env = dict(os.environ, PYTHONPATH=ROOT, NO_PROXY="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-c", script, repr(tuple(fake.spec)), fake.data_dir],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert fake.stalled.wait(60), "the download never started"
        time.sleep(0.3)  # let the client write what it got
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert FOLDER not in os.listdir(fake.data_dir) and ARCHIVE not in os.listdir(fake.data_dir)
    with pytest.raises(UserError, match="not found"):
        data.load_dataset("cifar10", fake.data_dir, download=False)
    fake.stall = False
    assert load(fake).x_train.shape == (100, 32, 32, 3)


def test_partial_dirs_of_dead_runs_are_removed_live_ones_kept(fake):
    os.makedirs(fake.data_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = f".{FOLDER}.partial-{socket.gethostname()}-"
    stale = os.path.join(fake.data_dir, f"{prefix}{dead.pid}-abcd")
    live = os.path.join(fake.data_dir, f"{prefix}{os.getpid()}-abcd")
    for d in (stale, live):
        os.makedirs(d)
        with open(os.path.join(d, "data_batch_1"), "wb") as f:
            f.write(b"cut short")
    load(fake)
    assert not os.path.exists(stale) and os.path.exists(live)


def test_a_partly_filled_folder_gets_only_its_missing_files(fake):
    folder = os.path.join(fake.data_dir, FOLDER)
    os.makedirs(folder)
    write_tiny_cifar10(os.path.join(fake.data_dir, "mine"), seed=7)
    os.replace(os.path.join(fake.data_dir, "mine", FOLDER, "data_batch_1"), os.path.join(folder, "data_batch_1"))
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        before = f.read()
    with pytest.warns(UserWarning, match=r"\(data_batch_1\): not the canonical set"):
        data.load_dataset("cifar10", fake.data_dir)
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        assert f.read() == before  # never overwritten
    assert sorted(os.listdir(folder)) == sorted(f for f, _ in fake.spec.files)


def test_no_server_is_a_one_line_error_saying_where_to_put_the_files(fake, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{ARCHIVE}"
    monkeypatch.setitem(data.CIFAR, "cifar10", fake.spec._replace(url=url))
    with pytest.raises(UserError) as e:
        data.load_dataset("cifar10", fake.data_dir)
    msg = str(e.value)
    assert "\n" not in msg and "could not be downloaded (ConnectionError" in msg
    assert f"Download {url} and extract it into --data_dir (it holds '{FOLDER}/')" in msg
    assert "--dataset digits" in msg
    assert not os.path.exists(fake.data_dir)


def test_every_cifar_dataset_has_a_table_entry():
    assert set(data.CIFAR) | set(data.MNIST) == set(data.DATASETS) - {"digits"}
    for name, spec in data.CIFAR.items():
        assert spec.url.endswith("/" + spec.archive) and data.INPUT_SHAPES[name] == (32, 32, 3)
