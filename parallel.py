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

Multi-host (several processes, each with its own devices) works through the same code once
`jax.distributed.initialize()` has run: `jax.devices()` then lists every process's devices.
Each process must feed the same batch (the scripts' seeded data order guarantees it), and
per-example results are brought back with `to_host`, which gathers across processes. This is
written for, but not tested on, several hosts.
"""
from __future__ import annotations

import functools
import os

import numpy as np

AXIS = "data"


@functools.lru_cache(maxsize=None)
def mesh():
    """The 1-D mesh over all devices, axis "data"; None with a single device (or when
    NTK_DATA_PARALLEL=0)."""
    import jax
    from jax.sharding import Mesh
    devices = jax.devices()
    if len(devices) < 2 or os.environ.get("NTK_DATA_PARALLEL", "1").strip() in ("0", "false", "no"):
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


def _pad_rows(a, size):
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
    return jax.device_put(jax.tree_util.tree_map(lambda a: _pad_rows(a, size), tree), batch_sharded()), n


def to_host(x):
    """`np.asarray(x)`, also for an array sharded over several processes (gathered first)."""
    import jax
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


__all__ = ["AXIS", "mesh", "num_devices", "enabled", "replicated", "batch_sharded", "padded_size",
           "replicate", "shard_batch", "to_host"]
