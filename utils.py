"""The ground floor under every module: user errors and `run_main`, the restricted unpickler,
atomic writes, and run records. Imports nothing of this project and no JAX at import time."""
from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np


class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line and exit 2."""


def enable_compilation_cache():
    """Keep compiled XLA executables on disk so later runs (and the other scripts, which
    compile the same functions) skip most compilation. Directory: $NTK_JAX_CACHE_DIR, by
    default ~/.cache/ntk_evolution/jax; set NTK_JAX_CACHE_DIR= (empty) to turn it off."""
    import jax
    path = os.environ.get("NTK_JAX_CACHE_DIR", os.path.expanduser("~/.cache/ntk_evolution/jax"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_main(fn, args):
    """Run `fn(args)`; a `UserError` becomes a one-line message and exit status 2. Joins a
    multi-process job first when the environment describes one (parallel.init_distributed)."""
    import parallel
    try:
        parallel.init_distributed()
    except parallel.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    enable_compilation_cache()
    try:
        return fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------
def _reconstruct_jax_array(fun, args, arr_state, aval_state):
    """Stand-in for `jax._src.array._reconstruct_array` (JAX 0.4-era pickles): a numpy array."""
    del aval_state
    arr = fun(*args)
    arr.__setstate__(arr_state)
    return np.asarray(arr)


def _allowed_globals():
    from numpy._core import multiarray, numeric
    return {
        ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,  # protocol-5 numpy pickles
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("jax._src.array", "_reconstruct_array"): _reconstruct_jax_array,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes under pickle protocol 2
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        fn = _allowed_globals().get((module, name))
        if fn is None:
            raise _Refused(f"refusing to load global '{module}.{name}'")
        return fn


def decode_keys(obj):
    """`obj` with the bytes keys of its (nested) dicts decoded: pickles written by Python 2, or
    read with encoding='bytes', key their dicts by bytes."""
    if isinstance(obj, dict):
        return {(k.decode() if isinstance(k, bytes) else k): decode_keys(v) for k, v in obj.items()}
    return obj


def restricted_load(path):
    """Unpickle `path`, accepting only containers, numbers, strings and numpy arrays
    (also JAX-0.4-era jax arrays, which come back as numpy). Anything else raises UserError."""
    if not os.path.exists(path):
        raise UserError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise UserError(f"{path} is not a safe pickle: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------
def _umask():
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes):
    """Write `data` to `path` via a temp file in the same directory and a rename, so a crash
    or a full disk leaves any previous file intact. Only process 0 of a multi-process job
    writes (parallel.is_writer)."""
    import parallel
    if not parallel.is_writer():
        return
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise UserError(f"cannot write {path}: {reason}; previous files were kept") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_pickle(path, obj):
    atomic_write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def atomic_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def check_writable_dir(path, flag="--save_path"):
    """Create `path` if needed and check a file can be written there, before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------
# Run records
# --------------------------------------------------------------------------------------
def git_hash():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_config(args):
    import jax
    return {"args": vars(args), "git": git_hash(), "argv": sys.argv,
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per line (written by process 0 only)."""

    def __init__(self, path):
        self.path = path

    def reset(self):
        """Start the file empty."""
        import parallel
        if parallel.is_writer():
            open(self.path, "w").close()

    def write(self, **record):
        import parallel
        if not parallel.is_writer():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
