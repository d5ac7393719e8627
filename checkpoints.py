"""Checkpoints end to end: the reference's pickle layout, this project's `meta`, tree checks,
and "open this checkpoint as a network" with one precedence rule.

A checkpoint is the reference's dict `{'params', 'lin_params', 'net_state'}` of numpy arrays,
plus a `meta` dict (model, width, num_classes, input_shape, dataset, epoch, phase, dynamics,
...) that the reference ignores. Which parameters each key holds follows the reference:

    kind of file                               params              lin_params
    phase-1 constant save (checkpoint_{e})     theta_t             the initial parameters
    phase-1-only parameters_final.pkl          theta (trained)     theta (the same copy)
    linearized / centered phase 2              theta0 (frozen)     theta (trained)
    --do_standard_second phase 2               theta (trained)     theta0 (the copy)

so a network is always read from `params`, and the linearization expands around `params`
towards `lin_params` (`Network.parameters`).

Precedence when a checkpoint is opened: a flag that contradicts `meta` is an error, a flag
fills what `meta` lacks, and the defaults (resnet18, width 64, cifar10) come last.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

import data
import models
import ntk
import utils
from utils import UserError, atomic_pickle, decode_keys, restricted_load

DEFAULTS = {"model": "resnet18", "width": 64, "dataset": "cifar10"}
# Earlier versions of this project named the MLP layers `mlp/~/linear_{i}` (hk.nets.MLP); the
# reference, and this project now, call them `linear`, `linear_1`, ... (plain hk.Linear).
_LEGACY_MLP = re.compile(r"^mlp/~/linear_(\d+)$")


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def save_checkpoint(path, params, lin_params, net_state, meta=None):
    """Write the reference layout `{'params','lin_params','net_state'}` as numpy arrays, plus
    `meta`, atomically (a crash leaves any previous file intact)."""
    obj = {"params": to_numpy(params), "lin_params": to_numpy(lin_params),
           "net_state": to_numpy(net_state)}
    if meta is not None:
        obj["meta"] = dict(meta)
    atomic_pickle(path, obj)


def _rename_legacy(tree):
    """Map this project's old MLP module names to the reference's (`mlp/~/linear_0` ->
    `linear`, `mlp/~/linear_2` -> `linear_2`); other trees come back unchanged."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, leaves in tree.items():
        m = _LEGACY_MLP.match(name) if isinstance(name, str) else None
        if m:
            name = "linear" if m.group(1) == "0" else f"linear_{m.group(1)}"
        out[name] = leaves
    return out


def check_file(path, flag="--model_path"):
    """A one-line error unless `path` is an existing file; a run directory gets a hint
    (its parameters_final.pkl, else the checkpoints it holds)."""
    utils.check_file(path, flag, "a checkpoint file", hints=("parameters_final.pkl", "parameters_*.pkl"))


def load_checkpoint(path):
    """Load a checkpoint safely (restricted unpickler). Returns a dict with 'params',
    'lin_params', 'net_state' (numpy leaves) and 'meta' ({} for the reference's own files)."""
    check_file(path, None)
    ckpt = decode_keys(restricted_load(path))
    if not isinstance(ckpt, dict) or "params" not in ckpt:
        raise UserError(f"{path} is not a checkpoint: it has no 'params'")
    ckpt.setdefault("lin_params", ckpt["params"])
    ckpt.setdefault("net_state", {})
    ckpt.setdefault("meta", {})
    for key in ("params", "lin_params", "net_state"):
        tree = ckpt[key]
        if not (isinstance(tree, dict) and all(isinstance(m, str) and isinstance(v, dict) for m, v in tree.items())
                and all(isinstance(n, str) and isinstance(a, (np.ndarray, np.generic, float, int))
                        for v in tree.values() for n, a in v.items())):
            raise UserError(f"{path} is not a checkpoint: its '{key}' is not a {{module: {{name: array}}}} tree")
    if not isinstance(ckpt["meta"], dict):
        raise UserError(f"{path} is not a checkpoint: its 'meta' is not a dict")
    for key in ("params", "lin_params"):
        ckpt[key] = _rename_legacy(ckpt[key])
    return ckpt


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------
def tree_shapes(tree):
    """{'module/name': shape} for a two-level Haiku tree."""
    return {f"{mod}/{name}": tuple(np.shape(leaf)) for mod, leaves in tree.items()
            for name, leaf in leaves.items()}


def check_tree(expected, got, what):
    """Raise UserError naming the first key whose presence or shape differs."""
    e, g = tree_shapes(expected), tree_shapes(got)
    for key in sorted(set(e) | set(g)):
        if e.get(key) != g.get(key):
            raise UserError(f"{what} does not fit the model: '{key}' has shape {g.get(key, 'missing')} in the "
                            f"file but the model expects {e.get(key, 'missing')}")


def check_meta(meta, path, **expected):
    """Compare a checkpoint's meta with the values requested (None: not requested)."""
    for key, want in expected.items():
        have = meta.get(key)
        if have is not None and want is not None and have != want:
            raise UserError(f"{path} was saved with {key}={have} but {key}={want} was requested")


def resolve(meta, path, key, flag_value):
    """The one precedence rule: the flag and the checkpoint's meta must agree; either fills
    what the other lacks; the default comes last."""
    check_meta(meta, path, **{key: flag_value})
    for value in (flag_value, meta.get(key)):
        if value is not None:
            return value
    return DEFAULTS[key]


def cast_to_model(ckpt, path, init_params, init_state):
    """Check the checkpoint's trees against the model's and return a copy with jnp leaves of
    the model's dtypes."""
    ckpt = dict(ckpt)
    for key, ref in (("params", init_params), ("lin_params", init_params), ("net_state", init_state)):
        check_tree(ref, ckpt[key], f"{path} ['{key}']")
        ckpt[key] = jax.tree_util.tree_map(lambda r, a: jnp.asarray(a, dtype=r.dtype), ref, ckpt[key])
    return ckpt


# --------------------------------------------------------------------------------------
# A checkpoint as a network
# --------------------------------------------------------------------------------------
def theta_and_theta0(ckpt, dynamics):
    """(theta, theta0) of `dynamics` in the reference's layout (see the module docstring):
    linearized and centered dynamics expand around theta0 = 'params' towards theta =
    'lin_params'; standard dynamics evaluate theta = 'params' (and standard-centered
    subtracts f(theta0 = 'lin_params'))."""
    if dynamics in ("linear", "centered"):
        return ckpt["lin_params"], ckpt["params"]
    return ckpt["params"], ckpt["lin_params"]


def stored_as(dynamics, theta, theta0):
    """(params, lin_params) to save for a network trained in `dynamics`: the inverse of
    `theta_and_theta0`. A phase-1 result is stored with theta0 = theta."""
    if dynamics in ("linear", "centered"):
        return theta0, theta
    return theta, theta0


def describe_parameters(dynamics):
    return {"linear": "theta=lin_params, theta0=params", "centered": "theta=lin_params, theta0=params",
            "standard": "theta=params", "standard_centered": "theta=params, theta0=lin_params"}[dynamics]


class Network:
    """A checkpoint opened as a network.

    Attributes: path, meta, model, width, dataset, num_classes, input_shape (H, W, C), epoch,
    apply (Haiku apply of the model), ckpt (the checkpoint with jnp leaves)."""

    def __init__(self, ckpt, path, *, model=None, width=None, dataset=None, num_classes=None):
        meta = ckpt["meta"]
        self.path, self.meta = path, meta
        self.model = resolve(meta, path, "model", model)
        if self.model not in models.NETWORKS:
            raise UserError(f"{path} names an unknown model {self.model!r}")
        self.width = int(resolve(meta, path, "width", width))
        self.dataset = resolve(meta, path, "dataset", dataset)
        self.num_classes = int(resolve_num_classes(meta, path, self.dataset, num_classes))
        self.input_shape = tuple(meta.get("input_shape") or data.INPUT_SHAPES[self.dataset])
        self.epoch = meta.get("epoch")
        self.architecture = dict(meta.get("architecture") or {})   # fc, conv, myrtle: depth, W_std, ...
        if (self.model in models.ARCHITECTURE_NETWORKS) != bool(self.architecture):
            raise UserError(f"{path}: model {self.model} " + ("records no architecture (depth, W_std, b_std, "
                            "parameterization) in its meta" if not self.architecture else "takes no architecture"))
        init, self.apply = models.get_model(self.model, self.num_classes, self.width, **self.architecture)
        # Shapes only: running Haiku's initializers for a ResNet-18 costs seconds for nothing.
        params0, state0 = jax.eval_shape(lambda k, x: init(k, x, True), jax.random.PRNGKey(0),
                                         jnp.zeros((1,) + self.input_shape, jnp.float32))
        self.ckpt = cast_to_model(ckpt, path, params0, state0)

    def parameters(self, dynamics):
        """(theta, theta0) evaluated under `dynamics` (see `theta_and_theta0`)."""
        return theta_and_theta0(self.ckpt, dynamics)

    def kernel_fn(self, use_linear_params=False):
        """(f, params) of ntk.checkpoint_fn: the NTK at 'params', or at 'lin_params'."""
        return ntk.checkpoint_fn(self.ckpt, self.apply, use_linear_params=use_linear_params)

    def describe(self):
        return {"model_path": self.path, "model": self.model, "width": self.width, "dataset": self.dataset,
                "num_classes": self.num_classes, "epoch": self.epoch,
                **({"architecture": self.architecture} if self.architecture else {})}


def resolve_num_classes(meta, path, dataset, num_classes=None):
    """The class count: the dataset's, which must agree with meta's and with `num_classes`."""
    want = data.num_classes_of(dataset) if num_classes is None else num_classes
    check_meta(meta, path, num_classes=want)
    return want


def open_network(path, *, model=None, width=None, dataset=None, flag="--model_path"):
    """Load `path` and open it as a `Network`; flags are None when not given."""
    check_file(path, flag)
    return Network(load_checkpoint(path), path, model=model, width=width, dataset=dataset)
