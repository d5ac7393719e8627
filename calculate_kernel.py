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

import argparse
import os
import time

import numpy as np

from utils import UserError


def build_parser():
    import data
    import models
    import ntk
    p = argparse.ArgumentParser(
        description="Finite-width empirical NTK of a checkpoint on a class-balanced subset of the "
                    "training images, for one logit or the mean over logits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint (parameters_*.pkl) whose NTK is computed")
    p.add_argument("--dataset_size", type=int, default=500,
                   help="number of training images n (divisible by the number of classes; n/C per class)")
    p.add_argument("--save_name", default="saved_kernel",
                   help="stem of the output file {save_name}_class_{c}_{n}.pkl ({save_name}_{n}.pkl for -1)")
    p.add_argument("--class_index", type=int, default=-1,
                   help="logit c whose kernel <grad f_c(x), grad f_c(x')> is computed; -1: the mean over "
                        "all logits of those kernels (neural-tangents' trace / C)")
    p.add_argument("--show_progress", action="store_true",
                   help="also print the engine's plan (layer forms, chunk and panel sizes); the progress "
                        "bar is always shown")
    p.add_argument("--model", default=None, choices=models.MODELS,
                   help="model (default: the checkpoint's, else resnet18); contradicting the checkpoint is an error")
    p.add_argument("--bonus_dir", default=".", help="sub-directory of the checkpoint's directory for the output")
    p.add_argument("--random_seed", type=int, default=0, help="seed of the image subset")
    p.add_argument("--use_linear_params", action="store_true",
                   help="evaluate the kernel at the checkpoint's 'lin_params' (the trained theta of a phase-2 "
                        "run) instead of 'params' (theta0)")
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="dataset (default: the checkpoint's, else cifar10); contradicting the checkpoint is an error")
    # Beyond the reference
    p.add_argument("--data_dir", default="./data", help="where the dataset lives (torchvision layout)")
    p.add_argument("--width", type=int, default=None, help="ResNet width (default: the checkpoint's, else 64)")
    p.add_argument("--memory_gb", type=float, default=ntk.DEFAULT_MEMORY_GB,
                   help="memory budget (GiB) for the gradients the engine holds at once; the kernel does not "
                        "depend on it, only the time (a smaller budget recomputes more gradients)")
    p.add_argument("--method", default="auto", choices=ntk.METHODS,
                   help="how each layer's share of K is contracted: 'auto' takes the cheaper exact form per "
                        "layer; 'jacobian' contracts plain per-example gradients (slowest; for checks)")
    return p


def output_path(model_path, bonus_dir, save_name, class_index, n):
    name = f"{save_name}_class_{class_index}_{n}.pkl" if class_index != -1 else f"{save_name}_{n}.pkl"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(model_path)), bonus_dir, name))


def run(args):
    """Compute and save the kernel; returns the saved dict plus 'path'."""
    import jax
    import jax.numpy as jnp

    import data
    import models
    import ntk
    import utils

    if args.dataset_size < 1:
        raise UserError(f"--dataset_size must be >= 1, got {args.dataset_size}")
    if not args.memory_gb > 0:
        raise UserError(f"--memory_gb must be > 0, got {args.memory_gb}")
    path = args.model_path
    meta = utils.load_checkpoint(path)["meta"]
    model = utils.resolve_setting(meta, "model", args.model, "resnet18", path)
    width = utils.resolve_setting(meta, "width", args.width, 64, path)
    dataset_name = utils.resolve_setting(meta, "dataset", args.dataset, "cifar10", path)
    num_classes = int(meta.get("num_classes") or data.num_classes_of(dataset_name))
    if not -1 <= args.class_index < num_classes:
        raise UserError(f"--class_index {args.class_index} is out of range: use -1 or a class of "
                        f"{dataset_name} (0..{num_classes - 1})")
    if args.dataset_size % num_classes:
        raise UserError(f"--dataset_size {args.dataset_size} is not divisible by the number of classes "
                        f"({num_classes}) of {dataset_name}")
    out_path = output_path(path, args.bonus_dir, args.save_name, args.class_index, args.dataset_size)
    utils.check_writable_dir(os.path.dirname(out_path), "--bonus_dir")

    ds = data.load_dataset(dataset_name, args.data_dir)
    per_class = args.dataset_size // num_classes
    smallest = int(np.bincount(ds.y_train, minlength=num_classes).min())
    if per_class > smallest:
        raise UserError(f"--dataset_size {args.dataset_size} needs {per_class} images per class but the "
                        f"{dataset_name} training split has only {smallest} of its rarest class: use at most "
                        f"{smallest * num_classes}")
    if meta.get("input_shape") is not None and tuple(meta["input_shape"]) != ds.input_shape:
        raise UserError(f"{dataset_name} images are {ds.input_shape} but {path} was made for "
                        f"{tuple(meta['input_shape'])}")
    x, labels, indices = data.balanced_subset(ds.x_train, ds.y_train, args.dataset_size, args.random_seed,
                                              num_classes, what="--dataset_size")

    init, apply = models.get_model(model, num_classes, width)
    # Shapes only: running Haiku's initializers for a full ResNet-18 costs seconds for nothing.
    p0, s0 = jax.eval_shape(lambda key, x: init(key, x, True), jax.random.PRNGKey(0),
                            jnp.zeros((1,) + ds.input_shape, jnp.float32))
    ckpt = utils.load_into_model(path, p0, s0, model=model, width=width, num_classes=num_classes)
    f, params = ntk.checkpoint_fn(ckpt, apply, use_linear_params=args.use_linear_params)

    if args.show_progress:
        plan = ntk.make_plan(f, params, ds.input_shape, num_classes, args.class_index, args.memory_gb,
                             args.method, n=len(x))
        print(f"engine: {len(plan.layers)} conv/dense layers intercepted "
              f"({sum(l.structured for l in plan.layers)} structured), {plan.row_floats / 1e6:.2f}M floats "
              f"per image row, gradient chunks of {plan.chunk}, blocks of {plan.block} rows, panels of {plan.panel_blocks} blocks")
    which = "mean over logits" if args.class_index == -1 else f"class {args.class_index}"
    print(f"NTK of {model} (width {width}) on {len(x)} {dataset_name} training images, {which}, at "
          f"{'lin_params' if args.use_linear_params else 'params'}")
    stats = {}
    t0 = time.time()
    kernel = ntk.empirical_ntk(f, params, x, class_index=args.class_index, memory_gb=args.memory_gb,
                               method=args.method, progress=True, stats=stats)
    seconds = time.time() - t0
    if not np.all(np.isfinite(kernel)):
        raise UserError(f"the kernel of {path} holds non-finite values: the checkpoint's parameters or "
                        f"BatchNorm statistics are not finite")

    result = {"kernel": kernel, "labels": labels, "indices": indices, "dataset": dataset_name,
              "class_index": args.class_index, "model": model, "width": width, "num_classes": num_classes,
              "use_linear_params": bool(args.use_linear_params), "dataset_size": len(x),
              "random_seed": args.random_seed, "model_path": os.path.abspath(path), "seconds": seconds,
              "engine": stats}
    utils.atomic_pickle(out_path, result)
    evals = np.linalg.eigvalsh(kernel)
    print(f"{len(x)} x {len(x)} kernel in {seconds:.1f} s ({stats['example_gradients']} image gradients); "
          f"eigenvalues {evals[-1]:.4g} .. {evals[0]:.4g}, trace {np.trace(kernel):.4g}")
    print(f"wrote {out_path}")
    result["path"] = out_path
    return result


def main(argv=None):
    import utils
    return utils.run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
