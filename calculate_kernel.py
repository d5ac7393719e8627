"""The finite-width empirical NTK of a checkpoint on a class-balanced subset of training images.

    K[i, j] = <grad_theta f_c(x_i), grad_theta f_c(x_j)>   with --class_index c
    K[i, j] = mean over the logits c of the above           with --class_index -1

BatchNorm runs in inference mode at the checkpoint's running statistics. The images are
--dataset_size / C per class (C classes), drawn without replacement with --random_seed, class 0
first. The kernel comes from ntk.empirical_ntk: each image's gradient is computed once when the
--memory_gb budget allows (the reference, neural-tangents in 4x4 blocks, recomputed it for
every block pair).

Output, under dirname(--model_path)/--bonus_dir/: {save_name}_class_{c}_{n}.pkl, or
{save_name}_{n}.pkl for --class_index -1, holding
  kernel [n, n] float64, labels [n]                  (the reference's keys)
  indices [n]      positions of the images in the training split, so later scripts
                   (visualize_ntk_features.py, analyze_ntk.py) use exactly these images
  dataset, class_index, model, width, num_classes, use_linear_params, dataset_size,
  random_seed, model_path, seconds, engine (the engine's plan and counts)

Example (the reference README's example 6):
  python3 calculate_kernel.py --model_path ./saved_model_path_phase_1/parameters_checkpoint_20.pkl \\
      --dataset_size 500 --random_seed 0 --class_index 0 --dataset cifar10
"""
from __future__ import annotations

import os
import time

import numpy as np

import cli
from utils import UserError


EXAMPLES = [
    "python calculate_kernel.py --model_path runs/phase1_AC/parameters_checkpoint_20.pkl --dataset_size 500 "
    "--class_index 0",
    "python calculate_kernel.py --model_path runs/phase1_AC/parameters_final.pkl --dataset_size 100 "
    "--class_index -1 --memory_gb 2",
]


def build_parser():
    p = cli.parser("Finite-width empirical NTK of a checkpoint on a class-balanced subset of the "
                   "training images, for one logit or the mean over logits.", EXAMPLES)
    p.add_argument("--model_path", required=True, help="checkpoint (parameters_*.pkl) whose NTK is computed")
    p.add_argument("--dataset_size", type=int, default=500,
                   help="number of training images n (divisible by the number of classes; n/C per class)")
    p.add_argument("--save_name", default="saved_kernel",
                   help="stem of the output file {save_name}_class_{c}_{n}.pkl ({save_name}_{n}.pkl for -1)")
    cli.add_class_index(p)
    p.add_argument("--show_progress", action="store_true",
                   help="also print the engine's plan (layer forms, chunk and panel sizes); the progress "
                        "bar is shown unless --no_progress")
    p.add_argument("--bonus_dir", default=".", help="sub-directory of the checkpoint's directory for the output")
    p.add_argument("--random_seed", type=cli.seed, default=0, help="seed of the image subset")
    p.add_argument("--use_linear_params", action="store_true",
                   help="evaluate the kernel at the checkpoint's 'lin_params' (the trained theta of a phase-2 "
                        "run) instead of 'params' (theta0)")
    cli.add_network_args(p)
    # Beyond the reference
    cli.add_memory_gb(p)
    p.add_argument("--method", default="auto", choices=cli.NTK_METHODS,
                   help="how each layer's share of K is contracted: 'auto' takes the cheaper exact form per "
                        "layer; 'jacobian' contracts plain per-example gradients (slowest; for checks)")
    cli.add_no_progress(p)
    return p


def output_path(model_path, bonus_dir, save_name, class_index, n):
    return os.path.join(cli.output_dir(model_path, bonus_dir), f"{save_name}{cli.class_suffix(class_index, n)}.pkl")


def kernel_images(args, net):
    """The class-balanced training images of the kernel: (x, labels, indices)."""
    import data
    if args.dataset_size % net.num_classes:
        raise UserError(f"--dataset_size {args.dataset_size} is not divisible by the number of classes "
                        f"({net.num_classes}) of {net.dataset}")
    ds = data.load_dataset(net.dataset, args.data_dir)
    per_class = args.dataset_size // net.num_classes
    smallest = int(np.bincount(ds.y_train, minlength=net.num_classes).min())
    if per_class > smallest:
        raise UserError(f"--dataset_size {args.dataset_size} needs {per_class} images per class but the "
                        f"{net.dataset} training split has only {smallest} of its rarest class: use at most "
                        f"{smallest * net.num_classes}")
    if ds.input_shape != net.input_shape:
        raise UserError(f"{net.dataset} images are {ds.input_shape} but {net.path} was made for {net.input_shape}")
    return data.balanced_subset(ds.x_train, ds.y_train, args.dataset_size, args.random_seed, net.num_classes,
                                what="--dataset_size")


# What a kernel is made from: the keys of a kernel file that must agree for a rerun to replace it.
INPUT_KEYS = ("model_path", "use_linear_params", "class_index", "dataset_size", "random_seed", "dataset", "model",
              "width")


def kernel_inputs(args, net):
    return {"model_path": os.path.abspath(args.model_path), "use_linear_params": bool(args.use_linear_params),
            "class_index": args.class_index, "dataset_size": args.dataset_size, "random_seed": args.random_seed,
            "dataset": net.dataset, "model": net.model, "width": net.width}


def check_output(out_path, inputs):
    """The reference's file name is kept, but a kernel of other inputs there (another checkpoint
    of the same run, another seed) is never replaced: one line says so and how to keep both."""
    import utils
    existing = utils.existing_files([out_path])
    recorded = None
    if existing:
        try:
            obj = utils.restricted_load(out_path)
            recorded = {k: obj[k] for k in INPUT_KEYS} if isinstance(obj, dict) else None
        except (UserError, KeyError):
            pass
    stem = os.path.splitext(os.path.basename(inputs["model_path"]))[0].replace("parameters_", "")
    utils.check_replace(existing, recorded, inputs, "a kernel",
                        f"to keep both, name this one with --save_name (e.g. --save_name saved_kernel_{stem}) or "
                        f"--bonus_dir")


def print_plan(f, params, net, args, n):
    import ntk
    plan = ntk.make_plan(f, params, net.input_shape, net.num_classes, args.class_index, args.memory_gb,
                         args.method, n=n)
    print(f"engine: {len(plan.layers)} conv/dense layers intercepted "
          f"({sum(l.structured for l in plan.layers)} structured), {plan.row_floats / 1e6:.2f}M floats "
          f"per image row, gradient chunks of {plan.chunk}, blocks of {plan.block} rows, panels of {plan.panel_blocks} blocks")


def run(args):
    """Compute and save the kernel; returns the saved dict plus 'path'."""
    import checkpoints
    import ntk
    import utils

    if args.dataset_size < 1:
        raise UserError(f"--dataset_size must be >= 1, got {args.dataset_size}")
    if not args.memory_gb > 0:
        raise UserError(f"--memory_gb must be > 0, got {args.memory_gb}")
    net = checkpoints.open_network(args.model_path, model=args.model, width=args.width, dataset=args.dataset)
    cli.check_class_index(args.class_index, net.num_classes, net.dataset)
    x, labels, indices = kernel_images(args, net)
    out_path = output_path(args.model_path, args.bonus_dir, args.save_name, args.class_index, args.dataset_size)
    inputs = kernel_inputs(args, net)
    check_output(out_path, inputs)
    utils.check_writable_dir(os.path.dirname(out_path), "--bonus_dir")
    f, params = net.kernel_fn(args.use_linear_params)
    if args.show_progress:
        print_plan(f, params, net, args, len(x))
    which = "mean over logits" if args.class_index == -1 else f"class {args.class_index}"
    print(f"NTK of {net.model} (width {net.width}) on {len(x)} {net.dataset} training images, {which}, at "
          f"{'lin_params' if args.use_linear_params else 'params'}")
    stats = {}
    t0 = time.time()
    kernel = ntk.empirical_ntk(f, params, x, class_index=args.class_index, memory_gb=args.memory_gb,
                               method=args.method, progress=not args.no_progress, stats=stats)
    seconds = time.time() - t0
    if not np.all(np.isfinite(kernel)):
        raise UserError(f"the kernel of {args.model_path} holds non-finite values: the checkpoint's parameters or "
                        f"BatchNorm statistics are not finite")

    result = {"kernel": kernel, "labels": labels, "indices": indices, "dataset": net.dataset,
              "class_index": args.class_index, "model": net.model, "width": net.width, "num_classes": net.num_classes,
              "use_linear_params": bool(args.use_linear_params), "dataset_size": len(x),
              "random_seed": args.random_seed, "model_path": os.path.abspath(args.model_path), "seconds": seconds,
              "engine": stats}
    utils.atomic_pickle(out_path, result)
    evals = np.linalg.eigvalsh(kernel)
    print(f"{len(x)} x {len(x)} kernel in {seconds:.1f} s ({stats['example_gradients']} image gradients); "
          f"eigenvalues {evals[-1]:.4g} .. {evals[0]:.4g}, trace {np.trace(kernel):.4g}")
    print(f"wrote {out_path}")
    result["path"] = out_path
    return result


def main(argv=None):
    from utils import run_main
    return run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
