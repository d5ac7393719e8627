"""Tsilivis & Kempe's training recipe in run_exp.py: their CNN and CNN_mega, FGSM training as one
eps step, and one step of their recipe (plain SGD on PGD examples only) against a hand-written
one; the reference's defaults unchanged; bad recipe flags."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attacks
import checkpoints
import experiment
import models
import run_exp
import train
from utils import UserError


def n_params(name, input_shape, width=32):
    init, _ = models.get_model(name, 10, width)
    shapes, _ = jax.eval_shape(lambda k, x: init(k, x, True), jax.random.PRNGKey(0), jnp.zeros((1,) + input_shape))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


def test_the_networks_have_the_parameter_counts_of_the_flax_originals():
    # Counted by hand from robust_train_CNN.py's layers (3x3 convs with biases, 2x2 pools, SAME):
    # CNN_mega on MNIST: 28 -> maxpool 14 -> avgpool 7, Dense(7*7*128 -> 10).
    convs = [(1, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    mega = sum(9 * i * o + o for i, o in convs) + 7 * 7 * 128 * 10 + 10
    assert n_params("cnn_mega", (28, 28, 1)) == mega == 349162
    # CNN on CIFAR: 32 -> 16 -> 8, Dense(8*8*64 -> 256), Dense(256 -> 10).
    cnn = 9 * 3 * 32 + 32 + 9 * 32 * 64 + 64 + 8 * 8 * 64 * 256 + 256 + 256 * 10 + 10
    assert n_params("cnn", (32, 32, 3)) == cnn
    assert models.default_width("cnn_mega") == 32 and models.default_width("resnet18") == 64


def tiny_exp(args_list):
    """A stand-in for experiment.Run with what adversarial_batch reads: the linear classifier."""
    args = run_exp.build_parser().parse_args(args_list)
    init, apply = models.get_model("linear", 10, 8)
    params, state = init(jax.random.PRNGKey(1), jnp.zeros((2, 8, 8, 1)), True)

    class Exp:
        eps = args.eps / 255
        attack = experiment.train_attack(args)

        @staticmethod
        def predict(dynamics):
            return attacks.make_predict(apply, dynamics)
    return Exp, train.TrainState(params, state, None, 0), apply


def cross_entropy_grad(apply, params, state, x, y):
    return jax.grad(lambda z: train.cross_entropy(apply(params, state, None, z, False)[0], y))(x)


def test_fgsm_training_takes_exactly_one_eps_step_from_the_clean_image():
    exp, st, apply = tiny_exp(["--loaders", "AC", "--train_attack", "fgsm", "--eps", "8"])
    assert exp.attack == {"steps": 1, "step_size": 8 / 255, "random_start": False, "clip_iterates": True}
    x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 0.9, (6, 8, 8, 1)), jnp.float32)
    y = jnp.arange(6) % 10
    x_adv = experiment.adversarial_batch(exp, st, st.params, x, y, "standard", jax.random.PRNGKey(3))
    g = cross_entropy_grad(apply, st.params, st.net_state, x, y)
    np.testing.assert_allclose(x_adv, jnp.clip(x + 8 / 255 * jnp.sign(g), 0, 1), atol=1e-6)
    moved = np.abs(np.asarray(x_adv - x))
    np.testing.assert_allclose(moved[np.asarray(g) != 0], 8 / 255, atol=1e-6)   # every pixel moved by eps


def test_the_reference_defaults_are_unchanged():
    args = run_exp.build_parser().parse_args([])
    assert (args.momentum, args.lr_schedule, args.adv_only, args.train_attack) == (0.9, "reference", False, "pgd")
    assert experiment.train_attack(args) == {"steps": 20, "step_size": 2 * (4 / 255) / 20, "random_start": True,
                                            "clip_iterates": True}
    assert train.phase1_lr(120, 0.1) == pytest.approx(0.01)
    assert train.phase1_lr(120, 0.01, "constant") == 0.01


def hand_pgd(apply, params, state, x, y, eps, alpha, steps):
    """Tsilivis & Kempe's pgd_attack: sign steps of alpha from the clean image, the
    perturbation clipped to [-eps, eps], the image to [0, 1]."""
    delta = jnp.zeros_like(x)
    for _ in range(steps):
        delta = jnp.clip(delta + alpha * jnp.sign(cross_entropy_grad(apply, params, state, x + delta, y)), -eps, eps)
    return jnp.clip(x + delta, 0, 1)


@pytest.mark.slow
def test_one_step_of_the_recipe_is_plain_sgd_on_the_pgd_examples(tmp_path):
    """One batch (the whole tiny training set) of PGD-20 (step 2/255, no random start, iterates
    clipped to [0, 1] only at the end), adversarial
    only, SGD lr 0.01 without momentum: the saved parameters after it equal a hand-written step.
    On the linear classifier, whose input gradients are far from zero (at a CNN's initialisation
    they are tiny, and the sign steps turn on rounding)."""
    run_exp.run(run_exp.build_parser().parse_args([
        "--dataset", "digits", "--model", "linear", "--train_size", "50", "--batch_size", "50",
        "--test_size", "100", "--loaders", "AC", "--adv_only", "--eps", "8", "--train_steps", "20",
        "--train_step_size", "2", "--no_train_random_start", "--clip_at_end", "--lr", "0.01", "--momentum", "0",
        "--lr_schedule", "constant", "--standard_epochs", "1", "--linear_epochs", "0", "--skip_first_test",
        "--constant_save", "--no_progress", "--save_path", str(tmp_path)]))
    before = checkpoints.load_checkpoint(str(tmp_path / "parameters_checkpoint_0.pkl"))
    after = checkpoints.load_checkpoint(str(tmp_path / "parameters_checkpoint_1.pkl"))
    assert after["meta"]["training"] == {
        "optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "lr_schedule": "constant", "adv_only": True,
        "eps": 8 / 255, "attack": "pgd", "steps": 20, "step_size": 2 / 255, "random_start": False,
        "clip_iterates": False}
    _, apply = models.get_model("linear", 10, 64)
    import data
    ds = data.load_dataset("digits")
    x, y, _ = data.balanced_subset(ds.x_train, ds.y_train, 50, 0, 10)
    x, y = jnp.asarray(x), jnp.asarray(y)
    p0, s0 = before["params"], before["net_state"]
    x_adv = hand_pgd(apply, p0, s0, x, y, 8 / 255, 2 / 255, 20)
    grads = jax.grad(lambda p: train.cross_entropy(apply(p, s0, None, x_adv, True)[0], y))(p0)
    want = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, p0, grads)
    for w, got in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(after["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-4, atol=1e-6)
    moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), want, p0))
    assert max(moved) > 1e-4   # the step did move the parameters


@pytest.mark.parametrize("argv, message", [
    (["--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["--train_step_size", "0"], "--train_step_size is in 1/255 units"),
    (["--train_attack", "fgsm", "--train_steps", "5"], "--train_steps is for --train_attack pgd"),
    (["--train_attack", "fgsm", "--no_train_random_start"], "--no_train_random_start is for --train_attack pgd"),
    (["--train_attack", "fgsm", "--clip_at_end"], "--clip_at_end is for --train_attack pgd"),
])
def test_bad_recipe_flags_are_one_line_errors(argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run_exp.validate(run_exp.build_parser().parse_args(argv))
