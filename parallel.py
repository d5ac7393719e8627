"""Data parallelism over every device with `jax.sharding`: batches sharded, parameters replicated.

A 1-D `Mesh` over `jax.devices()` with one axis, "data". Call sites put a batch on the mesh with
`shard_batch` (its leading axis split over the devices) and the parameters with `replicate`;
`jax.jit` then propagates the shardings through the computation (GSPMD), so the jitted training
step, the attacks, the evaluator and the NTK gradient passes need no change of their own: a
batch mean (the loss, BatchNorm's batch statistics in training mode) is still the mean over the
whole batch, and every result equals the single-device one up to float rounding.

On by default whenever `jax.device_count() > 1` (set NTK_DATA_PARALLEL=0 to keep everything on
one device). With one device every helper returns its input unchanged (`shard_batch` and
`replicate` do not even call `jax.device_put`), so single-device runs compile and compute
exactly what they did before this module existed.

Batches whose size is not a multiple of the device count
---------------------------------------------------------
- Evaluation, attacks and NTK rows are per-example computations (BatchNorm in inference mode),
  so `shard_batch(..., pad=True)` pads the batch with zeros up to the next multiple of the
  device count and returns the number of real rows; callers count and keep only those rows
  (the evaluator already masks its padded last batch the same way), so correct counts are
  exact.
- Training must not pad: the padded rows would enter the mean loss and BatchNorm's batch
  statistics. A training batch that does not divide (at most the last partial batch of an
  epoch, with a batch size that divides) is therefore replicated instead (`pad=False`): every
  device computes the whole batch, which is exactly the single-device result, only without the
  speed-up. Masking the padded rows out of the loss and of BatchNorm would work too, but needs
  changes inside the models; replication needs none.

Several processes (multi-host)
------------------------------
The same code runs one process per host (or several processes on one machine) once
`jax.distributed.initialize()` has run: `jax.devices()` then lists every process's devices and
the mesh spans them all. `init_distributed()`, which every script calls first (through
`utils.run_main`), does that when the environment asks for it:

- NTK_NUM_PROCESSES=N, NTK_PROCESS_ID=i, NTK_COORDINATOR=host:port: an explicit job (by hand,
  or from any launcher that can set per-process variables);
- NTK_DISTRIBUTED=1: `jax.distributed.initialize()` with no arguments, which finds them itself
  under SLURM (`srun`), Open MPI (`mpirun`) and on Cloud TPU pods;
- neither: a single process, nothing is called.

NTK_DISTRIBUTED_TIMEOUT (seconds) bounds the wait for the other processes at start, the silence
after which the coordinator declares a process dead and the wait at exit (JAX's defaults when
unset: 300 s, 100 s, 300 s). A process that dies makes the others abort with JAX's "another task
died" error instead of waiting forever. On CPU the collectives use gloo.

Each process must feed the same batch (the scripts' seeded data order guarantees it), and
per-example results are brought back with `to_host`, which gathers across processes. Only
process 0 writes files (`is_writer`; utils' writers check it), so the processes may share an
output directory.
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np

AXIS = "data"


class DistributedError(Exception):
    """The environment asks for a multi-process job but does not describe one correctly."""


def _env_int(env, name):
    raw = env.get(name, "").strip()
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name} must be an integer (got {raw!r})") from None


def env_word(name, default="", environ=None):
    """Environment variable `name` (`default` when unset), stripped and lower-cased: how the
    project's on/off switches (NTK_DISTRIBUTED, NTK_DATA_PARALLEL, NTK_XLA_CPU_DEFAULTS) are read."""
    env = os.environ if environ is None else environ
    return env.get(name, default).strip().lower()


def distributed_settings(environ=None):
    """The `jax.distributed.initialize` keyword arguments the environment asks for, or None for
    a single process (see the module docstring for the variables)."""
    env = os.environ if environ is None else environ
    explicit = [k for k in ("NTK_NUM_PROCESSES", "NTK_PROCESS_ID", "NTK_COORDINATOR") if env.get(k, "").strip()]
    auto = env_word("NTK_DISTRIBUTED", environ=env) in ("1", "true", "yes", "auto")
    if not explicit and not auto:
        return None
    kwargs = {}
    raw_timeout = env.get("NTK_DISTRIBUTED_TIMEOUT", "").strip()
    if raw_timeout:
        try:
            timeout = int(float(raw_timeout))
        except ValueError:
            timeout = 0
        if timeout < 1:
            raise DistributedError(f"NTK_DISTRIBUTED_TIMEOUT must be a number of seconds >= 1 (got {raw_timeout!r})")
        kwargs = {"initialization_timeout": timeout, "heartbeat_timeout_seconds": timeout,
                  "shutdown_timeout_seconds": timeout}
    if not explicit:
        return kwargs
    if len(explicit) < 3:
        missing = sorted({"NTK_NUM_PROCESSES", "NTK_PROCESS_ID", "NTK_COORDINATOR"} - set(explicit))
        raise DistributedError(f"{', '.join(explicit)} set but not {', '.join(missing)}: a multi-process "
                               f"job needs all three")
    n, i = _env_int(env, "NTK_NUM_PROCESSES"), _env_int(env, "NTK_PROCESS_ID")
    if n < 1 or not 0 <= i < n:
        raise DistributedError(f"NTK_PROCESS_ID must lie in [0, NTK_NUM_PROCESSES) (got {i} of {n})")
    address = env["NTK_COORDINATOR"].strip()
    if ":" not in address:
        raise DistributedError(f"NTK_COORDINATOR must be host:port (got {address!r})")
    return {**kwargs, "coordinator_address": address, "num_processes": n, "process_id": i}


def init_distributed():
    """Join the multi-process job the environment describes (a no-op for a single process, or
    if already joined). Must run before anything else touches JAX's devices. Returns the number
    of processes."""
    import jax
    kwargs = distributed_settings()
    if kwargs is None or jax.distributed.is_initialized():
        return jax.process_count() if kwargs is not None else 1
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Without it, CPU devices of different processes cannot exchange data; GPUs use NCCL.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = kwargs.get("coordinator_address", "found by jax.distributed")
    who = (f"process {kwargs['process_id']} of {kwargs['num_processes']}" if "process_id" in kwargs
           else "a multi-process job")
    print(f"joining {who} (coordinator {where})", file=sys.stderr, flush=True)
    jax.distributed.initialize(**kwargs)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
          f"device(s), {jax.device_count()} in all", file=sys.stderr, flush=True)
    return jax.process_count()


def is_writer():
    """True in the process that writes the outputs: the only one, or process 0 of a
    multi-process job. Cheap: it never starts JAX's backend itself."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return True
    return jax.process_index() == 0


@functools.lru_cache(maxsize=None)
def mesh():
    """The 1-D mesh over all devices, axis "data"; None with a single device (or when
    NTK_DATA_PARALLEL=0)."""
    import jax
    from jax.sharding import Mesh
    devices = jax.devices()
    if len(devices) < 2 or env_word("NTK_DATA_PARALLEL", "1") in ("0", "false", "no"):
        return None
    return Mesh(np.array(devices), (AXIS,))


def num_devices():
    """Devices the batch axis is split over (1 when data parallelism is off)."""
    m = mesh()
    return 1 if m is None else m.size


def enabled():
    return mesh() is not None


def replicated():
    """NamedSharding that keeps a full copy on every device."""
    from jax.sharding import NamedSharding, PartitionSpec
    return NamedSharding(mesh(), PartitionSpec())


def batch_sharded():
    """NamedSharding that splits the leading axis over the devices."""
    from jax.sharding import NamedSharding, PartitionSpec
    return NamedSharding(mesh(), PartitionSpec(AXIS))


def padded_size(n):
    """`n` rounded up to a multiple of the device count."""
    d = num_devices()
    return -(-n // d) * d


def replicate(tree):
    """Every leaf copied to every device (a no-op with one device, or if already so)."""
    if not enabled():
        return tree
    import jax
    return jax.device_put(tree, replicated())


def pad_rows(a, size):
    """`a` (host array) with zero rows appended up to `size` rows (the caller drops them)."""
    a = np.asarray(a)
    if len(a) == size:
        return a
    return np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)])


def shard_batch(tree, pad=True):
    """Put a batch (an array or a tree of arrays with the same leading size n) on the mesh,
    split along its leading axis. Returns `(tree, n)` with n the number of real rows.

    With one device: the leaves as jax arrays (`jnp.asarray`, as before), unpadded.
    If n is not a multiple of the device count: with `pad`, zero rows are appended up to the
    next multiple (the caller must drop rows >= n); without, the batch is replicated instead
    (see the module docstring for which callers use which)."""
    import jax
    import jax.numpy as jnp
    leaves = jax.tree_util.tree_leaves(tree)
    n = len(leaves[0])
    if not enabled():
        return jax.tree_util.tree_map(jnp.asarray, tree), n
    size = padded_size(n)
    if size == n:
        return jax.device_put(tree, batch_sharded()), n
    if not pad:
        return jax.device_put(tree, replicated()), n
    return jax.device_put(jax.tree_util.tree_map(lambda a: pad_rows(a, size), tree), batch_sharded()), n


def to_host(x):
    """`np.asarray(x)`, also for an array sharded over several processes (gathered first)."""
    import jax
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


__all__ = ["AXIS", "DistributedError", "distributed_settings", "init_distributed", "is_writer", "mesh", "num_devices", "enabled", "replicated", "batch_sharded", "padded_size",
           "replicate", "shard_batch", "to_host"]
