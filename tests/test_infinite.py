"""infinite.py: neural-tangents' numbers (fixed values from bench/bench_infinite.py), closed
forms, symmetry and PSD, blocks against the one-expression path, Monte Carlo convergence of
wide finite networks' empirical NTK (ntk.py) to the analytic kernel, input gradients."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infinite
import ntk

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _images(n, size=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


EXPECTED = json.load(open(os.path.join(HERE, "infinite_expected.json")))


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=lambda c: f"{c['arch']}{c['depth']}-{c['parameterization']}")
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-5), ("float32", 1e-4)])
def test_equals_neural_tangents(case, dtype, tol):
    """Values neural-tangents 0.6.5 computed in float64 on CIFAR-10 test pixels (8x8 crops)."""
    x = np.asarray(EXPECTED["pixels"], np.float64) / 255
    kfn = infinite.architecture(case["arch"], case["depth"], width=case["width"], W_std=case["W_std"],
                                b_std=case["b_std"], parameterization=case["parameterization"]).kernel_fn
    got = kfn(x[:3], x[3:], dtype=dtype)
    assert got.ntk.dtype == np.dtype(dtype)
    assert _rel(got.nngp, np.array(case["nngp"])) < tol
    assert _rel(got.ntk, np.array(case["ntk"])) < tol


def _arccos_one_layer(x1, x2, W, b):
    """FC-1 (Dense, Relu, Dense) from Cho & Saul's arc-cosine kernels, in numpy float64."""
    f1, f2 = x1.reshape(len(x1), -1).astype(np.float64), x2.reshape(len(x2), -1).astype(np.float64)
    d = f1.shape[1]
    k = W ** 2 * f1 @ f2.T / d + b ** 2
    q1 = W ** 2 * (f1 * f1).sum(1) / d + b ** 2
    q2 = W ** 2 * (f2 * f2).sum(1) / d + b ** 2
    norm = np.sqrt(np.outer(q1, q2))
    theta = np.arccos(np.clip(k / norm, -1, 1))
    k_relu = norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    k_dot = (np.pi - theta) / (2 * np.pi)
    nngp = W ** 2 * k_relu + b ** 2
    return nngp, nngp + W ** 2 * k * k_dot


def test_one_hidden_layer_is_the_arc_cosine_kernel():
    x = _images(7)
    W, b = 1.7, 0.4
    kfn = infinite.architecture("fc", 1, W_std=W, b_std=b).kernel_fn
    nngp, ntk_ = _arccos_one_layer(x[:4], x[4:], W, b)
    got = kfn(x[:4], x[4:], dtype="float64")
    assert _rel(got.nngp, nngp) < 1e-12 and _rel(got.ntk, ntk_) < 1e-12


@pytest.mark.parametrize("arch,depth", [("fc", 2), ("conv", 2), ("myrtle", 5)])
def test_self_kernel_is_symmetric_psd_and_equals_x_against_x(arch, depth):
    x = _images(6)
    kfn = infinite.architecture(arch, depth).kernel_fn
    self_k = kfn(x, dtype="float64")
    both = kfn(x, x, dtype="float64")
    for name in ("nngp", "ntk"):
        k = getattr(self_k, name)
        np.testing.assert_array_equal(k, k.T)
        assert np.linalg.eigvalsh(k).min() > -1e-10 * np.abs(k).max()
        assert _rel(k, getattr(both, name)) < 1e-12


@pytest.mark.parametrize("memory_gb, columns_kept", [(2e-4, False), (2e-3, True)])
def test_blocks_equal_the_one_expression_path(memory_gb, columns_kept):
    """A budget that forces many small blocks (and a short last one) changes nothing, whether
    x2's blocks stay on the device for every row of blocks or are sent again."""
    x = _images(11)
    kfn = infinite.architecture("myrtle", 5).kernel_fn
    stats = {}
    blocked = kfn(x[:7], x[7:], get="ntk", memory_gb=memory_gb, stats=stats)
    assert stats["blocks"] > 1 and stats["columns_kept"] == columns_kept
    traced = jax.jit(lambda a, b: kfn(a, b, get="ntk"))(x[:7], x[7:])
    assert _rel(blocked, np.asarray(traced)) < 1e-6
    sym = kfn(x, get="nngp", memory_gb=memory_gb)
    assert _rel(sym, np.asarray(jax.jit(lambda a: kfn(a, get="nngp"))(x))) < 1e-6


def test_global_avg_pool_is_the_mean_of_the_spatial_covariance():
    x = _images(5, size=6)
    conv = [infinite.Conv(8, (3, 3), W_std=1.5, b_std=0.2), infinite.Relu(), infinite.Conv(8, (3, 3), W_std=1.5)]
    pooled = infinite.serial(*conv, infinite.GlobalAvgPool(), infinite.Dense(1)).kernel_fn(x[:2], x[2:], get="nngp",
                                                                                           dtype="float64")
    with jax.enable_x64(True):
        steps = infinite.plan(infinite.serial(*conv, infinite.GlobalAvgPool()).kernel_fn.ops, x.shape[1:])[:-1]
        x64 = jnp.asarray(x, jnp.float64)
        q1, q2 = infinite._self_variances(steps, x64[:2]), infinite._self_variances(steps, x64[2:])
        full, _ = infinite._pair_kernels(steps, x64[:2], x64[2:], q1, q2)
    # `steps` end in the 'full' layout of the last conv: [2, 3, H, W, H, W]
    assert full.shape == (2, 3, 6, 6, 6, 6)
    assert _rel(pooled, np.asarray(full).mean((2, 3, 4, 5))) < 1e-12


def _monte_carlo_error(arch, depth, width, x, seeds, parameterization="ntk"):
    init_fn, apply_fn, kernel_fn = infinite.architecture(arch, depth, width=width, parameterization=parameterization)
    analytic = kernel_fn(x, get="ntk", dtype="float64")
    total = 0.0
    for seed in range(seeds):
        _, params = init_fn(jax.random.PRNGKey(seed), (-1,) + x.shape[1:])
        total = total + ntk.empirical_ntk(apply_fn, params, x, class_index=0)
    return _rel(total / seeds, analytic)


@pytest.mark.parametrize("arch,depth,parameterization", [("fc", 2, "ntk"), ("conv", 1, "ntk"), ("fc", 1, "standard")])
def test_wide_networks_empirical_ntk_converges_to_the_analytic_one(arch, depth, parameterization):
    """The empirical NTK of the finite network, averaged over 16 seeds, approaches kernel_fn about
    as 1/sqrt(width): 16x the width, ~4x less error (measured 2.2x to 13x: the seeds' noise, and a
    1/width bias at width 128). Kernels with W_std 1% and b_std 20% off stall at 4-7% error
    against these same networks, with ratios 0.8-1.3, and fail both bounds."""
    x = _images(5, size=4)
    small = _monte_carlo_error(arch, depth, 128, x, 16, parameterization)
    large = _monte_carlo_error(arch, depth, 2048, x, 16, parameterization)
    assert large < 0.03, (small, large)
    assert 1.8 < small / large < 16, (small, large)


def test_input_gradient_is_finite_and_matches_differences():
    """Differentiable in x through the analytic kernel, also at K(x, x) (correlation 1)."""
    x = _images(4, size=8).astype(np.float64)
    kfn = infinite.architecture("myrtle", 5).kernel_fn
    with jax.enable_x64(True):
        ref = jnp.asarray(x[1:])

        @jax.jit
        def f(z):
            return jnp.sum(kfn(z[None], ref, get="ntk")) + kfn(z[None], get="ntk")[0, 0]

        g = np.asarray(jax.grad(f)(jnp.asarray(x[0])))
        assert np.all(np.isfinite(g))
        v = np.random.default_rng(1).normal(size=x[0].shape)
        h = 1e-5
        fd = (f(jnp.asarray(x[0] + h * v)) - f(jnp.asarray(x[0] - h * v))) / (2 * h)
        assert abs(float(fd) - float(np.sum(g * v))) < 1e-5 * abs(float(fd)) + 1e-8


def test_float64_and_float32_agree():
    x = _images(6)
    kfn = infinite.architecture("conv", 2).kernel_fn
    k32, k64 = kfn(x, get="ntk"), kfn(x, get="ntk", dtype="float64")
    assert k32.dtype == np.float32 and k64.dtype == np.float64
    assert _rel(k32, k64) < 1e-5


def test_standard_parameterization_depends_on_the_width_ntk_does_not():
    x = _images(3)
    ntk_param = [infinite.architecture("conv", 2, width=w).kernel_fn(x, get="ntk") for w in (10, 100)]
    std = [infinite.architecture("conv", 2, width=w, parameterization="standard").kernel_fn(x, get="ntk")
           for w in (10, 100)]
    np.testing.assert_allclose(ntk_param[0], ntk_param[1], rtol=1e-6)
    assert _rel(std[0], std[1]) > 0.5


def test_finite_network_shapes_and_outputs():
    init_fn, apply_fn, _ = infinite.architecture("myrtle", 7, width=4, num_classes=10)
    out_shape, params = init_fn(jax.random.PRNGKey(0), (-1, 16, 16, 3))
    assert out_shape == (-1, 10)
    assert apply_fn(params, _images(2, size=16)).shape == (2, 10)


@pytest.mark.parametrize("build,message", [
    (lambda: infinite.architecture("myrtle", 6), "depth 5, 7 or 10"),
    (lambda: infinite.architecture("resnet", 2), "architecture must be one of"),
    (lambda: infinite.Conv(4, (3, 3), padding="FULL"), "padding"),
    (lambda: infinite.Dense(4, parameterization="mup"), "parameterization"),
])
def test_bad_networks_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_images_too_small_for_the_pools_are_named():
    kfn = infinite.architecture("myrtle", 10).kernel_fn
    with pytest.raises(ValueError, match="too small"):
        kfn(_images(2, size=2))
    with pytest.raises(ValueError, match="end it with Flatten or GlobalAvgPool"):
        infinite.serial(infinite.Conv(3, (3, 3)), infinite.Relu()).kernel_fn(_images(2))


# --------------------------------------------------------------------------------------
# calculate_kernel.py --arch
# --------------------------------------------------------------------------------------
def test_the_command_line_offers_every_architecture():
    import cli
    import models
    assert cli.ARCHITECTURES == infinite.ARCHITECTURES == models.ARCHITECTURE_NETWORKS
    assert cli.MYRTLE_DEPTHS == tuple(infinite.MYRTLE_FACTORS)


@pytest.mark.slow   # end to end
def test_calculate_kernel_writes_an_infinite_kernel_file(tmp_path):
    import data
    import ntk_inputs
    from cli_harness import call

    argv = ["--arch", "conv", "--depth", "2", "--dataset", "digits", "--dataset_size", "30", "--class_index", "3",
            "--bonus_dir", "kernels", "--no_progress"]
    status, out, err = call("calculate_kernel", argv, str(tmp_path))
    assert status == 0, err
    path = tmp_path / "kernels" / "saved_kernel_class_3_30.pkl"
    kfile = ntk_inputs.load_kernel_file(str(path))   # the empirical kernels' reader
    assert kfile["architecture"] == {"arch": "conv", "depth": 2, "width": 1000, "W_std": 2 ** 0.5, "b_std": 0.1,
                                     "parameterization": "ntk"}
    assert kfile["model_path"] is None and kfile["kernel_type"] == "ntk"
    ds = data.load_dataset("digits")
    expected = infinite.architecture("conv", 2).kernel_fn(ds.x_train[kfile["indices"]], get="ntk")
    assert _rel(kfile["kernel"], expected) < 1e-6
    np.testing.assert_array_equal(kfile["labels"], ds.y_train[kfile["indices"]])
    assert "wrote" in out and str(path) in out


@pytest.mark.parametrize("argv,message", [
    (["--arch", "myrtle", "--depth", "6"], "a Myrtle network has depth 5, 7 or 10"),
    (["--arch", "fc"], "needs --depth"),
    (["--arch", "fc", "--depth", "2", "--model_path", "x.pkl"], "exclude each other"),
    (["--arch", "fc", "--depth", "2", "--use_linear_params"], "an infinite-width kernel has none"),
    (["--dataset_size", "30"], "give --model_path"),
    (["--arch", "fc", "--depth", "2", "--random_seed", "1"], "already holds a kernel with --random_seed 0, not 1"),
])
def test_calculate_kernel_bad_infinite_input_is_one_line(tmp_path, argv, message):
    from cli_harness import call
    base = ["--dataset", "digits", "--dataset_size", "30", "--no_progress"]
    assert call("calculate_kernel", ["--arch", "fc", "--depth", "2"] + base, str(tmp_path))[0] == 0
    before = (tmp_path / "saved_kernel_30.pkl").read_bytes()
    status, out, err = call("calculate_kernel", argv + base, str(tmp_path))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "saved_kernel_30.pkl").read_bytes() == before
