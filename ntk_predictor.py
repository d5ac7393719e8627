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
    """Everything a kernel-predictor analysis needs: kernel, images, fitted predictor.

    The kernel is a checkpoint's empirical NTK (--model_path: `net` is its checkpoints.Network)
    or an architecture's analytic infinite-width NTK (--arch: `net` is None, `infinite_net` the
    infinite.Network and `architecture` its record). Attributes: dataset, num_classes, x_train
    [n,H,W,C], y_train [n] (task labels 0..C'-1), train_indices, x_test [m,H,W,C], y_test [m]
    (task labels), test_indices, classes (original label of each task class), k_train_train
    [n,n], k_test_train [m,n], predictor (EigenPredictor), ridge (absolute), kernel_vars (what the
    differentiable kernel takes: ntk.cross_kernel's parameters, BatchNorm state and X's gradient
    rows, or X itself), logits_fn ((kernel_vars, weights), x) -> K(x,X) @ weights, jit-stable),
    kernel_at(x)."""

    def __init__(self, args):
        """Check every input and draw the image subsets (no kernel yet: see `fit`)."""
        for flag in ("n_train", "n_test", "steps", "batch_size"):
            if getattr(args, flag) <= 0:
                raise UserError(f"--{flag} must be positive (got {getattr(args, flag)})")
        if not (0 <= args.eps < float("inf") and 0 <= args.ridge < float("inf")):
            raise UserError(f"--eps and --ridge must be finite and >= 0 (got {args.eps:g} and {args.ridge:g})")
        if args.step_size is not None and not 0 < args.step_size < float("inf"):
            raise UserError(f"--step_size must be finite and > 0 (got {args.step_size:g})")
        self.net = self.infinite_net = self.architecture = None
        if args.arch is not None:
            import infinite
            self.dataset = args.dataset or "cifar10"
            self.num_classes = data.num_classes_of(self.dataset)
            self.infinite_net, self.architecture = infinite.network_from_args(args, data.INPUT_SHAPES[self.dataset])
        elif args.model_path is None:
            raise UserError("give --model_path (a checkpoint's empirical NTK) or --arch (an infinite-width NTK)")
        else:
            given = cli.architecture_flags_given(args) + (["float64"] if args.float64 else [])
            if given:
                raise UserError(f"--{given[0]} is for infinite-width kernels (--arch); a checkpoint's kernel is its "
                                f"empirical NTK")
            self.net = open_network(args.model_path, args)
            self.dataset, self.num_classes = self.net.dataset, self.net.num_classes
        cli.check_class_index(args.class_index, self.num_classes, self.dataset)
        classes = list(range(self.num_classes)) if args.classes is None else sorted(set(args.classes))
        if len(classes) < 2 or any(not 0 <= c < self.num_classes for c in classes):
            raise UserError(f"--classes needs at least 2 distinct classes in [0, {self.num_classes - 1}] "
                            f"(got {args.classes})")
        self.classes = np.asarray(classes)
        n_classes = len(classes)
        for flag in ("n_train", "n_test"):
            if getattr(args, flag) % n_classes:
                raise UserError(f"--{flag} {getattr(args, flag)} is not divisible by the number of classes ({n_classes})")
        self.transfer_nets = transfer_networks(self, args)   # attack: checked before the images load
        ds = load_data(self.dataset, args.data_dir, data.INPUT_SHAPES[self.dataset] if self.net is None
                       else self.net.input_shape)

        def task_subset(x, y, size):
            pool = np.flatnonzero(np.isin(y, self.classes))
            task_y = np.searchsorted(self.classes, y[pool]).astype(np.int32)
            idx = data.balanced_indices(task_y, size // n_classes, args.random_seed, n_classes)
            return x[pool[idx]], task_y[idx], pool[idx]

        self.x_train, self.y_train, self.train_indices = task_subset(ds.x_train, ds.y_train, args.n_train)
        self.x_test, self.y_test, self.test_indices = task_subset(ds.x_test, ds.y_test, args.n_test)

    def fit(self, args):
        """The kernels K(X,X), K(x_test,X) and the fitted predictor (the work; inputs are checked)."""
        t0 = time.time()
        kernel = self._fit_infinite(args) if self.net is None else self._fit_empirical(args)
        self.k_test_train = self.kernel_at(self.x_test)                                             # [m, n]
        self.kernel_seconds = time.time() - t0
        self.ridge = args.ridge * float(np.mean(np.diag(self.k_train_train)))
        try:
            self.predictor = ka.fit_kernel_predictor(self.k_train_train,
                                                     ka.centered_one_hot(self.y_train, len(self.classes)), self.ridge)
        except ValueError as e:
            raise UserError(f"{e} (--ridge{'; or add --float64' if self.net is None and not args.float64 else ''})"
                            ) from None
        self.logits_fn = ka.make_kernel_logits(kernel)

    def _fit_empirical(self, args):
        """K(X, X) of the checkpoint's NTK; returns the differentiable kernel(variables, x)."""
        self.f, self.params = f, params = self.net.kernel_fn(args.use_linear_params)
        # X's gradient rows are computed once and kept (ntk.cross_kernel): K(X, X) is their Gram
        # matrix, and every K(x, X) of a test or attacked image reuses them.
        kernel, self.kernel_vars = ntk.cross_kernel(f, params, jnp.asarray(self.x_train), class_index=args.class_index)
        kernel_jit, b = jax.jit(kernel), args.batch_size

        def kernel_at(x):   # padded to one compiled shape; the padded rows are dropped
            return np.concatenate([np.asarray(kernel_jit(self.kernel_vars, parallel.pad_rows(x[i:i + b], b)),
                                              np.float64)[:len(x[i:i + b])] for i in range(0, len(x), b)])

        self._kernel_at = kernel_at
        logits_summed = len(ntk.classes_of(args.class_index, self.net.num_classes))  # the network's, not the task's
        self.k_train_train = ntk.reference_kernel(self.kernel_vars, logits_summed, args.batch_size)  # [n, n]
        return kernel

    def _fit_infinite(self, args):
        """K(X, X) of the architecture's infinite-width NTK (every logit has the same kernel);
        returns the differentiable kernel(X, x) = K(x, X) (infinite.cross_kernel)."""
        import infinite
        kernel_fn = self.infinite_net.kernel_fn
        kw = dict(get="ntk", memory_gb=args.memory_gb, dtype="float64" if args.float64 else "float32")
        self.kernel_vars = jnp.asarray(self.x_train)
        self._kernel_at = lambda x: np.asarray(kernel_fn(x, self.x_train, **kw), np.float64)
        self.k_train_train = np.asarray(kernel_fn(self.x_train, progress=not args.no_progress, **kw), np.float64)
        return infinite.cross_kernel(kernel_fn, args.memory_gb)

    def kernel_at(self, x):
        """K(x, X) [m, n] float64."""
        return self._kernel_at(np.asarray(x, np.float32))

    def accuracy(self, k_test_train, weights):
        """Accuracy on the test images of the predictor K(x,X) @ weights, from K(x_test, X)."""
        return float(np.mean(np.argmax(k_test_train @ weights, -1) == self.y_test))

    def attack(self, args, weights, method, key):
        """Adversarial test images of the predictor K(x,X) @ weights (`method` 'fgsm' or 'pgd')."""
        return ka.attack_kernel_predictor(self.logits_fn, (self.kernel_vars, weights), self.x_test, self.y_test,
                                          method=method,
                                          eps=cli.eps_from_255(args.eps), steps=1 if method == "fgsm" else args.steps,
                                          key=key, batch_size=args.batch_size, step_size=pgd_step(args),
                                          random_start=not args.no_random_start)

    def describe(self, args):
        if self.net is None:
            kernel = {"architecture": self.architecture, "kernel": "infinite-width NTK", "dataset": self.dataset,
                      "num_classes": self.num_classes, "float64": bool(args.float64)}
        else:
            kernel = {**self.net.describe(), "kernel": "empirical NTK", "use_linear_params": args.use_linear_params}
        return {**kernel, "class_index": args.class_index, "classes": self.classes.tolist(),
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
    """Per eigen-index i: --method (FGSM or PGD) on f_i alone, then the accuracy and label
    correlation of f_i and the full predictor's accuracy on those images. Returns three lists,
    in the order of `indices`."""
    predictor, n_classes = setup.predictor, len(setup.classes)
    acc_feat_adv, corr_feat_adv, acc_full_on_feat_adv = [], [], []
    with tqdm(total=len(indices), desc="feature attacks", unit="feature", disable=args.no_progress) as bar:
        for i in indices:
            weights = np.outer(predictor["evecs"][:, i], predictor["coefs"][i])     # [n, C]: f_i = K(x,X) weights
            x_adv = setup.attack(args, weights, args.method, jax.random.fold_in(key, i))
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
    x_adv_full = setup.attack(args, predictor["alpha"], args.method, jax.random.fold_in(key, 10 ** 6))
    full_robust = setup.accuracy(setup.kernel_at(x_adv_full), predictor["alpha"])
    acc_feat_adv, corr_feat_adv, acc_full_on_feat_adv = _feature_attacks(setup, args, indices, key)
    per_index = [{"index": int(i), "eigenvalue": float(predictor["evals"][i]),
                  "acc_clean": float(acc_clean[j]), "corr_clean": float(corr_clean[j]),
                  "acc_feature_attacked": acc_feat_adv[j], "corr_feature_attacked": corr_feat_adv[j],
                  "acc_full_on_feature_attack": acc_full_on_feat_adv[j]} for j, i in enumerate(indices)]
    return {**setup.describe(args), "eps_255": args.eps, "eps": cli.eps_from_255(args.eps),
            "method": args.method, "attack": f"{attack_name(args)} on the cross-entropy of the attacked feature's outputs",
            "chance": 1 / n_classes, "full_predictor": {"acc_clean": full_clean, "acc_robust": full_robust},
            "max_abs_sum_of_features_minus_predictor": sum_error,
            "eigenvalues": predictor["evals"].tolist(), "features": per_index,
            "feature_values": {"what": "f_i(x) at every test image, [index of 'features', test image, class], and "
                                       "the predictor f(x), [test image, class] (compared across kernels by "
                                       "tk_experiment.py)",
                               "values": np.asarray(feats, np.float32).tolist(),
                               "predictor": np.asarray(ka.kernel_predict(setup.k_test_train, predictor),
                                                       np.float32).tolist()}}


def pgd_step(args):
    """The PGD step of --step_size (1/255 units) or 2 eps / --steps, in pixel units."""
    return cli.eps_from_255(args.step_size if args.step_size is not None else 2 * args.eps / args.steps)


def attack_name(args):
    """--method in words: 'FGSM' or 'PGD-10 (step 2 eps/10, random start)'."""
    if args.method == "fgsm":
        return "FGSM"
    step = f"2 eps/{args.steps}" if args.step_size is None else f"{args.step_size:g}/255"
    return f"PGD-{args.steps} (step {step}, {'clean' if args.no_random_start else 'random'} start)"


def feature_images(setup, summary, n_images, path):
    """plots.feature_images_figure of up to 8 of the analysed eigen-features at `n_images` test
    images, recorded in summary['feature_images']; returns `path`."""
    import plots
    shown = shown_indices([r["index"] for r in summary["features"]])
    images = shown_images(len(setup.y_test), n_images)
    summary["feature_images"] = {"indices": shown, "test_images": images,
                                 "what": "input gradient of f_i at each test image (two classes: the second output "
                                         "minus the first; more: the true class's), min-max normalised"}
    return plots.feature_images_figure(summary, setup.x_test[images], feature_gradients(setup, shown, images), path)


def shown_indices(indices, count=8):
    """At most `count` of the analysed eigen-indices, spread from the first to the last."""
    picks = np.unique(np.round(np.linspace(0, len(indices) - 1, min(count, len(indices)))).astype(int))
    return [indices[p] for p in picks]


def shown_images(n_test, n_images):
    """Positions of `n_images` test images spread over the test set (so over its classes)."""
    return np.unique(np.round(np.linspace(0, n_test - 1, n_images)).astype(int)).tolist()


def feature_gradients(setup, indices, images):
    """The input gradient of each eigen-feature f_i at the test images at positions `images`,
    [len(indices), len(images), H, W, C]. With two classes f_i is the notebook's scalar phi_i
    (the second output minus the first: +1 is the second class); with more, the true class's."""
    x, y = jnp.asarray(setup.x_test[images]), jnp.asarray(setup.y_test[images])
    binary = len(setup.classes) == 2

    @jax.jit
    def grad(weights, x):
        def value(x):
            out = setup.logits_fn((setup.kernel_vars, weights), x)
            return jnp.sum(out[:, 1] - out[:, 0]) if binary else jnp.sum(jnp.take_along_axis(out, y[:, None], 1))
        return jax.grad(value)(x)

    predictor = setup.predictor
    return np.stack([np.asarray(grad(jnp.asarray(np.outer(predictor["evecs"][:, i], predictor["coefs"][i]), jnp.float32),
                                     x)) for i in indices])


def features_report(summary, args):
    """The `features` summary in words: the full predictor's accuracies and a table with one row
    per analysed eigen-index."""
    full = summary["full_predictor"]
    lines = [f"kernel predictor ({summary['n_train']} train, {summary['n_test']} test, classes {summary['classes']}): "
             f"clean {full['acc_clean']:.3f}, {attack_name(args)} eps {summary['eps_255']:g}/255 robust "
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
                   "step_size": cli.eps_from_255(args.eps) if args.method == "fgsm" else pgd_step(args),
                   "random_start": args.method == "pgd" and not args.no_random_start,
                   "kernel_predictor": {"acc_clean": setup.accuracy(setup.k_test_train, alpha),
                                        "acc_robust": setup.accuracy(setup.kernel_at(x_adv), alpha)},
                   "max_linf_perturbation": float(np.max(np.abs(x_adv - setup.x_test))),
                   "attack_seconds": round(attack_seconds, 2)}


def transfer_networks(setup, args):
    """The networks `attack` carries the kernel's examples to: the checkpoint itself
    (--model_path, unless --no_transfer) and every --transfer_to checkpoint, opened and checked
    to take the task's images and labels. Returns [checkpoints.Network] ([] for `features`)."""
    import checkpoints
    if args.command != "attack":
        return []
    nets = [setup.net] if setup.net is not None and not args.no_transfer else []
    shape = data.INPUT_SHAPES[setup.dataset]
    for path in args.transfer_to or []:
        net = checkpoints.open_network(path, flag="--transfer_to")
        if tuple(net.input_shape) != tuple(shape):
            raise UserError(f"--transfer_to {path} takes images of {tuple(net.input_shape)}, but these "
                            f"{setup.dataset} images are {tuple(shape)}")
        if net.num_classes <= int(setup.classes.max()):
            raise UserError(f"--transfer_to {path} has {net.num_classes} classes; --classes needs class "
                            f"{int(setup.classes.max())}")
        nets.append(net)
    return nets


def network_transfer(net, setup, x_adv, args):
    """A network (standard dynamics, 'params') on the clean test images, on the kernel's
    adversarial versions (attacks.evaluate without an attack, as eval_and_make_adv.py --test_path
    ... --no_adv), and under its own white-box L-inf PGD at the same eps, for contrast."""
    labels = setup.classes[setup.y_test]  # the network's own labels, not the task's 0..C'-1
    eps = cli.eps_from_255(args.eps)
    own = attacks.AttackConfig(norm="linf", eps=eps, step_size=2 * eps / args.steps, steps=args.steps, name="pgd")
    white = attacks.evaluate_network(net, "standard", setup.x_test, labels, own, seed=args.random_seed,
                                     batch_size=args.batch_size)
    transfer = attacks.evaluate_network(net, "standard", x_adv, labels, None, seed=args.random_seed,
                                        batch_size=args.batch_size)
    # The control: a perturbation of the same size in no chosen direction (+-eps per pixel, clipped).
    signs = np.random.default_rng(args.random_seed).choice(np.float32([-1, 1]), size=setup.x_test.shape)
    noise = attacks.evaluate_network(net, "standard", np.clip(setup.x_test + eps * signs, 0, 1), labels, None,
                                     seed=args.random_seed, batch_size=args.batch_size)
    return {"model_path": net.path, "model": net.model, "width": net.width, "acc_clean": white["acc_clean"],
            "acc_on_ntk_examples": transfer["acc_clean"], "acc_random_sign": noise["acc_clean"],
            "acc_own_pgd": white["acc_adv"],
            "own_pgd": f"L-inf PGD-{args.steps}, step 2 eps/{args.steps}, random start"}


def attack_report(summary):
    """The `attack` summary in words: the predictor's clean and attacked accuracy, and each
    network's on the same images."""
    accs = summary["kernel_predictor"]
    lines = [f"kernel predictor on {summary['n_test']} test images: clean {accs['acc_clean']:.3f}, "
             f"{summary['method'].upper()} eps {summary['eps_255']:g}/255 robust {accs['acc_robust']:.3f} "
             f"(max |delta| = {summary['max_linf_perturbation'] * 255:.2f}/255)"]
    for t in summary.get("network_transfer", []):
        lines.append(f"network {t['model_path']} ({t['model']}): clean {t['acc_clean']:.3f}, on the kernel's examples "
                     f"{t['acc_on_ntk_examples']:.3f}, with random +-eps signs {t['acc_random_sign']:.3f}, under its "
                     f"own PGD {t['acc_own_pgd']:.3f}")
    return "\n".join(lines)
