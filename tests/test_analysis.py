"""Tests of the Tsilivis & Kempe analyses: kernel_analysis.py (pure math) and analyze_ntk.py
(end to end on a width-2 ResNet on digits)."""
import os

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

    def kernel_fn(x):  # RBF on pixels: [m, n], differentiable in x
        d2 = jnp.sum((x.reshape(len(x), -1)[:, None] - x_ref.reshape(len(x_ref), -1)[None]) ** 2, -1)
        return jnp.exp(-d2 / 20.0)
    return x_tr, y_tr, x_te, y_te, kernel_fn


def test_kernel_predictor_attacks_stay_in_ball_and_lower_accuracy():
    x_tr, y_tr, x_te, y_te, kernel_fn = _digits_rbf()
    pred = ka.fit_kernel_predictor(np.asarray(kernel_fn(jnp.asarray(x_tr))), ka.centered_one_hot(y_tr, 10), 1e-6)
    logits = ka.make_kernel_logits(kernel_fn)
    clean = np.mean(np.argmax(ka.kernel_predict(kernel_fn(jnp.asarray(x_te)), pred), -1) == y_te)
    assert clean > 0.7
    eps = 0.15
    for method, steps in (("fgsm", 1), ("pgd", 10)):
        x_adv = ka.attack_kernel_predictor(logits, pred["alpha"], x_te, y_te, method=method, eps=eps,
                                           steps=steps, key=jax.random.PRNGKey(0), batch_size=32)
        assert x_adv.shape == x_te.shape
        assert np.all(np.abs(x_adv - x_te) <= eps + 1e-6)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        robust = np.mean(np.argmax(ka.kernel_predict(kernel_fn(jnp.asarray(x_adv)), pred), -1) == y_te)
        assert robust < clean - 0.2, (method, clean, robust)
