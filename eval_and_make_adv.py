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
                   help="evaluate on a seeded class-balanced subset of this many test images, the one run_exp.py "
                        "evaluates the run on (seed: the checkpoint's --random_seed) (default: all)")
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
    cli.check_eps(args.eps)
    cli.check_attack_args(args, "pgd_steps")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.test_size is not None and args.test_size < 1:
        raise UserError(f"--test_size must be >= 1, got {args.test_size}")
    if args.step_size is not None and not 0 < args.step_size < float("inf"):
        raise UserError(f"--step_size must be > 0, got {args.step_size}")


def load_test_pickle(path, input_shape, num_classes):
    """(images NHWC float32, labels int32) of a --test_path pickle, read and checked by
    `attacks.load_test_pickle` (imported here, so that the script loads JAX only when it runs)."""
    import attacks
    return attacks.load_test_pickle(path, input_shape, num_classes)


def load_images(args, net):
    """The images to evaluate: (x NHWC, y, description, number available before --test_size/--short).
    --test_size takes the seeded class-balanced subset, the meaning it has in every script."""
    import data
    if args.test_path is not None:
        x, y = load_test_pickle(args.test_path, net.input_shape, net.num_classes)
        source = args.test_path
    else:
        ds = data.load_dataset(net.dataset, args.data_dir)
        if tuple(ds.input_shape) != net.input_shape:
            raise UserError(f"{net.dataset} images are {ds.input_shape} but {net.path} was made for {net.input_shape}")
        x, y, source = ds.x_test, ds.y_test, f"{net.dataset} test split"
    n_available = len(x)
    if args.test_size is not None:   # the subset run_exp.py's --test_size evaluates the run on
        x, y, _ = data.balanced_subset(x, y, args.test_size, subset_seed(args, net), net.num_classes, "--test_size")
    if args.short:
        x, y = x[:10 * args.batch_size], y[:10 * args.batch_size]
    return x, y, source, n_available


def subset_seed(args, net):
    """The seed of the --test_size subset: the run's own --random_seed (the checkpoint's meta), so
    a network is scored on the images run_exp.py scored it on; else --random_seed."""
    seed = net.meta.get("random_seed")
    return args.random_seed if seed is None else int(seed)


def attack_config(args):
    """The AttackConfig of the flags, or None under --no_adv."""
    import attacks
    if args.no_adv:
        return None
    eps = cli.eps_from_255(args.eps) if args.norm == "linf" else args.l2_eps
    return attacks.attack_from_args(args, args.norm, eps, args.pgd_steps, args.step_size)


def summarize(args, net, dynamics, cfg, res, source, n_available, notes, files, seconds):
    """The JSON summary of one evaluation."""
    import attacks
    import checkpoints
    import utils
    return {
        "model_path": net.path, "model": net.model, "width": net.width, "num_classes": net.num_classes,
        "dataset": net.dataset, "images": source, "n_images": res["n"], "n_available": n_available,
        "dynamics": dynamics, "parameters": checkpoints.describe_parameters(dynamics),
        **attacks.summary_fields(res, cfg, eps_255=args.eps),
        "notes": notes + (["--no_adv: no attack was run; robust = clean"] if cfg is None else []),
        "test_subset": None if args.test_size is None else {"size": args.test_size, "seed": subset_seed(args, net),
                                                            "kind": "seeded class-balanced"},
        "random_seed": args.random_seed, "seconds": round(seconds, 2), "git": utils.git_hash(), "files": files,
    }


# Flags that do not change what an evaluation computes (the outputs' names and place, the bars,
# whether the examples are also saved, where the data files are).
NOT_INPUTS = ("save_name", "bonus_dir", "no_progress", "save_examples", "data_dir")


def eval_inputs(args, net):
    """What an evaluation's outputs are made from: the flags, with input files by content
    (utils.file_record) and the network as resolved from the checkpoint. Recorded in the JSON
    summary as 'inputs'."""
    import utils
    inputs = {k: v for k, v in vars(args).items() if k not in NOT_INPUTS}
    inputs.update(model_path=utils.file_record(args.model_path), model=net.model, width=net.width, dataset=net.dataset,
                  test_path=None if args.test_path is None else utils.file_record(args.test_path))
    return inputs


# --------------------------------------------------------------------------------------
def run(args):
    """Evaluate `args.model_path`; write the outputs; return the summary dict."""
    from tqdm import tqdm

    import attacks
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
    utils.check_outputs(list(paths.values()), inputs, "an evaluation",
                        "give another --save_name or --bonus_dir, or delete those files", record=paths["summary"])
    utils.check_writable_dir(out_dir, "--bonus_dir")
    notes = attacks.parameter_notes(net.meta, dynamics)
    for note in notes:
        print(f"note: {note}")

    t0 = time.time()
    what = "clean only" if cfg is None else f"{cfg.name} {cfg.norm} eps={cfg.eps:.5g} steps={cfg.steps} restarts={cfg.restarts}"
    with tqdm(total=len(x), desc=f"eval {what}", unit="img", disable=args.no_progress or None) as bar:
        res = attacks.evaluate_network(net, dynamics, x, y, cfg, seed=args.random_seed, batch_size=args.batch_size,
                                       keep_examples=args.save_examples, progress=bar)
    files = [paths["results"], paths["summary"]] + ([paths["examples"]] if args.save_examples else [])
    summary = summarize(args, net, dynamics, cfg, res, source, n_available, notes, files, time.time() - t0)
    summary["inputs"] = inputs
    utils.begin_outputs(paths["summary"], inputs)   # the summary, written last, records the inputs
    utils.atomic_pickle(paths["results"], {
        "acc_clean": res["acc_clean"], "acc_dirty": res["acc_adv"],
        "predictions_clean": res["predictions_clean"], "predictions_dirty": res["predictions_adv"],
        "components_clean": res["components_clean"], "components_dirty": res["components_adv"],
        "labels": np.asarray(y)})
    if args.save_examples:
        utils.atomic_pickle(paths["examples"], {"images": np.ascontiguousarray(res["x_adv"].transpose(0, 3, 1, 2)),
                                                "labels": np.asarray(y)})
    utils.atomic_json(paths["summary"], summary)
    utils.end_outputs(paths["summary"])

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
