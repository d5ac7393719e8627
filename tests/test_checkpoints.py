"""Checkpoints: round trip, restricted unpickling, old JAX pickles, atomic writes."""
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import get_model
from checkpoints import cast_to_model, check_meta, load_checkpoint, save_checkpoint
from tests.reference_pickles import old_jax_pickle
from utils import UserError, restricted_load


@pytest.fixture(scope="module")
def model():
    init, _ = get_model("resnet18", 10, width=2)
    return init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)


def test_checkpoint_round_trips(tmp_path, model):
    params, state = model
    path = tmp_path / "ck.pkl"
    meta = {"model": "resnet18", "width": 2, "num_classes": 10}
    save_checkpoint(path, params, params, state, meta)
    ck = load_checkpoint(str(path))
    check_meta(ck["meta"], str(path), model="resnet18", width=2, num_classes=10)
    ck = cast_to_model(ck, str(path), params, state)
    assert ck["meta"] == meta
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ck["params"])):
        np.testing.assert_array_equal(a, b)
    # leaves on disk are numpy arrays, not jax arrays
    raw = restricted_load(str(path))
    assert all(type(v) is np.ndarray for v in jax.tree_util.tree_leaves(raw["params"]))


def test_mismatched_model_names_key_and_shapes(tmp_path, model):
    params, state = model
    init4, _ = get_model("resnet18", 10, width=4)
    p4, s4 = init4(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)
    path = tmp_path / "w4.pkl"
    save_checkpoint(path, p4, p4, s4)  # no meta: the tree check must catch it
    with pytest.raises(UserError, match=r"'res_net18/~/.*' has shape \(.*\) in the file but the model expects"):
        cast_to_model(load_checkpoint(str(path)), str(path), params, state)
    save_checkpoint(path, p4, p4, s4, {"width": 4})
    with pytest.raises(UserError, match="width=4 but width=2"):
        check_meta(load_checkpoint(str(path))["meta"], str(path), width=2)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"params": _Evil()}))
    with pytest.raises(UserError, match="refusing to load global 'posix.system'|refusing to load global 'os.system'"):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_corrupt_and_missing_checkpoints(tmp_path, model):
    params, state = model
    path = tmp_path / "ck.pkl"
    save_checkpoint(path, params, params, state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(str(path))
    with pytest.raises(UserError, match="file not found"):
        load_checkpoint(str(tmp_path / "nope.pkl"))
    text = tmp_path / "README.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(str(text))


def test_reads_jax_04_era_pickles_without_jax_internals(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = old_jax_pickle({"w": a})
    assert b"jax._src.array\n_reconstruct_array" in raw and b"numpy.core.multiarray" in raw
    path = tmp_path / "old.pkl"
    path.write_bytes(raw)
    out = restricted_load(str(path))
    np.testing.assert_array_equal(out[b"w"] if b"w" in out else out["w"], a)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, model):
    params, state = model
    path = tmp_path / "ck.pkl"
    save_checkpoint(path, params, params, state, {"epoch": 1})
    before = path.read_bytes()
    # A child process starts writing a large checkpoint and is killed -9 mid-write.
    code = textwrap.dedent(f"""
        import numpy as np, os, signal, threading, checkpoints
        real = os.replace
        def slow_replace(*a):
            os.kill(os.getpid(), signal.SIGKILL)  # die after the temp file, before the rename
        os.replace = slow_replace
        big = {{"m": {{"w": np.ones((4000, 4000), np.float32)}}}}
        checkpoints.save_checkpoint({str(path)!r}, big, big, {{}}, {{"epoch": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -9
    assert path.read_bytes() == before
    assert load_checkpoint(str(path))["meta"]["epoch"] == 1


def test_unwritable_directory_gives_clear_error(tmp_path, model):
    params, state = model
    if os.geteuid() == 0:
        target = "/proc/forbidden/ck.pkl"  # root ignores permissions; /proc refuses files
    else:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        target = str(d / "ck.pkl")
    with pytest.raises(UserError, match="cannot write"):
        save_checkpoint(target, params, params, state)
