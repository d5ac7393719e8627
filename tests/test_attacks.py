"""Attacks: APGD, FAB-T and Square against closed forms on a linear model, APGD vs PGD, the
eps-ball and [0,1], restarts, the ensembles' bookkeeping, a masked gradient that only Square sees
through, and the sanity warnings. Digits and tiny models only."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attacks
import autoattack
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


def linear_weights(params):
    """(w [D, C], b [C]) in float64 of the one-layer `linear` model, whatever its module is named."""
    (layer,) = params.values()
    return np.asarray(layer["w"], np.float64), np.asarray(layer["b"], np.float64)


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
    assert autoattack.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    w = autoattack.apgd_checkpoints(7)
    assert w == sorted(set(w)) and all(1 <= c <= 7 for c in w)


def test_apgd_finds_the_exact_linf_optimum_of_a_linear_classifier(linear_model, digits):
    apply, params, state = linear_model
    w, b = linear_weights(params)
    x, y = digits.x_test[:200], digits.y_test[:200]
    flat = x.reshape(len(x), -1).astype(np.float64)
    eps = 0.08
    exact = exact_linf_robust(w, b, flat, y, eps)
    clean = np.argmax(flat @ w + b, 1) == y
    assert 0.2 * len(x) < exact.sum() < 0.9 * clean.sum()   # the attack has real work to do
    predict = attacks.make_predict(apply, "standard")
    res = attacks.evaluate(predict, (params, params, state), x, y,
                           attack=attacks.linf_config(eps, 100, name="ensemble-fast"))
    # No attack can beat the optimum: every robust-by-exact example stays robust.
    robust = res["predictions_adv"] == y
    assert np.all(robust[exact])
    # APGD with the targeted DLR loss optimises each class margin: it reaches the optimum.
    assert abs(res["attacks"]["apgd-dlr"]["correct"] - int(exact.sum())) <= 1
    assert abs(res["correct_adv"] - int(exact.sum())) <= 1
    # The cross-entropy is convex in x here, so maximising it is not the margin problem;
    # APGD-CE is allowed to be off, but not by much.
    assert res["attacks"]["apgd-ce"]["correct"] - int(exact.sum()) <= 0.05 * len(x)


def exact_min_distance(w, b, x, y, norm):
    """[N] exact distance from each example to the nearest misclassified point of [0,1]^d under
    the linear classifier x @ w + b, in L-inf or L2 (0 for clean mistakes). For each other class
    j, bisection on the radius r of the smallest margin (w_y - w_j).x' + b_y - b_j over the ball
    intersected with the box: L-inf, per pixel the end of [x - r, x + r] against the sign of
    w_y - w_j; L2, the point clip(x - mu (w_y - w_j)) of norm r (mu by an inner bisection)."""
    def bisect(below, lo, hi, steps):   # the largest t in [lo, hi] with below(t), per example
        for _ in range(steps):
            mid = (lo + hi) / 2
            ok = below(mid)
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        return lo, hi

    def worst_margin(v, c, r):
        if norm == "linf":
            return np.sum(v * np.where(v > 0, np.clip(x - r[:, None], 0, 1), np.clip(x + r[:, None], 0, 1)), 1) + c
        mu, _ = bisect(lambda m: np.linalg.norm(np.clip(x - m[:, None] * v, 0, 1) - x, axis=1) < r,
                       np.zeros(len(x)), np.full(len(x), 1e4), 80)
        return np.sum(v * np.clip(x - mu[:, None] * v, 0, 1), 1) + c

    out = np.where(np.argmax(x @ w + b, 1) == y, np.inf, 0.0)
    for j in range(w.shape[1]):
        v, c = w[:, y].T - w[:, j], b[y] - b[j]                   # [N, D], [N]
        far = np.full(len(x), 8.0)
        reach = (y != j) & (worst_margin(v, c, far) <= 0)
        _, r = bisect(lambda r: worst_margin(v, c, r) > 0, np.zeros(len(x)), far, 50)
        out = np.where(reach, np.minimum(out, r), out)
    return out


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_reaches_the_minimum_norm_boundary_of_a_linear_classifier(linear_model, digits, norm):
    apply, params, state = linear_model
    w, b = linear_weights(params)
    x, y = digits.x_test[:60], digits.y_test[:60]
    flat = x.reshape(len(x), -1).astype(np.float64)
    exact = exact_min_distance(w, b, flat, y, norm)
    predict = attacks.make_predict(apply, "standard")
    variables = (params, params, state)
    found = np.full(len(x), np.inf)
    for rank in range(9):   # FAB-T over every other class: the untargeted minimum
        x_best, dist = autoattack.fab_min_norm(predict, variables, x, y, jax.random.PRNGKey(0), 0.1, steps=20,
                                            norm=norm, target_rank=rank)
        dist = np.asarray(dist)
        # The reported distance is that of a returned point, which is misclassified and in [0, 1].
        ok = np.isfinite(dist)
        x_best = np.asarray(x_best)
        delta = (x_best - x).reshape(len(x), -1)
        size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        np.testing.assert_allclose(size[ok], dist[ok], rtol=1e-5, atol=1e-6)
        assert x_best.min() >= 0 and x_best.max() <= 1
        assert np.all(np.argmax(x_best.reshape(len(x), -1) @ w + b, 1)[ok & (dist > 0)] != y[ok & (dist > 0)])
        found = np.minimum(found, dist)
    reachable = np.isfinite(exact) & (exact > 0)
    assert reachable.sum() > 0.8 * len(x) and np.all(np.isfinite(found[reachable]))
    ratio = found[reachable] / exact[reachable]
    # FAB overshoots the linearised boundary by 5% and walks back; on a linear model it settles
    # within 1% above the exact minimum, and can never go below it.
    assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.01, (ratio.min(), ratio.max())


def test_fab_t_and_square_match_the_exact_linf_robustness_of_a_linear_classifier(linear_model, digits):
    apply, params, state = linear_model
    w, b = linear_weights(params)
    x, y = digits.x_test[:150], digits.y_test[:150]
    eps = 0.08
    exact = exact_linf_robust(w, b, x.reshape(len(x), -1).astype(np.float64), y, eps)
    predict = attacks.make_predict(apply, "standard")
    got = {}
    for name in ("fab-t", "square"):
        cfg = attacks.AttackConfig(norm="linf", eps=eps, name=name, fab_steps=20, square_queries=2000)
        r = attacks.evaluate(predict, (params, params, state), x, y, attack=cfg, check_gradients=False)
        robust = r["predictions_adv"] == y
        assert np.all(robust[exact]), name          # no attack beats the optimum
        got[name] = int(robust.sum())
    assert abs(got["fab-t"] - int(exact.sum())) <= 1
    # Square's random search over the vertices of the box ends within a few examples of the optimum.
    assert got["square"] - int(exact.sum()) <= 0.03 * len(x), (got, int(exact.sum()))


def test_projection_onto_the_boundary_is_the_least_norm_step_in_the_box():
    from scipy.optimize import linprog
    rng = np.random.default_rng(0)
    n, d = 6, 12
    p = rng.uniform(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(n, d)).astype(np.float32)
    w[0, :5] = 0.0                                    # coordinates that cannot help
    b = (np.sum(w * p, 1) + rng.normal(size=n)).astype(np.float32)
    b[5] = 100.0                                      # out of the box's reach
    for norm in ("linf", "l2"):
        step = np.asarray(autoattack.project_onto_hyperplane_box(jnp.asarray(p), jnp.asarray(w), jnp.asarray(b), norm))
        z = p + step
        assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
        np.testing.assert_allclose(np.sum(w[:5] * z[:5], 1), b[:5], atol=1e-4)
        # unreachable: the box corner that comes closest
        np.testing.assert_allclose(z[5], np.where(w[5] > 0, 1.0, 0.0), atol=1e-6)
        for k in range(5):
            r = b[k] - w[k] @ p[k]
            if norm == "linf":   # LP over (step, t): min t, |step_i| <= t, w.step = r, p + step in the box
                eye, ones = np.eye(d), np.ones((d, 1))
                lp = linprog(np.r_[np.zeros(d), 1.0], A_ub=np.block([[eye, -ones], [-eye, -ones]]),
                             b_ub=np.zeros(2 * d), A_eq=np.r_[w[k], 0.0][None], b_eq=[r],
                             bounds=[(-p[k, i], 1 - p[k, i]) for i in range(d)] + [(0, None)])
                assert np.abs(step[k]).max() == pytest.approx(lp.fun, rel=1e-4)
            else:                # KKT: step = clip(mu w) for the mu that reaches the plane (bisection)
                lo, hi = (0.0, 1e4) if r > 0 else (-1e4, 0.0)
                for _ in range(200):
                    mu = (lo + hi) / 2
                    lo, hi = (mu, hi) if w[k] @ np.clip(mu * w[k], -p[k], 1 - p[k]) < r else (lo, mu)
                best = np.clip(lo * w[k], -p[k], 1 - p[k])
                assert np.linalg.norm(step[k]) == pytest.approx(np.linalg.norm(best), rel=1e-4)


def test_square_l2_pattern_is_the_papers_eta():
    def rect(a, b):   # concentric rectangles around (a // 2, b // 2), the k-th weighted 1 / (k + 1)^2
        e = np.zeros((a, b))
        for k in range(b // 2 + 1):
            e[max(a // 2 - k, 0):a // 2 + k + 1, max(b // 2 - k, 0):b // 2 + k + 1] += 1 / (k + 1) ** 2
        return e / np.sqrt((e ** 2).sum()) if e.size else e

    h = 12
    for s in (1, 2, 3, 4, 7, 12):
        eta = np.concatenate([rect(s // 2, s), -rect(s - s // 2, s)])
        eta /= np.sqrt((eta ** 2).sum())
        top, left, flip = np.array([0, h - s, 2 % (h - s + 1)]), np.array([h - s, 0, 1 % (h - s + 1)]), np.array(
            [False, True, True])
        got = autoattack._l2_pattern(jnp.asarray(top), jnp.asarray(left), s, jnp.asarray(flip), h, h)
        got = np.asarray(got)[..., 0]
        for n in range(3):
            want = np.zeros((h, h))
            want[top[n]:top[n] + s, left[n]:left[n] + s] = eta.T if flip[n] else eta
            np.testing.assert_allclose(got[n], want, atol=1e-6, err_msg=f"s={s}")


def test_square_sees_through_a_masked_gradient_and_the_ensemble_warns(mlp_model, digits):
    apply, params, state = mlp_model
    plain = attacks.make_predict(apply, "standard")

    def quantised(variables, x):   # the input rounded to the digits' 17 grey levels: zero gradient
        return plain(variables, jnp.round(x * 16) / 16)

    x, y = digits.x_test[:64], digits.y_test[:64]
    cfg = attacks.linf_config(0.1, 10, name="ensemble", n_targets=3, fab_steps=10, square_queries=300)
    r = attacks.evaluate(quantised, (params, params, state), x, y, attack=cfg, batch_size=64, keep_examples=True)
    b = r["attacks"]
    # The gradient attacks see a flat loss: robustness stays near clean accuracy...
    assert b["fab-t"]["cumulative_correct"] >= 0.9 * r["correct_clean"]
    # ...and Square, reading only the logits, takes most of it away.
    assert b["square"]["cumulative_correct"] <= 0.6 * b["fab-t"]["cumulative_correct"]
    assert b["square"]["masking_suspected"] and b["square"]["fooled"] > b["square"]["masking_threshold"]
    assert any("square, which uses no gradients" in w for w in r["warnings"])
    xa = r["x_adv"]
    assert xa.min() >= 0 and xa.max() <= 1 and np.abs(xa - x).max() <= 0.1 + 1e-6


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
    for name in ("pgd", "apgd-ce", "apgd-dlr", "fab-t", "square"):
        cfg = attacks.AttackConfig(norm=norm, eps=eps, step_size=2 * eps / 10, steps=10, name=name, n_targets=3,
                                   fab_steps=10, square_queries=30)
        xa = attacks.evaluate(predict, (theta, params, state), x, y, batch_size=64, attack=cfg, key=jax.random.PRNGKey(1),
                              keep_examples=True, check_gradients=False)["x_adv"]
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
    ens, both = robust(name="ensemble-fast", restarts=2)
    b = ens["attacks"]
    assert list(b) == ["pgd", "apgd-ce", "apgd-dlr"]
    cum = [b[k]["cumulative_correct"] for k in b]
    assert cum == sorted(cum, reverse=True) and cum[-1] == ens["correct_adv"]
    assert ens["correct_adv"] <= min(v["correct"] for v in b.values())
    # APGD counts a clean mistake as non-robust, so the ensemble never exceeds clean accuracy.
    assert ens["correct_adv"] <= ens["correct_clean"]
    assert not np.any(both & (ens["predictions_clean"] != y))
    assert ens["attack"]["members"] == ["pgd", "apgd-ce", "apgd-dlr"] and ens["attack"]["restarts"] == 2

    # AutoAttack's standard set: each member attacks only what the ones before it left robust.
    aa, aa_robust = robust(name="ensemble", fab_steps=5, square_queries=20)
    b = aa["attacks"]
    assert list(b) == ["apgd-ce", "apgd-dlr", "fab-t", "square"]
    assert b["apgd-ce"]["attacked"] == aa["correct_clean"]          # clean mistakes are never attacked
    left = aa["correct_clean"]
    for name in b:
        assert b[name]["attacked"] == left
        left -= b[name]["fooled"]
        assert b[name]["cumulative_correct"] == left
    assert left == aa["correct_adv"] and not np.any(aa_robust & (aa["predictions_clean"] != y))
    assert b["square"]["masking_suspected"] is False and not any("square" in w for w in aa["warnings"])
    d = aa["attack"]
    assert (d["members"], d["fab_steps"], d["square_queries"], d["square_p_init"], d["n_targets"]) == (
        ["apgd-ce", "apgd-dlr", "fab-t", "square"], 5, 20, 0.8, 3)


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
    warnings = attacks.sanity_warnings(fake, attacks.linf_config(0.05, 10, name="ensemble-fast"))
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
    # AutoAttack's standard budgets by default; fewer for CPU-scale work.
    assert (l2.fab_steps, l2.square_queries, l2.square_p_init, l2.n_targets) == (100, 5000, 0.8, 9)
    fast = attacks.attack_from_args(p.parse_args(["--attack", "ensemble", "--square_queries", "300", "--fab_steps",
                                                  "20", "--square_p_init", "0.5"]), "linf", 0.1, 10)
    assert (fast.name, fast.square_queries, fast.fab_steps, fast.square_p_init) == ("ensemble", 300, 20, 0.5)
    assert [m.name for m in fast.members()] == ["apgd-ce", "apgd-dlr", "fab-t", "square"] and fast.on_survivors
    assert [m.name for m in attacks.linf_config(0.1, 10, name="ensemble-fast").members()] == ["pgd", "apgd-ce",
                                                                                             "apgd-dlr"]
    for bad in (["--square_queries", "0"], ["--fab_steps", "x"], ["--square_p_init", "1.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "apgd-dlr", "fab-t", "square"])
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
            # the iterate after steps // 2 is PGD with steps // 2 steps; the last one is unchanged
            x_last, x_half = attacks.pgd(predict, variables, x, y, key, eps, 0.02, steps=7, with_half=True)
            np.testing.assert_array_equal(x_last, out[mode])
            np.testing.assert_array_equal(x_half, attacks.pgd(predict, variables, x, y, key, eps, 0.02, steps=3))
        elif name == "fab-t":
            out[mode] = autoattack.fab_min_norm(predict, variables, x, y, key, eps, steps=7, target_rank=1)[0]
        elif name == "square":   # 150 queries: two chunks between the early-stopping checks
            out[mode] = autoattack.square(predict, variables, x, y, key, eps, queries=150)
        else:
            out[mode] = autoattack.apgd(predict, variables, x, y, key, eps, steps=9,
                                        loss="ce" if name == "apgd-ce" else "dlr-t", target_rank=1)
    assert not np.allclose(out["host"], x)            # the attack moved the images
    np.testing.assert_allclose(out["host"], out["fori"], atol=1e-6)
    assert attacks.loop_mode("host") == "host"   # a script's --loop wins over the environment
    with pytest.raises(ValueError, match="the loop"):
        attacks.loop_mode("sometimes")
    monkeypatch.setenv("NTK_ATTACK_LOOP", "sometimes")
    with pytest.raises(ValueError, match="NTK_ATTACK_LOOP"):
        attacks.loop_mode()
