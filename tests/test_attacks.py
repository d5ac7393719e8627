"""Attacks: APGD against a closed form, APGD vs PGD, the eps-ball and [0,1], restarts,
the ensemble's bookkeeping and the sanity warnings. Digits and tiny models only."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attacks
import cli
import data
import models


def train_digits(name, steps, lr, seed=0):
    """Full-batch Adam on the digits training split. Returns (apply, params, state)."""
    ds = data.load_dataset("digits")
    init, apply = models.get_model(name, 10)
    params, state = init(jax.random.PRNGKey(seed), ds.x_train[:2], True)
    opt = optax.adam(lr)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    def loss(p):
        logits, _ = apply(p, state, None, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train(p):
        def body(_, carry):
            p, o = carry
            u, o = opt.update(jax.grad(loss)(p), o)
            return optax.apply_updates(p, u), o
        return jax.lax.fori_loop(0, steps, body, (p, opt.init(p)))[0]

    return apply, train(params), state


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def linear_model():
    return train_digits("linear", 300, 0.05)


@pytest.fixture(scope="module")
def mlp_model():
    return train_digits("mlp_skinny", 200, 1e-3)


def exact_linf_robust(w, b, x, y, eps):
    """Exact robust correctness [N] of the linear classifier x @ w + b in the L-inf ball
    intersected with [0,1]^d. For each other class j the margin (w_y - w_j).x' + b_y - b_j is
    linear and the feasible set a box, so it is minimised per pixel: x'_p = the end of
    [max(0, x_p - eps), min(1, x_p + eps)] against the sign of (w_y - w_j)_p."""
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    robust = np.ones(len(x), bool)
    for j in range(w.shape[1]):
        d = w[:, y] - w[:, j][:, None]                     # [D, N]
        worst = np.where(d.T > 0, lo, hi)                  # [N, D]
        margin = np.sum(d.T * worst, axis=1) + b[y] - b[j]
        robust &= (margin > 0) | (y == j)
    return robust


def test_apgd_checkpoints_follow_the_paper():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, Sec. 3.2)
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    w = attacks.apgd_checkpoints(7)
    assert w == sorted(set(w)) and all(1 <= c <= 7 for c in w)


def test_apgd_finds_the_exact_linf_optimum_of_a_linear_classifier(linear_model, digits):
    apply, params, state = linear_model
    w = np.asarray(params["linear"]["w"], np.float64)
    b = np.asarray(params["linear"]["b"], np.float64)
    x, y = digits.x_test[:200], digits.y_test[:200]
    flat = x.reshape(len(x), -1).astype(np.float64)
    eps = 0.08
    exact = exact_linf_robust(w, b, flat, y, eps)
    clean = np.argmax(flat @ w + b, 1) == y
    assert 0.2 * len(x) < exact.sum() < 0.9 * clean.sum()   # the attack has real work to do
    predict = attacks.make_predict(apply, "standard")
    res = attacks.evaluate(predict, (params, params, state), x, y,
                           attack=attacks.linf_config(eps, 100, name="ensemble"))
    # No attack can beat the optimum: every robust-by-exact example stays robust.
    robust = res["predictions_adv"] == y
    assert np.all(robust[exact])
    # APGD with the targeted DLR loss optimises each class margin: it reaches the optimum.
    assert abs(res["attacks"]["apgd-dlr"]["correct"] - int(exact.sum())) <= 1
    assert abs(res["correct_adv"] - int(exact.sum())) <= 1
    # The cross-entropy is convex in x here, so maximising it is not the margin problem;
    # APGD-CE is allowed to be off, but not by much.
    assert res["attacks"]["apgd-ce"]["correct"] - int(exact.sum()) <= 0.05 * len(x)


def test_apgd_is_not_weaker_than_pgd_with_the_same_budget(mlp_model, digits):
    apply, params, state = mlp_model
    predict = attacks.make_predict(apply, "standard")
    x, y = digits.x_test, digits.y_test
    for eps, steps in ((0.1, 20), (0.06, 50)):
        got = {}
        for name in ("pgd", "apgd-ce"):
            r = attacks.evaluate(predict, (params, params, state), x, y,
                                 attack=attacks.linf_config(eps, steps, name=name), check_gradients=False)
            got[name] = r["correct_adv"]
        assert got["pgd"] < r["correct_clean"]   # the attack bites
        # Both reach local maxima of a non-concave loss from different random starts, so allow
        # 1% of the test set (3 images); in practice APGD-CE is at or below PGD.
        assert got["apgd-ce"] <= got["pgd"] + 3, (eps, steps, got)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dynamics", ["standard", "centered"])
def test_every_attack_stays_in_the_ball_and_the_box(mlp_model, digits, norm, dynamics):
    apply, params, state = mlp_model
    # A second point for the linearized dynamics, so centered logits are non-zero.
    theta = jax.tree_util.tree_map(lambda p: p * 1.1, params)
    predict = attacks.make_predict(apply, dynamics)
    x, y = digits.x_test[:64], digits.y_test[:64]
    eps = 0.1 if norm == "linf" else 1.0
    for name in ("pgd", "apgd-ce", "apgd-dlr"):
        cfg = attacks.AttackConfig(norm=norm, eps=eps, step_size=2 * eps / 10, steps=10, name=name, n_targets=3)
        xa = np.asarray(attacks.run_attack(predict, (theta, params, state), x, y, jax.random.PRNGKey(1), cfg))
        assert xa.shape == x.shape and xa.dtype == np.float32
        assert xa.min() >= 0.0 and xa.max() <= 1.0
        delta = (xa - x).reshape(len(x), -1)
        size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert size.max() <= eps * (1 + 1e-5) + 1e-6, (name, size.max())
        fooled = np.asarray(jnp.argmax(predict((theta, params, state), xa), -1)) != y
        assert fooled.any(), name


def test_restarts_and_ensemble_only_remove_robust_examples(mlp_model, digits):
    apply, params, state = mlp_model
    predict = attacks.make_predict(apply, "standard")
    variables = (params, params, state)
    x, y = digits.x_test[:150], digits.y_test[:150]
    key = jax.random.PRNGKey(3)

    def robust(**kw):
        r = attacks.evaluate(predict, variables, x, y, batch_size=64, key=key, check_gradients=False,
                             attack=attacks.linf_config(0.08, 10, n_targets=3, **kw))
        return r, r["predictions_adv"] == y

    r1, one = robust(name="pgd")
    r3, three = robust(name="pgd", restarts=3)
    assert not np.any(three & ~one)           # restart 0 is the same run: survivors are a subset
    ens, both = robust(name="ensemble", restarts=2)
    b = ens["attacks"]
    assert list(b) == ["pgd", "apgd-ce", "apgd-dlr"]
    cum = [b[k]["cumulative_correct"] for k in b]
    assert cum == sorted(cum, reverse=True) and cum[-1] == ens["correct_adv"]
    assert ens["correct_adv"] <= min(v["correct"] for v in b.values())
    # APGD counts a clean mistake as non-robust, so the ensemble never exceeds clean accuracy.
    assert ens["correct_adv"] <= ens["correct_clean"]
    assert not np.any(both & (ens["predictions_clean"] != y))
    assert ens["attack"]["members"] == ["pgd", "apgd-ce", "apgd-dlr"] and ens["attack"]["restarts"] == 2


def test_gradient_masking_and_robust_above_clean_are_reported(digits):
    init, apply = models.get_model("linear", 10)
    params, state = init(jax.random.PRNGKey(0), digits.x_test[:2], True)
    # Zero weights: every input gradient is exactly zero, the textbook masking signature.
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    predict = attacks.make_predict(apply, "standard")
    r = attacks.evaluate(predict, (zero, zero, state), digits.x_test[:50], digits.y_test[:50],
                         attack=attacks.linf_config(0.05, 5))
    assert r["zero_grad_count"] == 50
    assert any("gradient masking" in w for w in r["warnings"])
    fake = {"n": 10, "correct_clean": 5, "acc_clean": 0.5, "correct_adv": 6, "acc_adv": 0.6,
            "zero_grad_count": 0,
            "attacks": {"pgd": {"correct": 6, "acc": 0.6, "correct_half_steps": 4},
                        "apgd-ce": {"correct": 9, "acc": 0.9}}}
    warnings = attacks.sanity_warnings(fake, attacks.linf_config(0.05, 10, name="ensemble"))
    text = " | ".join(warnings)
    assert "exceeds clean" in text and "more steps raised" in text and "apgd-ce left more" in text


def test_attack_options_build_configs():
    p = argparse.ArgumentParser()
    cli.add_attack_args(p)
    args = p.parse_args(["--attack", "apgd-dlr", "--restarts", "2", "--n_target_classes", "4"])
    cfg = attacks.attack_from_args(args, "linf", 4 / 255, 50)
    assert (cfg.name, cfg.restarts, cfg.n_targets, cfg.steps) == ("apgd-dlr", 2, 4, 50)
    assert cfg.step_size == pytest.approx(2 * (4 / 255) / 50)
    l2 = attacks.attack_from_args(p.parse_args([]), "l2", 0.25, 100)
    assert (l2.name, l2.restarts, l2.step_size) == ("pgd", 1, 0.01)
    assert attacks.attack_from_args(argparse.Namespace(), "linf", 0.1, 10).name == "pgd"
    with pytest.raises(SystemExit):
        p.parse_args(["--attack", "fgsm"])


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "apgd-dlr"])
def test_host_and_fori_loops_give_the_same_iterates(name, mlp_model, digits, monkeypatch):
    # CPU runs the attack steps from a host loop, accelerators in one fori_loop (attacks.py):
    # both must compute the same attack.
    apply, params, state = mlp_model
    predict = attacks.make_predict(apply, "standard")
    variables = (params, params, state)
    x, y = jnp.asarray(digits.x_test[:40]), jnp.asarray(digits.y_test[:40])
    key, eps = jax.random.PRNGKey(3), 0.1
    out = {}
    for mode in ("host", "fori"):
        monkeypatch.setenv("NTK_ATTACK_LOOP", mode)
        assert attacks.loop_mode() == mode
        if name == "pgd":
            out[mode] = attacks.pgd(predict, variables, x, y, key, eps, 0.02, steps=7)
        else:
            out[mode] = attacks.apgd(predict, variables, x, y, key, eps, steps=9,
                                     loss="ce" if name == "apgd-ce" else "dlr-t", target_rank=1)
    assert not np.allclose(out["host"], x)            # the attack moved the images
    np.testing.assert_allclose(out["host"], out["fori"], atol=1e-6)
    monkeypatch.setenv("NTK_ATTACK_LOOP", "sometimes")
    with pytest.raises(ValueError, match="NTK_ATTACK_LOOP"):
        attacks.loop_mode()
