"""visualize_ntk_features.py: eigen-image ascent/descent, w = K^-1 y, the figure, bad inputs.

The kernel files are built here with an explicit jacrev-contracted kernel (independent of
ntk.py), in the documented calculate_kernel.py format.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import models
import checkpoints
import kernel_analysis
import tangent_features
import utils
import visualize_ntk_features as viz
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_DIGITS = []


def _digits():
    if not _DIGITS:
        _DIGITS.append(data.load_dataset("digits"))
    return _DIGITS[0]


def _perturbed_checkpoint(path, model, width, key=0):
    """A digits checkpoint at a random init with a non-zero logits layer (the ResNet's starts at 0)
    and BatchNorm statistics from one training-mode pass (a fresh state would divide by sqrt(eps))."""
    init, apply = models.get_model(model, 10, width)
    x = jnp.asarray(_digits().x_train[:64])
    params, state = init(jax.random.PRNGKey(key), x, True)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(key + 1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    _, state = apply(params, state, None, x, True)
    meta = {"model": model, "width": width, "num_classes": 10, "input_shape": [8, 8, 1],
            "dataset": "digits", "epoch": 0, "phase": 1, "dynamics": "standard"}
    checkpoints.save_checkpoint(path, params, params, state, meta)
    return apply, params, state


def _explicit_kernel(f, params, x, class_index):
    """K = J J^T from the full Jacobian (jacrev), J [n, P] for logit c; mean over logits for -1."""
    classes = slice(None) if class_index == -1 else slice(class_index, class_index + 1)
    jac = jax.jacrev(lambda p: f(p, x)[:, classes])(params)  # leaves [n, C or 1, ...]
    flat = jnp.concatenate([a.reshape(a.shape[0], a.shape[1], -1) for a in jax.tree_util.tree_leaves(jac)], -1)
    return np.asarray(jnp.einsum("icp,jcp->ij", flat, flat), np.float64) / flat.shape[1], flat


def _setup(tmp_path, model="mlp_skinny", width=4, n=20, class_index=0, kernel=None):
    """Checkpoint + kernel file for `n` balanced digits training images. Returns (paths, extras)."""
    ckpt = str(tmp_path / "run" / "parameters_final.pkl")
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    apply, params, state = _perturbed_checkpoint(ckpt, model, width)
    ds = _digits()
    idx = data.balanced_indices(ds.y_train, n // 10, seed=0, num_classes=10)

    def f(p, x):
        return apply(p, state, None, x, False)[0]

    if kernel is None:
        kernel, _ = _explicit_kernel(f, params, jnp.asarray(ds.x_train[idx]), class_index)
    kpath = str(tmp_path / "run" / f"saved_kernel_class_{class_index}_{n}.pkl")
    utils.atomic_pickle(kpath, {
        "kernel": np.asarray(kernel, np.float64), "labels": ds.y_train[idx], "indices": idx,
        "dataset": "digits", "class_index": class_index, "model": model, "width": width,
        "num_classes": 10, "model_path": ckpt, "use_linear_params": False, "random_seed": 0,
        "dataset_size": n})
    return ckpt, kpath, (f, params, ds, idx)


def _args(ckpt, kpath, **kw):
    argv = ["--model_path", ckpt, "--kernel_path", kpath]
    for key, value in kw.items():
        argv += [f"--{key}", str(value)]
    return viz.build_parser().parse_args(argv)


def test_direction_and_cosine_match_explicit_jacobian_and_ascent_moves_cosine(tmp_path, monkeypatch):
    """v from the chunked vjp equals J^T u; the cosine equals the explicit one; ascent raises and
    descent lowers it; images stay in [0, 1] with the input's shape. Single class and mean kernel."""
    monkeypatch.setattr(tangent_features, "_CHUNK", 16)  # 40 images -> 3 chunks of 14, the last padded
    _, _, (f, params, ds, idx) = _setup(tmp_path, n=40)
    x = jnp.asarray(ds.x_train[idx])
    for class_index in (3, -1):
        kernel, jac = _explicit_kernel(f, params, x, class_index)  # jac [n, k, P]
        evals, evecs = kernel_analysis.eigh_desc(kernel, fix_signs=True)
        classes = tuple(range(10)) if class_index == -1 else (class_index,)
        tools = tangent_features.make_tangent_fns(f, classes)
        u = evecs[:, 0]
        v = tools.direction(params, np.asarray(x), np.repeat(u[:, None], len(classes), 1))  
        v_flat = jnp.concatenate([a.reshape(len(classes), -1) for a in jax.tree_util.tree_leaves(v)], -1)
        expected = jnp.einsum("i,icp->cp", jnp.asarray(u, jnp.float32), jac)
        np.testing.assert_allclose(v_flat, expected, rtol=1e-4, atol=1e-5 * float(jnp.abs(expected).max()))

        probe = jnp.asarray(ds.x_train[:1])
        g = jax.jacrev(lambda p: f(p, probe))(params)
        g_flat = jnp.concatenate([a.reshape(10, -1) for a in jax.tree_util.tree_leaves(g)], -1)[np.asarray(classes)]
        explicit_cos = jnp.vdot(g_flat, v_flat) / (jnp.linalg.norm(g_flat) * jnp.linalg.norm(v_flat))
        np.testing.assert_allclose(tools.cosine(params, v, probe[0]), explicit_cos, rtol=1e-4, atol=1e-6)

        x0 = jnp.full((8, 8, 1), 0.5)
        x_pos, best_pos, hist_pos = tools.ascend(params, v, x0, 1.0, 0.01, steps=40)
        x_neg, best_neg, hist_neg = tools.ascend(params, v, x0, -1.0, 0.01, steps=40)
        start = float(tools.cosine(params, v, x0))
        assert hist_pos.shape == (41,) and float(hist_pos[0]) == pytest.approx(start, abs=1e-6)
        assert float(hist_neg[0]) == pytest.approx(start, abs=1e-6)
        # on this smooth model the LAST iterate has moved the cosine, not only the best one
        assert float(hist_pos[-1]) > start + 0.05, (class_index, start, hist_pos)
        assert float(hist_neg[-1]) < start - 0.05, (class_index, start, hist_neg)
        assert float(best_pos) == pytest.approx(float(hist_pos.max()))
        assert float(best_neg) == pytest.approx(float(hist_neg.min()))
        # the single-program lax.fori_loop and the host loop over the jitted step agree
        x_fori, best_fori, hist_fori = tangent_features.make_tangent_fns(f, classes, loop="fori").ascend(
            params, v, x0, 1.0, 0.01, steps=40)
        np.testing.assert_allclose(hist_fori, hist_pos, atol=1e-5)
        np.testing.assert_allclose(x_fori, x_pos, atol=1e-6)
        for img, best in ((x_pos, best_pos), (x_neg, best_neg)):
            assert img.shape == (8, 8, 1)
            assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
            assert float(jnp.abs(img - 0.5).max()) > 0  # it moved
            np.testing.assert_allclose(tools.cosine(params, v, img), best, rtol=1e-4, atol=1e-6)


def test_kernel_weights_exact_for_diagonal_and_ridge_only_when_needed():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.5, 5.0, size=12)
    y = (rng.integers(0, 3, size=12) == 1).astype(float)
    evals, evecs = kernel_analysis.eigh_desc(np.diag(d), fix_signs=True)
    assert np.all(np.diff(evals) <= 0)
    w, ridge = viz.kernel_weights(evals, evecs, y, ridge=1e-4)
    assert ridge is None
    np.testing.assert_allclose(w, y / d, rtol=1e-13, atol=0)

    singular = np.diag(np.r_[d[:-1], 0.0])
    evals, evecs = kernel_analysis.eigh_desc(singular, fix_signs=True)
    w, ridge = viz.kernel_weights(evals, evecs, y, ridge=1e-4)
    assert ridge == pytest.approx(1e-4 * d[:-1].sum() / 12)
    np.testing.assert_allclose(w, y / (np.r_[d[:-1], 0.0] + ridge), rtol=1e-10)
    with pytest.raises(UserError, match="ridge"):
        viz.kernel_weights(evals, evecs, y, ridge=0.0)


@pytest.mark.slow   # end to end
def test_end_to_end_resnet_writes_images_cosines_and_png(tmp_path, capsys):
    import matplotlib.image as mpimg
    ckpt, kpath, _ = _setup(tmp_path, model="resnet18", width=2, n=20, class_index=2)
    res = viz.run(_args(ckpt, kpath, n_images=2, steps=25, step_size=0.01, bonus_dir="viz"))
    stem = os.path.join(os.path.dirname(ckpt), "viz", "ntk_eig_images_class_2_20")
    assert res["pkl_path"] == stem + ".pkl" and res["png_path"] == stem + ".png"
    saved = utils.restricted_load(stem + ".pkl")
    assert saved["pos_images"].shape == saved["neg_images"].shape == (2, 8, 8, 1)
    assert saved["w_image"].shape == (8, 8, 1)
    for key in ("pos_images", "neg_images", "w_image"):
        assert saved[key].min() >= 0 and saved[key].max() <= 1
    start = saved["pos_cos_history"][:, 0]
    np.testing.assert_allclose(saved["neg_cos_history"][:, 0], start, atol=1e-6)
    assert np.all(saved["pos_cos"] > start) and np.all(saved["neg_cos"] < start)
    assert saved["w_cos"] > saved["w_cos_history"][0]
    assert saved["pos_cos_history"].shape == (2, 26)
    assert np.all(np.diff(saved["eigenvalues"]) <= 0) and len(saved["eigenvalues"]) == 20
    k = utils.restricted_load(kpath)
    if saved["ridge"] is None:
        np.testing.assert_allclose(saved["w"], np.linalg.solve(k["kernel"], (k["labels"] == 2) * 1.0),
                                   rtol=1e-6, atol=1e-9 * np.abs(saved["w"]).max())
    img = mpimg.imread(stem + ".png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.05  # not a blank canvas
    out = capsys.readouterr().out
    assert stem + ".png" in out and "u1: eigenvalue" in out


@pytest.mark.parametrize("class_index", [4, -1])
def test_w_from_diagonal_kernel_file_is_exact(tmp_path, class_index):
    """A kernel file holding a known diagonal K: the saved w is y_c / diag exactly (for the
    mean kernel, -1: the one-hot matrix Y / diag), no ridge."""
    d = np.linspace(3.0, 1.0, 10)
    ckpt, kpath, (_, _, ds, idx) = _setup(tmp_path, n=10, class_index=class_index, kernel=np.diag(d))
    res = viz.run(_args(ckpt, kpath, n_images=1, steps=2))
    assert res["ridge"] is None
    labels = ds.y_train[idx]
    expected = (labels == 4) / d if class_index == 4 else (labels[:, None] == np.arange(10)) / d[:, None]
    np.testing.assert_allclose(res["w"], expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(res["eigenvalues"], d)
    name = "ntk_eig_images_class_4_10.pkl" if class_index == 4 else "ntk_eig_images_10.pkl"
    assert res["pkl_path"] == os.path.join(os.path.dirname(ckpt), name)


@pytest.mark.parametrize("change, match", [
    (dict(class_index=1), "class_index mismatch"),
    (dict(dataset_size=30), "dataset_size mismatch"),
    (dict(n_images=21), "n_images 21"),
    (dict(model="mlp_wide"), "model mismatch"),
    (dict(dataset="cifar10"), "dataset mismatch"),
    (dict(width=8), "width mismatch"),
    (dict(random_seed=5), "random_seed mismatch"),
    (dict(kernel_path="missing.pkl"), "kernel file not found"),
])
def test_bad_inputs_are_user_errors_before_any_output(tmp_path, change, match):
    ckpt, kpath, _ = _setup(tmp_path, n=20, class_index=0, kernel=np.eye(20))
    if "kernel_path" in change:
        change = {"kernel_path": str(tmp_path / change["kernel_path"])}
        args = _args(ckpt, change["kernel_path"])
    else:
        args = _args(ckpt, kpath, **change)
    with pytest.raises(UserError, match=match):
        viz.run(args)
    assert not [p for p in os.listdir(os.path.dirname(ckpt)) if p.startswith("ntk_eig_images")]


def test_kernel_of_another_model_or_checkpoint_is_refused(tmp_path):
    ckpt, kpath, _ = _setup(tmp_path, n=20, class_index=0, kernel=np.eye(20))
    k = utils.restricted_load(kpath)
    utils.atomic_pickle(kpath, {**k, "model": "resnet18"})
    with pytest.raises(UserError, match="model mismatch: the kernel file says 'resnet18' but the checkpoint"):
        viz.run(_args(ckpt, kpath))
    other = str(tmp_path / "run" / "parameters_checkpoint_0.pkl")
    _perturbed_checkpoint(other, "mlp_skinny", 4, key=7)
    utils.atomic_pickle(kpath, {**k, "model_path": other})
    with pytest.raises(UserError, match="the kernel was computed from"):
        viz.run(_args(ckpt, kpath))
    utils.atomic_pickle(kpath, {**k, "labels": (k["labels"] + 1) % 10})
    with pytest.raises(UserError, match="not the images the kernel was computed on"):
        viz.run(_args(ckpt, kpath))


def test_cli_prints_one_line_error(tmp_path):
    ckpt, kpath, _ = _setup(tmp_path, n=20, class_index=0, kernel=np.eye(20))
    proc = subprocess.run([sys.executable, "visualize_ntk_features.py", "--model_path", ckpt,
                           "--kernel_path", kpath, "--class_index", "3"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: class_index mismatch") and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------
# Infinite-width kernels: the alignment goes through the kernel itself
# --------------------------------------------------------------------------------------
def test_the_kernel_cosine_is_the_tangent_feature_cosine_on_an_empirical_kernel(tmp_path):
    """cos = K(x,X) u / sqrt(K(x,x) lambda), the cosine make_kernel_tools computes through a
    kernel, equals make_tangent_fns's cosine of the tangent features when K is an empirical NTK."""
    _, _, (f, params, ds, idx) = _setup(tmp_path, n=20)
    x = jnp.asarray(ds.x_train[idx])
    c = 3

    def jacobian(x):   # [n, P] for logit c
        jac = jax.jacrev(lambda p: f(p, x)[:, c])(params)
        return jnp.concatenate([a.reshape(len(x), -1) for a in jax.tree_util.tree_leaves(jac)], -1)

    def empirical(x1, x2=None, get="ntk"):
        j1 = jacobian(x1)
        return j1 @ (j1 if x2 is None else jacobian(x2)).T

    kernel = np.asarray(empirical(x), np.float64)
    evals, evecs = kernel_analysis.eigh_desc(kernel, fix_signs=True)
    tangent = tangent_features.make_tangent_fns(f, (c,))
    through_kernel = tangent_features.make_kernel_tools(empirical, kernel, (c,))
    probes = jnp.asarray(ds.x_test[:3])
    for coef in (evecs[:, :1], evecs[:, 4:5], np.linspace(-1, 1, 20)[:, None]):
        v, kv = tangent.direction(params, np.asarray(x), coef), through_kernel.direction(x, x, coef)
        for probe in probes:
            np.testing.assert_allclose(through_kernel.cosine(x, kv, probe), tangent.cosine(params, v, probe),
                                       rtol=1e-4, atol=1e-5)


def test_eigen_images_of_an_infinite_kernel_file(tmp_path):
    """calculate_kernel.py --arch, then visualize_ntk_features.py on its file without a checkpoint:
    the ascent raises and the descent lowers the kernel cosine; a --model_path, or a --model other than
    the file's architecture, is refused."""
    import calculate_kernel
    from cli_harness import call
    calculate_kernel.run(calculate_kernel.build_parser().parse_args(
        ["--arch", "conv", "--depth", "1", "--dataset", "digits", "--dataset_size", "20", "--class_index", "0",
         "--bonus_dir", str(tmp_path / "k"), "--no_progress"]))
    kpath = str(tmp_path / "k" / "saved_kernel_class_0_20.pkl")
    res = viz.run(viz.build_parser().parse_args(["--kernel_path", kpath, "--n_images", "2", "--steps", "15",
                                                 "--step_size", "0.01", "--bonus_dir", "viz", "--no_progress"]))
    assert res["architecture"]["arch"] == "conv" and res["model_path"] is None
    assert res["pkl_path"] == str(tmp_path / "k" / "viz" / "ntk_eig_images_class_0_20.pkl")
    assert os.path.isfile(res["png_path"])
    start = res["pos_cos_history"][:, 0]
    assert np.all(res["pos_cos"] > start) and np.all(res["neg_cos"] < start) and res["w_cos"] > res["w_cos_history"][0]
    assert np.all((res["pos_images"] >= 0) & (res["pos_images"] <= 1))
    ckpt, _, _ = _setup(tmp_path, n=20)
    code, _, err = call("visualize_ntk_features", ["--kernel_path", kpath, "--model_path", ckpt], str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "drop --model_path" in err, err
    code, _, err = call("visualize_ntk_features", ["--kernel_path", kpath, "--model", "fc"], str(tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert "model mismatch: the kernel file says 'conv' but --model says 'fc'" in err, err
    assert sorted(os.listdir(tmp_path / "k")) == ["saved_kernel_class_0_20.pkl", "viz"]
