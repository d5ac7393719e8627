"""Tests of the Tsilivis & Kempe analyses: kernel_analysis.py (pure math) and analyze_ntk.py
(end to end on a width-2 ResNet on digits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_analysis as ka


def _random_psd(rng, n, rank=None):
    a = rng.normal(size=(n, rank or n))
    return a @ a.T


# ---------------------------------------------------------------- kernel motion
def test_kernel_distance_is_zero_for_same_and_scaled_kernel():
    rng = np.random.default_rng(0)
    k = _random_psd(rng, 12)
    assert abs(ka.kernel_distance(k, k)) < 1e-12
    assert abs(ka.kernel_distance(k, 3 * k)) < 1e-12
    other = _random_psd(rng, 12)
    assert ka.kernel_distance(k, other) > 1e-3
    d = ka.distance_matrix([k, 3 * k, other])
    assert d.shape == (3, 3) and np.allclose(d, d.T) and np.allclose(np.diag(d), 0)
    assert abs(d[0, 1]) < 1e-12 and abs(d[0, 2] - ka.kernel_distance(k, other)) < 1e-12


def test_polar_radius_runs_from_zero_to_one_in_every_eigenspace():
    rng = np.random.default_rng(1)
    k0 = _random_psd(rng, 10)
    drift = _random_psd(rng, 10)
    kernels = [k0 + t * drift + 0.1 * t ** 2 * _random_psd(rng, 10) for t in (0.0, 0.3, 1.0, 2.0)]
    polar = ka.eigenspace_polar_dynamics(kernels, 3)
    for which in ("full", "top", "bottom"):
        r, a = polar[which]["radius"], polar[which]["angle"]
        assert r[0] == 0.0 and abs(r[-1] - 1.0) < 1e-12, which
        assert a[0] == 0.0 and all(0 <= x <= np.pi for x in a)
    # the angle is scale invariant: a kernel that only grows does not turn
    grow = ka.polar_dynamics([k0, 2 * k0, 5 * k0])
    assert np.allclose(grow["angle"], 0, atol=1e-6) and np.allclose(grow["radius"], [0, 0.25, 1])


def test_eigenspace_parts_add_up_and_have_the_right_rank():
    rng = np.random.default_rng(2)
    k = _random_psd(rng, 8)
    top, bottom = ka.eigenspace_part(k, 3, "top"), ka.eigenspace_part(k, 5, "bottom")
    assert np.allclose(top + bottom, k)
    assert np.linalg.matrix_rank(top) == 3


def test_eigh_desc_is_descending_reconstructs_and_fixes_signs():
    rng = np.random.default_rng(5)
    k = _random_psd(rng, 12, rank=12)
    for fix in (False, True):
        evals, evecs = ka.eigh_desc(k, fix_signs=fix)
        assert np.all(np.diff(evals) <= 0)
        np.testing.assert_allclose(evecs @ np.diag(evals) @ evecs.T, 0.5 * (k + k.T), atol=1e-10)
    plain, fixed = ka.eigh_desc(k)[1], ka.eigh_desc(k, fix_signs=True)[1]
    assert np.all(fixed[np.argmax(np.abs(fixed), axis=0), np.arange(12)] > 0)
    np.testing.assert_allclose(np.abs(np.sum(plain * fixed, 0)), 1.0, atol=1e-10)   # the same vectors, up to sign


def test_eigenvalue_mass_in_unit_interval_and_monotone():
    rng = np.random.default_rng(3)
    evals = ka.eigh_desc(_random_psd(rng, 30, rank=20))[0]
    masses = [ka.eigenvalue_mass(evals, k) for k in range(1, 31)]
    assert all(0 <= m <= 1 for m in masses)
    assert all(b >= a for a, b in zip(masses, masses[1:]))
    assert abs(masses[-1] - 1) < 1e-12 and abs(masses[19] - 1) < 1e-9  # rank 20
    assert ka.eigenvalue_mass(np.array([2.0, 1.0]), 1) == pytest.approx(0.8)


# ---------------------------------------------------------------- predictor, features
def test_eigen_features_sum_to_the_ridge_predictor():
    rng = np.random.default_rng(4)
    x_train, x_test = rng.normal(size=(40, 5)), rng.normal(size=(15, 5))
    labels = rng.integers(0, 3, size=40)
    k_tt = x_train @ x_train.T + 1.0          # rank 6: needs the ridge
    k_xt = x_test @ x_train.T + 1.0
    ridge = 1e-3
    pred = ka.fit_kernel_predictor(k_tt, ka.centered_one_hot(labels, 3), ridge)
    direct = k_xt @ np.linalg.solve(k_tt + ridge * np.eye(40), ka.centered_one_hot(labels, 3))
    f = ka.kernel_predict(k_xt, pred)
    assert np.allclose(f, direct, atol=1e-8)
    feats = ka.eigen_features(k_xt, pred)
    assert feats.shape == (40, 15, 3)
    assert np.allclose(feats.sum(0), f, atol=1e-10)
    # a subset of indices gives the same rows
    assert np.allclose(ka.eigen_features(k_xt, pred, [0, 7]), feats[[0, 7]])
    acc, corr = ka.feature_usefulness(feats, rng.integers(0, 3, size=15), 3)
    assert acc.shape == corr.shape == (40,) and np.all(np.abs(corr) <= 1 + 1e-12)


# ---------------------------------------------------------------- attacks (RBF kernel: fast)
def _digits_rbf():
    from data import load_dataset, balanced_subset
    ds = load_dataset("digits")
    x_tr, y_tr, _ = balanced_subset(ds.x_train, ds.y_train, 100, 0, 10)
    x_te, y_te, _ = balanced_subset(ds.x_test, ds.y_test, 50, 0, 10)
    x_ref = jnp.asarray(x_tr)

    def kernel(x_ref, x):  # RBF on pixels: [m, n], differentiable in x
        d2 = jnp.sum((x.reshape(len(x), -1)[:, None] - x_ref.reshape(len(x_ref), -1)[None]) ** 2, -1)
        return jnp.exp(-d2 / 20.0)
    return x_tr, y_tr, x_te, y_te, kernel, x_ref


def test_kernel_predictor_attacks_stay_in_ball_and_lower_accuracy():
    x_tr, y_tr, x_te, y_te, kernel, x_ref = _digits_rbf()

    def kernel_fn(x):
        return kernel(x_ref, x)
    pred = ka.fit_kernel_predictor(np.asarray(kernel_fn(jnp.asarray(x_tr))), ka.centered_one_hot(y_tr, 10), 1e-6)
    logits = ka.make_kernel_logits(kernel)
    clean = np.mean(np.argmax(ka.kernel_predict(kernel_fn(jnp.asarray(x_te)), pred), -1) == y_te)
    assert clean > 0.7
    eps = 0.15
    for method, steps in (("fgsm", 1), ("pgd", 10)):
        x_adv = ka.attack_kernel_predictor(logits, (x_ref, pred["alpha"]), x_te, y_te, method=method, eps=eps,
                                           steps=steps, key=jax.random.PRNGKey(0), batch_size=32)
        assert x_adv.shape == x_te.shape
        assert np.all(np.abs(x_adv - x_te) <= eps + 1e-6)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        robust = np.mean(np.argmax(ka.kernel_predict(kernel_fn(jnp.asarray(x_adv)), pred), -1) == y_te)
        assert robust < clean - 0.2, (method, clean, robust)


# ---------------------------------------------------------------- end to end (tiny MLP on digits)
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A fake run directory: mlp_skinny checkpoints at epochs 0, 0.125, 0.5, 1 whose parameters
    drift from the initial ones, plus a phase-2 `_linear_` file that must be ignored."""
    import models
    import checkpoints
    run_dir = tmp_path_factory.mktemp("run")
    init, _ = models.get_model("mlp_skinny", 10)
    params, state = init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(leaves))
    d1 = [0.05 * jax.random.normal(k, a.shape) for k, a in zip(keys[::2], leaves)]
    d2 = [0.05 * jax.random.normal(k, a.shape) for k, a in zip(keys[1::2], leaves)]
    meta = dict(model="mlp_skinny", width=64, num_classes=10, input_shape=(8, 8, 1), dataset="digits", phase=1)
    for t in (0, 0.125, 0.5, 1):
        p = jax.tree_util.tree_unflatten(tree, [a + t * b + t * t * c for a, b, c in zip(leaves, d1, d2)])
        checkpoints.save_checkpoint(str(run_dir / f"parameters_checkpoint_{t:g}.pkl"), p, params, state,
                              dict(meta, epoch=t))
    checkpoints.save_checkpoint(str(run_dir / "parameters_checkpoint_linear_0.pkl"), params, params, state,
                          dict(meta, epoch=1, phase=2))
    return run_dir


def _args(argv):
    import analyze_ntk
    return analyze_ntk.build_parser().parse_args(argv + ["--no_progress"])


@pytest.mark.slow   # end to end
def test_dynamics_script_orders_checkpoints_caches_and_overlays_runs(tiny_run, tmp_path):
    pytest.importorskip("ntk")
    import json

    import analyze_ntk
    out = tmp_path / "dyn"
    argv = ["dynamics", "--runs", str(tiny_run), str(tiny_run), "--labels", "A", "B", "--dataset_size", "20",
            "--k", "3", "--out_dir", str(out)]
    s = analyze_ntk.run(_args(argv))
    assert s["kernels_computed"] == 8
    r = s["runs"]["A"]
    assert r["epochs"] == [0, 0.125, 0.5, 1]
    for part in ("full", "top", "bottom"):
        assert r["polar"][part]["radius"][0] == 0 and r["polar"][part]["radius"][-1] == pytest.approx(1)
    m10, m20 = np.array(r["mass"]["top10"]), np.array(r["mass"]["top20"])
    assert np.all((0 <= m10) & (m10 <= m20) & (m20 <= 1 + 1e-12))
    assert np.allclose(np.diag(r["distance_matrix"]), 0) and r["distance_matrix"][0][-1] > 0
    assert s["runs"]["B"]["distance_matrix"] == r["distance_matrix"]
    for f in ("kernel_distance_A.png", "polar_dynamics.png", "polar_vs_epoch.png", "eigenvalue_mass.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "dynamics.json").read_text())["runs"]["A"]["epochs"] == r["epochs"]
    # a rerun reuses every kernel; the cached kernel files give the same numbers
    assert analyze_ntk.run(_args(argv))["kernels_computed"] == 0
    files = sorted((out / "kernel_cache" / "A").glob("*.pkl"))
    s2 = analyze_ntk.run(_args(["dynamics", "--kernel_files"] + [str(f) for f in files]
                               + ["--k", "3", "--out_dir", str(tmp_path / "dyn2")]))
    r2 = s2["runs"]["run0"]
    assert r2["epochs"] == r["epochs"] and np.allclose(r2["distance_matrix"], r["distance_matrix"])


def test_features_script_sums_to_predictor(tiny_run, tmp_path):
    pytest.importorskip("ntk")
    import analyze_ntk
    s = analyze_ntk.run(_args(["features", "--model_path", str(tiny_run / "parameters_checkpoint_1.pkl"),
                               "--n_train", "20", "--n_test", "10", "--n_features", "3", "--n_tail", "2",
                               "--eps", "16", "--steps", "2", "--out_dir", str(tmp_path)]))
    assert s["max_abs_sum_of_features_minus_predictor"] < 1e-8
    idx = [r["index"] for r in s["features"]]
    assert idx[:3] == [0, 1, 2] and idx[-1] == 19
    assert all(0 <= r[k] <= 1 for r in s["features"] for k in ("acc_clean", "acc_feature_attacked"))
    assert (tmp_path / "eigen_features.png").exists() and (tmp_path / "eigen_features.json").exists()


def test_predictor_kernels_with_a_class_subset_are_the_networks_ntk(tiny_run):
    """With --classes 3 5, K(X, X) and K(x, X) are both the NTK averaged over all 10 logits of the
    network (the task's classes pick the images, not the logits)."""
    pytest.importorskip("ntk")
    import ntk
    import ntk_predictor
    args = _args(["features", "--model_path", str(tiny_run / "parameters_checkpoint_1.pkl"), "--classes", "3", "5",
                  "--n_train", "10", "--n_test", "4", "--batch_size", "4"])
    s = ntk_predictor.PredictorSetup(args)
    s.fit(args)
    x_train, x_test = jnp.asarray(s.x_train), jnp.asarray(s.x_test)
    k_train = np.asarray(ntk.empirical_ntk(s.f, s.params, x_train), np.float64)
    k_test = np.asarray(ntk.empirical_ntk(s.f, s.params, x_test, x_train), np.float64)
    assert np.max(np.abs(s.k_train_train - k_train)) <= 1e-5 * np.max(np.abs(k_train))
    assert np.max(np.abs(s.k_test_train - k_test)) <= 1e-5 * np.max(np.abs(k_test))


def test_attack_script_lowers_accuracy_and_saves_transferable_examples(tiny_run, tmp_path):
    pytest.importorskip("ntk")
    import analyze_ntk
    import utils
    from eval_and_make_adv import load_test_pickle
    eps = 32
    s = analyze_ntk.run(_args(["attack", "--model_path", str(tiny_run / "parameters_checkpoint_1.pkl"),
                               "--n_train", "50", "--n_test", "30", "--eps", str(eps), "--steps", "5",
                               "--out_dir", str(tmp_path)]))
    kp = s["kernel_predictor"]
    assert kp["acc_clean"] >= 0.5 and kp["acc_robust"] < kp["acc_clean"]
    adv = utils.restricted_load(s["files"]["adv_examples"])
    clean = utils.restricted_load(s["files"]["clean_examples"])
    assert adv["images"].shape == (30, 1, 8, 8) and np.array_equal(adv["labels"], clean["labels"])
    assert np.max(np.abs(adv["images"] - clean["images"])) <= eps / 255 + 1e-6
    assert adv["images"].min() >= 0 and adv["images"].max() <= 1
    x, y = load_test_pickle(s["files"]["adv_examples"], (8, 8, 1), 10)   # eval_and_make_adv's reader
    assert x.shape == (30, 8, 8, 1)
    t, = s["network_transfer"]                                           # the checkpoint's own network
    assert 0 <= t["acc_on_ntk_examples"] <= 1 and 0 <= t["acc_own_pgd"] <= t["acc_clean"] <= 1


def test_an_infinite_kernels_examples_transfer_to_networks(tiny_run, tmp_path):
    """attack --arch --transfer_to: each checkpoint's clean accuracy, on the kernel's examples and
    under its own PGD; a checkpoint of another input shape is refused before any work."""
    import analyze_ntk
    from cli_harness import call
    ckpt = str(tiny_run / "parameters_checkpoint_1.pkl")
    s = analyze_ntk.run(_args(["attack", "--arch", "fc", "--depth", "1", "--dataset", "digits", "--n_train", "20",
                               "--n_test", "20", "--eps", "16", "--steps", "3", "--transfer_to", ckpt, ckpt,
                               "--out_dir", str(tmp_path / "a")]))
    assert "model_path" not in s and s["architecture"]["arch"] == "fc"
    assert len(s["network_transfer"]) == 2 and s["network_transfer"][0] == s["network_transfer"][1]
    t = s["network_transfer"][0]
    assert t["model_path"] == ckpt and 0 <= t["acc_own_pgd"] <= t["acc_clean"] <= 1 and 0 <= t["acc_on_ntk_examples"] <= 1
    assert 0 <= t["acc_random_sign"] <= 1   # the control: +-eps signs in no chosen direction
    code, _, err = call("analyze_ntk", ["attack", "--arch", "fc", "--depth", "1", "--dataset", "cifar10",
                                        "--transfer_to", ckpt, "--out_dir", "b"], str(tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert "takes images of (8, 8, 1), but these cifar10 images are (32, 32, 3)" in err, err


def test_epoch_axes_show_no_negative_epochs():
    """The symlog epoch axis of the dynamics figures starts at epoch 0 (matplotlib's margins used
    to spend almost half of each panel on negative epochs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import plots
    fig, ax = plt.subplots()
    epochs = [0, 0.125, 0.25, 1, 2.5, 20]
    ax.plot(epochs, np.arange(len(epochs)))
    plots._epoch_axis(ax, epochs)
    lo, hi = ax.get_xlim()
    assert lo == 0 and 20 < hi < 25
    plt.close(fig)
