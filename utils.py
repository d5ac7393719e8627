"""Training utilities, safe checkpoints and tree helpers shared by the four scripts."""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
from typing import Any, NamedTuple

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
# Checkpoints
# --------------------------------------------------------------------------------------
def to_numpy(tree):
    import jax
    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


def save_checkpoint(path, params, lin_params, net_state, meta=None):
    """Save the reference layout `{'params','lin_params','net_state'}` as numpy arrays,
    plus a `meta` dict (model, width, num_classes, input_shape, dataset, epoch, ...)."""
    obj = {"params": to_numpy(params), "lin_params": to_numpy(lin_params),
           "net_state": to_numpy(net_state)}
    if meta is not None:
        obj["meta"] = dict(meta)
    atomic_pickle(path, obj)


def _decode_keys(obj):
    if isinstance(obj, dict):
        return {(k.decode() if isinstance(k, bytes) else k): _decode_keys(v) for k, v in obj.items()}
    return obj


def load_checkpoint(path):
    """Load a checkpoint safely. Returns a dict with 'params', 'lin_params', 'net_state'
    (numpy leaves) and 'meta' ({} for the reference's own files)."""
    ckpt = _decode_keys(restricted_load(path))
    if not isinstance(ckpt, dict) or "params" not in ckpt:
        raise UserError(f"{path} is not a checkpoint: it has no 'params'")
    ckpt.setdefault("lin_params", ckpt["params"])
    ckpt.setdefault("net_state", {})
    ckpt.setdefault("meta", {})
    return ckpt


def tree_shapes(tree):
    """{'module/name': shape} for a two-level Haiku tree."""
    out = {}
    for mod, leaves in tree.items():
        for name, leaf in leaves.items():
            out[f"{mod}/{name}"] = tuple(np.shape(leaf))
    return out


def check_tree(expected, got, what):
    """Raise UserError naming the first key whose presence or shape differs."""
    e, g = tree_shapes(expected), tree_shapes(got)
    for key in sorted(set(e) | set(g)):
        if e.get(key) != g.get(key):
            exp = e.get(key, "missing")
            found = g.get(key, "missing")
            raise UserError(f"{what} does not fit the model: '{key}' has shape {found} in the file "
                            f"but the model expects {exp}")


def check_meta(meta, path, **expected):
    """Compare a checkpoint's meta with the values requested on the command line."""
    for key, want in expected.items():
        have = meta.get(key)
        if have is not None and want is not None and have != want:
            raise UserError(f"{path} was saved with {key}={have} but {key}={want} was requested")


def resolve_setting(meta, key, flag_value, default, path):
    """The checkpoint's meta value, the flag, or the default; a contradiction is an error."""
    have = meta.get(key)
    if have is not None and flag_value is not None and have != flag_value:
        raise UserError(f"{path} was saved with {key}={have} but --{key} {flag_value} was given")
    if flag_value is not None:
        return flag_value
    return have if have is not None else default


def load_into_model(path, init_params, init_state, **expected_meta):
    """Load `path`, check its meta and tree against the model, return the checkpoint with
    jnp leaves."""
    import jax.numpy as jnp
    import jax
    ckpt = load_checkpoint(path)
    check_meta(ckpt["meta"], path, **expected_meta)
    for key, ref in (("params", init_params), ("lin_params", init_params), ("net_state", init_state)):
        check_tree(ref, ckpt[key], f"{path} ['{key}']")
        ckpt[key] = jax.tree_util.tree_map(lambda r, a: jnp.asarray(a, dtype=r.dtype), ref, ckpt[key])
    return ckpt


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


# --------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    params: Any      # the parameters being trained (theta)
    net_state: Any   # Haiku state: BatchNorm running statistics
    opt_state: Any   # optax state of SGD with momentum; holds the current learning rate
    step: Any        # number of optimizer steps taken (int32 scalar)


def make_optimizer(lr):
    """The reference's optimizer: SGD with momentum 0.9, no Nesterov, no weight decay.
    The learning rate lives in the state so it can change on epoch boundaries."""
    import optax
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=0.9)


def set_lr(opt_state, lr):
    import jax.numpy as jnp
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, dtype=jnp.float32)
    return opt_state


def get_lr(opt_state):
    return float(opt_state.hyperparams["learning_rate"])


def phase1_lr(epoch, base_lr=0.1):
    """lr 0.1, 0.01 once epoch 99 has finished, 0.001 once epoch 149 has finished."""
    if epoch >= 150:
        return base_lr * 0.01
    if epoch >= 100:
        return base_lr * 0.1
    return base_lr


def cross_entropy(logits, labels):
    import jax
    import jax.numpy as jnp
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def make_train_step(apply, dynamics, is_training, optimizer):
    """A jitted `(TrainState, theta0, x, y) -> (TrainState, metrics)` step.

    `dynamics` is one of models.DYNAMICS; `theta0` is ignored by 'standard'. With
    `is_training`, BatchNorm uses batch statistics and its running averages are updated;
    otherwise it is frozen to them. metrics = {'loss': mean loss before the update, 'correct':
    count, 'finite': whether every float of the new TrainState is finite}.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from models import dynamics_apply

    def loss_fn(params, net_state, theta0, x, y):
        logits, new_state = dynamics_apply(apply, dynamics, params, theta0, net_state, x,
                                           is_training=is_training)
        return cross_entropy(logits, y), (logits, new_state)

    def step(state, theta0, x, y):
        (loss, (logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.net_state, theta0, x, y)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if not is_training:
            new_state = state.net_state
        new = TrainState(params, new_state, opt_state, state.step + 1)
        # The loss was taken before the update: also report whether the new state is finite,
        # so a NaN guard never lets a non-finite state reach a checkpoint.
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(new)
                                    if jnp.issubdtype(a.dtype, jnp.inexact)]))
        metrics = {"loss": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == y), "finite": finite}
        return new, metrics

    return jax.jit(step)

