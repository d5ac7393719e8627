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

import time

import numpy as np

import cli
from utils import UserError

# Pixel values may carry float rounding from the attack's own arithmetic.
RANGE_TOLERANCE = 1e-5


EXAMPLES = [
    "python eval_and_make_adv.py --model_path runs/phase2_centered/parameters_final.pkl --linear --centering "
    "--save_examples --bonus_dir test_results",
    "python eval_and_make_adv.py --model_path runs/phase1_CC/parameters_final.pkl --test_path "
    "runs/phase1_AC/test_results/adv_examples_test_results.pkl --no_adv --save_name transfer",
]


def build_parser():
    p = cli.parser("Clean and adversarial accuracy of a checkpoint (the reference's L-inf PGD-100 by "
                   "default), with the f/df output components, and optionally the adversarial examples.",
                   EXAMPLES)
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
    p.add_argument("--random_seed", type=cli.seed, default=0, help="seed of the attacks' random starts")
    cli.add_network_args(p)
    p.add_argument("--eps", type=float, default=4.0, help="L-inf radius in 1/255 units")
    # Beyond the reference
    p.add_argument("--test_size", type=int, default=None,
                   help="evaluate the first N test images only (default: all)")
    p.add_argument("--norm", default="linf", choices=cli.NORMS,
                   help="threat model: 'linf' (radius --eps/255) or 'l2' (radius --l2_eps)")
    p.add_argument("--l2_eps", type=float, default=cli.L2_EPS,
                   help="L2 radius in pixel units, with --norm l2 (the reference's run_exp.py uses 0.25)")
    p.add_argument("--pgd_steps", type=int, default=100, help="iterations of each attack run")
    p.add_argument("--step_size", type=float, default=None,
                   help="PGD's fixed step in pixel units (default: 2*eps/steps for L-inf, 0.01 for L2); "
                        "APGD starts at 2*eps and adapts")
    p.add_argument("--batch_size", type=int, default=100, help="test batch size")
    cli.add_attack_args(p)
    cli.add_no_progress(p)
    return p


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------
def _check_args(args):
    if not (0 <= args.eps < float("inf") and 0 <= args.l2_eps < float("inf")):
        raise UserError(f"--eps and --l2_eps must be >= 0 and finite (got {args.eps:g} and {args.l2_eps:g})")
    cli.check_attack_args(args, "pgd_steps")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.test_size is not None and args.test_size < 1:
        raise UserError(f"--test_size must be >= 1, got {args.test_size}")
    if args.step_size is not None and not 0 < args.step_size < float("inf"):
        raise UserError(f"--step_size must be > 0, got {args.step_size}")


def load_test_pickle(path, input_shape, num_classes):
    """Read and check a --test_path pickle. Returns (images NHWC float32, labels int32)."""
    from utils import check_file, decode_keys, restricted_load
    check_file(path, "--test_path", "a pickle of images and labels", hints=("adv_examples_*.pkl",))
    obj = decode_keys(restricted_load(path))
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


def parameter_notes(meta, dynamics):
    """Warnings for an evaluation that may not be what the user meant."""
    notes = []
    trained = meta.get("dynamics")
    if dynamics in ("linear", "centered") and meta.get("phase") == 1:
        notes.append("this is a phase-1 checkpoint: --linear expands around the trained 'params' "
                     "towards 'lin_params' (the initial parameters in a constant save, the same "
                     "parameters in a final one)")
    if trained is not None and trained != dynamics:
        notes.append(f"the checkpoint was trained with {trained} dynamics but is evaluated with {dynamics} "
                     f"(check --linear/--centering)")
    return notes


def load_images(args, net):
    """The images to evaluate: (x NHWC, y, description, number available before --test_size/--short)."""
    import data
    if args.test_path is not None:
        x, y = load_test_pickle(args.test_path, net.input_shape, net.num_classes)
        source = args.test_path
    else:
        ds = data.load_dataset(net.dataset, args.data_dir)
        if tuple(ds.input_shape) != net.input_shape:
            raise UserError(f"{net.dataset} images are {ds.input_shape} but {net.path} was made for {net.input_shape}")
        x, y, source = ds.x_test, ds.y_test, f"{net.dataset} test split"
    limit = len(x)
    if args.test_size is not None:
        limit = min(limit, args.test_size)
    if args.short:
        limit = min(limit, 10 * args.batch_size)
    return x[:limit], y[:limit], source, len(x)


def attack_config(args):
    """The AttackConfig of the flags, or None under --no_adv."""
    import attacks
    if args.no_adv:
        return None
    eps = cli.eps_from_255(args.eps) if args.norm == "linf" else args.l2_eps
    return attacks.attack_from_args(args, args.norm, eps, args.pgd_steps, args.step_size)


def evaluate(args, net, dynamics, x, y, cfg):
    """attacks.evaluate on the network's `dynamics`; under --no_adv the robust fields repeat the
    clean ones and the 'adversarial' images are the clean ones."""
    import jax
    from tqdm import tqdm

    import attacks
    what = "clean only" if cfg is None else f"{cfg.name} {cfg.norm} eps={cfg.eps:.5g} steps={cfg.steps} restarts={cfg.restarts}"
    theta, theta0 = net.parameters(dynamics)
    with tqdm(total=len(x), desc=f"eval {what}", unit="img", disable=args.no_progress or None) as bar:
        res = attacks.evaluate(attacks.make_predict(net.apply, dynamics), (theta, theta0, net.ckpt["net_state"]),
                               x, y, batch_size=args.batch_size, attack=cfg, key=jax.random.PRNGKey(args.random_seed),
                               keep_examples=args.save_examples and cfg is not None, progress=bar,
                               components=attacks.make_components(net.apply, dynamics))
    if cfg is None:
        res["acc_adv"], res["correct_adv"] = res["acc_clean"], res["correct_clean"]
        res["predictions_adv"], res["components_adv"] = res["predictions_clean"], res["components_clean"]
        res["x_adv"] = np.asarray(x, np.float32)
    return res


def summarize(args, net, dynamics, cfg, res, source, n_available, notes, files, seconds):
    """The JSON summary of one evaluation."""
    import checkpoints
    import utils
    attack = {} if cfg is None else {"attack": cfg.name, "norm": cfg.norm, "eps": cfg.eps,
                                     "eps_255": args.eps if cfg.norm == "linf" else None, "steps": cfg.steps,
                                     "step_size": cfg.step_size, "restarts": cfg.restarts}
    return {
        "model_path": net.path, "model": net.model, "width": net.width, "num_classes": net.num_classes,
        "dataset": net.dataset, "images": source, "n_images": res["n"], "n_available": n_available,
        "dynamics": dynamics, "parameters": checkpoints.describe_parameters(dynamics),
        **{k: attack.get(k) for k in ("attack", "norm", "eps", "eps_255", "steps", "step_size", "restarts")},
        "attack_config": res.get("attack"),
        "acc_clean": res["acc_clean"], "acc_robust": None if cfg is None else res["acc_adv"],
        "correct_clean": res["correct_clean"], "correct_robust": None if cfg is None else res["correct_adv"],
        "per_attack": res.get("attacks", {}), "zero_grad_inputs": res["zero_grad_count"],
        "warnings": res["warnings"],
        "notes": notes + (["--no_adv: no attack was run; robust = clean"] if cfg is None else []),
        "random_seed": args.random_seed, "seconds": round(seconds, 2), "git": utils.git_hash(), "files": files,
    }


# Flags that do not change what an evaluation computes (the outputs' names and place, the bars,
# whether the examples are also saved, where the data files are).
NOT_INPUTS = ("save_name", "bonus_dir", "no_progress", "save_examples", "data_dir")


def eval_inputs(args, net):
    """What an evaluation's outputs are made from: the flags, with paths absolute and the
    network as resolved from the checkpoint. Recorded in the JSON summary as 'inputs'."""
    import os
    inputs = {k: v for k, v in vars(args).items() if k not in NOT_INPUTS}
    inputs.update(model_path=os.path.abspath(args.model_path), model=net.model, width=net.width, dataset=net.dataset,
                  test_path=None if args.test_path is None else os.path.abspath(args.test_path))
    return inputs


def check_outputs(paths, inputs):
    """A rerun with the same inputs may replace the outputs; other inputs must not (one line)."""
    import json

    import utils
    existing = utils.existing_files(paths.values())
    recorded = None
    if existing:
        try:
            with open(paths["summary"]) as f:
                recorded = json.load(f).get("inputs")
        except (OSError, ValueError, AttributeError):
            pass
    utils.check_replace(existing, recorded, inputs, "an evaluation",
                        "give another --save_name or --bonus_dir, or delete those files")


# --------------------------------------------------------------------------------------
def run(args):
    """Evaluate `args.model_path`; write the outputs; return the summary dict."""
    import checkpoints
    import utils

    _check_args(args)
    net = checkpoints.open_network(args.model_path, model=args.model, width=args.width, dataset=args.dataset)
    out_dir = cli.output_dir(args.model_path, args.bonus_dir)
    x, y, source, n_available = load_images(args, net)  # every input is checked before any output
    dynamics = cli.dynamics_name(args.linear, args.centering)
    cfg = attack_config(args)
    paths = cli.eval_files(out_dir, args.save_name)
    inputs = eval_inputs(args, net)
    check_outputs(paths, inputs)
    utils.check_writable_dir(out_dir, "--bonus_dir")
    notes = parameter_notes(net.meta, dynamics)
    for note in notes:
        print(f"note: {note}")

    t0 = time.time()
    res = evaluate(args, net, dynamics, x, y, cfg)
    files = [paths["results"], paths["summary"]] + ([paths["examples"]] if args.save_examples else [])
    summary = summarize(args, net, dynamics, cfg, res, source, n_available, notes, files, time.time() - t0)
    summary["inputs"] = inputs
    utils.atomic_pickle(paths["results"], {
        "acc_clean": res["acc_clean"], "acc_dirty": res["acc_adv"],
        "predictions_clean": res["predictions_clean"], "predictions_dirty": res["predictions_adv"],
        "components_clean": res["components_clean"], "components_dirty": res["components_adv"],
        "labels": np.asarray(y)})
    if args.save_examples:
        utils.atomic_pickle(paths["examples"], {"images": np.ascontiguousarray(res["x_adv"].transpose(0, 3, 1, 2)),
                                                "labels": np.asarray(y)})
    utils.atomic_json(paths["summary"], summary)

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
    from utils import run_main
    return run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
