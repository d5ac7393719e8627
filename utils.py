"""The ground floor under every module: user errors and `run_main`, XLA:CPU's flags (set on
import), the restricted unpickler, atomic writes, and run records. Imports only parallel.py (who
writes in a multi-process job) of this project, and no JAX at import time."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import importlib.metadata
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

try:
    import fcntl
except ImportError:   # Windows: no advisory locks, runs are not guarded against each other
    fcntl = None

import parallel


class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line and exit 2."""


class Notice(UserWarning):
    """A warning about the user's input that does not stop the run (data that are not the
    published files, say): shown as one line `warning: ...`, once per message in a process."""


_format_warning = warnings.formatwarning


def _one_line_notices(message, category, filename, lineno, line=None):
    if issubclass(category, Notice):
        return f"warning: {one_line(message)}\n"
    return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _one_line_notices


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a cluster's scancel or requeue, `kill`), raised where the run is, like Ctrl-C's
    KeyboardInterrupt, so the same `finally` blocks and atomic writes keep their promises."""


def _raise_interrupted(signum, frame):
    raise Interrupted()


def one_line(message):
    """`message` as one line: whatever an underlying exception's text held (newlines, tabs)."""
    return " ".join(str(message).split())


def run_main(fn, args, uses_jax=True, on_interrupt=None):
    """Run `fn(args)`; a `UserError` becomes a one-line message and exit status 2. Ctrl-C
    (SIGINT) and SIGTERM end it with one line, exit 130 and 143: the line is
    `on_interrupt()`'s (what was kept, how to continue) when given, else "interrupted". With
    `uses_jax`, first joins a multi-process job when the environment describes one
    (parallel.init_distributed) and turns on the compilation cache; without, JAX is not loaded
    (a process that only schedules others)."""
    import signal
    try:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:   # not the main thread: leave the signal alone
        pass
    try:
        if uses_jax:
            try:
                parallel.init_distributed()
            except parallel.DistributedError as e:
                raise UserError(e) from None
            enable_compilation_cache()
        return fn(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        what = "SIGTERM" if isinstance(e, Interrupted) else "Ctrl-C"
        hint = on_interrupt() if on_interrupt is not None else None
        print(f"interrupted ({what}){': ' + one_line(hint) if hint else ''}", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Interrupted) else 130) from None
    finally:
        unlock_all()


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
        if os.path.islink(path):
            raise UserError(f"{where} is a symbolic link to nothing (broken, or a loop)")
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


LOCK_FILE = ".lock"
_locks = {}   # a locked directory -> [the lock file's descriptor, the directories lock_dir created, holds]


def _missing_dirs(path):
    """`path` and those of its parents that do not exist yet, deepest first."""
    out, probe = [], os.path.abspath(path)
    while not os.path.lexists(probe):
        out.append(probe)
        probe = os.path.dirname(probe)
    return out


def lock_dir(path, flag="--save_path"):
    """Make directory `path` (created if needed) this process's alone until `unlock_dir` or the
    process's end: an exclusive flock on PATH/.lock, which the OS releases however the process
    ends, so a killed run leaves no stale lock. A second process (a job requeued while the first
    still runs, a command started twice) gets a one-line UserError naming the first: its PID, host
    and start. In a multi-process job only the writer (process 0) locks."""
    if fcntl is None or not parallel.is_writer():
        return
    if os.path.abspath(path) in _locks:   # this process holds it already (a grid cell's run): count it
        _locks[os.path.abspath(path)][2] += 1
        return
    created = _missing_dirs(path)
    make_dir(path, flag)
    lock = os.path.join(path, LOCK_FILE)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            _remove_empty(created)
            raise UserError(f"{flag} {path} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            for _ in range(10):   # the holder writes who it is just after it locks
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                if holder:
                    break
                time.sleep(0.05)
            holder = holder or "another process"
            os.close(fd)
            raise UserError(f"{flag} {path} is in use by {holder}: wait for it to end, or give another "
                            f"{flag}") from None
        try:   # the file may have been removed by its last holder between our open and flock
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {os.uname().nodename}, started {started}".encode(), 0)
    _locks[os.path.abspath(path)] = [fd, created, 1]


def _remove_empty(dirs):
    for d in dirs:   # deepest first
        try:
            os.rmdir(d)
        except OSError:
            return


def unlock_dir(path):
    """Release lock_dir(path) (the last of this process's holds): the lock file goes (removed while
    still locked, so no other process can hold a lock on a file that is gone), and so do the
    directories lock_dir created if they are still empty (a run refused or failed before it wrote
    anything leaves no folder)."""
    held = _locks.get(os.path.abspath(path))
    if held is None:
        return
    held[2] -= 1
    if held[2] > 0:
        return
    fd, created, _ = _locks.pop(os.path.abspath(path))
    try:
        os.unlink(os.path.join(path, LOCK_FILE))
    except OSError:
        pass
    os.close(fd)
    _remove_empty(created)


def unlock_all():
    for path in list(_locks):
        _locks[path][2] = 1
        unlock_dir(path)


# --------------------------------------------------------------------------------------
# Outputs made from other inputs are never replaced silently
# --------------------------------------------------------------------------------------
def plain(value):
    """`value` as JSON would give it back (tuples as lists, numpy scalars as numbers)."""
    return json.loads(json.dumps(value, default=_json_default))


def file_record(path):
    """An input file as outputs record it: its absolute path (for people) and its content, size and
    sha256 (for the checks), so a folder moved or copied elsewhere still recognises its own
    inputs while a file with other contents is still told apart. A directory (a run folder) is
    recorded by its config.json, the run's flags, when it has one, else by its files' names and
    sizes."""
    path = os.path.abspath(path)
    h = hashlib.sha256()
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        listing = "".join(f"{n}\t{os.path.getsize(os.path.join(path, n))}\n" for n in names).encode()
        h.update(listing)
        return {"path": path, "size": len(listing), "sha256": h.hexdigest()}
    target = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(target):
        return {"path": path}
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"path": path, "size": os.path.getsize(target), "sha256": h.hexdigest()}


def same_input(recorded, given):
    """Whether a recorded input equals this call's, both as `plain` gives them. File records
    (file_record) are the same file when their contents are, wherever they now lie; a path
    recorded as a string (outputs of earlier versions) is compared with the path."""
    if isinstance(given, dict) and "path" in given:
        if isinstance(recorded, str):
            return recorded == given["path"]
        if isinstance(recorded, dict) and "sha256" in recorded and "sha256" in given:
            return (recorded["sha256"], recorded.get("size")) == (given["sha256"], given.get("size"))
        return isinstance(recorded, dict) and recorded.get("path") == given["path"]
    if isinstance(given, list) and isinstance(recorded, list):
        return len(given) == len(recorded) and all(same_input(r, g) for r, g in zip(recorded, given))
    return recorded == given


def shown(value):
    """An input value as a message names it: file records by their path."""
    if isinstance(value, dict) and "path" in value:
        return repr(value["path"])
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return repr(value)


def check_replace(existing, recorded, inputs, what, way_out):
    """Refuse to replace output files made from other inputs.

    existing: the output files of this call that already exist; recorded: the inputs the
    earlier call recorded (a dict), or None when nothing says what they were made from;
    inputs: this call's inputs (flag name -> value; input files as `file_record`s). The same inputs may
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
        if key in recorded and not same_input(recorded[key], value):
            raise UserError(f"{first} already holds {what} with --{key} {shown(recorded[key])}, not {shown(value)}: "
                            f"it is not replaced; {way_out}")
        if key not in recorded:
            raise UserError(f"{first} already holds {what} that does not record --{key}: it is not "
                            f"replaced; {way_out}")
    return list(existing)


def existing_files(paths):
    return [p for p in paths if os.path.lexists(p)]


def _pending(record):
    """Where begin_outputs notes the inputs of outputs being written: beside `record`, hidden."""
    return os.path.join(os.path.dirname(record), f".{os.path.basename(record)}.inputs.json")


def recorded_inputs(record, keys=None):
    """The inputs output file `record` was made from: its 'inputs' (a JSON object or a pickled
    dict), or else the entries `keys` of a pickled dict (kernel files of earlier versions);
    when `record` is absent, what an interrupted call noted (begin_outputs). None if unknown."""
    path = record if os.path.lexists(record) else _pending(record)
    try:
        if path.endswith(".json"):
            with open(path) as f:
                obj = json.load(f)
        else:
            obj = restricted_load(path)
    except (OSError, ValueError, UserError):
        return None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("inputs"), dict):
        return obj["inputs"]
    return {k: obj[k] for k in keys if k in obj} if keys is not None and path == record else None


def check_outputs(files, inputs, what, way_out, record=None, keys=None):
    """The guard of every script's outputs: `files` (the first, or `record`, says what they were
    made from: recorded_inputs) may be replaced by a call with the same `inputs`, and are never
    replaced by one with other or unknown inputs (check_replace: one line, naming the first of
    `files` that exists, the first input that differs and `way_out`). Returns the files that will
    be replaced."""
    record = record or files[0]
    existing = existing_files(list(files) + ([] if record in files else [record]))
    if not existing and not os.path.lexists(_pending(record)):
        return []
    return check_replace(existing or [record], recorded_inputs(record, keys), inputs, what, way_out)


def begin_outputs(record, inputs):
    """Note `inputs` beside `record` before writing several outputs, `record` last: if the call is
    interrupted half-way, a rerun with the same inputs may replace what it left (end_outputs
    removes the note once `record` is written)."""
    atomic_json(_pending(record), {"inputs": inputs})


def end_outputs(record):
    if parallel.is_writer():
        with contextlib.suppress(FileNotFoundError):
            os.remove(_pending(record))


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
