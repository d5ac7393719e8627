"""The empirical neural tangent kernel, computed fast and within a memory budget.

    K[i, j] = < d f_c(x_i) / d theta , d f_c(x_j) / d theta >          (one logit c)
    K[i, j] = 1/C sum_c < d f_c(x_i) / d theta , d f_c(x_j) / d theta > (class_index None or -1)
    K[i, j, c, c'] = < d f_c(x_i) / d theta , d f_c'(x_j) / d theta >   (full=True: every class pair)

The second is neural-tangents' default trace over the output axis divided by the number of
outputs, which the reference's `calculate_kernel.py --class_index -1` used. The third is the full
empirical NTK (neural-tangents' `trace_axes=()`), [n1, n2, C, C] with no division by C: its
class-diagonal blocks K[:, :, c, c] are the first kernel of each class c, the mean of those blocks
the second. `full_matrix` arranges it as the [C n1, C n2] class-major matrix Tsilivis & Kempe
analyse.

How it is computed
------------------
K is a sum over parameter leaves of Gram matrices of per-example gradients ("Jacobian rows").
Naively each row of a ResNet-18 is 11.2M floats (45 MB), so 500 rows do not fit in memory and
the reference (neural-tangents in 4x4 blocks) recomputed every gradient for every block pair.
This engine instead:

1. Takes every example's gradient in one batched pass. For networks built by `models.py`
   (`NetFn`), it intercepts each `hk.Conv2D`/`hk.Linear` call, records the layer's input and
   adds a zero "probe" to its output. A vmapped reverse pass with respect to the probes and the
   remaining leaves (BatchNorm scales and offsets) gives every example's output cotangent g
   per layer; no per-example weight-gradient convolution is ever run.
2. Builds each layer's contribution from the input patches a [S, p] and cotangents g [S, o]
   of an example (S output positions), whose weight gradient is a^T g [p, o]. Per layer it takes
   the cheaper of two exact forms:
   - "direct": materialise a^T g (one batched matmul) and add it to the example's row;
   - "structured": keep (a, g) and use <a_i^T g_i, a_j^T g_j> = sum_{s,t} (a_i a_j^T)[s,t]
     (g_i g_j^T)[s,t], which costs S^2 (p + o) instead of p*o per pair and stores S (p + o)
     floats instead of p*o. Dense layers (S = 1) and ResNet-18's last stage (4x4 positions,
     512 channels: 75% of the parameters) take this form, which shrinks a row from 11.2M to
     about 3.1M floats.
3. Contracts rows in blocks of several chunks: as many blocks as fit in `memory_gb` are held
   (a "panel") while later blocks stream past them, so with a large enough budget every
   gradient is computed exactly once, and with a small one the result is the same, just slower.

The full kernel (full=True) takes every layer in the direct form: each image's row holds the
C * P floats of its C logits' gradients, laid out class-major ([C, P] flattened: the same layout
the other kernels use, whose plain inner product sums over the classes), and `full_gram`
contracts two sets of rows into all C x C class pairs.

Other callables `f(params, x)` (not `NetFn`) take the generic path: per-example gradients of
all leaves by `vmap(jacrev)`, contracted the same way.

Several devices: each chunk's batch axis is split over them (parallel.py: the chunk is a
multiple of the device count, parameters are replicated), so the rows come out sharded along
the batch axis and the jitted contraction works on the sharded rows; the host receives the
[chunk, chunk] blocks. One device: unchanged.

Precision: rows are float32 and every contraction accumulates in float32 at full precision
(`jax.default_matmul_precision("highest")`, so GPUs do not use TF32); the blocks are assembled
into a float64 numpy array. float32 keeps the CPU at its matmul peak (float64 is 2-4x slower on
CPU and far slower on GPUs); the tests compare against an explicit Jacobian to 1e-5 relative.
The result is symmetric by construction: only blocks i <= j are computed and then mirrored, and
diagonal blocks are symmetrised.
"""
from __future__ import annotations

import functools
import time
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import data
import parallel
from cli import DEFAULT_MEMORY_GB, NTK_METHODS as METHODS
from utils import UserError
# Examples per jitted gradient call: large enough for efficient batched matmuls, small enough
# that the transient activations stay a fraction of the budget.
MAX_CHUNK = 64
# Rows per contraction block. Contracting is memory-bound on CPUs (each pair of blocks reads
# both blocks' rows once), so several chunks are gathered into one block (larger blocks ran
# about four times faster than 15 x 15 ones; bench/README.md).
BLOCK_ROWS = 64


class NetFn:
    """f(params, x) -> logits [N, C] of a Haiku network with BatchNorm in inference mode at a
    fixed `net_state`. The engine recognises it and takes the layer-structured fast path."""

    def __init__(self, apply, net_state):
        self.apply = apply
        self.net_state = net_state

    def __call__(self, params, x):
        return self.apply(params, self.net_state, None, x, False)[0]


def checkpoint_fn(ckpt, apply, use_linear_params=False):
    """`(f, params)` for a loaded checkpoint: f = NetFn at its net_state (BatchNorm frozen) and
    params = its 'lin_params' (with use_linear_params) or 'params', as jax arrays."""
    to_jnp = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
    params = ckpt["lin_params" if use_linear_params else "params"]
    return NetFn(apply, to_jnp(ckpt["net_state"])), to_jnp(params)


def classes_of(class_index, num_classes):
    """The logits whose kernels are averaged: (c,) for a class, all of them for None or -1."""
    if class_index is None or class_index == -1:
        return tuple(range(num_classes))
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index {class_index} is out of range for {num_classes} logits")
    return (int(class_index),)


# --------------------------------------------------------------------------------------
# Layers seen by the structured path
# --------------------------------------------------------------------------------------
class Layer(NamedTuple):
    name: str            # Haiku module name, the key of its leaves in params
    conv: tuple | None   # (kernel_shape, stride, padding, rhs_dilation) of a conv; None: dense
    in_shape: tuple      # one example's input shape (no batch axis)
    out_shape: tuple     # one example's output shape (no batch axis)
    positions: int       # S: output positions per example (1 for a dense layer on vectors)
    fan_in: int          # p: entries of one input patch (kh * kw * C_in, or d_in)
    fan_out: int         # o: output channels
    has_bias: bool
    structured: bool     # keep (patches, cotangents) rather than the weight gradient


def _supported_module(module, params):
    name = module.module_name
    if name not in params or "w" not in params[name]:
        return False
    if isinstance(module, hk.Linear):
        return True
    return (isinstance(module, hk.ConvND) and module.num_spatial_dims == 2 and module.channel_index == -1
            and module.mask is None and module.feature_group_count == 1
            and tuple(module.lhs_dilation) == (1, 1))


def discover_layers(f, params, input_shape, k, method="auto"):
    """The conv/dense layers of `f` (a NetFn) that the structured path handles, with the
    direct/structured choice made per layer by cost. Layers called more than once, or of an
    unsupported kind, are left to the generic path (their leaves are differentiated directly)."""
    if method == "jacobian" or not isinstance(f, NetFn):
        return ()
    calls, unsupported = {}, set()

    def interceptor(next_f, args, kwargs, ctx):
        out = next_f(*args, **kwargs)
        if ctx.method_name == "__call__" and isinstance(ctx.module, (hk.Linear, hk.ConvND)):
            if _supported_module(ctx.module, params):
                calls.setdefault(ctx.module.module_name, []).append((ctx.module, args[0].shape, out.shape))
            else:
                unsupported.add(ctx.module.module_name)
        return out

    with hk.intercept_methods(interceptor):  # a fresh lambda: eval_shape caches traces by function
        jax.eval_shape(lambda p, x: f(p, x), params, jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
    layers = []
    for name, seen in calls.items():
        if len(seen) != 1 or name in unsupported:
            continue
        module, in_shape, out_shape = seen[0]
        in_shape, out_shape = tuple(in_shape[1:]), tuple(out_shape[1:])
        fan_out = out_shape[-1]
        if isinstance(module, hk.Linear):
            conv, fan_in = None, in_shape[-1]
        else:
            conv = (tuple(module.kernel_shape), tuple(module.stride), module.padding,
                    tuple(module.kernel_dilation))
            fan_in = int(np.prod(module.kernel_shape)) * in_shape[-1]
        positions = int(np.prod(out_shape[:-1]))
        if method == "direct":
            structured = False
        elif method == "structured":
            structured = True
        else:  # cost per pair of examples: p*o*k direct, S^2 (p + k*o) structured
            structured = positions ** 2 * (fan_in + k * fan_out) < k * fan_in * fan_out
        layers.append(Layer(name, conv, in_shape, out_shape, positions, fan_in, fan_out,
                            "b" in params[name], structured))
    return tuple(layers)


def _split(params, layers):
    """(other, owned): the leaves the generic path differentiates, and the conv/dense leaves."""
    names = {layer.name for layer in layers}
    other = {m: v for m, v in params.items() if m not in names}
    owned = {m: v for m, v in params.items() if m in names}
    return other, owned


def _patches(x, layer):
    """Input patches [b, S, p] of a batch of layer inputs x [b, *in_shape]."""
    b = x.shape[0]
    if layer.conv is None:
        return x.reshape(b, layer.positions, layer.fan_in)
    kernel_shape, stride, padding, dilation = layer.conv
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel_shape, stride, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    return patches.reshape(b, layer.positions, layer.fan_in)


# --------------------------------------------------------------------------------------
# Rows: each example's gradient, in the form the contraction needs
# --------------------------------------------------------------------------------------
def make_rows_fn(f, classes, layers):
    """`rows(params, x [b, ...]) -> (dense [b, k*P_dense], blocks)`, the per-example gradients.

    `dense` holds the flattened gradients of the generic leaves and of the direct layers, laid
    out class-major: dense.reshape(b, k, P_dense)[:, i] is logit classes[i]'s gradient (what
    `full_gram` reads); `blocks` holds, per structured layer, (patches [b, S, p], cotangents
    [b, S, k*o]). k = len(classes); the class axis is folded into the features, so a plain inner
    product of rows sums over the classes. Not jitted: callers jit it or differentiate through it."""
    classes = jnp.asarray(classes)
    k = len(classes)

    def flat(tree, b):  # leaves [b, k, ...] -> [b, k, size]
        return [leaf.reshape(b, k, -1) for leaf in jax.tree_util.tree_leaves(tree)]

    def join(parts, b, dtype):  # [b, k, P_1], [b, k, P_2], ... -> [b, k * (P_1 + P_2 + ...)], class-major
        return jnp.concatenate(parts, 2).reshape(b, -1) if parts else jnp.zeros((b, 0), dtype)

    if not layers:
        def logits_of_one(params, x):
            return f(params, x[None])[0][classes]

        def rows(params, x):
            jac = jax.vmap(jax.jacrev(logits_of_one), (None, 0))(params, x)  # leaves [b, k, ...]
            return join(flat(jac, x.shape[0]), x.shape[0], x.dtype), ()
        return rows

    by_name = {layer.name: layer for layer in layers}

    def single(other, owned, probes, x):
        captured = {}

        def interceptor(next_f, args, kwargs, ctx):
            out = next_f(*args, **kwargs)
            if ctx.method_name == "__call__" and getattr(ctx.module, "module_name", None) in by_name:
                name = ctx.module.module_name
                captured[name] = args[0][0]
                out = out + probes[name][None]  # zero: only its cotangent matters
            return out

        with hk.intercept_methods(interceptor):
            logits = f({**other, **owned}, x[None])
        return logits[0][classes], captured

    def rows(params, x):
        b = x.shape[0]
        other, owned = _split(params, layers)
        probes = {l.name: jnp.zeros((b,) + l.out_shape, x.dtype) for l in layers}
        (d_other, d_probes), inputs = jax.vmap(
            jax.jacrev(single, argnums=(0, 2), has_aux=True), (None, None, 0, 0))(other, owned, probes, x)
        dense, blocks = flat(d_other, b), []
        for layer in layers:
            g = d_probes[layer.name].reshape(b, k, layer.positions, layer.fan_out)  # [b, k, S, o]
            a = _patches(inputs[layer.name], layer)                                # [b, S, p]
            if layer.structured:
                blocks.append((a, g.transpose(0, 2, 1, 3).reshape(b, layer.positions, k * layer.fan_out)))
            else:
                w = jnp.einsum("bsp,bkso->bkpo", a, g, precision=jax.lax.Precision.HIGHEST)
                dense.append(w.reshape(b, k, -1))
            if layer.has_bias:
                dense.append(g.sum(2))                                             # [b, k, o]
        return join(dense, b, x.dtype), tuple(blocks)

    return rows


def gram(rows1, rows2):
    """Sum over classes of the gradient inner products of two sets of rows: [b1, b2] float32."""
    hi = jax.lax.Precision.HIGHEST
    (d1, blocks1), (d2, blocks2) = rows1, rows2
    k = 0.0
    for (a1, g1), (a2, g2) in zip(blocks1, blocks2):
        (n1, s, _), n2 = a1.shape, a2.shape[0]
        aa = jnp.matmul(a1.reshape(n1 * s, -1), a2.reshape(n2 * s, -1).T, precision=hi)
        gg = jnp.matmul(g1.reshape(n1 * s, -1), g2.reshape(n2 * s, -1).T, precision=hi)
        k = k + (aa * gg).reshape(n1, s, n2, s).sum((1, 3))
    # Measured on XLA:CPU: without the barrier, the dense dot gets fused with the sums above
    # into a naive loop more than 10x slower than its matmul library.
    return k + jax.lax.optimization_barrier(jnp.matmul(d1, d2.T, precision=hi))


def full_gram(rows1, rows2, k):
    """Every class pair of the gradient inner products of two sets of rows of k logits (dense
    rows only: the full kernel takes every layer in the direct form): [b1, b2, k, k] float32,
    entry [i, j, a, c] = <gradient of logit a at x_i, gradient of logit c at x_j>."""
    (d1, blocks1), (d2, blocks2) = rows1, rows2
    if blocks1 or blocks2:
        raise ValueError("the full kernel needs every layer in the direct form (no structured layers)")
    n1, n2 = d1.shape[0], d2.shape[0]
    kk = jnp.matmul(d1.reshape(n1 * k, -1), d2.reshape(n2 * k, -1).T, precision=jax.lax.Precision.HIGHEST)
    return kk.reshape(n1, k, n2, k).transpose(0, 2, 1, 3)


def full_matrix(kernel):
    """The full kernel K [n1, n2, C, C] (`empirical_ntk(..., full=True)`) as the class-major
    [C n1, C n2] matrix M[a n1 + p, b n2 + q] = K[p, q, a, b]: C x C blocks of [n1, n2], block
    (a, b) pairing logit a at x1 with logit b at x2. For a symmetric K(X, X) (K[p, q, a, b] =
    K[q, p, b, a]) this is exactly Tsilivis & Kempe's `K.transpose([3, 1, 2, 0]).reshape(C n, C n)`,
    a symmetric PSD matrix (for a cross kernel their expression gives this matrix's transpose)."""
    k = np.asarray(kernel)
    if k.ndim != 4 or k.shape[2] != k.shape[3]:
        raise ValueError(f"a full kernel is [n1, n2, C, C]; got shape {k.shape}")
    n1, n2, c, _ = k.shape
    return np.ascontiguousarray(k.transpose(2, 0, 3, 1)).reshape(c * n1, c * n2)


def _row_floats(layers, dense_leaf_sizes, k):
    """Floats of one example's row: generic leaves, direct layers, structured (a, g) pairs."""
    n = k * sum(dense_leaf_sizes)
    for l in layers:
        n += l.positions * (l.fan_in + k * l.fan_out) if l.structured else k * l.fan_in * l.fan_out
        n += k * l.fan_out if l.has_bias else 0
    return n


def _transient_floats(layers, input_size, k):
    """A rough bound on the floats a chunk's gradient pass holds per example beyond its row:
    activations and residuals of the forward/backward pass, patches and cotangents."""
    if not layers:
        return 8 * input_size
    acts = sum(int(np.prod(l.in_shape)) + int(np.prod(l.out_shape)) for l in layers)
    patches = sum(l.positions * l.fan_in for l in layers)
    return 4 * acts * k + 2 * patches + 8 * input_size


class Plan(NamedTuple):
    method: str
    k: int                 # logits whose kernels are averaged
    layers: tuple          # Layer entries (empty on the generic path)
    row_floats: int        # floats in one example's row
    chunk: int             # examples per jitted gradient call
    block: int             # rows per contraction block (a multiple of chunk)
    panel_blocks: int      # blocks whose rows are held at once
    full: bool = False     # every class pair: blocks of [block, block, k, k]


def check_full(class_index, method):
    """The method a full kernel (every class pair) is computed with: 'auto' becomes 'direct'
    (the only form of a layer whose rows keep each logit's gradient apart); a class_index other
    than None/-1 or method 'structured' is a ValueError."""
    if class_index is not None and class_index != -1:
        raise ValueError(f"the full kernel covers every class pair: class_index must be None or -1, got {class_index}")
    if method == "structured":
        raise ValueError("the full kernel takes every layer in the direct form: use method 'auto', 'direct' or "
                         "'jacobian', not 'structured'")
    return "direct" if method == "auto" else method


def make_plan(f, params, input_shape, num_classes, class_index=None, memory_gb=DEFAULT_MEMORY_GB,
              method="auto", n=None, devices=1, full=False):
    """Choose the layer forms, chunk size and panel size for a budget of `memory_gb` GiB.

    With `devices` > 1 (data parallel, see parallel.py) a chunk's examples are split over the
    devices: the cap MAX_CHUNK applies per device, and the chunk is rounded up to a multiple
    of `devices` (so it may exceed the budget by at most devices - 1 examples). `memory_gb`
    stays the total over all devices. `full`: the plan of the full kernel (`check_full`: all
    classes, every layer direct); its rows are the same k*P floats per image, and its [block,
    block, k, k] contraction outputs are counted with the streaming block."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if memory_gb <= 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    if full:
        method = check_full(class_index, method)
    k = len(classes_of(class_index, num_classes))
    layers = discover_layers(f, params, input_shape, k, method)
    other, _ = _split(params, layers) if layers else (params, None)
    dense_sizes = [int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(other)]
    row = _row_floats(layers, dense_sizes, k)
    transient = _transient_floats(layers, int(np.prod(input_shape)), k)
    budget = memory_gb * 2 ** 30 / 4  # floats
    # A quarter of the budget for one chunk's pass (its rows and transients), the rest for the
    # held panel and one streaming block.
    chunk = int(max(1, min(MAX_CHUNK * devices, budget * 0.25 // (row + transient))))
    if n is not None:
        chunk = min(chunk, max(1, n))
    chunk = -(-chunk // devices) * devices
    rest = budget * 0.75
    per_block = int(max(1, min(BLOCK_ROWS // chunk, rest // (2 * chunk * row))))
    if n is not None:
        per_block = min(per_block, -(-n // chunk))
    if full:  # a pair of blocks contracts into [block, block, k, k] floats: keep it within the streaming share
        while per_block > 1 and 2 * per_block * chunk * row + (per_block * chunk * k) ** 2 > rest:
            per_block -= 1
        rest -= (per_block * chunk * k) ** 2
    block = per_block * chunk
    panel_blocks = int(rest // (block * row))
    if n is None or panel_blocks * block < n:
        panel_blocks -= 1  # room for the block streaming past the panel
    panel_blocks = max(1, panel_blocks)
    if n is not None:
        panel_blocks = min(panel_blocks, -(-n // block))
    return Plan(method, k, layers, row, chunk, block, panel_blocks, bool(full))


def describe_plan(plan):
    """One line on a plan: the layers intercepted, the floats of an image's row, the chunk, block
    and panel sizes."""
    return (f"engine: {'full kernel (all ' + str(plan.k) + ' x ' + str(plan.k) + ' class pairs), ' if plan.full else ''}"
            f"{len(plan.layers)} conv/dense layers intercepted "
            f"({sum(l.structured for l in plan.layers)} structured), {plan.row_floats / 1e6:.2f}M floats "
            f"per image row, gradient chunks of {plan.chunk}, blocks of {plan.block} rows, panels of "
            f"{plan.panel_blocks} blocks")


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------
_JIT_CACHE = {}


def _jitted(f, classes, layers, full=False):
    """(rows(params, x), put, gram) jitted once per (network, classes, layers, full); the gram
    is `full_gram` for the full kernel. A NetFn's BatchNorm state is an argument of the jitted
    rows function, so the checkpoints of one network (kernel motion across epochs) share one
    compilation."""

    net = isinstance(f, NetFn)
    key = (f.apply if net else f, classes, layers, full)
    hit = _JIT_CACHE.get(key)
    if hit is None:
        def rows(state, params, x):
            return make_rows_fn(NetFn(f.apply, state) if net else f, classes, layers)(params, x)

        def put(block, rows, start):  # a chunk's rows into its block, in place (donated)
            return jax.tree_util.tree_map(
                lambda p, r: jax.lax.dynamic_update_slice_in_dim(p, r, start, 0), block, rows)

        hit = (jax.jit(rows), jax.jit(put, donate_argnums=0),
               jax.jit(functools.partial(full_gram, k=len(classes)) if full else gram))
        _JIT_CACHE.clear()  # one network at a time: drop the previous one's executables
        _JIT_CACHE[key] = hit
    rows, put, gram_fn = hit
    return functools.partial(rows, f.net_state if net else None), put, gram_fn


def _num_classes(f, params, input_shape):
    out = jax.eval_shape(f, params, jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
    return int(out.shape[-1])


def empirical_ntk(f, params, x1, x2=None, class_index=None, memory_gb=DEFAULT_MEMORY_GB,
                  method="auto", progress=False, stats=None, full=False):
    """The empirical NTK of `f(params, x) -> logits [N, C]` between x1 [n1, ...] and x2
    [n2, ...] (x2 = None: x1 against itself, symmetric by construction).

    class_index: c for logit c's kernel; None or -1 for the mean over the logits.
    memory_gb: budget for the held rows and one chunk's pass; the result does not depend on it.
    method: 'auto' (per layer, the cheaper exact form), 'direct', 'structured', or 'jacobian'
      (plain per-example gradients of every leaf; what any callable f gets).
    progress: show a tqdm bar over the chunk gradient passes.
    stats: a dict filled with the plan and counts (chunk, block, panel, gradient evaluations) and the
      seconds spent in total, in gradient passes and in contractions.
    full: the full kernel K[i, j, c, c'] = <d f_c(x_i)/d theta, d f_c'(x_j)/d theta> of every class
      pair, not divided by C (class_index must be None or -1; method 'auto' means 'direct',
      'structured' is a ValueError); `full_matrix` gives its class-major [C n1, C n2] matrix.
    Returns K as a float64 numpy array [n1, n2] ([n1, n2, C, C] with full).

    Schedule: images are taken in blocks of `block` rows, each computed `chunk` examples at a
    time. The blocks of x2 (x1 when symmetric) are held in panels of `panel_blocks` blocks.
    Against each panel, every block of x1 is contracted with each held block as it is computed;
    when symmetric, only blocks at or after the panel's start, and within the panel only the
    held blocks up to its own, so each pair is computed once. One panel (a large enough budget)
    computes every gradient once.
    """

    t0 = time.time()
    x1 = np.asarray(x1, np.float32)
    symmetric = x2 is None
    x_panel = x1 if symmetric else np.asarray(x2, np.float32)
    input_shape = x1.shape[1:]
    if not symmetric and x_panel.shape[1:] != input_shape:
        raise ValueError(f"x1 images are {input_shape} but x2 images are {x_panel.shape[1:]}")
    params = parallel.replicate(jax.tree_util.tree_map(jnp.asarray, params))
    num_classes = _num_classes(f, params, input_shape)
    classes = classes_of(class_index, num_classes)
    plan = make_plan(f, params, input_shape, num_classes, class_index, memory_gb, method,
                     n=max(len(x1), len(x_panel)), devices=parallel.num_devices(), full=full)
    rows_fn, put, gram_fn = _jitted(f, classes, plan.layers, plan.full)
    rows = _BlockRows(rows_fn, put, params, plan.chunk, plan.block)
    kernel, total, panels, contraction_seconds = _contract(rows, gram_fn, x1, x_panel, symmetric, plan, progress)
    if not plan.full:
        kernel /= plan.k
    if stats is not None:
        stats.update(method=plan.method, k=plan.k, full=plan.full, chunk=plan.chunk, block=plan.block,
                     panel_blocks=plan.panel_blocks, panels=panels, devices=parallel.num_devices(),
                     row_floats=plan.row_floats, block_evaluations=total, example_gradients=rows.examples,
                     structured_layers=[l.name for l in plan.layers if l.structured],
                     direct_layers=[l.name for l in plan.layers if not l.structured],
                     gradient_seconds=rows.seconds, contraction_seconds=contraction_seconds,
                     seconds=time.time() - t0)
    return kernel


class _BlockRows:
    """The gradient rows of block i of an image array, computed `chunk` images at a time, with
    the gradient seconds and the number of image gradients spent so far."""

    def __init__(self, rows_fn, put, params, chunk, block):
        self.rows_fn, self.put, self.params, self.chunk, self.block = rows_fn, put, params, chunk, block
        self.seconds, self.examples = 0.0, 0

    def __call__(self, x, i):
        """Rows past the end of x stay zero (they are dropped)."""
        m, b = self.chunk, self.block
        lo, hi = i * b, min(len(x), (i + 1) * b)
        block = None
        for s in range(lo, hi, m):
            xb = x[s:s + m]
            self.examples += len(xb)
            if len(xb) < m:  # pad to one compiled shape; the padded rows are dropped
                xb = np.concatenate([xb, np.repeat(xb[:1], m - len(xb), 0)])
            t = time.time()
            rows = self.rows_fn(self.params, parallel.shard_batch(xb)[0])
            if m == b:
                block = rows
            else:
                if block is None:
                    block = jax.tree_util.tree_map(
                        lambda r: jnp.zeros((b,) + r.shape[1:], r.dtype, device=r.sharding), rows)
                block = self.put(block, rows, s - lo)
            jax.block_until_ready(block)
            self.seconds += time.time() - t
        return block


def _mirror(block):
    """K(x2, x1) from K(x1, x2): [n2, n1] from [n1, n2], [n2, n1, C, C] from a full [n1, n2, C, C]."""
    return block.transpose((1, 0, 3, 2) if block.ndim == 4 else (1, 0))


def _contract(rows, gram_fn, x1, x_panel, symmetric, plan, progress):
    """K (unnormalised, float64 [n1, n2], or [n1, n2, k, k] for a full plan) by the panel
    schedule of `empirical_ntk`. Returns (K, block evaluations, panels, contraction seconds)."""
    n1, n2, b, pc = len(x1), len(x_panel), plan.block, plan.panel_blocks
    c1, c2 = -(-n1 // b), -(-n2 // b)
    panels = range(0, c2, pc)
    if symmetric:  # panel p streams the blocks from its own start
        total = sum(c1 - p0 for p0 in panels)
    else:  # panel p computes its own blocks, then streams all of x1
        total = sum(min(pc, c2 - p0) + c1 for p0 in panels)
    kernel, seconds = np.zeros((n1, n2) + ((plan.k, plan.k) if plan.full else ()), np.float64), 0.0
    with jax.default_matmul_precision("highest"), \
            tqdm(total=total, desc="NTK gradients", unit="block", disable=not progress) as bar:
        for p0 in panels:
            held = []  # the rows of blocks p0, p0 + 1, ... of x2
            p_end = min(c2, p0 + pc)
            if not symmetric:
                for j in range(p0, p_end):
                    held.append(rows(x_panel, j))
                    bar.update(1)
            for i in range(p0 if symmetric else 0, c1):
                rows_i = rows(x1, i)
                if symmetric and i < p_end:  # a block of this panel: hold it, pair it with those before
                    held.append(rows_i)
                r_lo, r_hi = i * b, min(n1, (i + 1) * b)
                for j, held_rows in enumerate(held, p0):
                    c_lo, c_hi = j * b, min(n2, (j + 1) * b)
                    t = time.time()
                    block = np.asarray(parallel.to_host(gram_fn(rows_i, held_rows)), np.float64)
                    block = block[:r_hi - r_lo, :c_hi - c_lo]
                    seconds += time.time() - t
                    if symmetric and i == j:  # a diagonal block: made exactly symmetric
                        block = 0.5 * (block + _mirror(block))
                    kernel[r_lo:r_hi, c_lo:c_hi] = block
                    if symmetric and i != j:
                        kernel[c_lo:c_hi, r_lo:r_hi] = _mirror(block)
                bar.update(1)
            del held
    return kernel, total, len(panels), seconds


def ntk_cross(f, params, x, x_ref, class_index=None):
    """K(x, x_ref) [m, n] float32 as a traceable jax function, differentiable in x (for attacks
    on kernel predictors and eigen-features). Holds all m + n rows at once: meant for the
    moderate sizes of those analyses; use `empirical_ntk` for large kernels. For many x against
    one x_ref, `cross_kernel` computes x_ref's rows once."""
    kernel, variables = cross_kernel(f, params, x_ref, class_index)
    return kernel(variables, x)


_CROSS_CACHE = {}


def cross_kernel(f, params, x_ref, class_index=None):
    """K(x, x_ref) for many x against one fixed x_ref: `(kernel, variables)` with
    `kernel(variables, x) -> K(x, x_ref)` [m, n] float32, the value of `ntk_cross(f, params, x,
    x_ref, class_index)`, traceable and differentiable in x.

    `variables` holds the parameters, a NetFn's BatchNorm state and the gradient rows of
    x_ref, computed here once: every call of `kernel` (each step of an attack) computes only the
    rows of x. Nothing of the checkpoint is a constant of `kernel`, and `kernel` is the same
    function object for every checkpoint of one network and class selection, so jitted code
    taking it as a static argument traces once per network and compiles to the same executable
    for every checkpoint (shared through the persistent compilation cache across processes)."""
    input_shape = tuple(x_ref.shape[1:])
    num_classes = _num_classes(f, params, input_shape)
    classes = classes_of(class_index, num_classes)
    layers = discover_layers(f, params, input_shape, len(classes))
    net = isinstance(f, NetFn)
    key = (f.apply if net else f, classes, layers)
    if key not in _CROSS_CACHE:
        def rows(state, params_, x):
            return make_rows_fn(NetFn(f.apply, state) if net else f, classes, layers)(params_, x)

        def kernel(variables, x):
            state, params_, ref_rows = variables
            with jax.default_matmul_precision("highest"):
                return gram(rows(state, params_, jnp.asarray(x, jnp.float32)), ref_rows) / len(classes)
        _CROSS_CACHE.clear()  # one network at a time
        _CROSS_CACHE[key] = (kernel, jax.jit(rows))
    kernel, rows_jit = _CROSS_CACHE[key]
    state = f.net_state if net else None
    params = jax.tree_util.tree_map(jnp.asarray, params)
    with jax.default_matmul_precision("highest"):
        ref_rows = rows_jit(state, params, jnp.asarray(x_ref, jnp.float32))
    return kernel, (state, params, ref_rows)


@functools.partial(jax.jit, static_argnums=2)
def _scaled_gram(rows1, rows2, num_summed):
    with jax.default_matmul_precision("highest"):
        return gram(rows1, rows2) / num_summed


def reference_kernel(variables, num_summed, batch_size):
    """K(x_ref, x_ref) [n, n] float64 from the gradient rows of x_ref that `cross_kernel` keeps in
    `variables`, `batch_size` rows at a time: no gradient is computed again. `num_summed` is the
    number of logits the kernel averages, len(classes_of(class_index, C)) for a network with C
    logits. Made
    exactly symmetric; equal to `empirical_ntk(f, params, x_ref, class_index=...)` up to float
    rounding."""
    ref_rows = variables[2]
    n = jax.tree_util.tree_leaves(ref_rows)[0].shape[0]
    blocks = [np.asarray(_scaled_gram(jax.tree_util.tree_map(lambda a, s=s: a[s:s + batch_size], ref_rows),
                                      ref_rows, num_summed), np.float64)
              for s in range(0, n, batch_size)]
    k = np.concatenate(blocks)
    return (k + k.T) / 2


def flops_floor(params, n, k=1):
    """FLOPs of the plain Gram of n full Jacobian rows (upper triangle only): n(n+1)/2 * 2P*k."""
    p = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    return n * (n + 1) / 2 * 2 * p * k


# --------------------------------------------------------------------------------------
# The images of a kernel file (calculate_kernel.py: a checkpoint's kernel, or an --arch's)
# --------------------------------------------------------------------------------------
def kernel_images(dataset, num_classes, size, seed, data_dir, input_shape=None, made_for=None):
    """The training images of a kernel: size / num_classes per class of `dataset`, drawn without
    replacement with `seed`, class 0 first, as (x, labels, indices into the training split).
    With `input_shape` (that of the network at `made_for`) the images must have that shape.
    A size that does not fit is a UserError naming --dataset_size."""
    if size % num_classes:
        raise UserError(f"--dataset_size {size} is not divisible by the number of classes "
                        f"({num_classes}) of {dataset}")
    ds = data.load_dataset(dataset, data_dir)
    per_class = size // num_classes
    smallest = int(np.bincount(ds.y_train, minlength=num_classes).min())
    if per_class > smallest:
        raise UserError(f"--dataset_size {size} needs {per_class} images per class but the "
                        f"{dataset} training split has only {smallest} of its rarest class: use at most "
                        f"{smallest * num_classes}")
    if input_shape is not None and ds.input_shape != input_shape:
        raise UserError(f"{dataset} images are {ds.input_shape} but {made_for} was made for {input_shape}")
    return data.balanced_subset(ds.x_train, ds.y_train, size, seed, num_classes, what="--dataset_size")


__all__ = ["NetFn", "checkpoint_fn", "empirical_ntk", "ntk_cross", "cross_kernel", "reference_kernel", "make_plan",
           "discover_layers", "make_rows_fn", "gram", "full_gram", "full_matrix", "check_full", "classes_of",
           "describe_plan", "kernel_images",
           "DEFAULT_MEMORY_GB", "METHODS"]
