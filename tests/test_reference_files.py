"""Checkpoints interchangeable with the reference's, in both directions: a file pickled the way the
reference pickles (JAX 0.4 arrays, top-level `linear*` MLP modules, no meta) opens in all five
scripts with the reference's logits in every dynamics; the final layouts follow the reference's
rule; files of this project's earlier MLP names still load."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import analyze_ntk
import calculate_kernel
import checkpoints
import data
import eval_and_make_adv
import models
import ntk
import run_exp
import visualize_ntk_features
from tests.reference_pickles import old_jax_pickle

MLP_NAMES = {"linear": ((64, 256), (256,)), "linear_1": ((256, 256), (256,)), "linear_2": ((256, 10), (10,))}


def _numpy(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


@pytest.fixture(scope="module")
def reference_mlp(tmp_path_factory):
    """A reference-pickled phase-2 mlp_skinny checkpoint on digits: params = theta0, lin_params =
    theta, net_state = {}. Returns (path, theta0, theta) with float64 numpy leaves."""
    init, _ = models.get_model("mlp_skinny", 10)
    theta0, _ = init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))
    theta = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), theta0)
    path = tmp_path_factory.mktemp("reference") / "parameters_final.pkl"
    path.write_bytes(old_jax_pickle({"params": theta0, "lin_params": theta, "net_state": {}}))
    return str(path), _numpy(theta0), _numpy(theta)


def reference_forward(p, x):
    """The reference's mlp_skinny in numpy: Flatten, Linear-ReLU-Linear-ReLU-Linear."""
    h = x.reshape(len(x), -1)
    for name in ("linear", "linear_1"):
        h = np.maximum(h @ p[name]["w"] + p[name]["b"], 0)
    return h @ p["linear_2"]["w"] + p["linear_2"]["b"]


def reference_jvp(p, dp, x):
    """J(p; x) dp of the same network, by the chain rule written out (forward mode)."""
    h, dh = x.reshape(len(x), -1), np.zeros((len(x), x[0].size))
    for name in ("linear", "linear_1"):
        z = h @ p[name]["w"] + p[name]["b"]
        dz = dh @ p[name]["w"] + h @ dp[name]["w"] + dp[name]["b"]
        h, dh = np.maximum(z, 0), (z > 0) * dz
    return dh @ p["linear_2"]["w"] + h @ dp["linear_2"]["w"] + dp["linear_2"]["b"]


def test_project_mlps_use_the_reference_names():
    init, _ = models.get_model("mlp_skinny", 10)
    params, _ = init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)
    assert {k: (v["w"].shape, v["b"].shape) for k, v in params.items()} == MLP_NAMES


@pytest.mark.parametrize("dynamics", ["standard", "linear", "centered"])
def test_reference_checkpoint_gives_the_reference_logits(reference_mlp, dynamics):
    path, theta0, theta = reference_mlp
    net = checkpoints.open_network(path, model="mlp_skinny", dataset="digits")
    assert net.meta == {} and net.num_classes == 10
    x = data.load_dataset("digits").x_test[:32]
    variables = net.parameters(dynamics)
    logits = np.asarray(models.dynamics_apply(net.apply, dynamics, *variables, net.ckpt["net_state"], x)[0])
    # the reference: test(params, lin_params, ...) reads the network from 'params' and linearizes
    # around 'params' (theta0) towards 'lin_params' (theta)
    x64 = np.asarray(x, np.float64)
    dp = jax.tree_util.tree_map(np.subtract, theta, theta0)
    expected = {"standard": reference_forward(theta0, x64),
                "linear": reference_forward(theta0, x64) + reference_jvp(theta0, dp, x64),
                "centered": reference_jvp(theta0, dp, x64)}[dynamics]
    np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.slow   # end to end
def test_reference_checkpoint_runs_through_all_five_scripts(reference_mlp, tmp_path):
    path, _, _ = reference_mlp
    common = ["--model", "mlp_skinny", "--dataset", "digits", "--no_progress"]
    # eval_and_make_adv.py, centered, as the reference's example 5
    summary = eval_and_make_adv.run(eval_and_make_adv.build_parser().parse_args(
        ["--model_path", path, *common, "--linear", "--centering", "--test_size", "50", "--pgd_steps", "2",
         "--bonus_dir", str(tmp_path / "eval")]))
    assert summary["parameters"] == "theta=lin_params, theta0=params" and summary["n_images"] == 50
    # calculate_kernel.py, then visualize_ntk_features.py on its kernel
    kernel = calculate_kernel.run(calculate_kernel.build_parser().parse_args(
        ["--model_path", path, *common, "--dataset_size", "20", "--class_index", "0",
         "--bonus_dir", str(tmp_path / "kernel")]))
    assert kernel["kernel"].shape == (20, 20)
    vis = visualize_ntk_features.run(visualize_ntk_features.build_parser().parse_args(
        ["--model_path", path, "--kernel_path", kernel["path"], "--no_progress", "--n_images", "1",
         "--steps", "2", "--bonus_dir", str(tmp_path / "vis")]))
    assert os.path.exists(vis["png_path"])
    # analyze_ntk.py features
    out = analyze_ntk.run(analyze_ntk.build_parser().parse_args(
        ["features", "--model_path", path, *common, "--n_train", "20", "--n_test", "10", "--steps", "1",
         "--n_features", "2", "--n_tail", "0", "--out_dir", str(tmp_path / "features")]))
    assert out["model"] == "mlp_skinny" and len(out["features"]) == 2
    # run_exp.py phase 2 from it
    res = run_exp.run(run_exp.build_parser().parse_args(
        ["--base_model_path", path, *common, "--train_size", "100", "--test_size", "50", "--batch_size", "50",
         "--linear_epochs", "1", "--pgd_eval_steps", "2", "--save_models", "--save_path", str(tmp_path / "run")]))
    assert 0 <= res["linear"]["clean"] <= 1


def test_old_project_names_are_renamed_on_load(reference_mlp, tmp_path):
    path, theta0, theta = reference_mlp
    old = {"mlp/~/linear_0": theta0["linear"], "mlp/~/linear_1": theta0["linear_1"],
           "mlp/~/linear_2": theta0["linear_2"]}
    meta = {"model": "mlp_skinny", "width": 64, "num_classes": 10, "input_shape": [8, 8, 1], "dataset": "digits"}
    target = str(tmp_path / "old_names.pkl")
    checkpoints.save_checkpoint(target, old, old, {}, meta)
    net = checkpoints.open_network(target)
    assert set(net.ckpt["params"]) == set(MLP_NAMES) == set(net.ckpt["lin_params"])
    x = data.load_dataset("digits").x_test[:8]
    logits = net.apply(net.ckpt["params"], {}, None, x, False)[0]
    np.testing.assert_allclose(np.asarray(logits), reference_forward(theta0, np.asarray(x, np.float64)),
                               rtol=2e-4, atol=2e-4)


def test_standard_second_final_is_evaluated_and_kernelled_at_the_trained_parameters(tmp_path):
    """--do_standard_second stores the trained theta in 'params' (the reference's layout), so the
    evaluation without --linear and the kernel both use the trained network."""
    run_dir = tmp_path / "run"
    run_exp.run(run_exp.build_parser().parse_args(
        ["--dataset", "digits", "--model", "mlp_skinny", "--train_size", "100", "--test_size", "50",
         "--batch_size", "50", "--standard_epochs", "1", "--linear_epochs", "1", "--do_standard_second",
         "--second_lr", "0.05", "--skip_first_test", "--skip_second_test", "--constant_save", "--save_models",
         "--no_progress", "--save_path", str(run_dir)]))
    final = checkpoints.load_checkpoint(str(run_dir / "parameters_final.pkl"))
    phase1 = checkpoints.load_checkpoint(str(run_dir / "parameters_checkpoint_1.pkl"))["params"]
    trained = final["params"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(final["lin_params"]),
                                                    jax.tree_util.tree_leaves(phase1)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trained),
                                                        jax.tree_util.tree_leaves(phase1)))
    model_path = str(run_dir / "parameters_final.pkl")
    eval_and_make_adv.run(eval_and_make_adv.build_parser().parse_args(
        ["--model_path", model_path, "--no_adv", "--test_size", "50", "--no_progress"]))
    with open(run_dir / "test_results_test_results.json") as f:
        summary = json.load(f)
    ds = data.load_dataset("digits")
    net = checkpoints.open_network(model_path)
    logits = net.apply(jax.tree_util.tree_map(jnp.asarray, trained), {}, None, ds.x_test[:50], False)[0]
    assert summary["parameters"] == "theta=params"
    assert summary["acc_clean"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == ds.y_test[:50])))
    kernel = calculate_kernel.run(calculate_kernel.build_parser().parse_args(
        ["--model_path", model_path, "--dataset_size", "10", "--class_index", "0", "--no_progress"]))
    f, _ = net.kernel_fn()
    x_kernel = ds.x_train[kernel["indices"]]
    at = {name: ntk.empirical_ntk(f, jax.tree_util.tree_map(jnp.asarray, p), x_kernel, class_index=0)
          for name, p in (("trained", trained), ("theta0", phase1))}
    np.testing.assert_allclose(kernel["kernel"], at["trained"], rtol=1e-5)
    assert not np.allclose(at["trained"], at["theta0"], rtol=1e-3)
