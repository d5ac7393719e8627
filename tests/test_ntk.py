"""ntk.py and calculate_kernel.py: the engine against an explicit Jacobian, symmetry and PSD,
independence of the memory budget, K(x, X) and its x-gradient, and the script's file and errors."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calculate_kernel
import data
import models
import ntk
import checkpoints
import utils
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def _network(model, width, x, key=0):
    """(apply, theta0, theta, state): a random init with a non-zero logits layer, BatchNorm
    statistics from one training pass, and a second parameter set theta (a 'lin_params')."""
    init, apply = models.get_model(model, 10, width)
    params, state = init(jax.random.PRNGKey(key), x, True)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(key + 1), 2 * len(leaves))
    theta0 = jax.tree_util.tree_unflatten(
        tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys[::2])])
    theta = jax.tree_util.tree_unflatten(
        tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(jax.tree_util.tree_leaves(theta0), keys[1::2])])
    _, state = apply(theta0, state, None, x, True)
    return apply, theta0, theta, state


def explicit_kernel(f, params, x, class_index, x2=None):
    """K from the full Jacobian (jacrev of the batch), contracted; mean over logits for -1."""
    @jax.jit
    def jac(xs):
        out = jax.jacrev(lambda p: f(p, xs))(params)  # leaves [n, C, ...]
        flat = jnp.concatenate([a.reshape(a.shape[0], a.shape[1], -1) for a in jax.tree_util.tree_leaves(out)], -1)
        return flat if class_index == -1 else flat[:, class_index:class_index + 1]
    j1 = jac(x)
    j2 = j1 if x2 is None else jac(x2)
    return np.asarray(jnp.einsum("icp,jcp->ij", j1, j2, precision="highest"), np.float64) / j1.shape[1]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("model,width,class_index", [
    ("mlp_skinny", None, 3), ("mlp_skinny", None, -1), ("resnet18", 2, 3),
    pytest.param("resnet18", 2, -1, marks=pytest.mark.slow),   # the fast loop keeps one ResNet case
])
def test_engine_equals_explicit_jacobian_at_params_and_lin_params(digits, model, width, class_index):
    x = jnp.asarray(digits.x_train[:24])
    apply, theta0, theta, state = _network(model, width or 64, x)
    ckpt = {"params": theta0, "lin_params": theta, "net_state": state}
    for use_lin in (False, True):
        f, params = ntk.checkpoint_fn(ckpt, apply, use_linear_params=use_lin)
        ref = explicit_kernel(f, params, x, class_index)
        for method in ntk.METHODS:
            stats = {}
            k = ntk.empirical_ntk(f, params, x, class_index=class_index, method=method, stats=stats)
            assert k.dtype == np.float64 and k.shape == (24, 24)
            assert _rel(k, ref) < 1e-5, (model, class_index, use_lin, method, _rel(k, ref))
            if method == "auto" and model == "resnet18":  # both exact forms were exercised
                assert stats["structured_layers"] and stats["direct_layers"]
    # lin_params really are other parameters: the two kernels differ
    k0 = ntk.empirical_ntk(*ntk.checkpoint_fn(ckpt, apply), x, class_index=class_index)
    k1 = ntk.empirical_ntk(*ntk.checkpoint_fn(ckpt, apply, use_linear_params=True), x, class_index=class_index)
    assert _rel(k0, k1) > 1e-3


def test_symmetric_psd_and_independent_of_memory_budget(digits):
    x = jnp.asarray(digits.x_train[:30])
    apply, theta0, _, state = _network("resnet18", 2, x)
    f = ntk.NetFn(apply, state)
    big, small = {}, {}
    k_big = ntk.empirical_ntk(f, theta0, x, class_index=-1, stats=big)
    k_small = ntk.empirical_ntk(f, theta0, x, class_index=-1, memory_gb=2e-5, stats=small)
    assert big["panel_blocks"] * big["block"] >= 30 and big["example_gradients"] == 30  # each once
    assert small["chunk"] < 30 and small["panels"] > 2 and small["example_gradients"] > 30  # several panels: gradients recomputed
    np.testing.assert_array_equal(k_big, k_big.T)
    np.testing.assert_array_equal(k_small, k_small.T)
    assert _rel(k_small, k_big) < 1e-5
    evals = np.linalg.eigvalsh(k_big)
    assert evals[0] >= -1e-6 * evals[-1]


def test_blocks_gathered_from_several_chunks(digits, monkeypatch):
    """Gradient chunks smaller than the contraction block (a partial last chunk included) give
    the same kernel, symmetric and against a second set."""
    x = jnp.asarray(digits.x_train[:30])
    apply, theta0, _, state = _network("resnet18", 2, x)
    f = ntk.NetFn(apply, state)
    whole = ntk.empirical_ntk(f, theta0, x, class_index=1)
    monkeypatch.setattr(ntk, "MAX_CHUNK", 4)
    stats = {}
    k = ntk.empirical_ntk(f, theta0, x, class_index=1, stats=stats)
    assert stats["chunk"] == 4 and stats["block"] > 4 and stats["example_gradients"] == 30
    np.testing.assert_array_equal(k, k.T)
    assert _rel(k, whole) < 1e-5
    assert _rel(ntk.empirical_ntk(f, theta0, x[:7], x[7:], class_index=1), whole[:7, 7:]) < 1e-5


def test_cross_kernel_and_its_input_gradient(digits):
    x = jnp.asarray(digits.x_train[:16])
    apply, theta0, _, state = _network("resnet18", 2, x)
    f = ntk.NetFn(apply, state)
    xa, xb = x[:5], x[5:]
    for ci in (2, -1):
        ref = explicit_kernel(f, theta0, xa, ci, xb)
        assert _rel(ntk.empirical_ntk(f, theta0, xa, xb, class_index=ci, memory_gb=2e-5), ref) < 1e-5
        cross = jax.jit(lambda z: ntk.ntk_cross(f, theta0, z, xb, class_index=ci))
        assert _rel(np.asarray(cross(xa), np.float64), ref) < 1e-5
    # d/dx of sum K(x, X) against the explicit kernel's: the fast path is differentiable in x
    w = jax.random.normal(jax.random.PRNGKey(7), (5, 11))
    g_fast = jax.jit(jax.grad(lambda z: jnp.sum(w * ntk.ntk_cross(f, theta0, z, xb, class_index=2))))(xa)

    def explicit_sum(z):
        ja = jax.jacrev(lambda p: f(p, z)[:, 2])(theta0)
        jb = jax.jacrev(lambda p: f(p, xb)[:, 2])(theta0)
        k = sum(jnp.einsum("i...,j...->ij", a, b, precision="highest")
                for a, b in zip(jax.tree_util.tree_leaves(ja), jax.tree_util.tree_leaves(jb)))
        return jnp.sum(w * k)
    g_ref = jax.jit(jax.grad(explicit_sum))(xa)
    assert float(jnp.abs(g_ref).max()) > 0
    assert _rel(np.asarray(g_fast), np.asarray(g_ref)) < 1e-4


def test_cross_kernel_is_one_function_for_every_checkpoint(digits):
    """ntk.cross_kernel returns the same kernel function for two checkpoints of one network (so
    jitted attacks compile once), and each checkpoint's variables give that checkpoint's kernel."""
    x = jnp.asarray(digits.x_train[:12])
    apply, theta0, theta, state = _network("resnet18", 2, x)
    f = ntk.NetFn(apply, state)
    xa, xb = x[:4], x[4:]
    k0, v0 = ntk.cross_kernel(f, theta0, xb, class_index=1)
    k1, v1 = ntk.cross_kernel(f, theta, xb, class_index=1)
    assert k0 is k1
    jitted = jax.jit(k0)
    for params, v in ((theta0, v0), (theta, v1)):
        assert _rel(np.asarray(jitted(v, xa), np.float64), explicit_kernel(f, params, xa, 1, xb)) < 1e-5


@pytest.mark.slow   # ResNet-scale; the engine's own ResNet case stays in the fast loop
def test_reference_kernel_is_the_gram_of_the_kept_rows(digits):
    """ntk.reference_kernel builds K(X, X) from the rows cross_kernel keeps (in blocks, the last
    one short): the explicit kernel, exactly symmetric, for one class and for all of them."""
    x = jnp.asarray(digits.x_train[:11])
    apply, theta0, _, state = _network("resnet18", 2, x)
    f = ntk.NetFn(apply, state)
    for ci, summed in ((1, 1), (-1, 10)):
        _, variables = ntk.cross_kernel(f, theta0, x, class_index=ci)
        k = ntk.reference_kernel(variables, summed, batch_size=4)
        assert k.shape == (11, 11) and np.array_equal(k, k.T)
        assert _rel(k, explicit_kernel(f, theta0, x, ci)) < 1e-5


def test_any_callable_takes_the_generic_path(digits):
    x = jnp.asarray(digits.x_train[:12])
    apply, theta0, _, state = _network("mlp_skinny", 64, x)
    f = lambda p, z: apply(p, state, None, z, False)[0]  # noqa: E731  (not a NetFn)
    assert _rel(ntk.empirical_ntk(f, theta0, x, class_index=0), explicit_kernel(f, theta0, x, 0)) < 1e-5
    with pytest.raises(ValueError, match="out of range"):
        ntk.empirical_ntk(f, theta0, x, class_index=10)


# --------------------------------------------------------------------------------------
# calculate_kernel.py
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits):
    path = str(tmp_path_factory.mktemp("run") / "parameters_final.pkl")
    x = jnp.asarray(digits.x_train[:64])
    apply, theta0, theta, state = _network("resnet18", 2, x)
    meta = {"model": "resnet18", "width": 2, "num_classes": 10, "input_shape": [8, 8, 1],
            "dataset": "digits", "epoch": 0, "phase": 1, "dynamics": "standard"}
    checkpoints.save_checkpoint(path, theta0, theta, state, meta)
    return path, apply, theta0, theta, state


def _args(argv):
    return calculate_kernel.build_parser().parse_args(argv)


@pytest.mark.slow   # end to end
def test_script_writes_the_documented_file(checkpoint, digits):
    path, apply, theta0, theta, state = checkpoint
    out = calculate_kernel.run(_args(["--model_path", path, "--dataset_size", "30", "--class_index", "4",
                                      "--use_linear_params", "--bonus_dir", "kernels", "--random_seed", "3"]))
    expected = os.path.join(os.path.dirname(path), "kernels", "saved_kernel_class_4_30.pkl")
    assert out["path"] == expected and os.path.exists(expected)
    saved = utils.restricted_load(expected)
    for key in ("kernel", "labels", "indices", "dataset", "class_index", "model", "width", "num_classes",
                "use_linear_params", "dataset_size", "random_seed", "model_path"):
        assert key in saved, key
    assert saved["kernel"].shape == (30, 30) and saved["class_index"] == 4 and saved["use_linear_params"]
    # class-balanced, class 0 first, and the labels are those of the recorded training indices
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 3))
    np.testing.assert_array_equal(digits.y_train[saved["indices"]], saved["labels"])
    assert len(set(saved["indices"].tolist())) == 30
    # the kernel of those images at lin_params
    f = ntk.NetFn(apply, state)
    ref = explicit_kernel(f, theta, jnp.asarray(digits.x_train[saved["indices"]]), 4)
    assert _rel(saved["kernel"], ref) < 1e-5
    # the mean kernel is named without a class
    out = calculate_kernel.run(_args(["--model_path", path, "--dataset_size", "20"]))
    assert out["path"].endswith(os.path.join(os.path.dirname(path), "saved_kernel_20.pkl"))


@pytest.mark.parametrize("argv,message", [
    (["--dataset_size", "25"], "not divisible by the number of classes"),
    (["--dataset_size", "5000"], "use at most"),
    (["--class_index", "10"], "--class_index 10 is out of range"),
    (["--class_index", "-2"], "--class_index -2 is out of range"),
    (["--dataset", "cifar10"], "was saved with dataset=digits"),
    (["--width", "4"], "was saved with width=2"),
])
def test_bad_inputs_are_refused_before_any_work(checkpoint, argv, message):
    path = checkpoint[0]
    with pytest.raises(UserError, match=message.replace("-", r"\-")):
        calculate_kernel.run(_args(["--model_path", path] + argv))


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "calculate_kernel.py", "--model_path", str(tmp_path / "nope.pkl")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NTK_JAX_CACHE_DIR": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: file not found: {tmp_path / 'nope.pkl'}"
