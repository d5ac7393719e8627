"""models.py: the reference tree, widths, input shapes and the four dynamics."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import count_params, dynamics_apply, get_model

HERE = os.path.dirname(__file__)


def _tree_lines(params, state):
    lines = []
    for kind, tree in (("params", params), ("state", state)):
        for mod, leaves in tree.items():
            shapes = " ".join(sorted(f"{n}({','.join(map(str, np.shape(v)))})" for n, v in leaves.items()))
            lines.append(f"{kind} {mod} {shapes}")
    return lines


def test_resnet18_tree_equals_reference():
    init, _ = get_model("resnet18", 10)
    # eval_shape: the full-width tree without allocating or running anything
    params, state = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), True))
    with open(os.path.join(HERE, "reference_resnet18_tree.txt")) as f:
        ref = [l.split() for l in f if l.strip() and not l.startswith("#")]
    ref = [" ".join(parts[:2] + sorted(parts[2:])) for parts in ref]
    assert sorted(_tree_lines(params, state)) == sorted(ref)
    assert count_params(params) == 11_173_962


def test_width_scales_channels_and_keeps_names():
    init, _ = get_model("resnet18", 10)
    init4, _ = get_model("resnet18", 7, width=4)
    p64 = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), True))[0]
    p4 = jax.eval_shape(lambda: init4(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True))[0]
    assert set(p64) == set(p4)
    assert p4["res_net18/~/block_group_3/~/block_1/~/conv_1"]["w"].shape == (3, 3, 32, 32)
    assert p4["res_net18/~/initial_conv"]["w"].shape == (3, 3, 1, 4)
    assert p4["res_net18/~/logits"]["w"].shape == (32, 7)


@pytest.mark.parametrize("name", ["mlp_skinny", "mlp_wide", "linear", "resnet18"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_any_input_shape_gives_num_classes_logits(name, shape):
    init, apply = get_model(name, 13, width=2)
    x = jnp.ones((3,) + shape) * 0.5
    params, state = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), x, True))
    logits, _ = jax.eval_shape(lambda p, s: apply(p, s, None, x, False), params, state)
    assert logits.shape == (3, 13)


@pytest.fixture(scope="module")
def tiny():
    init, apply = get_model("resnet18", 10, width=2)
    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 8, 8, 1))
    params, state = init(jax.random.PRNGKey(0), x, True)
    # The logits layer starts at zero; give it weights so the checks below are not trivial.
    params["res_net18/~/logits"]["w"] = jax.random.normal(jax.random.PRNGKey(2), params["res_net18/~/logits"]["w"].shape)
    _, state = apply(params, state, None, x, True)  # non-trivial BN running statistics
    theta = jax.tree_util.tree_map(lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(3), a.shape), params)
    return apply, params, theta, state, x


def test_linearized_equals_network_and_centered_is_zero_at_theta0(tiny):
    apply, theta0, _, state, x = tiny
    f0, _ = apply(theta0, state, None, x, False)
    assert float(jnp.abs(f0).max()) > 1e-3
    lin, _ = dynamics_apply(apply, "linear", theta0, theta0, state, x)
    np.testing.assert_allclose(lin, f0, rtol=1e-5, atol=1e-6)
    for dyn in ("centered", "standard_centered"):
        out, _ = dynamics_apply(apply, dyn, theta0, theta0, state, x)
        assert float(jnp.abs(out).max()) == 0.0


def test_linearized_is_affine_and_matches_finite_difference(tiny):
    apply, theta0, theta, state, x = tiny
    delta = jax.tree_util.tree_map(jnp.subtract, theta, theta0)

    def lin_at(t):
        th = jax.tree_util.tree_map(lambda a, d: a + t * d, theta0, delta)
        return dynamics_apply(apply, "linear", th, theta0, state, x)[0]

    f0, f1, f2 = lin_at(0.0), lin_at(1.0), lin_at(2.0)
    np.testing.assert_allclose(f2 - f1, f1 - f0, rtol=1e-4, atol=1e-5)  # affine in theta
    # Against the network, by a central difference (f(theta0 + h delta) - f(theta0 - h delta)) / 2h,
    # taken in float64: BN at this init has small running variances, so the net is strongly curved
    # and float32 cancellation would swamp a small h.
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        t0, d64, s64, x64 = to64(theta0), to64(delta), to64(state), jnp.asarray(x, jnp.float64)

        def net_at(t):
            return apply(jax.tree_util.tree_map(lambda a, d: a + t * d, t0, d64), s64, None, x64, False)[0]
        h = 1e-5
        fd = np.asarray((net_at(h) - net_at(-h)) / (2 * h))
    scale = float(jnp.abs(f1 - f0).max())
    np.testing.assert_allclose(f1 - f0, fd, atol=1e-3 * scale)
    assert float(jnp.abs(f1 - f0).max()) > 1e-3


def test_components_sum_to_logits(tiny):
    apply, theta0, theta, state, x = tiny
    for dyn in ("standard", "linear"):
        logits, _, c = dynamics_apply(apply, dyn, theta, theta0, state, x, return_components=True)
        np.testing.assert_allclose(c["f"] + c["df"], logits, rtol=1e-5, atol=1e-6)
    for dyn in ("centered", "standard_centered"):
        logits, _, c = dynamics_apply(apply, dyn, theta, theta0, state, x, return_components=True)
        np.testing.assert_allclose(c["df"], logits, rtol=1e-6)
        np.testing.assert_allclose(c["f"], apply(theta0, state, None, x, False)[0], rtol=1e-5, atol=1e-6)


def test_unknown_model_and_dynamics_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        get_model("vgg", 10)
    with pytest.raises(ValueError, match="unknown dynamics"):
        dynamics_apply(None, "lazy", None, None, None, None)


def test_xla_cpu_kernel_flag_is_added_once_and_never_overrides_the_user():
    import importlib.metadata

    import utils
    flag = utils.YNN_FLAG + "="
    on_010 = importlib.metadata.version("jaxlib").startswith("0.10.")
    env = {}
    utils.prefer_xla_cpu_kernels(env)
    assert env.get("XLA_FLAGS") == (flag if on_010 else None)
    utils.prefer_xla_cpu_kernels(env)  # idempotent
    assert env.get("XLA_FLAGS") == (flag if on_010 else None)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    utils.prefer_xla_cpu_kernels(env)
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=4")
    assert (flag in env["XLA_FLAGS"]) == on_010
    mine = {"XLA_FLAGS": utils.YNN_FLAG + "=+individual_dot"}
    utils.prefer_xla_cpu_kernels(mine)
    assert mine == {"XLA_FLAGS": utils.YNN_FLAG + "=+individual_dot"}
    for value in ("1", "True", " yes"):
        defaults = {"NTK_XLA_CPU_DEFAULTS": value}
        utils.prefer_xla_cpu_kernels(defaults)
        assert "XLA_FLAGS" not in defaults
    # This process imported utils (conftest) before JAX started: its backend runs with the flag.
    assert (flag in os.environ.get("XLA_FLAGS", "")) == on_010


def test_the_command_line_offers_exactly_the_networks_models_builds():
    import cli
    import models
    assert tuple(models.NETWORKS) == cli.MODELS
