"""The full empirical NTK (every class pair, neural-tangents' trace_axes=()): ntk.empirical_ntk
(..., full=True) against the class kernels and an explicit Jacobian, ntk.full_matrix against
Tsilivis & Kempe's arrangement, kernel_analysis.kernel_motion with bottom='rest' and its one
eigendecomposition per kernel, calculate_kernel.py --full and analyze_ntk.py dynamics --full end
to end, and the one-line refusals of full-kernel files and bad flag combinations."""
import json
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import data
import kernel_analysis as ka
import models
import ntk
import utils
from cli_harness import call
from utils import UserError


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def _mixed_net():
    """A tiny Haiku network exercising every kind of leaf the engine sees: intercepted convs
    and a dense layer, BatchNorm scales/offsets (generic leaves), a Linear called twice (not
    intercepted: generic) and a conv without bias."""
    def net(x, is_training):
        x = hk.Conv2D(3, 3, name="c1")(x)
        x = hk.BatchNorm(True, True, 0.9, name="bn")(x, is_training)
        x = jax.nn.relu(x)
        x = hk.Conv2D(4, 3, stride=2, with_bias=False, name="c2")(x)
        x = jax.nn.relu(hk.Flatten()(x))
        shared = hk.Linear(16, name="shared")
        x = jax.nn.relu(shared(jax.nn.relu(hk.Linear(16, name="d1")(x))))
        x = jnp.tanh(shared(x))
        return hk.Linear(10, name="out")(x)
    return hk.transform_with_state(net)


@pytest.fixture(scope="module")
def mixed(digits):
    x = jnp.asarray(digits.x_train[:14])
    t = _mixed_net()
    params, state = jax.jit(t.init, static_argnums=2)(jax.random.PRNGKey(0), x, True)
    params = _perturbed(params, 0.3, 1)
    _, state = t.apply(params, state, None, x, True)   # BatchNorm statistics
    return ntk.NetFn(t.apply, state), params, x


def _perturbed(params, scale, seed):
    """params plus scale * N(0, 1) noise drawn with numpy (no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p + scale * rng.standard_normal(p.shape), jnp.float32), params)


def explicit_full(f, params, x1, x2=None):
    """K[i, j, a, b] from the full Jacobian (jacrev over the parameters of the batch), einsum."""
    def jac(xs):
        out = jax.jacrev(lambda p: f(p, xs))(params)  # leaves [n, C, ...]
        return jnp.concatenate([a.reshape(a.shape[0], a.shape[1], -1) for a in jax.tree_util.tree_leaves(out)], -1)
    j1 = jac(x1)
    j2 = j1 if x2 is None else jac(x2)
    return np.asarray(jnp.einsum("iap,jbp->ijab", j1, j2, precision="highest"), np.float64)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _swap(k):
    return k.transpose(1, 0, 3, 2)


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------
def test_full_kernel_blocks_are_the_class_kernels(mixed):
    f, params, x = mixed
    stats = {}
    k = ntk.empirical_ntk(f, params, x, full=True, stats=stats)
    assert k.shape == (14, 14, 10, 10) and k.dtype == np.float64
    assert stats["full"] and stats["k"] == 10 and stats["method"] == "direct" and not stats["structured_layers"]
    assert set(stats["direct_layers"]) == {"c1", "c2", "d1", "out"}   # 'shared' is called twice: generic
    for c in (0, 7):
        assert _rel(k[:, :, c, c], ntk.empirical_ntk(f, params, x, class_index=c)) < 1e-5
    mean = ntk.empirical_ntk(f, params, x, class_index=-1)
    assert _rel(np.einsum("ijcc->ij", k) / 10, mean) < 1e-5
    # the off-diagonal class pairs are not zero: the full kernel holds more than the class kernels
    assert np.abs(k[:, :, 0, 1]).max() > 1e-3 * np.abs(k[:, :, 0, 0]).max()


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_full_kernel_equals_the_explicit_jacobian(mixed, method):
    f, params, x = mixed
    ref = explicit_full(f, params, x)
    k = ntk.empirical_ntk(f, params, x, full=True, method=method)
    assert _rel(k, ref) < 1e-5, _rel(k, ref)
    np.testing.assert_array_equal(k, _swap(k))          # symmetric by construction
    # a tiny budget: several panels and blocks, the same kernel, symmetric and cross (x1, x2)
    small = {}
    k_small = ntk.empirical_ntk(f, params, x, full=True, method=method, memory_gb=2e-6, stats=small)
    assert small["panels"] > 2 and small["chunk"] < 14 and small["example_gradients"] > 14
    np.testing.assert_array_equal(k_small, _swap(k_small))
    assert _rel(k_small, ref) < 1e-5
    small = {}
    cross = ntk.empirical_ntk(f, params, x[:5], x[5:], full=True, method=method, memory_gb=2e-6, stats=small)
    assert cross.shape == (5, 9, 10, 10) and small["panels"] > 1
    assert _rel(cross, ref[:5, 5:]) < 1e-5


def test_full_kernel_refuses_a_class_and_the_structured_form(mixed):
    f, params, x = mixed
    with pytest.raises(ValueError, match="class_index must be None or -1"):
        ntk.empirical_ntk(f, params, x, class_index=0, full=True)
    with pytest.raises(ValueError, match="direct form"):
        ntk.empirical_ntk(f, params, x, method="structured", full=True)
    plan = ntk.make_plan(f, params, x.shape[1:], 10, -1, full=True, n=14)
    assert plan.full and plan.method == "direct" and "full kernel" in ntk.describe_plan(plan)


def test_full_matrix_is_tsilivis_kempes_arrangement(mixed):
    f, params, x = mixed
    k = ntk.empirical_ntk(f, params, x, full=True)
    n, c = 14, 10
    m = ntk.full_matrix(k)
    np.testing.assert_array_equal(m, k.transpose([3, 1, 2, 0]).reshape(c * n, c * n))
    np.testing.assert_array_equal(m, m.T)
    assert m[2 * n + 5, 7 * n + 3] == k[5, 3, 2, 7]   # class-major: row (a, p), column (b, q)
    evals = np.linalg.eigvalsh(m)
    assert evals[0] >= -1e-6 * evals[-1]
    rect = ntk.full_matrix(np.arange(2 * 3 * 4 * 4, dtype=float).reshape(2, 3, 4, 4))
    assert rect.shape == (8, 12) and rect[1 * 2 + 1, 3 * 3 + 2] == (np.arange(96).reshape(2, 3, 4, 4))[1, 2, 1, 3]
    with pytest.raises(ValueError):
        ntk.full_matrix(np.zeros((3, 3)))


# --------------------------------------------------------------------------------------
# kernel motion
# --------------------------------------------------------------------------------------
def _kernel_sequence(n=24, t=4, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    drift = rng.normal(size=(n, n))
    return [(a + s * drift) @ (a + s * drift).T for s in np.linspace(0, 1, t)]


def _reference_motion(kernels, k, bottom):
    """The polar dynamics and spectra recomputed plainly, one numpy eigh per part."""
    def part(kern, which):
        sym = 0.5 * (kern + kern.T)
        w, u = np.linalg.eigh(sym)
        w, u = w[::-1], u[:, ::-1]
        if which == "top":
            return u[:, :k] @ np.diag(w[:k]) @ u[:, :k].T
        if bottom == "rest":
            return u[:, k:] @ np.diag(w[k:]) @ u[:, k:].T
        return u[:, -k:] @ np.diag(w[-k:]) @ u[:, -k:].T

    out = {}
    for which in ("full", "top", "bottom"):
        ks = [kern if which == "full" else part(kern, which) for kern in kernels]
        dist = np.array([np.linalg.norm(x - ks[0]) for x in ks])
        cos = [np.sum(x * ks[0]) / (np.linalg.norm(x) * np.linalg.norm(ks[0])) for x in ks]
        out[which] = (dist / dist[-1], np.arccos(np.clip(cos, -1, 1)))
    return out


@pytest.mark.parametrize("bottom", ["k", "rest"])
def test_kernel_motion_bottom_definitions_and_one_eigh_per_kernel(bottom, monkeypatch):
    kernels = _kernel_sequence()
    k = 5
    calls = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: calls.append(1) or eigh(a))
    motion = ka.kernel_motion([0, 0.5, 1, 2], kernels, k, bottom=bottom)
    assert len(calls) == len(kernels)                          # one eigendecomposition per kernel
    monkeypatch.setattr(np.linalg, "eigh", eigh)
    assert motion["eigenspaces"] == {"size": 24, "top_count": k, "bottom": bottom,
                                     "bottom_count": 24 - k if bottom == "rest" else k}
    ref = _reference_motion(kernels, k, bottom)
    for which in ("full", "top", "bottom"):
        np.testing.assert_allclose(motion["polar"][which]["radius"], ref[which][0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(motion["polar"][which]["angle"], ref[which][1], rtol=1e-6, atol=1e-7)
    # the same numbers as the building blocks composed the straightforward way (an eigh per part)
    for which in ("full", "top", "bottom"):
        part = "bottom" if (which == "bottom" and bottom == "k") else ("rest" if which == "bottom" else which)
        assert motion["polar"][which] == ka.polar_dynamics([ka.eigenspace_part(x, k, part) for x in kernels])
    assert ka.eigenspace_polar_dynamics(kernels, k, bottom) == motion["polar"]
    spectra = [ka.eigh_desc(x)[0] for x in kernels]
    assert motion["eigenvalues_top"] == [s[:max(ka.MASS_KS)].tolist() for s in spectra]
    assert motion["mass"]["top10"] == [ka.eigenvalue_mass(s, 10) for s in spectra]
    for i, x in enumerate(kernels):
        for j, y in enumerate(kernels):
            assert abs(motion["distance_matrix"][i][j] - (0.0 if i == j else ka.kernel_distance(x, y))) < 1e-12


def test_top_and_rest_parts_add_up_to_the_kernel():
    kern = _kernel_sequence()[2]
    top, rest = ka.eigenspace_part(kern, 5, "top"), ka.eigenspace_part(kern, 5, "rest")
    np.testing.assert_allclose(top + rest, kern, atol=1e-10 * np.abs(kern).max())
    tol = 1e-9 * np.abs(kern).max()
    assert np.linalg.matrix_rank(top, tol) == 5 and np.linalg.matrix_rank(rest, tol) == 19
    bottom = ka.eigenspace_part(kern, 19, "bottom")
    np.testing.assert_allclose(rest, bottom, atol=1e-9 * np.abs(kern).max())
    with pytest.raises(ValueError):
        ka.kernel_motion([0, 1], [kern, kern], 24, bottom="rest")   # nothing would remain
    with pytest.raises(ValueError):
        ka.kernel_motion([0, 1], [kern, kern], 5, bottom="smallest")


# --------------------------------------------------------------------------------------
# the scripts
# --------------------------------------------------------------------------------------
META = {"model": "cnn", "width": 2, "num_classes": 10, "input_shape": [8, 8, 1], "dataset": "digits", "phase": 1,
        "dynamics": "standard"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory of two cnn (width 2) checkpoints on digits, epochs 0 and 1."""
    run_dir = tmp_path_factory.mktemp("run")
    init, apply = models.get_model("cnn", 10, 2)
    params, state = jax.jit(init, static_argnums=2)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)
    moved = _perturbed(params, 0.2, 2)
    for epoch, p in ((0, params), (1, moved)):
        checkpoints.save_checkpoint(str(run_dir / f"parameters_checkpoint_{epoch}.pkl"), p, params, state,
                                    dict(META, epoch=epoch))
    return run_dir, apply, moved, state


def test_calculate_kernel_full_writes_the_full_kernel(tiny_run, digits):
    import calculate_kernel
    run_dir, apply, moved, state = tiny_run
    ckpt = str(run_dir / "parameters_checkpoint_1.pkl")
    out = calculate_kernel.main(["--model_path", ckpt, "--dataset_size", "10", "--full", "--save_name", "k",
                                 "--no_progress"])
    path = str(run_dir / "k_full_10.pkl")
    assert out["path"] == path
    saved = utils.restricted_load(path)
    assert saved["kernel"].shape == (10, 10, 10, 10) and saved["full"] is True and saved["inputs"]["full"] is True
    assert saved["class_index"] == -1 and saved["engine"]["full"]
    for key in ("labels", "indices", "dataset", "model", "width", "num_classes", "dataset_size", "random_seed"):
        assert key in saved, key
    x = jnp.asarray(digits.x_train[saved["indices"]])
    assert _rel(saved["kernel"], explicit_full(ntk.NetFn(apply, state), moved, x)) < 1e-5
    # the same call again replaces it; a kernel of another kind at the same name never does
    calculate_kernel.main(["--model_path", ckpt, "--dataset_size", "10", "--full", "--save_name", "k",
                           "--no_progress"])
    code, _, err = call("calculate_kernel", ["--model_path", ckpt, "--dataset_size", "10", "--save_name", "k_full",
                                             "--no_progress"], str(run_dir))
    assert code == 2 and err.count("\n") == 1 and "already holds a full kernel" in err, err
    other = {k: v for k, v in saved.items() if k != "full"}   # a mean kernel's file, as calculate_kernel writes it
    other["kernel"] = np.einsum("ijcc->ij", saved["kernel"]) / 10
    other["inputs"] = {k: v for k, v in saved["inputs"].items() if k != "full"}
    utils.atomic_pickle(str(run_dir / "m_full_10.pkl"), other)
    code, _, err = call("calculate_kernel", ["--model_path", ckpt, "--dataset_size", "10", "--save_name", "m", "--full",
                                             "--no_progress"], str(run_dir))
    assert code == 2 and err.count("\n") == 1 and "--full" in err, err
    # readers that need an [n, n] kernel refuse it in one line
    import ntk_inputs
    with pytest.raises(UserError, match="full kernel"):
        ntk_inputs.load_kernel_file(path)
    code, _, err = call("visualize_ntk_features", ["--model_path", ckpt, "--kernel_path", path], str(run_dir))
    assert code == 2 and err.count("\n") == 1 and "full kernel" in err, err


@pytest.mark.parametrize("argv,message", [
    (["--class_index", "0"], "give no --class_index"),
    (["--arch", "fc", "--depth", "1", "--dataset", "digits"], "--full is the empirical NTK of a checkpoint"),
    (["--method", "structured"], "not structured"),
])
def test_calculate_kernel_full_bad_inputs_are_one_line(tiny_run, argv, message):
    run_dir = tiny_run[0]
    base = [] if "--arch" in argv else ["--model_path", str(run_dir / "parameters_checkpoint_0.pkl")]
    code, _, err = call("calculate_kernel", base + ["--full", "--dataset_size", "10", "--no_progress"] + argv,
                        str(run_dir))
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_dynamics_full_is_tsilivis_kempes_motion(tiny_run, tmp_path):
    import analyze_ntk
    run_dir = tiny_run[0]
    argv = ["dynamics", "--runs", str(run_dir), "--dataset_size", "10", "--k", "3", "--full", "--no_progress"]
    s = analyze_ntk.main(argv + ["--out_dir", str(tmp_path / "a")])
    r = s["runs"][os.path.basename(str(run_dir))]
    assert s["full"] and s["bottom"] == "rest" and "all its other" in s["definitions"]["top/bottom"]
    assert r["eigenspaces"] == {"size": 100, "top_count": 3, "bottom": "rest", "bottom_count": 97}
    assert r["polar"]["bottom"]["radius"][-1] == pytest.approx(1) and r["distance_matrix"][0][1] > 0
    assert json.loads((tmp_path / "a" / "dynamics.json").read_text())["bottom"] == "rest"
    cache = sorted((tmp_path / "a" / "kernel_cache").rglob("*.pkl"))
    assert [p.name for p in cache] == ["kernel_epoch_0_full_10.pkl", "kernel_epoch_1_full_10.pkl"]
    # the cached full kernels as --kernel_files give the same numbers; without --full they are refused
    files = [str(p) for p in cache]
    s2 = analyze_ntk.main(["dynamics", "--kernel_files"] + files + ["--k", "3", "--full", "--no_progress",
                                                                    "--out_dir", str(tmp_path / "b")])
    assert np.allclose(s2["runs"]["run0"]["distance_matrix"], r["distance_matrix"])
    assert s2["runs"]["run0"]["polar"] == r["polar"]
    code, _, err = call("analyze_ntk", ["dynamics", "--kernel_files"] + files + ["--out_dir", "c"], str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "analyse it with --full" in err, err
    # an output of the full analysis is not replaced by another kind; --full with a class is refused
    code, _, err = call("analyze_ntk", argv[:-2] + ["--no_progress", "--out_dir", "a"], str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "full-kernel analysis" in err, err
    code, _, err = call("analyze_ntk", argv + ["--class_index", "2", "--out_dir", "d"], str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "give no --class_index" in err, err
