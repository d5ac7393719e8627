"""Evaluate a checkpoint under attack and (optionally) save its adversarial examples.

The reference's evaluation is L-inf PGD-100 at eps/255 with one random start. This script keeps
its flags and outputs and adds stronger attacks (--attack apgd-ce|apgd-dlr|fab-t|square, AutoAttack's
standard set --attack ensemble, the gradient-only --attack ensemble-fast, --restarts)
and a JSON summary with sanity checks. It shares one evaluator (`attacks.evaluate`) with
run_exp.py.

Norm and attack are separate options: --norm linf|l2 picks the threat model (L-inf radius
--eps in 1/255 units, L2 radius --l2_eps in pixel units) and --attack picks the algorithm.

Outputs, under dirname(--model_path)/--bonus_dir/:
  test_results_{save_name}.pkl   acc_clean, acc_dirty (robust), predictions_clean/_dirty,
                                 components_clean/_dirty = {'f', 'df'} (see models.dynamics_apply),
                                 labels
  test_results_{save_name}.json  summary: attack, norm, eps, steps, step size, restarts,
                                 number of images, dynamics, model, accuracies, per-attack
                                 breakdown and sanity warnings
  adv_examples_{save_name}.pkl   with --save_examples: {'images': N x C x H x W, 'labels': N},
                                 readable by --test_path (transfer attacks)

Example (the reference README's example 5):
  python3 eval_and_make_adv.py --model_path ./saved_model_loaded_centering_phase_2/parameters_final.pkl \\
      --linear --centering --save_examples --bonus_dir test_results --random_seed 0
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from utils import UserError

# Pixel values may carry float rounding from the attack's own arithmetic.
RANGE_TOLERANCE = 1e-5


def build_parser():
    import attacks
    import data
    import models
    p = argparse.ArgumentParser(
        description="Clean and adversarial accuracy of a checkpoint (the reference's L-inf PGD-100 by "
                    "default), with the f/df output components, and optionally the adversarial examples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint to evaluate (parameters_*.pkl)")
    p.add_argument("--save_name", default="test_results",
                   help="name used in the output files test_results_{save_name}.pkl/.json and "
                        "adv_examples_{save_name}.pkl")
    p.add_argument("--linear", action="store_true",
                   help="evaluate the linearized dynamics f(theta0) + J(theta0)(theta - theta0), with "
                        "theta0 = the checkpoint's 'params' and theta = its 'lin_params'")
    p.add_argument("--centering", action="store_true",
                   help="evaluate the centered dynamics: J(theta0)(theta - theta0) with --linear, "
                        "f(theta) - f(theta0) without")
    p.add_argument("--test_path", default=None,
                   help="pickle {'images': N x C x H x W floats in [0,1], 'labels': N ints} to evaluate "
                        "instead of the test split (e.g. another model's adv_examples_*.pkl, for "
                        "transfer attacks)")
    p.add_argument("--bonus_dir", default=".",
                   help="sub-directory of the checkpoint's directory for the outputs")
    p.add_argument("--no_adv", action="store_true",
                   help="skip the attack: robust accuracy is reported equal to clean accuracy")
    p.add_argument("--save_examples", action="store_true",
                   help="also save the adversarial examples (NCHW) to adv_examples_{save_name}.pkl "
                        "(the clean images under --no_adv)")
    p.add_argument("--short", action="store_true", help="evaluate the first 10 batches only")
    p.add_argument("--random_seed", type=int, default=0, help="seed of the attacks' random starts")
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="dataset (default: the checkpoint's, else cifar10); contradicting the "
                        "checkpoint is an error")
    p.add_argument("--model", default=None, choices=models.MODELS,
                   help="model (default: the checkpoint's, else resnet18); contradicting the "
                        "checkpoint is an error")
    p.add_argument("--eps", type=float, default=4.0, help="L-inf radius in 1/255 units")
    # Beyond the reference
    p.add_argument("--data_dir", default="./data", help="where the dataset lives (torchvision layout)")
    p.add_argument("--width", type=int, default=None,
                   help="ResNet width (default: the checkpoint's, else 64)")
    p.add_argument("--test_size", type=int, default=None,
                   help="evaluate the first N test images only (default: all)")
    p.add_argument("--norm", default="linf", choices=attacks.NORMS,
                   help="threat model: 'linf' (radius --eps/255) or 'l2' (radius --l2_eps)")
    p.add_argument("--l2_eps", type=float, default=0.25,
                   help="L2 radius in pixel units, with --norm l2 (the reference's run_exp.py uses 0.25)")
    p.add_argument("--pgd_steps", type=int, default=100, help="iterations of each attack run")
    p.add_argument("--step_size", type=float, default=None,
                   help="PGD's fixed step in pixel units (default: 2*eps/steps for L-inf, 0.01 for L2); "
                        "APGD starts at 2*eps and adapts")
    p.add_argument("--batch_size", type=int, default=100, help="test batch size")
    attacks.add_attack_args(p)
    return p


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------
def _check_args(args):
    if args.eps < 0 or args.l2_eps < 0:
        raise UserError("--eps and --l2_eps must be >= 0")
    for flag in ("pgd_steps", "batch_size", "restarts", "n_target_classes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.test_size is not None and args.test_size < 1:
        raise UserError(f"--test_size must be >= 1, got {args.test_size}")
    if args.step_size is not None and args.step_size <= 0:
        raise UserError(f"--step_size must be > 0, got {args.step_size}")


def load_test_pickle(path, input_shape, num_classes):
    """Read and check a --test_path pickle. Returns (images NHWC float32, labels int32)."""
    from utils import restricted_load
    obj = restricted_load(path)
    if isinstance(obj, dict):
        obj = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if not isinstance(obj, dict) or "images" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"--test_path {path} must hold a dict with 'images' and 'labels'; found {keys}")
    images, labels = np.asarray(obj["images"]), np.asarray(obj["labels"])
    h, w, c = input_shape
    if images.ndim != 4:
        raise UserError(f"--test_path images must be N x C x H x W; got shape {images.shape}")
    if images.shape[1] != c and images.shape[3] == c:
        raise UserError(f"--test_path images look N x H x W x C {images.shape}; they must be N x C x H x W "
                        f"(transpose with images.transpose(0, 3, 1, 2))")
    if tuple(images.shape[1:]) != (c, h, w):
        raise UserError(f"--test_path images have shape {images.shape[1:]} per image but the model takes "
                        f"{(c, h, w)} (C x H x W)")
    if len(images) == 0:
        raise UserError(f"--test_path {path} holds no images")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise UserError(f"--test_path images must be numbers; got dtype {images.dtype}")
    images = images.astype(np.float32)
    if not np.all(np.isfinite(images)):
        raise UserError("--test_path images hold NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise UserError(f"--test_path pixel values must lie in [0, 1]; found [{lo:g}, {hi:g}]"
                        + (" (uint8 images? divide by 255)" if hi > 1.5 else ""))
    images = np.clip(images, 0.0, 1.0)
    if labels.shape != (len(images),):
        raise UserError(f"--test_path labels must be a vector of {len(images)} ints; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
            raise UserError(f"--test_path labels must be integers; got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"--test_path labels must lie in [0, {num_classes - 1}]; found "
                        f"[{labels.min()}, {labels.max()}]")
    return images.transpose(0, 2, 3, 1), labels.astype(np.int32)


def select_parameters(ckpt, dynamics):
    """(theta, theta0, which, notes): the parameters evaluated under `dynamics`.

    Linearized/centered dynamics expand around theta0 = 'params' towards theta = 'lin_params'
    (the phase-2 layout). Standard dynamics evaluate 'params' (the reference's behaviour, right
    for phase-1 and reference files), except for a phase-2 checkpoint trained with standard
    dynamics, whose trained parameters are 'lin_params'."""
    meta = ckpt["meta"]
    trained = meta.get("dynamics")
    notes = []
    if dynamics in ("linear", "centered"):
        theta, theta0, which = ckpt["lin_params"], ckpt["params"], "theta=lin_params, theta0=params"
        if meta.get("phase") == 1:
            notes.append("this is a phase-1 checkpoint: --linear expands around the trained 'params' "
                         "towards 'lin_params' (its initial copy)")
    elif meta.get("phase") == 2 and trained in ("standard", "standard_centered"):
        theta, theta0, which = ckpt["lin_params"], ckpt["params"], "theta=lin_params, theta0=params"
    else:
        theta, theta0, which = ckpt["params"], ckpt["lin_params"], "theta=params"
        if dynamics == "standard_centered":
            which = "theta=params, theta0=lin_params"
    if trained is not None and trained != dynamics:
        notes.append(f"the checkpoint was trained with {trained} dynamics but is evaluated with {dynamics} "
                     f"(check --linear/--centering)")
    return theta, theta0, which, notes


# --------------------------------------------------------------------------------------
def run(args):
    """Evaluate `args.model_path`; write the outputs; return the summary dict."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    import attacks
    import data
    import models
    import utils

    _check_args(args)
    ckpt = utils.load_checkpoint(args.model_path)
    meta = ckpt["meta"]
    path = args.model_path
    model = utils.resolve_setting(meta, "model", args.model, "resnet18", path)
    width = utils.resolve_setting(meta, "width", args.width, 64, path)
    dataset = utils.resolve_setting(meta, "dataset", args.dataset, "cifar10", path)
    num_classes = int(meta.get("num_classes") or data.num_classes_of(dataset))
    input_shape = tuple(meta.get("input_shape") or data.INPUT_SHAPES[dataset])
    if model not in models.MODELS:
        raise UserError(f"{path} names an unknown model {model!r}")
    out_dir = os.path.join(os.path.dirname(os.path.abspath(path)), args.bonus_dir)
    utils.check_writable_dir(out_dir, "--bonus_dir")

    # Data: every check happens before any computation.
    if args.test_path is not None:
        x, y = load_test_pickle(args.test_path, input_shape, num_classes)
        source = args.test_path
    else:
        ds = data.load_dataset(dataset, args.data_dir)
        if tuple(ds.input_shape) != input_shape:
            raise UserError(f"{dataset} images are {ds.input_shape} but {path} was made for {input_shape}")
        x, y = ds.x_test, ds.y_test
        source = f"{dataset} test split"
    n_total = len(x)
    limit = n_total
    if args.test_size is not None:
        limit = min(limit, args.test_size)
    if args.short:
        limit = min(limit, 10 * args.batch_size)
    x, y = x[:limit], y[:limit]

    dynamics = models.dynamics_name(args.linear, args.centering)
    init, apply = models.get_model(model, num_classes, width)
    # Shapes only: compiling the initializers of a ResNet takes ~20 s on CPU for nothing.
    params0, state0 = jax.eval_shape(lambda k, x: init(k, x, True), jax.random.PRNGKey(0),
                                     jnp.zeros((1,) + input_shape, jnp.float32))
    for key, ref in (("params", params0), ("lin_params", params0), ("net_state", state0)):
        utils.check_tree(ref, ckpt[key], f"{path} ['{key}']")
        ckpt[key] = jax.tree_util.tree_map(lambda r, a: jnp.asarray(a, dtype=r.dtype), ref, ckpt[key])
    theta, theta0, which, notes = select_parameters(ckpt, dynamics)
    variables = (theta, theta0, ckpt["net_state"])

    cfg = None
    if not args.no_adv:
        eps = args.eps / 255 if args.norm == "linf" else args.l2_eps
        cfg = attacks.attack_from_args(args, args.norm, eps, args.pgd_steps, args.step_size)

    for note in notes:
        print(f"note: {note}")
    what = "clean only" if cfg is None else f"{cfg.name} {cfg.norm} eps={cfg.eps:.5g} steps={cfg.steps} restarts={cfg.restarts}"
    t0 = time.time()
    with tqdm(total=len(x), desc=f"eval {what}", unit="img") as bar:
        res = attacks.evaluate(attacks.make_predict(apply, dynamics), variables, x, y,
                               batch_size=args.batch_size, attack=cfg,
                               key=jax.random.PRNGKey(args.random_seed),
                               keep_examples=args.save_examples and cfg is not None, progress=bar,
                               components=attacks.make_components(apply, dynamics))
    seconds = time.time() - t0

    if cfg is None:
        res["acc_adv"], res["correct_adv"] = res["acc_clean"], res["correct_clean"]
        res["predictions_adv"], res["components_adv"] = res["predictions_clean"], res["components_clean"]
        res["x_adv"] = np.asarray(x, np.float32)

    results = {"acc_clean": res["acc_clean"], "acc_dirty": res["acc_adv"],
               "predictions_clean": res["predictions_clean"], "predictions_dirty": res["predictions_adv"],
               "components_clean": res["components_clean"], "components_dirty": res["components_adv"],
               "labels": np.asarray(y)}
    stem = f"test_results_{args.save_name}"
    files = [os.path.join(out_dir, stem + ".pkl"), os.path.join(out_dir, stem + ".json")]
    if args.save_examples:
        files.append(os.path.join(out_dir, f"adv_examples_{args.save_name}.pkl"))
    summary = {
        "model_path": path, "model": model, "width": width, "num_classes": num_classes,
        "dataset": dataset, "images": source, "n_images": len(x), "n_available": n_total,
        "dynamics": dynamics, "parameters": which,
        "attack": None if cfg is None else cfg.name, "norm": None if cfg is None else cfg.norm,
        "eps": None if cfg is None else cfg.eps,
        "eps_255": None if cfg is None or cfg.norm != "linf" else args.eps,
        "steps": None if cfg is None else cfg.steps, "step_size": None if cfg is None else cfg.step_size,
        "restarts": None if cfg is None else cfg.restarts, "attack_config": res.get("attack"),
        "acc_clean": res["acc_clean"], "acc_robust": None if cfg is None else res["acc_adv"],
        "correct_clean": res["correct_clean"], "correct_robust": None if cfg is None else res["correct_adv"],
        "per_attack": res.get("attacks", {}),
        "zero_grad_inputs": res["zero_grad_count"],
        "warnings": res["warnings"], "notes": notes + (["--no_adv: no attack was run; robust = clean"]
                                                       if cfg is None else []),
        "random_seed": args.random_seed, "seconds": round(seconds, 2),
        "git": utils.git_hash(), "files": files,
    }
    utils.atomic_pickle(files[0], results)
    if args.save_examples:
        utils.atomic_pickle(files[2], {"images": np.ascontiguousarray(res["x_adv"].transpose(0, 3, 1, 2)),
                                       "labels": np.asarray(y)})
    utils.atomic_json(files[1], summary)

    robust = "n/a (--no_adv)" if cfg is None else f"{res['acc_adv']:.4f}"
    print(f"{len(x)} images, dynamics={dynamics}: clean {res['acc_clean']:.4f}, robust {robust}")
    for name, b in res.get("attacks", {}).items():
        if "acc" in b:
            print(f"  {name}: robust {b['acc']:.4f} alone, {b['cumulative_acc']:.4f} with the attacks before it")
        else:   # AutoAttack's order: each member attacked only what the ones before it left robust
            print(f"  {name}: fooled {b['fooled']} of the {b['attacked']} still robust; robust "
                  f"{b['cumulative_acc']:.4f} after it")
    for w in res["warnings"]:
        print(f"WARNING: {w}")
    for f in files:
        print(f"wrote {f}")
    return summary


def main(argv=None):
    import utils
    args = build_parser().parse_args(argv)
    return utils.run_main(run, args)


if __name__ == "__main__":
    main()
