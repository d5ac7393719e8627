"""Networks (Haiku) and the three training dynamics of Loo et al. (2022).

`get_model(name, num_classes, width)` returns `(init, apply)` with the reference's signatures:

    params, state = init(rng, x, is_training)
    logits, state = apply(params, state, rng, x, is_training)

`dynamics_apply` turns that network into the standard, linearized, centered or
standard-centered predictor used in phase 2.
"""
from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import infinite


DYNAMICS = ("standard", "linear", "centered", "standard_centered")


def _batchnorm(name):
    # Every BatchNorm of the reference: decay 0.9, eps 1e-5, with scale and offset.
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9, eps=1e-5, name=name)


def _conv(channels, kernel, stride, name):
    return hk.Conv2D(channels, kernel, stride=stride, with_bias=False, padding="SAME", name=name)


class BlockV1(hk.Module):
    """Basic ResNet v1 block: conv-BN-ReLU-conv-BN, plus an optional 1x1 conv+BN projection.

    Submodules are built in __init__ so Haiku names them `block_0/~/conv_0`, as the reference."""

    def __init__(self, channels, stride, use_projection, name=None):
        super().__init__(name=name)
        self.projection = None
        if use_projection:
            self.projection = (_conv(channels, 1, stride, "shortcut_conv"), _batchnorm("shortcut_batchnorm"))
        self.conv_0, self.bn_0 = _conv(channels, 3, stride, "conv_0"), _batchnorm("batchnorm_0")
        self.conv_1, self.bn_1 = _conv(channels, 3, 1, "conv_1"), _batchnorm("batchnorm_1")

    def __call__(self, x, is_training):
        shortcut = x
        if self.projection is not None:
            conv, bn = self.projection
            shortcut = bn(conv(x), is_training)
        out = jax.nn.relu(self.bn_0(self.conv_0(x), is_training))
        out = self.bn_1(self.conv_1(out), is_training)
        return jax.nn.relu(out + shortcut)


class BlockGroup(hk.Module):
    def __init__(self, channels, stride, use_projection, name=None):
        super().__init__(name=name)
        self.blocks = (BlockV1(channels, stride, use_projection, name="block_0"),
                       BlockV1(channels, 1, False, name="block_1"))

    def __call__(self, x, is_training):
        for block in self.blocks:
            x = block(x, is_training)
        return x


class ResNet18(hk.Module):
    """The reference's CIFAR ResNet-18 (Haiku name `res_net18`).

    A 3x3 stride-1 stem without max-pool, four groups of two basic blocks with
    (w, 2w, 4w, 8w) channels and strides (1, 2, 2, 2), global average pooling and a
    zero-initialised linear head. At width 64 the tree matches the reference exactly.
    """

    def __init__(self, num_classes, width=64, name=None):
        super().__init__(name=name)
        w = width
        self.initial_conv = _conv(w, 3, 1, "initial_conv")
        self.initial_bn = _batchnorm("initial_batchnorm")
        self.groups = [BlockGroup(w * mult, stride, use_projection=i > 0, name=f"block_group_{i}")
                       for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)))]
        self.logits = hk.Linear(num_classes, w_init=jnp.zeros, name="logits")

    def __call__(self, x, is_training):
        x = jax.nn.relu(self.initial_bn(self.initial_conv(x), is_training))
        for group in self.groups:
            x = group(x, is_training)
        return self.logits(jnp.mean(x, axis=(1, 2)))


def _mlp(hidden, num_classes):
    # Plain hk.Linear modules called in the transformed function, as the reference builds its
    # MLPs: Haiku names them `linear`, `linear_1`, `linear_2`, so checkpoints are interchangeable.
    def net(x, is_training):
        del is_training
        x = hk.Flatten()(x)
        for size in hidden:
            x = jax.nn.relu(hk.Linear(size)(x))
        return hk.Linear(num_classes)(x)
    return net


class _StaxLayer(hk.Module):
    """One Dense or Conv layer of infinite.py's finite network (infinite.layer_apply), its w and b
    Haiku parameters drawn as infinite.py's init draws them (so the empirical NTK of a wide one
    approaches the analytic kernel of infinite.architecture)."""

    def __init__(self, op, name):
        super().__init__(name=name)
        self.op = op

    def __call__(self, x):
        op = self.op
        shape = tuple(op.window) + (x.shape[-1], op.out)
        fan_in = x.shape[-1] * int(np.prod(op.window))
        standard = op.parameterization == "standard"
        w = hk.get_parameter("w", shape, init=hk.initializers.RandomNormal(
            op.W_std / np.sqrt(fan_in) if standard else 1.0))
        b = None if op.b_std is None else hk.get_parameter(
            "b", (op.out,), init=hk.initializers.RandomNormal(op.b_std if standard else 1.0))
        return infinite.layer_apply(op, (w, b), x)


def _tk_network(arch):
    """Tsilivis & Kempe's FC, Conv and Myrtle networks (infinite.architecture) as Haiku
    functions: -> (num_classes, width, depth, W_std, b_std, parameterization) -> net."""
    def make(num_classes, width, depth=None, W_std=2 ** 0.5, b_std=0.1, parameterization="ntk"):
        if depth is None:
            raise ValueError(f"model {arch!r} needs a depth")
        ops = infinite.architecture(arch, depth, width=width, W_std=W_std, b_std=b_std or None,
                                    parameterization=parameterization, num_classes=num_classes).kernel_fn.ops

        def net(x, is_training):
            for i, op in enumerate(ops):
                x = (_StaxLayer(op, name=f"{op.kind}_{i}")(x) if op.kind in ("dense", "conv")
                     else infinite.layer_apply(op, (), x))
            return x
        return net
    return make


@functools.lru_cache(maxsize=None)
def get_model(name, num_classes, width=64, **architecture):
    """Return Haiku `(init, apply)` for `name`.

    `width` scales the ResNet's channels and the MLPs' hidden layers are fixed
    (256 for `mlp_skinny`, 2048 for `mlp_wide`); `linear` is a single affine layer
    (a linear classifier, used to test attacks against a closed form). `fc`, `conv` and
    `myrtle` are Tsilivis & Kempe's networks of hidden width `width`, with `architecture`:
    depth, W_std, b_std, parameterization (see infinite.architecture).

    Memoized: the same arguments give the same (pure) functions, so every jitted function
    that takes `apply` (or a closure keyed on it) traces once per network, not once per
    checkpoint opened (`analyze_ntk.py dynamics` opens dozens).
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(NETWORKS)}")
    if architecture and name not in ARCHITECTURE_NETWORKS:
        raise ValueError(f"model {name!r} takes no {', '.join(architecture)}")
    transformed = hk.transform_with_state(NETWORKS[name](num_classes, width, **architecture))
    return transformed.init, transformed.apply


# Flax's 2x2 stride-2 pools (window and strides over H, W; any leading axes are batch axes).
_POOL = ((2, 2, 1), (2, 2, 1), "VALID")


def _tk_cnn(num_classes, width):
    """Tsilivis & Kempe's `CNN` (robust_train_CNN.py, Flax): Conv(w) ReLU AvgPool, Conv(2w) ReLU
    AvgPool, Dense(8w) ReLU, Dense; w = 32 is theirs (256 hidden units). 3x3 SAME convolutions
    with biases, 2x2 stride-2 pools, Haiku's default init (LeCun normal, zero biases), which is
    Flax's."""
    def net(x, is_training):
        del is_training
        for channels in (width, 2 * width):
            x = hk.avg_pool(jax.nn.relu(hk.Conv2D(channels, 3)(x)), *_POOL)
        x = jax.nn.relu(hk.Linear(8 * width)(hk.Flatten()(x)))
        return hk.Linear(num_classes)(x)
    return net


def _tk_cnn_mega(num_classes, width):
    """Tsilivis & Kempe's `CNN_mega`, the network of their training experiment: Conv(w) Conv(w)
    MaxPool, Conv(2w) Conv(2w), Conv(4w) Conv(4w), AvgPool, Dense; every conv 3x3 SAME with
    bias and ReLU, pools 2x2 stride 2; w = 32 is theirs. Init as `_tk_cnn`."""
    def net(x, is_training):
        del is_training
        for i, channels in enumerate((width, width, 2 * width, 2 * width, 4 * width, 4 * width)):
            x = jax.nn.relu(hk.Conv2D(channels, 3)(x))
            if i == 1:
                x = hk.max_pool(x, *_POOL)
        x = hk.avg_pool(x, *_POOL)
        return hk.Linear(num_classes)(hk.Flatten()(x))
    return net


# The width of each network when neither the flags nor a checkpoint name one.
DEFAULT_WIDTHS = {"cnn": 32, "cnn_mega": 32}


def default_width(name):
    return DEFAULT_WIDTHS.get(name, 64)


def _resnet18(num_classes, width):
    def net(x, is_training):
        return ResNet18(num_classes, width)(x, is_training)
    return net


# The networks by name (cli.MODELS, the command line's choices, lists the same names; a test
# checks it): name -> (num_classes, width[, depth, W_std, b_std, parameterization]) -> the Haiku
# function net(x, is_training).
NETWORKS = {
    "resnet18": _resnet18,
    "mlp_skinny": lambda num_classes, width: _mlp((256, 256), num_classes),
    "mlp_wide": lambda num_classes, width: _mlp((2048, 2048), num_classes),
    "linear": lambda num_classes, width: _mlp((), num_classes),
    "cnn": _tk_cnn,
    "cnn_mega": _tk_cnn_mega,
    **{arch: _tk_network(arch) for arch in infinite.ARCHITECTURES},
}
# The networks that take depth, W_std, b_std and parameterization.
ARCHITECTURE_NETWORKS = infinite.ARCHITECTURES


def tree_sub(a, b):
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def dynamics_apply(apply, dynamics, theta, theta0, state, x, is_training=False, rng=None,
                   return_components=False):
    """Logits of the chosen dynamics.

    theta0 is the frozen start of phase 2 and theta the parameters being trained
    (for phase 1 pass the same tree twice, with dynamics 'standard').

    - standard:          f(theta; x)
    - linear:            f(theta0; x) + J(theta0; x)(theta - theta0), one jvp at theta0
    - centered:          J(theta0; x)(theta - theta0)
    - standard_centered: f(theta; x) - f(theta0; x)

    Returns `(logits [N, C], new_state)`, or `(logits, new_state, {'f', 'df'})` with
    `return_components`. For linear/centered, f = f(theta0) and df = J(theta - theta0);
    for standard, f = logits and df = 0; for standard_centered, f = f(theta0) and
    df = f(theta) - f(theta0). So logits = f + df (linear), = df (both centered).
    """
    def net(p):
        return apply(p, state, rng, x, is_training)

    if dynamics == "standard":
        logits, new_state = net(theta)
        comps = {"f": logits, "df": jnp.zeros_like(logits)}
    elif dynamics in ("linear", "centered"):
        (f0, new_state), (df, _) = jax.jvp(net, (theta0,), (tree_sub(theta, theta0),))
        logits = f0 + df if dynamics == "linear" else df
        comps = {"f": f0, "df": df}
    elif dynamics == "standard_centered":
        f, new_state = net(theta)
        f0, _ = net(theta0)
        logits = f - f0
        comps = {"f": f0, "df": logits}
    else:
        raise ValueError(f"unknown dynamics {dynamics!r}; choose one of {', '.join(DYNAMICS)}")
    if return_components:
        return logits, new_state, comps
    return logits, new_state


def random_variables(init, input_shape, seed=0):
    """`init`'s (params, state) trees filled with numpy draws, for tests and benchmarks that need
    a network with non-trivial weights fast (compiling Haiku's initializers for a ResNet-18 on a
    CPU takes ~20 s). Weights N(0, 2/fan_in) (the logits layer too, so it is not zero), BN
    scale 1, offsets and biases 0; BN statistics mean 0, variance 1."""
    rng = np.random.default_rng(seed)
    shapes, state_shapes = jax.eval_shape(lambda k, x: init(k, x, True), jax.random.PRNGKey(0),
                                          jnp.zeros(input_shape, jnp.float32))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "offset" in name or name.endswith("['b']"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.dtype)

    def stat(path, leaf):
        name = jax.tree_util.keystr(path)
        ones = ("var" in name and "average" in name) or "counter" in name
        return (jnp.ones if ones else jnp.zeros)(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes), jax.tree_util.tree_map_with_path(stat, state_shapes)


def count_params(params):
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
