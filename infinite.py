"""Infinite-width NNGP and NTK kernels of ReLU networks, with neural-tangents' `stax` semantics.

Each layer constructor returns `(init_fn, apply_fn, kernel_fn)` as `neural_tangents.stax` does:
- `init_fn(key, input_shape) -> (output_shape, params)` and `apply_fn(params, x)`: the finite
  network (shapes with a leading batch axis, NHWC images or [N, D] vectors);
- `kernel_fn(x1, x2=None, get=('nngp', 'ntk'))`: the kernels of its infinite-width limit,
  [n1, n2] arrays for one output (the outputs of the last layer are i.i.d.). `x2=None` is x1
  against itself, exactly symmetric. `get` a string returns one array, a tuple a namedtuple.

Called on concrete arrays, kernel_fn computes in blocks of image pairs sized from `memory_gb`
(one compilation per block shape, the first block axis split over the devices by parallel.py)
and returns numpy arrays. Called on tracers (inside `jax.grad`, `jit`, `vmap`) it is one plain
JAX expression of x1 and x2, so kernel predictors can be differentiated in the input.

The recursions (per output channel; "nngp" K and "ntk" T, both [pairs, *positions]):
- inputs: K0(s, s') = <x1(s), x2(s')> / C (mean over the input channels), T0 = 0;
- Dense / Conv, 'ntk' parameterization (z = W_std / sqrt(fan_in) W x + b_std b, W, b ~ N(0, 1)):
      K' = W_std^2 A(K) + b_std^2,   T' = K' + W_std^2 A(T),
  with A = identity for Dense and, for a k_h x k_w convolution, the mean over the filter's
  offsets d of K(s + d, s' + d), zero-padded (SAME pads and still divides by k_h k_w);
- Dense / Conv, 'standard' parameterization (z = W x + b, W ~ N(0, W_std^2 / fan_in),
  b ~ N(0, b_std^2)): K' = W_std^2 A(K) + b_std^2, T' = fan_in A(K) + W_std^2 A(T) + 1. Here the
  NTK depends on the widths (fan_in = channels x filter size of the finite layer), as in stax;
- Relu (Cho & Saul's arc-cosine kernels): with q1, q2 the variances at s and s' and
  theta = arccos(K / sqrt(q1 q2)),
      K' = sqrt(q1 q2) (sin theta + (pi - theta) cos theta) / (2 pi),
      T' = T (pi - theta) / (2 pi);
- AvgPool: the mean of K over the pairs of positions of the two windows; GlobalAvgPool: the
  mean over all pairs of positions; Flatten: the mean over the diagonal K(s, s).

What is propagated: Flatten reads only the diagonal K(s, s) of a convolutional stack, so those
stacks carry [pairs, H, W] ("diag"); pooling reads the covariance of every pair of positions, so
layers before a pool carry [pairs, H, W, H, W] ("full", the expensive case: Myrtle). The
variances q of every image at each Relu are computed once, before the pairs, from each image's
own covariance. No neural-tangents code is used; bench/bench_infinite.py checks this module
against neural-tangents 0.6.5 side by side.

Precision: float32 by default (what the CPU and GPU run fastest). `dtype='float64'` computes in
double precision (under `jax.enable_x64`), for kernel regression on ill-conditioned kernels
(ridgeless solves on thousands of images lose digits in float32).
"""
from __future__ import annotations

import collections
import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import cli
import parallel
from cli import DEFAULT_MEMORY_GB

PARAMETERIZATIONS = ("ntk", "standard")
ARCHITECTURES = ("fc", "conv", "myrtle")
# Myrtle depth -> convolutions per stage (the stages are separated by 2x2 average pools).
MYRTLE_FACTORS = {5: (1, 1, 1), 7: (1, 2, 2), 10: (2, 3, 3)}
# The inputs' NTK: zero (a marker, so no layer transforms an array of zeros).
ZERO = object()
# Kernel entries per block of image pairs (or of images, for their own covariances). Every layer
# is a pass over a block's entries, so blocks that stay in the CPU's caches are fastest
# (bench/README.md). A network whose kernels are one number per pair throughout (FC) is instead
# dominated by the inputs' Gram matrix, which runs faster as fewer, larger matrix products.
BLOCK_ENTRIES = 2 ** 18
FLAT_BLOCK_PAIRS = 2 ** 21
# Floats held per pair of images per propagated entry (K, T, the layer's temporaries).
_FLOATS_PER_ENTRY = 8


class Op(NamedTuple):
    """One layer of a network, as the kernel interpreter and the finite network read it."""
    kind: str                      # 'dense' | 'conv' | 'relu' | 'avgpool' | 'gap' | 'flatten'
    out: int = 0                   # output channels (dense, conv)
    window: tuple = ()             # filter or pool window (conv, avgpool)
    strides: tuple = ()
    padding: str = "VALID"
    W_std: float = 1.0
    b_std: float | None = None
    parameterization: str = "ntk"


class Network(NamedTuple):
    init_fn: object
    apply_fn: object
    kernel_fn: object


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------
def _check_parameterization(parameterization):
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    return parameterization


def _network(ops):
    ops = tuple(ops)
    return Network(functools.partial(_init, ops), functools.partial(_apply, ops), KernelFn(ops))


def Dense(out_dim, W_std=1.0, b_std=None, parameterization="ntk"):
    """Fully connected layer on the last axis (stax.Dense). b_std=None: no bias."""
    return _network([Op("dense", int(out_dim), W_std=float(W_std), b_std=None if b_std is None else float(b_std),
                        parameterization=_check_parameterization(parameterization))])


def Conv(out_chan, filter_shape, strides=None, padding="SAME", W_std=1.0, b_std=None, parameterization="ntk"):
    """2-D convolution over NHWC images (stax.Conv), padding 'SAME' or 'VALID'."""
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    return _network([Op("conv", int(out_chan), tuple(filter_shape), tuple(strides or (1, 1)), padding,
                        float(W_std), None if b_std is None else float(b_std),
                        _check_parameterization(parameterization))])


def Relu():
    return _network([Op("relu")])


def AvgPool(window_shape, strides=None, padding="VALID"):
    """Average pooling (stax.AvgPool with normalize_edges=False: padded zeros count)."""
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    return _network([Op("avgpool", window=tuple(window_shape), strides=tuple(strides or (1, 1)), padding=padding)])


def GlobalAvgPool():
    return _network([Op("gap")])


def Flatten():
    return _network([Op("flatten")])


def serial(*layers):
    """The layers one after another (stax.serial)."""
    return _network([op for layer in layers for op in layer.kernel_fn.ops])


def architecture(name, depth, *, width=1000, W_std=2 ** 0.5, b_std=0.1, parameterization="ntk", num_classes=1):
    """Tsilivis & Kempe's three networks (their notebook's builders):
    - 'fc': Flatten, depth x [Dense(width), Relu], Dense(num_classes);
    - 'conv': depth x [Conv(width, 3x3, SAME), Relu], Flatten, Dense(num_classes);
    - 'myrtle' (depth 5, 7 or 10): Conv+Relu, then per stage of MYRTLE_FACTORS[depth] that many
      [Conv+Relu], a 2x2 AvgPool between stages, GlobalAvgPool, Dense(num_classes).
    In the 'ntk' parameterization `width` does not change the kernels."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {name!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    kw = dict(W_std=W_std, b_std=b_std, parameterization=parameterization)
    conv = [Conv(width, (3, 3), padding="SAME", **kw), Relu()]
    if name == "fc":
        layers = [Flatten()] + [Dense(width, **kw), Relu()] * depth
    elif name == "conv":
        layers = conv * depth + [Flatten()]
    else:
        if depth not in MYRTLE_FACTORS:
            raise ValueError(f"a Myrtle network has depth 5, 7 or 10, got {depth}")
        *stages, last = MYRTLE_FACTORS[depth]
        layers = list(conv)
        for n in stages:
            layers += conv * n + [AvgPool((2, 2), strides=(2, 2))]
        layers += conv * last + [GlobalAvgPool()]
    return serial(*layers, Dense(num_classes, **kw))


def network_from_args(args, input_shape):
    """The `architecture` that the command line's --arch, --depth, --width, --W_std, --b_std and
    --parameterization name (cli.add_architecture_args), checked against the flags of a
    checkpoint and against images of `input_shape` [H, W, C]. Returns (Network, the record files
    keep of it); bad flags are one-line UserErrors."""
    from utils import UserError
    if getattr(args, "model_path", None) is not None:
        raise UserError("--arch and --model_path exclude each other: --arch takes the infinite-width kernel of an "
                        "architecture, --model_path the empirical NTK of a checkpoint")
    for flag, what in (("model", "--model names a checkpoint's network"),
                       ("use_linear_params", "--use_linear_params selects a checkpoint's parameters")):
        if getattr(args, flag, None):
            raise UserError(f"{what}; an infinite-width kernel has none")
    record = {"arch": args.arch, **cli.architecture_record(args.arch, args, "--arch")}
    width = 1000 if args.width is None else args.width
    if width < 1:
        raise UserError(f"--width must be >= 1, got {width}")
    record["width"] = width
    net = architecture(args.arch, args.depth, width=width, W_std=args.W_std, b_std=args.b_std or None,
                       parameterization=args.parameterization)
    try:
        output_shape(net.kernel_fn.ops, input_shape)
    except ValueError as e:
        raise UserError(f"--arch {args.arch} --depth {args.depth} on images of {tuple(input_shape)}: {e}") from None
    return net, record


# --------------------------------------------------------------------------------------
# Shapes: one example's shape through the layers (no batch axis)
# --------------------------------------------------------------------------------------
def _pads(size, window, stride, padding):
    """(low, high) padding of one spatial axis, as lax computes it."""
    return jax.lax.padtype_to_pads((size,), (window,), (stride,), padding)[0]


def _out_size(size, window, stride, padding):
    lo, hi = _pads(size, window, stride, padding)
    return (size + lo + hi - window) // stride + 1


def _out_shape(op, shape):
    if op.kind == "dense":
        return shape[:-1] + (op.out,)
    if op.kind in ("conv", "avgpool"):
        if len(shape) != 3:
            raise ValueError(f"{op.kind} needs [H, W, C] images, got examples of shape {shape}")
        hw = tuple(_out_size(n, w, s, op.padding) for n, w, s in zip(shape[:2], op.window, op.strides))
        if min(hw) < 1:
            raise ValueError(f"images of {shape[0]}x{shape[1]} are too small for a {op.window} {op.kind} "
                             f"with {op.padding} padding")
        return hw + ((op.out,) if op.kind == "conv" else shape[2:])
    if op.kind == "gap":
        if len(shape) != 3:
            raise ValueError(f"GlobalAvgPool needs [H, W, C] images, got examples of shape {shape}")
        return shape[2:]
    if op.kind == "flatten":
        return (int(np.prod(shape)),)
    return shape  # relu


def output_shape(ops, input_shape):
    """One example's output shape, or a ValueError naming the layer that cannot take the input."""
    shape = tuple(input_shape)
    for op in ops:
        shape = _out_shape(op, shape)
    return shape


# --------------------------------------------------------------------------------------
# The finite network
# --------------------------------------------------------------------------------------
def _init(ops, key, input_shape):
    """stax-style init: (output_shape with the batch axis, params: one tuple per layer). W, b ~
    N(0, 1) in the 'ntk' parameterization, N(0, W_std^2 / fan_in) and N(0, b_std^2) in 'standard'."""
    shape = tuple(input_shape)
    params = []
    for op in ops:
        out = (shape[0],) + _out_shape(op, shape[1:])
        if op.kind in ("dense", "conv"):
            key, kw, kb = jax.random.split(key, 3)
            fan_in = shape[-1] * int(np.prod(op.window))
            w = jax.random.normal(kw, tuple(op.window) + (shape[-1], op.out))
            b = None if op.b_std is None else jax.random.normal(kb, (op.out,))
            if op.parameterization == "standard":
                w = w * op.W_std / math.sqrt(fan_in)
                b = None if b is None else b * op.b_std
            params.append((w, b))
        else:
            params.append(())
        shape = out
    return shape, tuple(params)


def layer_apply(op, p, x):
    """One layer of the finite network (stax semantics for both parameterizations)."""
    if op.kind in ("dense", "conv"):
        w, b = p
        if op.kind == "dense":
            z = jnp.tensordot(x, w, (-1, 0))
        else:
            z = jax.lax.conv_general_dilated(x, w, op.strides, op.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if op.parameterization == "ntk":
            z = z * (op.W_std / math.sqrt(x.shape[-1] * int(np.prod(op.window))))
            return z if b is None else z + op.b_std * b
        return z if b is None else z + b
    if op.kind == "relu":
        return jnp.maximum(x, 0)
    if op.kind == "avgpool":
        window, strides = (1,) + op.window + (1,), (1,) + op.strides + (1,)
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, op.padding) / np.prod(op.window)
    if op.kind == "gap":
        return x.mean((1, 2))
    return x.reshape(x.shape[0], -1)


def _apply(ops, params, x):
    """The finite network's outputs."""
    for op, p in zip(ops, params):
        x = layer_apply(op, p, x)
    return x


# --------------------------------------------------------------------------------------
# The kernel interpreter
# --------------------------------------------------------------------------------------
class Step(NamedTuple):
    """A layer with the shapes and kernel layouts it works on."""
    op: Op
    in_shape: tuple
    out_shape: tuple
    form: str        # layout of the kernels it reads: 'flat' | 'diag' | 'full'
    out_form: str    # layout it writes


def plan(ops, input_shape):
    """The Steps of `ops` on examples of `input_shape`, with the cheapest layouts the readout
    allows: walking back from the output, a pool needs 'full' input, Flatten 'diag', and
    dense/conv/relu need what their output needs."""
    shapes = [tuple(input_shape)]
    for op in ops:
        shapes.append(_out_shape(op, shapes[-1]))
    if len(shapes[-1]) != 1:
        raise ValueError(f"the network's output has shape {shapes[-1]} per example: end it with Flatten or "
                         f"GlobalAvgPool and Dense, so each example has a vector of outputs")
    need, forms = "flat", []
    for op, shape in zip(reversed(ops), reversed(shapes[:-1])):
        if len(shape) == 1:
            need = "flat"
        elif op.kind in ("avgpool", "gap"):
            need = "full"
        elif op.kind == "flatten":
            need = "diag"
        forms.append(need)
    forms = forms[::-1]
    steps = []
    for i, op in enumerate(ops):
        out_form = {"avgpool": "full", "gap": "flat", "flatten": "flat"}.get(op.kind, forms[i])
        steps.append(Step(op, shapes[i], shapes[i + 1], forms[i], out_form))
    return tuple(steps)


def _spatial_ndim(form):
    return {"flat": 0, "diag": 2, "full": 4}[form]


def _to_form(k, form, new_form):
    """A 'full' kernel's diagonal when the next layer reads 'diag'."""
    if form == new_form or k is None:
        return k
    assert (form, new_form) == ("full", "diag"), (form, new_form)
    h, w = k.shape[-4], k.shape[-3]
    lead = k.shape[:-4]
    k = k.reshape(lead + (h * w, h * w))
    return jnp.diagonal(k, axis1=-2, axis2=-1).reshape(lead + (h, w))


def _band(size, out_size, window, stride, pad_lo):
    """B [out, in]: B[o, i] = 1 where input i lies in output o's window (zero padding)."""
    o = np.arange(out_size)[:, None] * stride - pad_lo
    i = np.arange(size)[None, :]
    return ((i >= o) & (i < o + window)).astype(np.float32)


def _shifted_sum(k, form, axes, window, stride, pads, size_out):
    """The sum over d < window of k's slices at d + stride * o along each of `axes` together
    (position axes of the layout `form`), zero padded by `pads`: a window sum XLA fuses."""
    lead = k.ndim - _spatial_ndim(form)
    widths = [(0, 0)] * k.ndim
    for a in axes:
        widths[lead + a] = pads
    kp = jnp.pad(k, widths)
    out = 0.0
    for d in range(window):
        index = [slice(None)] * k.ndim
        for a in axes:
            index[lead + a] = slice(d, d + stride * (size_out - 1) + 1, stride)
        out = out + kp[tuple(index)]
    return out


def _conv_mean(k, step):
    """A(K): the mean over the filter offsets d of K(s + d, s' + d), zero padded, strided.
    'diag': along W a matmul with a 0/1 band matrix (the last axis, no transpose), along H a sum
    of shifted rows; 'full': the shared offset of s and s' along one axis at a time, as sums of
    shifted slices."""
    op, (h, w) = step.op, step.in_shape[:2]
    (kh, kw), (sh, sw) = op.window, op.strides
    pads_h, pads_w = _pads(h, kh, sh, op.padding), _pads(w, kw, sw, op.padding)
    ho, wo = step.out_shape[:2]
    if step.form == "diag":
        bw = jnp.asarray(_band(w, wo, kw, sw, pads_w[0]), k.dtype)
        k = jnp.einsum("...hw,vw->...hv", k, bw, precision=jax.lax.Precision.HIGHEST)
        return _shifted_sum(k, step.form, (0,), kh, sh, pads_h, ho) / (kh * kw)
    k = _shifted_sum(k, step.form, (0, 2), kh, sh, pads_h, ho)
    return _shifted_sum(k, step.form, (1, 3), kw, sw, pads_w, wo) / (kh * kw)


def _pool_mean(k, step):
    """AvgPool of a 'full' kernel: the mean over both windows' positions."""
    op, (h, w) = step.op, step.in_shape[:2]
    window = (1,) * (k.ndim - 4) + op.window * 2
    strides = (1,) * (k.ndim - 4) + op.strides * 2
    pads = [(0, 0)] * (k.ndim - 4) + [_pads(h, op.window[0], op.strides[0], op.padding),
                                      _pads(w, op.window[1], op.strides[1], op.padding)] * 2
    return jax.lax.reduce_window(k, 0.0, jax.lax.add, window, strides, pads) / np.prod(op.window) ** 2


@jax.custom_jvp
def _safe_sqrt(x):
    return jnp.sqrt(jnp.maximum(x, 0.0))


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    # At x <= 0 (correlation exactly +-1, e.g. an image against itself) the derivative of the
    # square root is infinite but the kernel's is finite; this zero keeps gradients finite.
    (x,), (dx,) = primals, tangents
    y = _safe_sqrt(x)
    return y, jnp.where(x > 0, dx / (2 * jnp.where(x > 0, y, 1.0)), 0.0)


def _atan2_upper(y, x):
    """arctan2(y, x) for y >= 0 in float32, as plain arithmetic that XLA vectorises (Cephes'
    atanf polynomial after reduction to [0, tan(pi/8)]: about 3e-7 absolute error, the same as
    jnp.arctan2's in float32, and several times faster on a CPU)."""
    ax = jnp.abs(x)
    hi, lo = jnp.maximum(ax, y), jnp.minimum(ax, y)
    a = lo / jnp.where(hi == 0, 1, hi)                    # in [0, 1]
    big = a > 0.41421356237309503                         # tan(pi / 8)
    a = jnp.where(big, (a - 1) / (a + 1), a)
    z = a * a
    r = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * a + a
    r = jnp.where(big, r + np.pi / 4, r)
    r = jnp.where(y > ax, np.pi / 2 - r, r)
    return jnp.where(x < 0, np.pi - r, r)


def _relu(k, prod, t=None, same=None):
    """The arc-cosine maps: K' and (with T) T' from K and prod = q1 q2. `same` marks the entries
    of an image with itself at one position, whose correlation is exactly 1: in float32 the
    rounding of K and q1 q2 would otherwise give theta ~ 1e-3 there, and T errs by ~1e-4."""
    if same is not None:
        prod = jnp.where(same, k * k, prod)
    root = _safe_sqrt(prod - k * k)                       # sqrt(q1 q2) sin(theta)
    theta = _atan2_upper(root, k) if k.dtype == jnp.float32 else jnp.arctan2(root, k)
    theta = jnp.where((root == 0) & (k == 0), jnp.pi / 2, theta)
    k_dot = 0.5 - theta / (2 * jnp.pi)                    # E[relu'(u) relu'(v)]
    return root / (2 * jnp.pi) + k_dot * k, _map(lambda a: a * k_dot, t)


def _affine_layer(k, t, step, averaged=False):
    """Dense or Conv: (K', T') from (K, T). T is None (not tracked) or ZERO (the inputs');
    `averaged`: K arrives as A(K)."""
    op = step.op
    mean = (lambda a: a) if op.kind == "dense" or averaged else (lambda a: _conv_mean(a, step))  # noqa: E731
    a_k = mean(k)
    a_t = 0.0 if t is ZERO else _map(mean, t)
    b2 = 0.0 if op.b_std is None else op.b_std ** 2
    k_out = op.W_std ** 2 * a_k + b2
    if t is None:
        return k_out, None
    if op.parameterization == "ntk":
        return k_out, k_out + op.W_std ** 2 * a_t
    fan_in = step.in_shape[-1] * int(np.prod(op.window))
    return k_out, fan_in * a_k + op.W_std ** 2 * a_t + (0.0 if op.b_std is None else 1.0)


def _linear_layer(k, t, step):
    """Any layer but Relu, on kernels of the layout step.form; returns the layout step.out_form."""
    kind = step.op.kind
    if kind in ("dense", "conv"):
        return _affine_layer(k, t, step)
    if kind == "avgpool":
        fn = functools.partial(_pool_mean, step=step)
    elif kind == "gap":
        fn = lambda a: a.mean((-4, -3, -2, -1))  # noqa: E731
    elif kind == "flatten":
        nd = _spatial_ndim(step.form)
        fn = (lambda a: a) if nd == 0 else (lambda a: a.mean(tuple(range(-nd, 0))))  # noqa: E731
    else:
        raise AssertionError(kind)
    return fn(k), _map(fn, t)


def _map(fn, t):
    """fn(T), with None (not tracked) and ZERO passed through."""
    return t if t is None or t is ZERO else fn(t)


def _variance(cov, form):
    """Each position's variance [n, H, W] (or [n]) from one image's own covariance."""
    return _to_form(cov, form, "diag") if form == "full" else cov


def _input_cov(x, step, self_only):
    """K0 in the first layer's layout, and whether the first layer is already applied to it.

    Two first layers are folded in: Flatten (K0 = x1 . x2 / D, one matmul) and, in the 'full'
    layout, the filter mean of a Conv, A(K0)(s, s') = P1(s) . P2(s') / (C k_h k_w) with P the
    images' input patches (one matmul instead of a kernel over all position pairs and its shifts).
    self_only: each image with itself ([n, *positions])."""
    x1, x2 = x
    hi = jax.lax.Precision.HIGHEST
    if step.form == "flat" or step.op.kind == "flatten":   # vectors, or images flattened at once
        f1, f2 = x1.reshape(len(x1), -1), x2.reshape(len(x2), -1)
        d = f1.shape[1]
        return (jnp.sum(f1 * f1, 1) if self_only else jnp.matmul(f1, f2.T, precision=hi)) / d, step.op.kind == "flatten"
    folded = step.op.kind == "conv" and step.form == "full"   # 'diag' convolutions are cheap already
    if folded:
        op = step.op
        patches = lambda z: jax.lax.conv_general_dilated_patches(  # noqa: E731
            z, op.window, op.strides, op.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi)
        x1, x2 = patches(x1), (None if self_only else patches(x2))
    c = x1.shape[-1]
    if step.form == "diag":
        k = jnp.sum(x1 * x1, -1) if self_only else jnp.einsum("ahwc,bhwc->abhw", x1, x2, precision=hi)
    elif self_only:
        k = jnp.einsum("ahwc,aijc->ahwij", x1, x1, precision=hi)
    else:
        k = jnp.einsum("ahwc,bijc->abhwij", x1, x2, precision=hi)
    return k / c, folded


def _self_variances(steps, x):
    """Per Relu, each image's variances at its input: a tuple of [n, *positions] arrays."""
    k, folded = _input_cov((x, x), steps[0], self_only=True)
    out, form = [], steps[0].form
    for i, step in enumerate(steps):
        if i == 0 and folded:
            k, _ = _first_layer(k, None, step)
            form = step.out_form
            continue
        k = _to_form(k, form, step.form)
        form = step.form
        if step.op.kind == "relu":
            q = _variance(k, form)
            out.append(q)
            if form == "full":
                h, w = q.shape[1:]
                prod = q[:, :, :, None, None] * q[:, None, None, :, :]
                k, _ = _relu(k, prod)
            else:
                k = k / 2          # relu of a variance: E[relu(u)^2] = q / 2
        else:
            k, _ = _linear_layer(k, None, step)
        form = step.out_form
    return tuple(out)


def _same_positions(same, form, shape):
    """`same` [n1, n2] (pairs of identical images) broadcast to the entries of one position."""
    if form == "flat":
        return same
    if form == "diag":
        return same[:, :, None, None]
    h, w = shape[:2]
    eye = jnp.eye(h * w, dtype=bool).reshape(h, w, h, w)
    return same[:, :, None, None, None, None] & eye


def _materialise(*arrays):
    """Compute these arrays before their consumers: without it XLA fuses a Relu into the next
    convolution's shifted reads and evaluates it once per filter offset."""
    return jax.lax.optimization_barrier(arrays)


def _first_layer(k, t, step):
    """The rest of a first layer that `_input_cov` folded in: nothing for Flatten, the affine
    part for Conv (K0 arrives as A(K0))."""
    if step.op.kind == "flatten":
        return k, t
    return _affine_layer(k, t, step, averaged=True)


def _pair_kernels(steps, x1, x2, q1, q2, same=None):
    """(K, T) [n1, n2] of the network's output, given each image's Relu variances q1, q2 and
    optionally `same` [n1, n2], True where x1[i] and x2[j] are the same image."""
    k, folded = _input_cov((x1, x2), steps[0], self_only=False)
    t = ZERO
    form, relu = steps[0].form, 0
    for i, step in enumerate(steps):
        if i == 0 and folded:
            k, t = _first_layer(k, t, step)
            form = step.out_form
            continue
        k, t = _to_form(k, form, step.form), _map(lambda a: _to_form(a, form, step.form), t)
        form = step.form
        if step.op.kind == "relu":
            a, b = q1[relu], q2[relu]
            if form in ("flat", "diag"):
                prod = a[:, None] * b[None, :]
            else:
                prod = a[:, None, :, :, None, None] * b[None, :, None, None, :, :]
            mask = None if same is None else _same_positions(same, form, step.in_shape)
            k, t = _relu(k, prod, t, mask)
            relu += 1
            k, t = (_materialise(k)[0], t) if t is ZERO else _materialise(k, t)
        else:
            k, t = _linear_layer(k, t, step)
        form = step.out_form
    return k, jnp.zeros_like(k) if t is ZERO else t


# --------------------------------------------------------------------------------------
# kernel_fn
# --------------------------------------------------------------------------------------
def _is_traced(*arrays):
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def _outputs(get, values):
    if isinstance(get, str):
        return values[get]
    Kernels = collections.namedtuple("Kernels", get)
    return Kernels(*(values[g] for g in get))


def _check_get(get):
    names = (get,) if isinstance(get, str) else tuple(get)
    bad = [g for g in names if g not in ("nngp", "ntk")]
    if bad or not names:
        raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them, got {get!r}")
    return names


def _dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


class KernelFn:
    """kernel_fn(x1, x2=None, get=('nngp', 'ntk'), *, memory_gb, dtype, progress, stats): see the
    module docstring. `ops` lists the network's layers."""

    def __init__(self, ops):
        self.ops = tuple(ops)

    def __call__(self, x1, x2=None, get=("nngp", "ntk"), *, memory_gb=DEFAULT_MEMORY_GB, dtype="float32",
                 progress=False, stats=None):
        names = _check_get(get)
        if _is_traced(x1, x2):
            return _outputs(get, self.traced(x1, x2))
        values = self.blocked(x1, x2, memory_gb=memory_gb, dtype=dtype, progress=progress, stats=stats)
        return _outputs(get if isinstance(get, str) else names, values)

    def steps(self, input_shape):
        return plan(self.ops, input_shape)

    def traced(self, x1, x2=None):
        """{'nngp', 'ntk'} [n1, n2] as one JAX expression (differentiable in x1 and x2)."""
        steps = self.steps(x1.shape[1:])
        q1 = _self_variances(steps, x1)
        q2 = q1 if x2 is None else _self_variances(steps, x2)
        same = jnp.eye(len(x1), dtype=bool) if x2 is None else None
        k, t = _pair_kernels(steps, x1, x1 if x2 is None else x2, q1, q2, same)
        return {"nngp": k, "ntk": t}

    def cost(self, input_shape):
        """(floats per image pair, floats per image) held at the widest layer."""
        steps = self.steps(input_shape)
        if steps[0].op.kind == "flatten":   # folded into the input kernel
            steps = steps[1:]
        sizes = [int(np.prod(s.in_shape[:2])) ** (_spatial_ndim(s.form) // 2) for s in steps]
        channels = int(np.prod(input_shape))
        return _FLOATS_PER_ENTRY * max(sizes), _FLOATS_PER_ENTRY * max(sizes) + channels

    def blocked(self, x1, x2=None, *, memory_gb=DEFAULT_MEMORY_GB, dtype="float32", progress=False, stats=None):
        """{'nngp', 'ntk'} as numpy arrays of `dtype`, computed in blocks within `memory_gb`."""
        dtype = _dtype(dtype)
        if not memory_gb > 0:
            raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
        t0 = time.time()
        x1 = np.asarray(x1, dtype)
        symmetric = x2 is None
        x2 = x1 if symmetric else np.asarray(x2, dtype)
        if x1.shape[1:] != x2.shape[1:]:
            raise ValueError(f"x1 examples have shape {x1.shape[1:]} but x2 examples {x2.shape[1:]}")
        steps = self.steps(x1.shape[1:])
        per_pair, per_image = self.cost(x1.shape[1:])
        budget = memory_gb * 2 ** 30 / dtype.itemsize
        b1, b2 = _block_sizes(len(x1), len(x2), per_pair, budget, symmetric)
        bq = min(max(len(x1), len(x2)), int(budget // per_image), BLOCK_ENTRIES * _FLOATS_PER_ENTRY // per_image)
        bq = _round_up(max(1, bq), parallel.num_devices())
        with jax.enable_x64(dtype == np.float64), jax.default_matmul_precision("highest"):
            var_fn, pair_fn = _jitted(self.ops, x1.shape[1:])
            q1 = _variances_in_blocks(var_fn, x1, bq)
            q2 = q1 if symmetric else _variances_in_blocks(var_fn, x2, bq)
            ids1, ids2 = _image_ids(x1, None if symmetric else x2)
            keep = len(x2) * per_image <= budget / 4
            nngp, ntk, blocks = _pairs_in_blocks(pair_fn, x1, x2, q1, q2, ids1, ids2, b1, b2, symmetric, progress,
                                                 dtype, keep)
        if stats is not None:
            stats.update(block=(b1, b2), image_block=bq, blocks=blocks, columns_kept=keep, devices=parallel.num_devices(),
                         forms=[s.form for s in steps], floats_per_pair=per_pair, dtype=dtype.name,
                         seconds=time.time() - t0)
        return {"nngp": nngp, "ntk": ntk}


@functools.lru_cache(maxsize=None)
def cross_kernel(kernel_fn, memory_gb=DEFAULT_MEMORY_GB, get="ntk"):
    """`kernel(x_ref, x) -> K(x, x_ref)` [m, n] as one JAX expression, differentiable in x, whose
    memory stays near `memory_gb` however many reference images: x_ref is taken in chunks by a
    lax.map whose per-chunk pass is recomputed (jax.checkpoint) when differentiating, so the
    input gradient of a kernel predictor K(x, X) w holds one chunk's layers at a time. The chunk
    is sized at trace time from the batch and the network's cost per image pair. Memoized, so the
    same kernel_fn gives the same function (and one compilation per shape)."""
    _check_get(get)

    def one_chunk(x, chunk):
        return kernel_fn.traced(x, chunk)[get]

    one_chunk = jax.checkpoint(one_chunk)

    def kernel(x_ref, x):
        n = len(x_ref)
        per_pair, _ = kernel_fn.cost(x.shape[1:])
        # float32 entries; forward values, their cotangents and the recomputation: about 4 copies
        chunk = int(max(1, min(n, memory_gb * 2 ** 30 / 4 / 4 // (per_pair * len(x)))))
        chunks = -(-n // chunk)
        padded = jnp.concatenate([x_ref, jnp.repeat(x_ref[-1:], chunks * chunk - n, 0)]) if chunks * chunk > n else x_ref
        k = jax.lax.map(lambda c: one_chunk(x, c), padded.reshape((chunks, chunk) + x_ref.shape[1:]))  # [chunks, m, chunk]
        return jnp.moveaxis(k, 0, 1).reshape(len(x), chunks * chunk)[:, :n]

    return kernel


def _round_up(n, m):
    return -(-n // m) * m


def _block_sizes(n1, n2, per_pair, budget, symmetric):
    """Block sides (b1, b2): at most `budget` floats and BLOCK_ENTRIES kernel entries a block
    (FLAT_BLOCK_PAIRS pairs where a pair's kernel is one number throughout), sides splitting the
    sizes evenly, b1 a multiple of the device count."""
    d = parallel.num_devices()
    cap = FLAT_BLOCK_PAIRS if per_pair == _FLOATS_PER_ENTRY else BLOCK_ENTRIES * _FLOATS_PER_ENTRY // per_pair
    pairs = max(1, min(int(budget // per_pair), cap))
    side = max(1, math.isqrt(pairs))

    def split(n, b):
        return -(-n // -(-n // b))

    if symmetric:
        b = split(n1, side)
        return _round_up(b, d), b
    b1 = split(n1, side)
    b2 = split(n2, max(1, pairs // b1))
    return _round_up(b1, d), b2


@functools.lru_cache(maxsize=None)
def _jitted(ops, input_shape):
    steps = plan(ops, input_shape)
    var_fn = jax.jit(functools.partial(_self_variances, steps))
    pair_fn = jax.jit(functools.partial(_pair_kernels, steps))
    return var_fn, pair_fn


def _pad_to(x, size):
    """x with its last row repeated up to `size` rows (the padded rows are dropped)."""
    return x if len(x) == size else np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)])


def _variances_in_blocks(var_fn, x, block):
    parts = []
    for lo in range(0, len(x), block):
        xb = parallel.shard_batch(_pad_to(x[lo:lo + block], block))[0]
        parts.append([np.asarray(parallel.to_host(q))[:len(x) - lo] for q in var_fn(xb)])
    return [np.concatenate(qs) for qs in zip(*parts)]


def _image_ids(x1, x2=None):
    """Integer ids equal exactly for identical images (by their bytes), across x1 and x2 (None:
    x1 alone, whose ids serve for both)."""
    both = x1 if x2 is None else np.concatenate([x1, x2])
    rows = np.ascontiguousarray(both.reshape(len(both), -1))
    rows = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))
    ids = np.unique(rows.ravel(), return_inverse=True)[1].astype(np.int32)
    return (ids, ids) if x2 is None else (ids[:len(x1)], ids[len(x1):])


def _pairs_in_blocks(pair_fn, x1, x2, q1, q2, ids1, ids2, b1, b2, symmetric, progress, dtype, keep_columns):
    """K and T [n1, n2]: blocks (i, j) of b1 x b2 pairs (j >= i when symmetric, then mirrored);
    keep_columns: keep x2's blocks on the devices for every row of blocks."""
    n1, n2 = len(x1), len(x2)
    rows, cols = range(0, n1, b2 if symmetric else b1), range(0, n2, b2)
    todo = [(r, c) for r in rows for c in cols if not symmetric or c >= r]
    nngp, ntk = np.zeros((n1, n2), dtype), np.zeros((n1, n2), dtype)
    size1, step1 = b1, b2 if symmetric else b1

    @functools.lru_cache(maxsize=1)          # a row's blocks go to the devices once,
    def row(lo):
        return parallel.shard_batch([_pad_to(a[lo:lo + step1], size1) for a in [x1, *q1]])[0]

    @functools.lru_cache(maxsize=None if keep_columns else 1)   # and the columns' when they fit
    def col(lo):
        return parallel.replicate([jnp.asarray(_pad_to(a[lo:lo + b2], b2)) for a in [x2, *q2]])

    for r, c in tqdm(todo, desc="infinite-width kernel", unit="block", disable=not progress):
        lo1, hi1 = r, min(n1, r + step1)
        lo2, hi2 = c, min(n2, c + b2)
        (xa, *qa), (xb, *qb) = row(r), col(c)
        same = parallel.shard_batch(_pad_to(ids1[lo1:hi1], size1)[:, None] == _pad_to(ids2[lo2:hi2], b2)[None])[0]
        k, t = pair_fn(xa, xb, qa, qb, same)
        k = np.asarray(parallel.to_host(k))[:hi1 - lo1, :hi2 - lo2]
        t = np.asarray(parallel.to_host(t))[:hi1 - lo1, :hi2 - lo2]
        if symmetric and r == c:  # a diagonal block, computed whole: made exactly symmetric
            k, t = (k + k.T) / 2, (t + t.T) / 2
        nngp[lo1:hi1, lo2:hi2], ntk[lo1:hi1, lo2:hi2] = k, t
        if symmetric:
            nngp[lo2:hi2, lo1:hi1], ntk[lo2:hi2, lo1:hi1] = k.T, t.T
    return nngp, ntk, len(todo)
