"""Tsilivis & Kempe's notebook pipeline on an architecture's infinite-width NTK, through
`analyze_ntk.py features --arch`, against a direct computation of the notebook's formulas on the
same images: ridgeless regression on labels -1/+1 (a symmetric solve), FGSM as one step of
eps sign(grad of the logistic loss) from the clean image clipped to [0, 1], and the
eigen-features phi_j(x) = K(x,X) u_j u_j^T y / lambda_j with their accuracy and their accuracy
under FGSM on phi_j itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import analyze_ntk
import data
import infinite
from cli_harness import call
from test_data import write_tiny_cifar10

EPS = 8 / 255


def _notebook_fgsm(kernel_fn, x_train, weights, x, y):
    """The notebook's FGSM on f(x) = K(x, X) weights: x + eps sign(grad_x logistic(f(x), (y+1)/2)), in [0, 1]."""
    @jax.jit
    def fgsm(x, x_train, weights, y):
        def loss(x):
            f = kernel_fn(x, x_train, get="ntk") @ weights
            return jnp.sum(jax.nn.softplus(-y * f))   # -log sigmoid(y f): the logistic loss against (y+1)/2
        return jnp.clip(x + EPS * jnp.sign(jax.grad(loss)(x)), 0, 1)
    return np.asarray(fgsm(x, x_train, weights, jnp.asarray(y, jnp.float32)))


def _accuracy(k, weights, y):
    return float(np.mean(np.sign(k @ weights) == y))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_tiny_cifar10(root, n_per_batch=40)
    return str(root)


def test_features_on_an_infinite_kernel_are_the_notebooks_computation(cifar, tmp_path):
    argv = ["features", "--arch", "fc", "--depth", "1", "--dataset", "cifar10", "--data_dir", cifar, "--classes", "0",
            "1", "--ridge", "0", "--float64", "--method", "fgsm", "--eps", "8", "--n_train", "24", "--n_test", "8",
            "--n_features", "24", "--n_tail", "0", "--out_dir", str(tmp_path), "--no_progress"]
    summary = analyze_ntk.run(analyze_ntk.build_parser().parse_args(argv))
    assert summary["architecture"] == {"arch": "fc", "depth": 1, "width": 1000, "W_std": 2 ** 0.5, "b_std": 0.1,
                                       "parameterization": "ntk"}

    with pytest.warns(UserWarning):   # random images: not the published md5 sums
        ds = data.load_dataset("cifar10", cifar)
    x_train, x_test = ds.x_train[summary["train_indices"]], ds.x_test[summary["test_indices"]]
    y_train = np.where(ds.y_train[summary["train_indices"]] == 1, 1.0, -1.0)   # airplane -1, automobile +1
    y_test = np.where(ds.y_test[summary["test_indices"]] == 1, 1.0, -1.0)
    kernel_fn = infinite.architecture("fc", 1).kernel_fn
    k = np.asarray(kernel_fn(x_train, get="ntk", dtype="float64"))
    k_test = np.asarray(kernel_fn(x_test, x_train, get="ntk", dtype="float64"))
    alpha = scipy.linalg.solve(k, y_train, assume_a="pos")                      # ridgeless
    full = summary["full_predictor"]
    assert full["acc_clean"] == _accuracy(k_test, alpha, y_test)
    x_adv = _notebook_fgsm(kernel_fn, x_train, jnp.asarray(alpha, jnp.float32), x_test, y_test)
    k_adv = np.asarray(kernel_fn(x_adv, x_train, get="ntk", dtype="float64"))
    assert full["acc_robust"] == _accuracy(k_adv, alpha, y_test)

    evals, evecs = np.linalg.eigh(k)
    evals, evecs = evals[::-1], evecs[:, ::-1]                                   # index 0: the largest
    np.testing.assert_allclose(summary["eigenvalues"], evals, rtol=1e-9)
    rows = summary["features"]
    assert [r["index"] for r in rows] == list(range(24))
    for j, row in enumerate(rows):
        phi_weights = evecs[:, j] * (evecs[:, j] @ y_train) / evals[j]          # phi_j(x) = K(x,X) phi_weights
        assert row["acc_clean"] == _accuracy(k_test, phi_weights, y_test), j
        x_adv = _notebook_fgsm(kernel_fn, x_train, jnp.asarray(phi_weights, jnp.float32), x_test, y_test)
        k_adv = np.asarray(kernel_fn(x_adv, x_train, get="ntk", dtype="float64"))
        assert row["acc_feature_attacked"] == _accuracy(k_adv, phi_weights, y_test), j


def test_an_infinite_kernel_attack_stays_in_the_ball_and_transfers(cifar, tmp_path):
    import utils
    argv = ["attack", "--arch", "conv", "--depth", "1", "--dataset", "cifar10", "--data_dir", cifar, "--classes", "0",
            "1", "--n_train", "10", "--n_test", "6", "--steps", "3", "--eps", "8", "--batch_size", "4",
            "--memory_gb", "0.01", "--out_dir", str(tmp_path), "--no_progress"]
    summary = analyze_ntk.run(analyze_ntk.build_parser().parse_args(argv))
    adv = utils.restricted_load(summary["files"]["adv_examples"])
    clean = utils.restricted_load(summary["files"]["clean_examples"])
    assert adv["images"].shape == (6, 3, 32, 32) and set(adv["labels"]) == {0, 1}
    assert np.max(np.abs(adv["images"] - clean["images"])) <= EPS + 1e-6
    assert adv["images"].min() >= 0 and adv["images"].max() <= 1
    assert summary["kernel_predictor"]["acc_robust"] <= summary["kernel_predictor"]["acc_clean"]


def test_the_chunked_cross_kernel_and_its_gradient_are_the_plain_ones():
    """infinite.cross_kernel takes X in chunks (rematerialised): the same values and input gradients."""
    kernel_fn = infinite.architecture("conv", 2).kernel_fn
    rng = np.random.default_rng(0)
    x_ref = jnp.asarray(rng.uniform(size=(7, 6, 6, 2)), jnp.float32)
    x = jnp.asarray(rng.uniform(size=(3, 6, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 2)), jnp.float32)
    chunked = infinite.cross_kernel(kernel_fn, memory_gb=1e-6)   # one reference image a chunk
    plain = jax.jit(lambda x: kernel_fn(x, x_ref, get="ntk"))(x)
    np.testing.assert_allclose(jax.jit(chunked)(x_ref, x), plain, rtol=1e-5)
    g_chunked = jax.grad(lambda x: jnp.sum(chunked(x_ref, x) @ w))(x)
    g_plain = jax.grad(lambda x: jnp.sum(kernel_fn(x, x_ref, get="ntk") @ w))(x)
    np.testing.assert_allclose(g_chunked, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "fc", "--depth", "1", "--model_path", "x.pkl"], "--arch and --model_path exclude each other"),
    (["--arch", "fc"], "--arch fc needs --depth"),
    (["--arch", "myrtle", "--depth", "6"], "a Myrtle network has depth 5, 7 or 10"),
    (["--arch", "fc", "--depth", "1", "--use_linear_params"], "an infinite-width kernel has none"),
    (["--arch", "fc", "--depth", "1", "--classes", "0", "10"], "--classes needs at least 2 distinct classes in [0, 9]"),
    (["--arch", "conv", "--depth", "0"], "--depth 0: give at least 1 hidden layer"),
    (["--arch", "fc", "--depth", "1", "--n_train", "15"], "--n_train 15 is not divisible by the number of classes"),
    ([], "give --model_path (a checkpoint's empirical NTK) or --arch"),
])
def test_bad_architecture_flags_are_one_line(tmp_path, argv, message):
    for command in ("features", "attack"):
        code, _, err = call("analyze_ntk", [command, "--dataset", "digits", *argv, "--out_dir", "out"], str(tmp_path))
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_pgd_without_random_start_is_the_notebooks(cifar, tmp_path):
    """--method pgd --step_size 2.55 --no_random_start: the notebook's PGD (10 steps of 0.01 sign(grad) from the
    clean image, each clipped to [0, 1] and projected onto the eps-ball)."""
    import utils
    argv = ["attack", "--arch", "fc", "--depth", "1", "--dataset", "cifar10", "--data_dir", cifar, "--classes", "0",
            "1", "--ridge", "0", "--float64", "--method", "pgd", "--steps", "10", "--step_size", "2.55",
            "--no_random_start", "--eps", "8", "--n_train", "24", "--n_test", "8", "--out_dir", str(tmp_path),
            "--no_progress"]
    summary = analyze_ntk.run(analyze_ntk.build_parser().parse_args(argv))
    assert summary["random_start"] is False and summary["step_size"] == pytest.approx(0.01)
    with pytest.warns(UserWarning):
        ds = data.load_dataset("cifar10", cifar)
    x_train, x_test = ds.x_train[summary["train_indices"]], ds.x_test[summary["test_indices"]]
    y_train = np.where(ds.y_train[summary["train_indices"]] == 1, 1.0, -1.0)
    y_test = np.where(ds.y_test[summary["test_indices"]] == 1, 1.0, -1.0)
    kernel_fn = infinite.architecture("fc", 1).kernel_fn
    k = np.asarray(kernel_fn(x_train, get="ntk", dtype="float64"))
    alpha = jnp.asarray(scipy.linalg.solve(k, y_train, assume_a="pos"), jnp.float32)

    @jax.jit
    def step(x_adv):
        def loss(x):
            return jnp.sum(jax.nn.softplus(-jnp.asarray(y_test, jnp.float32) * (kernel_fn(x, x_train, get="ntk") @ alpha)))
        x_adv = jnp.clip(x_adv + 0.01 * jnp.sign(jax.grad(loss)(x_adv)), 0, 1)
        return jnp.clip(x_test + jnp.clip(x_adv - x_test, -EPS, EPS), 0, 1)

    x_adv = jnp.asarray(x_test)
    for _ in range(10):
        x_adv = step(x_adv)
    saved = utils.restricted_load(summary["files"]["adv_examples"])["images"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(saved, x_adv, atol=1e-6)
    k_adv = np.asarray(kernel_fn(np.asarray(x_adv), x_train, get="ntk", dtype="float64"))
    assert summary["kernel_predictor"]["acc_robust"] == _accuracy(k_adv, np.asarray(alpha, np.float64), y_test)
