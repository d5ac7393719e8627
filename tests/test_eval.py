"""eval_and_make_adv.py end to end on tiny digits checkpoints: outputs, dumped examples fed back
through --test_path, transfer, linearized components, --no_adv and bad input."""
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import eval_and_make_adv as ev
import models
import checkpoints
from tests.test_attacks import train_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meta(model, phase, dynamics, width=64):
    return {"model": model, "width": width, "num_classes": 10, "input_shape": [8, 8, 1],
            "dataset": "digits", "epoch": 1, "phase": phase, "dynamics": dynamics}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints: a trained MLP (phase 1), another MLP for transfer, and a phase-2 linearized
    width-2 ResNet with BatchNorm statistics."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        _, params, state = train_digits("mlp_skinny", 150, 1e-3, seed=seed)
        paths[name] = str(root / name / "parameters_final.pkl")
        checkpoints.save_checkpoint(paths[name], params, params, state, _meta("mlp_skinny", 1, "standard"))
    ds = data.load_dataset("digits")
    init, apply = models.get_model("resnet18", 10, width=2)
    theta0, state = models.random_variables(init, (1, 8, 8, 1), seed=0)   # the logits layer too: not zero
    _, state = jax.jit(apply, static_argnums=4)(theta0, state, None, ds.x_train[:256], True)  # BN statistics
    theta = jax.tree_util.tree_map(lambda a, b: a + 0.3 * b, theta0, models.random_variables(init, (1, 8, 8, 1), seed=1)[0])
    paths["lin"] = str(root / "lin" / "parameters_final.pkl")
    checkpoints.save_checkpoint(paths["lin"], theta0, theta, state, _meta("resnet18", 2, "linear", width=2))
    return paths


def run_eval(*argv):
    args = ev.build_parser().parse_args(list(argv))
    return ev.run(args)


def _outputs(model_path, bonus_dir, save_name):
    d = os.path.join(os.path.dirname(model_path), bonus_dir)
    with open(os.path.join(d, f"test_results_{save_name}.pkl"), "rb") as f:
        res = pickle.load(f)
    with open(os.path.join(d, f"test_results_{save_name}.json")) as f:
        summary = json.load(f)
    adv = None
    if os.path.exists(os.path.join(d, f"adv_examples_{save_name}.pkl")):
        with open(os.path.join(d, f"adv_examples_{save_name}.pkl"), "rb") as f:
            adv = pickle.load(f)
    return res, summary, adv


@pytest.mark.slow   # end to end
def test_dumped_examples_reproduce_robust_accuracy_and_transfer(ckpts):
    eps = 20.0   # in 1/255: large enough on 8x8 digits for the attack to bite
    run_eval("--model_path", ckpts["a"], "--save_examples", "--bonus_dir", "out", "--save_name", "a",
             "--eps", str(eps), "--pgd_steps", "20", "--attack", "ensemble", "--n_target_classes", "3",
             "--fab_steps", "5", "--square_queries", "50")
    res, summary, adv = _outputs(ckpts["a"], "out", "a")
    ds = data.load_dataset("digits")
    n = len(ds.y_test)
    assert set(res) >= {"acc_clean", "acc_dirty", "predictions_clean", "predictions_dirty",
                        "components_clean", "components_dirty"}
    assert res["acc_dirty"] < res["acc_clean"]
    assert res["predictions_dirty"].shape == (n,) and res["components_dirty"]["f"].shape == (n, 10)
    for k in ("attack", "norm", "eps", "steps", "step_size", "restarts", "n_images", "dynamics", "warnings"):
        assert k in summary
    assert summary["attack"] == "ensemble" and summary["n_images"] == n and summary["steps"] == 20
    assert summary["eps"] == pytest.approx(eps / 255) and summary["dynamics"] == "standard"
    assert list(summary["per_attack"]) == ["apgd-ce", "apgd-dlr", "fab-t", "square"]
    assert summary["attack_config"]["square_queries"] == 50 and summary["attack_config"]["fab_steps"] == 5
    assert summary["per_attack"]["square"]["cumulative_correct"] == summary["correct_robust"]

    # Dumped examples: N x C x H x W, labels, inside the eps-ball of their clean image and [0,1].
    images = adv["images"]
    assert images.shape == (n, 1, 8, 8) and np.array_equal(adv["labels"], ds.y_test)
    clean = ds.x_test.transpose(0, 3, 1, 2)
    assert images.min() >= 0 and images.max() <= 1
    assert np.abs(images - clean).max() <= eps / 255 + 1e-6

    # Fed back to the same model they give the robust accuracy it reported...
    path = os.path.join(os.path.dirname(ckpts["a"]), "out", "adv_examples_a.pkl")
    run_eval("--model_path", ckpts["a"], "--test_path", path, "--no_adv", "--bonus_dir", "back",
             "--save_name", "a")
    back, back_summary, _ = _outputs(ckpts["a"], "back", "a")
    assert back["acc_clean"] == pytest.approx(res["acc_dirty"])
    assert np.array_equal(back["predictions_clean"], res["predictions_dirty"])
    assert back_summary["images"] == path
    # ...and to another model a transfer accuracy, between its robust and clean accuracy range.
    run_eval("--model_path", ckpts["b"], "--test_path", path, "--no_adv", "--bonus_dir", "transfer",
             "--save_name", "from_a")
    transfer, _, _ = _outputs(ckpts["b"], "transfer", "from_a")
    assert 0.0 <= transfer["acc_clean"] <= 1.0 and transfer["acc_clean"] > res["acc_dirty"]


def test_linearized_components_are_the_logits_used(ckpts):
    run_eval("--model_path", ckpts["lin"], "--linear", "--bonus_dir", "o", "--save_name", "lin",
             "--test_size", "60", "--batch_size", "32", "--pgd_steps", "5", "--eps", "8")
    res, summary, _ = _outputs(ckpts["lin"], "o", "lin")
    assert summary["dynamics"] == "linear" and summary["n_images"] == 60
    assert summary["parameters"] == "theta=lin_params, theta0=params"
    ckpt = checkpoints.load_checkpoint(ckpts["lin"])
    _, apply = models.get_model("resnet18", 10, width=2)
    ds = data.load_dataset("digits")   # --test_size: the run's seeded class-balanced subset
    seed = ckpt["meta"].get("random_seed", 0)   # the run's seed, else eval's --random_seed (0)
    x, _, _ = data.balanced_subset(ds.x_test, ds.y_test, 60, seed, 10)
    logits, _ = jax.jit(lambda t, t0, s, xx: models.dynamics_apply(apply, "linear", t, t0, s, xx))(
        ckpt["lin_params"], ckpt["params"], ckpt["net_state"], jnp.asarray(x))
    for which in ("clean", "dirty"):
        comps = res[f"components_{which}"]
        total = comps["f"] + comps["df"]
        assert np.abs(comps["df"]).max() > 1e-3      # theta != theta0: a real linear term
        assert np.array_equal(np.argmax(total, 1), res[f"predictions_{which}"])
    np.testing.assert_allclose(res["components_clean"]["f"] + res["components_clean"]["df"], logits,
                               rtol=1e-4, atol=1e-4)


def test_no_adv_gives_robust_equal_to_clean(ckpts):
    run_eval("--model_path", ckpts["a"], "--no_adv", "--bonus_dir", "noadv", "--save_name", "x",
             "--short", "--batch_size", "20")
    res, summary, _ = _outputs(ckpts["a"], "noadv", "x")
    assert res["acc_dirty"] == res["acc_clean"] and summary["n_images"] == 200
    assert np.array_equal(res["predictions_dirty"], res["predictions_clean"])
    assert summary["attack"] is None and summary["acc_robust"] is None


def _bad(tmp_path, name, obj):
    p = tmp_path / name
    with open(p, "wb") as f:
        pickle.dump(obj, f)
    return str(p)


def test_bad_inputs_are_clear_errors(ckpts, tmp_path, capsys):
    x = np.full((4, 1, 8, 8), 0.5, np.float32)
    y = np.arange(4)
    cases = {
        "no_labels.pkl": ({"images": x}, "'images' and 'labels'"),
        "nhwc.pkl": ({"images": x.transpose(0, 2, 3, 1), "labels": y}, "N x C x H x W"),
        "flat.pkl": ({"images": x.reshape(4, 64), "labels": y}, "N x C x H x W"),
        "cifar.pkl": ({"images": np.zeros((4, 3, 32, 32), np.float32), "labels": y}, "model takes"),
        "uint8.pkl": ({"images": (x * 255).astype(np.uint8), "labels": y}, "[0, 1]"),
        "labels.pkl": ({"images": x, "labels": np.array([0, 1, 2, 10])}, "labels must lie in [0, 9]"),
    }
    out_dir = os.path.join(os.path.dirname(ckpts["a"]), "bad")
    for name, (obj, message) in cases.items():
        path = _bad(tmp_path, name, obj)
        with pytest.raises(SystemExit) as e:
            ev.main(["--model_path", ckpts["a"], "--test_path", path, "--bonus_dir", "bad"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (name, err)
        assert not os.path.exists(os.path.join(out_dir, "test_results_test_results.pkl"))
    with pytest.raises(SystemExit):
        ev.main(["--model_path", ckpts["a"], "--eps", "-1"])
    assert "--eps and --l2_eps must be >= 0" in capsys.readouterr().err
    # A flag contradicting the checkpoint's meta.
    with pytest.raises(SystemExit):
        ev.main(["--model_path", ckpts["a"], "--model", "resnet18", "--no_adv"])
    assert "mlp_skinny" in capsys.readouterr().err


@pytest.mark.slow   # end to end
def test_readme_example_5_runs_as_written(ckpts, tmp_path):
    """The reference README's example 5, verbatim, from a directory holding its checkpoint
    (a linearized+centered phase-2 file; its meta says digits, so ./data is not needed)."""
    target = tmp_path / "saved_model_loaded_centering_phase_2"
    target.mkdir()
    ckpt = checkpoints.load_checkpoint(ckpts["a"])
    theta = jax.tree_util.tree_map(lambda p: p * 1.05, ckpt["params"])
    checkpoints.save_checkpoint(str(target / "parameters_final.pkl"), ckpt["params"], theta, ckpt["net_state"],
                          _meta("mlp_skinny", 2, "centered"))
    cmd = ("python3 eval_and_make_adv.py --model_path ./saved_model_loaded_centering_phase_2/parameters_final.pkl "
           "--linear --centering --save_examples --bonus_dir test_results --random_seed 0")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    argv = cmd.split()
    argv[1] = os.path.join(ROOT, argv[1])
    proc = subprocess.run([sys.executable] + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = target / "test_results"
    assert sorted(os.listdir(out)) == ["adv_examples_test_results.pkl", "test_results_test_results.json",
                                       "test_results_test_results.pkl"]
    summary = json.loads((out / "test_results_test_results.json").read_text())
    assert summary["dynamics"] == "centered" and summary["attack"] == "pgd" and summary["steps"] == 100
    assert summary["eps"] == pytest.approx(4 / 255)
    assert not any("exceeds clean" in w for w in summary["warnings"])
    assert summary["acc_robust"] <= summary["acc_clean"]
