"""The ground floor under every module: user errors and `run_main`, XLA:CPU's flags (set on
import), the restricted unpickler, atomic writes, and run records. Imports only parallel.py (who
writes in a multi-process job) of this project, and no JAX at import time."""
from __future__ import annotations

import errno
import glob
import importlib.metadata
import json
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np

import parallel


class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line and exit 2."""


# XLA:CPU in jaxlib 0.10 hands convolutions, dots and reductions to YNNPACK by default. On this
# project's workloads XLA's own kernels are faster (train steps, PGD and the NTK alike; figures
# in bench/README.md, "XLA:CPU's kernels"). An empty list of YNN fusion types turns YNNPACK
# off; only XLA_FLAGS is touched, so GPUs are unaffected. It must be set before JAX creates its
# CPU backend, which is why it happens here, on import of the module every other module imports
# first.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def prefer_xla_cpu_kernels(environ=None):
    """Add `YNN_FLAG=` (no YNNPACK fusions) to XLA_FLAGS, unless XLA_FLAGS already sets that flag,
    NTK_XLA_CPU_DEFAULTS=1 asks for XLA's defaults, or jaxlib is not 0.10.x (the versions it was
    measured on; another jaxlib may not know the flag, and XLA aborts on unknown flags)."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if YNN_FLAG in flags or parallel.env_word("NTK_XLA_CPU_DEFAULTS", environ=env) in ("1", "true", "yes"):
        return
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    if version.startswith("0.10."):
        env["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()


prefer_xla_cpu_kernels()


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


def run_main(fn, args, uses_jax=True):
    """Run `fn(args)`; a `UserError` becomes a one-line message and exit status 2. With
    `uses_jax`, first joins a multi-process job when the environment describes one
    (parallel.init_distributed) and turns on the compilation cache; without, JAX is not loaded
    (a process that only schedules others)."""
    if uses_jax:
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
    check_file(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise UserError(f"{path} is not a safe pickle: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------
# Paths given on the command line
# --------------------------------------------------------------------------------------
def check_file(path, flag=None, kind="a file", hints=()):
    """A one-line UserError unless `path` names an existing file. A directory is named as one;
    `hints` are glob patterns tried in order inside it, and the files the first one matches are
    suggested ("did you mean DIR/parameters_final.pkl?")."""
    where = f"{flag} {path}" if flag else str(path)
    if path is None or str(path) == "":
        raise UserError(f"{flag or 'a path'} is empty: give {kind}")
    if os.path.isdir(path):
        found = []
        for pattern in hints:
            found = sorted(glob.glob(os.path.join(glob.escape(str(path)), pattern)))
            if found:
                break
        extra = ""
        if len(found) == 1:
            extra = f" (did you mean {found[0]}?)"
        elif found:
            extra = f" (it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
        raise UserError(f"{where} is a directory, not {kind}{extra}")
    if not os.path.exists(path):
        raise UserError(f"file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{where} is not a regular file")


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
    """Check, before any work starts, that files can be written in directory `path`, without
    creating it (a run that fails leaves no empty folder behind): `path` must be a writable
    directory, or be creatable under its nearest existing parent. The writers create it."""
    if str(path) == "":
        raise UserError(f"{flag} is empty: give a directory")
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        if not os.path.isdir(probe):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None


def make_dir(path, flag="--save_path"):
    """Create directory `path` (after `check_writable_dir`), as a one-line error if that fails."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------
# Outputs made from other inputs are never replaced silently
# --------------------------------------------------------------------------------------
def plain(value):
    """`value` as JSON would give it back (tuples as lists, numpy scalars as numbers)."""
    return json.loads(json.dumps(value, default=_json_default))


def check_replace(existing, recorded, inputs, what, way_out):
    """Refuse to replace output files made from other inputs.

    existing: the output files of this call that already exist; recorded: the inputs the
    earlier call recorded (a dict), or None when nothing says what they were made from;
    inputs: this call's inputs (flag name -> value, paths absolute). The same inputs may
    replace the files (a rerun); other or unknown ones raise a one-line UserError that names the
    file, the first input that differs and `way_out`. Returns the files to be replaced."""
    if not existing:
        return []
    first = existing[0]
    if not isinstance(recorded, dict):
        raise UserError(f"{first} already exists and does not record what it was made from: "
                        f"it is not replaced; {way_out}")
    recorded, inputs = plain(recorded), plain(inputs)
    for key, value in inputs.items():
        if key in recorded and recorded[key] != value:
            raise UserError(f"{first} already holds {what} with --{key} {recorded[key]!r}, not {value!r}: "
                            f"it is not replaced; {way_out}")
        if key not in recorded:
            raise UserError(f"{first} already holds {what} that does not record --{key}: it is not "
                            f"replaced; {way_out}")
    return list(existing)


def existing_files(paths):
    return [p for p in paths if os.path.lexists(p)]


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
        if parallel.is_writer():
            open(self.path, "w").close()

    def write(self, **record):
        if not parallel.is_writer():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
