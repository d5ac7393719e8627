"""Data parallelism (parallel.py) on 4 forced CPU devices equals one device.

XLA_FLAGS=--xla_force_host_platform_device_count=N only takes effect before jax is imported, so
this file is also the worker: `python tests/test_multidevice.py OUT.npz` computes, on however
many devices its environment gives it, a short run_exp.py run (adversarial phase 1 and phase 2,
batch 16 over 110 images, so the last batch of 14 does not divide by 4), evaluations under both
ensembles with batch size 10 (padded to 12 on 4 devices), and empirical NTKs of a small MLP
(symmetric and cross, layer-structured and generic paths, chunks that do not divide the
images). The test runs it once with 1 device and once with 4, side by side, and compares.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # multi-process: `pytest -m "not slow"` skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4


# --------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------
def worker(out_path):
    """Every piece of work the test compares, on this process's devices, saved to `out_path`."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    import data
    import models
    import parallel

    res, info = {}, {"devices": jax.device_count(), "parallel_devices": parallel.num_devices()}

    # shard_batch's padding info and fallback
    x10 = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    padded, n = parallel.shard_batch(x10)
    info["pad_shape"], info["pad_n"] = list(padded.shape), n
    fallback, _ = parallel.shard_batch(x10, pad=False)
    info["nopad_shape"] = list(fallback.shape)
    info["nopad_replicated"] = bool(fallback.sharding.is_fully_replicated)

    ckpt = _train(res, info)
    ds = data.load_dataset("digits")
    init, apply = models.get_model("mlp_skinny", 10)
    theta0 = jax.tree_util.tree_map(jnp.asarray, ckpt["params"])
    theta = jax.tree_util.tree_map(jnp.asarray, ckpt["lin_params"])
    state = {}

    _direct_step(res, info, apply, theta0, state, ds)
    _evaluate(res, info, apply, theta, theta0, state, ds)
    _kernels(res, info, apply, theta, state, ds)
    np.savez(out_path, info=json.dumps(info), **res)


def _train(res, info):
    """1. Training through run_exp.py: adversarial (PGD-20) steps in phase 1 and in phase 2
    (linearized), evaluation with PGD, final parameters. Returns the final checkpoint."""
    import jax

    import checkpoints
    import run_exp
    with tempfile.TemporaryDirectory() as tmp:
        run_exp.main(["--dataset", "digits", "--model", "mlp_skinny", "--train_size", "110",
                      "--test_size", "30", "--batch_size", "16", "--standard_epochs", "1",
                      "--linear_epochs", "1", "--loaders", "AA", "--eps", "8", "--pgd_eval_steps", "3",
                      "--save_models", "--no_progress", "--save_path", tmp])
        ckpt = checkpoints.load_checkpoint(os.path.join(tmp, "parameters_final.pkl"))
        with open(os.path.join(tmp, "results.json")) as f:
            info["results"] = json.load(f)
        with open(os.path.join(tmp, "metrics.jsonl")) as f:
            epochs = [json.loads(line) for line in f if '"epoch"' in line]
        info["epoch_acc"] = [e["acc"] for e in epochs if e.get("event") == "epoch"]
        res["epoch_loss"] = np.array([e["loss"] for e in epochs if e.get("event") == "epoch"])
    for name in ("params", "lin_params"):
        for i, leaf in enumerate(jax.tree_util.tree_leaves(ckpt[name])):
            res[f"train_{name}_{i}"] = np.asarray(leaf)

    return ckpt


def _direct_step(res, info, apply, theta0, state, ds):
    """One direct train step: the updated parameters stay replicated."""
    import jax
    import jax.numpy as jnp

    import parallel
    import train
    opt = train.make_optimizer(0.1)
    step = train.make_train_step(apply, "standard", True, opt)
    ts = parallel.replicate(train.TrainState(theta0, state, opt.init(theta0), jnp.zeros((), jnp.int32)))
    (xb, yb), _ = parallel.shard_batch((ds.x_train[:16], ds.y_train[:16]), pad=False)
    ts, _ = step(ts, theta0, xb, yb)
    info["step_params_replicated"] = all(leaf.sharding.is_fully_replicated
                                         for leaf in jax.tree_util.tree_leaves(ts.params))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(ts.params)):
        res[f"step_params_{i}"] = np.asarray(leaf)



def _evaluate(res, info, apply, theta, theta0, state, ds):
    """2. The evaluator under the fast ensemble (PGD, APGD-CE, APGD-T), linearized dynamics,
    batch 10 over 25 images; then AutoAttack's standard set."""
    import jax

    import attacks
    cfg = attacks.AttackConfig(norm="linf", eps=8 / 255, step_size=2 / 255, steps=5, name="ensemble-fast",
                               n_targets=2)
    ev = attacks.evaluate(attacks.make_predict(apply, "linear"), (theta, theta0, state), ds.x_test[:25],
                          ds.y_test[:25], batch_size=10, attack=cfg, key=jax.random.PRNGKey(3),
                          keep_examples=True, components=attacks.make_components(apply, "linear"))
    info["eval_counts"] = {"clean": ev["correct_clean"], "adv": ev["correct_adv"],
                           **{k: v["correct"] for k, v in ev["attacks"].items()}}
    for k in ("predictions_clean", "predictions_adv", "x_adv"):
        res[f"eval_{k}"] = ev[k]
    res["eval_df_adv"] = ev["components_adv"]["df"]
    # AutoAttack's standard set: members re-batch the examples still robust (padded again).
    cfg = attacks.AttackConfig(norm="linf", eps=8 / 255, steps=5, name="ensemble", n_targets=2, fab_steps=5,
                               square_queries=30)
    aa = attacks.evaluate(attacks.make_predict(apply, "linear"), (theta, theta0, state), ds.x_test[:25],
                          ds.y_test[:25], batch_size=10, attack=cfg, key=jax.random.PRNGKey(3), keep_examples=True)
    info["aa_breakdown"] = aa["attacks"]
    res["eval_predictions_aa"], res["aa_x_adv"] = aa["predictions_adv"], aa["x_adv"]



def _kernels(res, info, apply, theta, state, ds):
    """3. The NTK engine: a small budget so the 10 images span several chunks."""
    import jax

    import ntk
    import parallel
    f = ntk.NetFn(apply, state)
    x1, x2 = ds.x_test[:10], ds.x_test[10:16]
    stats = {}
    res["ntk_sym"] = ntk.empirical_ntk(f, theta, x1, class_index=-1, memory_gb=0.003, stats=stats)
    info["ntk_chunk"], info["ntk_stats_devices"] = stats["chunk"], stats["devices"]
    res["ntk_cross"] = ntk.empirical_ntk(f, theta, x1, x2, class_index=3, memory_gb=0.003)
    res["ntk_generic"] = ntk.empirical_ntk(lambda p, x: apply(p, state, None, x, False)[0], theta, x1,
                                           class_index=-1, method="jacobian")
    # Rows come out sharded along the batch axis.
    classes = ntk.classes_of(-1, 10)
    layers = ntk.discover_layers(f, theta, x1.shape[1:], len(classes))
    rows_fn = jax.jit(ntk.make_rows_fn(f, classes, layers))  # what the engine jits
    dense, blocks = rows_fn(parallel.replicate(theta), parallel.shard_batch(x1[:8])[0])
    info["rows_specs"] = [str(a.sharding.spec) if hasattr(a.sharding, "spec") else str(a.sharding)
                          for a in [dense] + [t for blk in blocks for t in blk]]
    info["rows_sharded"] = not any(a.sharding.is_fully_replicated for a in [dense] + [t for blk in blocks for t in blk])


# --------------------------------------------------------------------------------------
# Test
# --------------------------------------------------------------------------------------
def _start(devices, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu", NTK_DATA_PARALLEL="1",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), out], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_four_devices_equal_one(tmp_path):
    outs = {d: str(tmp_path / f"dev{d}.npz") for d in (1, DEVICES)}
    procs = {d: _start(d, outs[d]) for d in outs}  # side by side: the two halves of the work
    for d, p in procs.items():
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{d}-device worker failed:\n{log[-4000:]}"
    one, many = (np.load(outs[d]) for d in (1, DEVICES))
    info1, info4 = json.loads(str(one["info"])), json.loads(str(many["info"]))

    # The setups are what they claim to be.
    assert (info1["devices"], info1["parallel_devices"]) == (1, 1)
    assert (info4["devices"], info4["parallel_devices"]) == (DEVICES, DEVICES)
    assert (info1["pad_shape"], info1["pad_n"], info1["nopad_shape"]) == ([10, 3], 10, [10, 3])
    assert (info4["pad_shape"], info4["pad_n"]) == ([12, 3], 10)
    assert info4["nopad_shape"] == [10, 3] and info4["nopad_replicated"]
    assert info4["step_params_replicated"]
    assert info4["rows_sharded"], info4["rows_specs"]
    assert info4["ntk_stats_devices"] == DEVICES and info4["ntk_chunk"] % DEVICES == 0
    assert info1["ntk_chunk"] < 10 and info4["ntk_chunk"] < 10  # several chunks, last one padded

    # Counts are exact; accuracies, being count / n, too.
    assert info4["eval_counts"] == info1["eval_counts"]
    assert info4["results"] == info1["results"]
    assert info4["epoch_acc"] == info1["epoch_acc"]
    np.testing.assert_array_equal(many["eval_predictions_clean"], one["eval_predictions_clean"])
    np.testing.assert_array_equal(many["eval_predictions_adv"], one["eval_predictions_adv"])
    assert info4["aa_breakdown"] == info1["aa_breakdown"]
    np.testing.assert_array_equal(many["eval_predictions_aa"], one["eval_predictions_aa"])

    # Floats within tolerance; the measured differences are printed (pytest -s).
    diffs = {}
    for key in one.files:
        if key == "info" or key.startswith("eval_predictions"):
            continue
        a, b = one[key], many[key]
        assert a.shape == b.shape, key
        scale = max(float(np.abs(a).max()), 1e-12)
        diffs[key] = (float(np.abs(a - b).max()), float(np.abs(a - b).max()) / scale)
    worst = {}
    for key, (abs_d, rel_d) in diffs.items():
        group = key.rsplit("_", 1)[0] if key[-1].isdigit() else key
        worst[group] = max(worst.get(group, (0.0, 0.0)), (abs_d, rel_d))
    print("max |1 device - 4 devices| (abs, relative to max |value|):",
          {k: f"{a:.2e}, {r:.2e}" for k, (a, r) in worst.items()})
    for key, (abs_d, rel_d) in diffs.items():
        if key.startswith("ntk"):
            assert rel_d < 1e-5, (key, rel_d)
        elif key == "eval_x_adv":
            assert abs_d < 1e-5, (key, abs_d)
        else:  # trained parameters, losses, logits
            assert rel_d < 1e-4, (key, rel_d)


if __name__ == "__main__":
    worker(sys.argv[1])
