"""Running the scripts as a user does, from tests: a scratch directory holding a tiny digits
MLP run and files of every wrong kind, and `call`, which runs a script's main(argv) in this
process and judges it as `python script.py argv` would be judged (exit status, stdout, stderr).

`call` is what the fuzz test (test_fuzz_cli.py) and the bad-input tests use: SystemExit gives the
exit status as Python would (None is 0, a message is printed and gives 1), any other exception is
a traceback (exit 1), stdout and stderr are captured at the file-descriptor level too (so C-level
output counts), and warnings are filtered as in a fresh interpreter (each shown once).
"""
import contextlib
import hashlib
import io
import os
import shutil
import socket
import sys
import tempfile
import traceback
import warnings

import numpy as np
import pytest

# The fixture run's seed: no value the fuzz draws equals it, so no drawn run_exp.py call is "the
# same run" (which may replace its files).
FIXTURE_SEED = "12345"
TINY = ["--dataset", "digits", "--model", "mlp_skinny", "--train_size", "40", "--test_size", "20",
        "--batch_size", "20", "--pgd_eval_steps", "1", "--no_progress"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def _build(d):
    """The scratch directory's contents, made with the scripts themselves:
    run/                    run_exp.py, 1 epoch, --constant_save --save_models (parameters_checkpoint_{0,
                            0.125, ..., 1}.pkl, parameters_final.pkl, results.*, config.json, ...)
    run/kernels/            calculate_kernel.py --save_name fixture: fixture_class_0_20.pkl
    run/evals/              eval_and_make_adv.py --save_name fixture --save_examples
    run/vis/                visualize_ntk_features.py --save_name fixture_images (.pkl, .png)
    mini/                   two of run/'s checkpoints (epochs 0 and 1)
    truncated.pkl, empty.pkl, notes.txt, evil.pkl (runs os.system when unpickled), random.bin (random
    bytes), loop (a symlink to itself), emptydir/"""
    import pickle

    import calculate_kernel
    import eval_and_make_adv
    import run_exp
    import visualize_ntk_features
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        run_exp.main([*TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--constant_save", "--save_models",
                      "--random_seed", FIXTURE_SEED, "--save_path", os.path.join(d, "run")])
        final = os.path.join(d, "run", "parameters_final.pkl")
        calculate_kernel.main(["--model_path", final, "--dataset_size", "20", "--class_index", "0",
                               "--save_name", "fixture", "--bonus_dir", "kernels", "--no_progress"])
        eval_and_make_adv.main(["--model_path", final, "--test_size", "20", "--pgd_steps", "1", "--save_examples",
                                "--save_name", "fixture", "--bonus_dir", "evals", "--no_progress"])
        visualize_ntk_features.main(["--model_path", final, "--kernel_path",
                                     os.path.join(d, "run", "kernels", "fixture_class_0_20.pkl"), "--steps", "2",
                                     "--n_images", "1", "--save_name", "fixture_images", "--bonus_dir", "vis",
                                     "--no_progress"])
    with open(final, "rb") as f:
        raw = f.read()
    with open(os.path.join(d, "truncated.pkl"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    open(os.path.join(d, "empty.pkl"), "wb").close()
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("not a checkpoint\n")
    with open(os.path.join(d, "evil.pkl"), "wb") as f:
        pickle.dump({"params": _Evil(), "lin_params": {}, "net_state": {}}, f)
    with open(os.path.join(d, "random.bin"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    os.symlink("loop", os.path.join(d, "loop"))   # a symlink loop: opening it fails with ELOOP
    os.mkdir(os.path.join(d, "emptydir"))
    os.mkdir(os.path.join(d, "mini"))  # a run directory with two checkpoints: a quick analyze_ntk.py dynamics
    for e in (0, 1):
        shutil.copy2(os.path.join(d, "run", f"parameters_checkpoint_{e}.pkl"), os.path.join(d, "mini"))


def snapshot(d):
    """{path: (mtime, sha1)} of every file under `d`."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            path = os.path.join(root, n)
            if os.path.islink(path):
                out[path] = (os.readlink(path), None)
                continue
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mtime_ns, hashlib.sha1(f.read()).hexdigest())
    return out


class Scratch:
    """The scratch directory (always at the same path, since kernel files record absolute
    checkpoint paths) and a pristine copy to restore it from."""

    def __init__(self, root):
        self.root = root
        self.dir = os.path.join(root, "scratch", "work")
        self.pristine = os.path.join(root, "pristine")
        os.makedirs(self.dir)
        _build(self.dir)
        shutil.copytree(self.dir, self.pristine, symlinks=True)
        self.files = snapshot(self.pristine)

    def restore(self):
        shutil.rmtree(os.path.join(self.root, "scratch"))
        shutil.copytree(self.pristine, self.dir, symlinks=True)  # copy2 keeps the mtimes

    def changed(self):
        """Files of the scratch directory's original contents that are gone or differ."""
        now = snapshot(self.dir)
        out = []
        for path, sig in self.files.items():
            mine = os.path.join(self.dir, os.path.relpath(path, self.pristine))
            if now.get(mine) != sig:
                out.append(os.path.relpath(mine, self.dir))
        return out


@contextlib.contextmanager
def offline():
    """No network (name resolution fails as offline) and no waits between download retries."""
    import data
    mp = pytest.MonkeyPatch()

    def refuse(*a, **k):
        raise socket.gaierror(-3, "network blocked by the test")
    mp.setattr(socket, "getaddrinfo", refuse)
    mp.setattr(data, "DOWNLOAD_RETRIES", 0)
    try:
        yield
    finally:
        mp.undo()


# ------------------------------------------------------------------------------------------
# A call judged as the command line would be
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _captured_fds():
    """Capture fds 1 and 2 (and sys.stdout/sys.stderr) into temporary files; yields a dict
    that receives 'stdout' and 'stderr' on exit."""
    got = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}
    out, err = io.TextIOWrapper(files[1], write_through=True), io.TextIOWrapper(files[2], write_through=True)
    try:
        for fd in (1, 2):
            os.dup2(files[fd].fileno(), fd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield got
    finally:
        for stream in (out, err):
            stream.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            files[fd].seek(0)
            got[name] = files[fd].read().decode(errors="replace")
            files[fd].close()


def main_of(script):
    import importlib
    return importlib.import_module(script.split()[0]).main


def call(script, argv, cwd):
    """Run `script`'s main(argv) in this process as `python script.py argv` would run.
    Returns (exit status, stdout, stderr)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with _captured_fds() as got, warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh interpreter's filters (this also clears the registries)
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                main_of(script)(argv)
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: B902 - what the interpreter would print
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old)
    return code, got["stdout"], got["stderr"]


def verdict(code, stderr):
    """What is wrong with a call's exit status and stderr (None if nothing)."""
    if "Traceback" in stderr:
        return "traceback"
    if code not in (0, 2):
        return f"exit status {code}"
    if code == 2:
        lines = stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: "):
            return f"exit 2 with {len(lines)} stderr lines"
    return None
