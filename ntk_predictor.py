"""The kernel predictor of a checkpoint's NTK and the analyses on it (analyze_ntk.py features
and attack; the maths is kernel_analysis.py's, the kernels ntk.py's).

The predictor is f(x) = K(x,X) (K(X,X) + r I)^-1 Y on class-balanced training images X, with Y
the centered one-hot labels (onehot - 1/C) and r = --ridge * mean(diag K(X,X)). Its
eigen-features are f_i(x) = (lambda_i + r)^-1 K(x,X) u_i u_i^T Y (sum_i f_i = f exactly).

* `feature_analysis`: per eigen-index, usefulness (clean accuracy and label correlation of f_i
  on test images) and robustness (accuracy of f_i under an L-inf PGD attack on f_i itself, and
  accuracy of the full predictor on those feature-attacked images).
* `predictor_attack`: training-free adversarial examples, FGSM or PGD on the input gradient of
  the predictor (K(x,X) is differentiated in x through ntk.cross_kernel); `network_transfer`
  evaluates the checkpoint's network on them.

--classes restricts the task (the images and the targets), never the kernel: K is the
network's NTK over the logits that --class_index selects.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attacks
import cli
import data
import kernel_analysis as ka
import ntk
import parallel
from ntk_inputs import load_data, open_network
from utils import UserError


class PredictorSetup:
    """Everything a kernel-predictor analysis needs: network, images, kernels, fitted predictor.

    Attributes: net, f, params, x_train [n,H,W,C], y_train [n] (task labels 0..C'-1),
    train_indices, x_test [m,H,W,C], y_test [m] (task labels), test_indices, classes (original
    label of each task class), k_train_train [n,n], k_test_train [m,n], predictor (EigenPredictor),
    ridge (absolute), kernel_vars (ntk.cross_kernel's: parameters, BatchNorm state, X's gradient
    rows), logits_fn ((kernel_vars, weights), x) -> K(x,X) @ weights, jit-stable), kernel_at(x)."""

    def __init__(self, args):
        """Check every input and draw the image subsets (no kernel yet: see `fit`)."""
        for flag in ("n_train", "n_test", "steps", "batch_size"):
            if getattr(args, flag) <= 0:
                raise UserError(f"--{flag} must be positive (got {getattr(args, flag)})")
        if not (0 <= args.eps < float("inf") and 0 <= args.ridge < float("inf")):
            raise UserError(f"--eps and --ridge must be finite and >= 0 (got {args.eps:g} and {args.ridge:g})")
        self.net = net = open_network(args.model_path, args)
        cli.check_class_index(args.class_index, net.num_classes, net.dataset)
        classes = list(range(net.num_classes)) if args.classes is None else sorted(set(args.classes))
        if len(classes) < 2 or any(not 0 <= c < net.num_classes for c in classes):
            raise UserError(f"--classes needs at least 2 distinct classes in [0, {net.num_classes - 1}] (got {args.classes})")
        self.classes = np.asarray(classes)
        n_classes = len(classes)
        for flag in ("n_train", "n_test"):
            if getattr(args, flag) % n_classes:
                raise UserError(f"--{flag} {getattr(args, flag)} is not divisible by the number of classes ({n_classes})")
        ds = load_data(net.dataset, args.data_dir, net.input_shape)

        def task_subset(x, y, size):
            pool = np.flatnonzero(np.isin(y, self.classes))
            task_y = np.searchsorted(self.classes, y[pool]).astype(np.int32)
            idx = data.balanced_indices(task_y, size // n_classes, args.random_seed, n_classes)
            return x[pool[idx]], task_y[idx], pool[idx]

        self.x_train, self.y_train, self.train_indices = task_subset(ds.x_train, ds.y_train, args.n_train)
        self.x_test, self.y_test, self.test_indices = task_subset(ds.x_test, ds.y_test, args.n_test)

    def fit(self, args):
        """The kernels K(X,X), K(x_test,X) and the fitted predictor (the work; inputs are checked)."""
        self.f, self.params = self.net.kernel_fn(args.use_linear_params)
        x_ref = jnp.asarray(self.x_train)
        t0 = time.time()
        # X's gradient rows are computed once and kept (ntk.cross_kernel): K(X, X) is their Gram
        # matrix, and every K(x, X) of a test or attacked image reuses them.
        kernel, self.kernel_vars = ntk.cross_kernel(self.f, self.params, x_ref, class_index=args.class_index)
        self._kernel_jit, self.batch_size = jax.jit(kernel), args.batch_size
        logits_summed = len(ntk.classes_of(args.class_index, self.net.num_classes))  # the network's, not the task's
        self.k_train_train = ntk.reference_kernel(self.kernel_vars, logits_summed, args.batch_size)  # [n, n]
        self.k_test_train = self.kernel_at(self.x_test)                                             # [m, n]
        self.kernel_seconds = time.time() - t0
        self.ridge = args.ridge * float(np.mean(np.diag(self.k_train_train)))
        try:
            self.predictor = ka.fit_kernel_predictor(self.k_train_train,
                                                     ka.centered_one_hot(self.y_train, len(self.classes)), self.ridge)
        except ValueError as e:
            raise UserError(f"{e} (--ridge)") from None
        self.logits_fn = ka.make_kernel_logits(kernel)

    def kernel_at(self, x):
        """K(x, X) [m, n] float64, in batches of --batch_size (the last one padded)."""
        x = np.asarray(x, np.float32)
        b = self.batch_size
        out = []
        for start in range(0, len(x), b):
            xb = x[start:start + b]   # padded to one compiled shape; the padded rows are dropped
            out.append(np.asarray(self._kernel_jit(self.kernel_vars, parallel.pad_rows(xb, b)), np.float64)[:len(xb)])
        return np.concatenate(out)

    def accuracy(self, k_test_train, weights):
        """Accuracy on the test images of the predictor K(x,X) @ weights, from K(x_test, X)."""
        return float(np.mean(np.argmax(k_test_train @ weights, -1) == self.y_test))

    def attack(self, args, weights, method, key):
        """Adversarial test images of the predictor K(x,X) @ weights (`method` 'fgsm' or 'pgd')."""
        return ka.attack_kernel_predictor(self.logits_fn, (self.kernel_vars, weights), self.x_test, self.y_test,
                                          method=method,
                                          eps=cli.eps_from_255(args.eps), steps=1 if method == "fgsm" else args.steps,
                                          key=key, batch_size=args.batch_size)

    def describe(self, args):
        return {**self.net.describe(), "use_linear_params": args.use_linear_params,
                "class_index": args.class_index, "classes": self.classes.tolist(),
                "n_train": len(self.y_train), "n_test": len(self.y_test),
                "train_indices": self.train_indices.tolist(), "test_indices": self.test_indices.tolist(),
                "ridge_rel": args.ridge, "ridge_abs": self.ridge, "random_seed": args.random_seed,
                "targets": "centered one-hot (onehot - 1/C)", "kernel_seconds": round(self.kernel_seconds, 2)}


# --------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------
def feature_indices(n, n_features, n_tail):
    """Leading indices 0..n_features-1 plus `n_tail` log-spaced ones up to n-1 (sorted, unique)."""
    head = list(range(min(n_features, n)))
    tail = []
    if n_tail > 0 and n > len(head):
        tail = np.unique(np.round(np.geomspace(max(len(head), 1), n - 1, n_tail)).astype(int)).tolist()
    return sorted(set(head) | set(tail))


def _feature_attacks(setup, args, indices, key):
    """Per eigen-index i: PGD on f_i alone, then the accuracy and label correlation of f_i and the
    full predictor's accuracy on those images. Returns three lists, in the order of `indices`."""
    predictor, n_classes = setup.predictor, len(setup.classes)
    acc_feat_adv, corr_feat_adv, acc_full_on_feat_adv = [], [], []
    with tqdm(total=len(indices), desc="feature attacks", unit="feature", disable=args.no_progress) as bar:
        for i in indices:
            weights = np.outer(predictor["evecs"][:, i], predictor["coefs"][i])     # [n, C]: f_i = K(x,X) weights
            x_adv = setup.attack(args, weights, "pgd", jax.random.fold_in(key, i))
            k_adv = setup.kernel_at(x_adv)
            acc, corr = ka.feature_usefulness(ka.eigen_features(k_adv, predictor, [i]), setup.y_test, n_classes)
            acc_feat_adv.append(float(acc[0]))
            corr_feat_adv.append(float(corr[0]))
            acc_full_on_feat_adv.append(setup.accuracy(k_adv, predictor["alpha"]))
            bar.update(1)
    return acc_feat_adv, corr_feat_adv, acc_full_on_feat_adv


def feature_analysis(setup, args):
    """Fit the predictor and measure the usefulness and robustness of its eigen-features at the
    indices of --n_features and --n_tail, and the full predictor's clean and PGD accuracy.
    Returns the `features` summary from setup.describe to 'features' (one dict per index)."""
    setup.fit(args)
    predictor, n_classes = setup.predictor, len(setup.classes)
    indices = feature_indices(len(setup.y_train), args.n_features, args.n_tail)
    if not indices:
        raise UserError("no eigen-index selected (--n_features 0 and --n_tail 0)")
    feats = ka.eigen_features(setup.k_test_train, predictor, indices)                       # [F, m, C]
    acc_clean, corr_clean = ka.feature_usefulness(feats, setup.y_test, n_classes)
    full_clean = setup.accuracy(setup.k_test_train, predictor["alpha"])
    sum_error = float(np.max(np.abs(ka.eigen_features(setup.k_test_train, predictor).sum(0)
                                    - ka.kernel_predict(setup.k_test_train, predictor))))
    key = jax.random.PRNGKey(args.random_seed)
    x_adv_full = setup.attack(args, predictor["alpha"], "pgd", jax.random.fold_in(key, 10 ** 6))
    full_robust = setup.accuracy(setup.kernel_at(x_adv_full), predictor["alpha"])
    acc_feat_adv, corr_feat_adv, acc_full_on_feat_adv = _feature_attacks(setup, args, indices, key)
    per_index = [{"index": int(i), "eigenvalue": float(predictor["evals"][i]),
                  "acc_clean": float(acc_clean[j]), "corr_clean": float(corr_clean[j]),
                  "acc_feature_attacked": acc_feat_adv[j], "corr_feature_attacked": corr_feat_adv[j],
                  "acc_full_on_feature_attack": acc_full_on_feat_adv[j]} for j, i in enumerate(indices)]
    return {**setup.describe(args), "eps_255": args.eps, "eps": cli.eps_from_255(args.eps),
            "attack": f"L-inf PGD-{args.steps}, step 2eps/steps, cross-entropy on the attacked feature's outputs",
            "chance": 1 / n_classes, "full_predictor": {"acc_clean": full_clean, "acc_robust": full_robust},
            "max_abs_sum_of_features_minus_predictor": sum_error,
            "eigenvalues": predictor["evals"].tolist(), "features": per_index}


def features_report(summary, steps):
    """The `features` summary in words: the full predictor's accuracies (PGD-`steps`) and a table
    with one row per analysed eigen-index."""
    full = summary["full_predictor"]
    lines = [f"kernel predictor ({summary['n_train']} train, {summary['n_test']} test, classes {summary['classes']}): "
             f"clean {full['acc_clean']:.3f}, PGD-{steps} eps {summary['eps_255']:g}/255 robust "
             f"{full['acc_robust']:.3f}; |sum f_i - f| = {summary['max_abs_sum_of_features_minus_predictor']:.2e}",
             "index  eigenvalue   acc_clean  corr_clean  acc_attacked  full_acc_on_feature_attack"]
    lines += [f"{r['index']:5d}  {r['eigenvalue']:10.4g}  {r['acc_clean']:9.3f}  {r['corr_clean']:10.3f}  "
              f"{r['acc_feature_attacked']:12.3f}  {r['acc_full_on_feature_attack']:10.3f}" for r in summary["features"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# attack
# --------------------------------------------------------------------------------------
def predictor_attack(setup, args):
    """Fit the predictor and attack it on the test images with --method. Returns (x_adv
    [m,H,W,C], the `attack` summary from setup.describe to 'attack_seconds')."""
    setup.fit(args)
    alpha = setup.predictor["alpha"]
    t0 = time.time()
    x_adv = setup.attack(args, alpha, args.method, jax.random.PRNGKey(args.random_seed))
    attack_seconds = time.time() - t0
    steps = 1 if args.method == "fgsm" else args.steps
    return x_adv, {**setup.describe(args), "method": args.method, "eps_255": args.eps, "eps": cli.eps_from_255(args.eps),
                   "steps": steps,
                   "step_size": cli.eps_from_255(args.eps) * (1 if args.method == "fgsm" else 2 / args.steps),
                   "kernel_predictor": {"acc_clean": setup.accuracy(setup.k_test_train, alpha),
                                        "acc_robust": setup.accuracy(setup.kernel_at(x_adv), alpha)},
                   "max_linf_perturbation": float(np.max(np.abs(x_adv - setup.x_test))),
                   "attack_seconds": round(attack_seconds, 2)}


def network_transfer(setup, x_adv):
    """The checkpoint's network (standard dynamics, 'params') on the clean test images and on
    their NTK-attacked versions, through attacks.evaluate without an attack of its own."""
    labels = setup.classes[setup.y_test]  # the network's own labels, not the task's 0..C'-1
    theta, theta0 = setup.net.parameters("standard")
    predict = attacks.make_predict(setup.net.apply, "standard")
    variables = (theta, theta0, setup.net.ckpt["net_state"])
    accs = {name: attacks.evaluate(predict, variables, x, labels, attack=None)["acc_clean"]
            for name, x in (("clean", setup.x_test), ("adv", jnp.asarray(x_adv)))}
    return {"acc_clean": accs["clean"], "acc_on_ntk_examples": accs["adv"],
            "evaluated_with": "attacks.evaluate without attack (standard dynamics, 'params'), as "
                              "eval_and_make_adv.py --test_path ... --no_adv"}


def attack_report(summary):
    """The `attack` summary in words: the predictor's clean and attacked accuracy, and the
    network's on the same images when it was evaluated."""
    accs = summary["kernel_predictor"]
    lines = [f"kernel predictor on {summary['n_test']} test images: clean {accs['acc_clean']:.3f}, "
             f"{summary['method'].upper()} eps {summary['eps_255']:g}/255 robust {accs['acc_robust']:.3f} "
             f"(max |delta| = {summary['max_linf_perturbation'] * 255:.2f}/255)"]
    if "network_transfer" in summary:
        transfer = summary["network_transfer"]
        lines.append(f"network ({summary['model_path']}) on the same images: clean {transfer['acc_clean']:.3f}, "
                     f"on the NTK examples {transfer['acc_on_ntk_examples']:.3f}")
    return "\n".join(lines)
