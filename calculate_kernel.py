"""The finite-width empirical NTK of a checkpoint on a class-balanced subset of training images.

    K[i, j] = <grad_theta f_c(x_i), grad_theta f_c(x_j)>   with --class_index c
    K[i, j] = mean over the logits c of the above           with --class_index -1
    K[i, j, c, c'] = <grad_theta f_c(x_i), grad_theta f_c'(x_j)>   with --full (every class pair)

BatchNorm runs in inference mode at the checkpoint's running statistics. The images are
--dataset_size / C per class (C classes), drawn without replacement with --random_seed, class 0
first. The kernel comes from ntk.empirical_ntk: each image's gradient is computed once when the
--memory_gb budget allows (the reference, neural-tangents in 4x4 blocks, recomputed it for
every block pair).

Output, under dirname(--model_path)/--bonus_dir/: {save_name}_class_{c}_{n}.pkl, or
{save_name}_{n}.pkl for --class_index -1, or {save_name}_full_{n}.pkl for --full, holding
  kernel [n, n] float64, labels [n]                  (the reference's keys)
                   with --full: kernel [n, n, C, C] float64 (not divided by C; its blocks
                   kernel[:, :, c, c] are the --class_index c kernels, their mean the -1 one)
                   and full = True
  indices [n]      positions of the images in the training split, so later scripts
                   (visualize_ntk_features.py, analyze_ntk.py) use exactly these images
  dataset, class_index, model, width, num_classes, use_linear_params, dataset_size,
  random_seed, model_path, seconds, engine (the engine's plan and counts)

--full is the full empirical NTK (neural-tangents' trace_axes=()), as Tsilivis & Kempe analyse it:
they read a (n, n, C, C) kernel as the C n x C n class-major matrix
K.transpose([3, 1, 2, 0]).reshape(C n, C n), entry [(a, p), (b, q)] = K[p, q, a, b]
(ntk.full_matrix); the spectrum printed is that matrix's. Every layer then takes the direct form
(--method structured does not apply), and the kernel file is C^2 times larger.

Example (the reference README's example 6):
  python3 calculate_kernel.py --model_path ./saved_model_path_phase_1/parameters_checkpoint_20.pkl \\
      --dataset_size 500 --random_seed 0 --class_index 0 --dataset cifar10

With --arch (fc, conv or myrtle) and no --model_path, the kernel is instead the analytic
infinite-width NTK (or NNGP, --kernel nngp) of that architecture (infinite.py; Tsilivis & Kempe's
networks), on the same images and in the same file format; the file records `architecture`
(arch, depth, width, W_std, b_std, parameterization) and `kernel_type` where an empirical kernel
records its checkpoint, and --bonus_dir is relative to the current directory. Every logit of the
infinite network has the same kernel, so --class_index only names the file.
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
    "python calculate_kernel.py --arch myrtle --depth 5 --dataset cifar10 --dataset_size 100 --bonus_dir kernels",
    "python calculate_kernel.py --model_path runs/tk_cnn/parameters_final.pkl --dataset_size 250 --full",
]

def build_parser():
    p = cli.parser("Finite-width empirical NTK of a checkpoint on a class-balanced subset of the "
                   "training images, for one logit, the mean over logits, or every class pair (--full).", EXAMPLES)
    p.add_argument("--model_path", default=None,
                   help="checkpoint (parameters_*.pkl) whose NTK is computed (or --arch instead)")
    p.add_argument("--dataset_size", type=int, default=500,
                   help="number of training images n (divisible by the number of classes; n/C per class)")
    p.add_argument("--save_name", default="saved_kernel",
                   help="stem of the output file {save_name}_class_{c}_{n}.pkl ({save_name}_{n}.pkl for -1, "
                        "{save_name}_full_{n}.pkl for --full)")
    cli.add_class_index(p)
    p.add_argument("--full", action="store_true",
                   help="the full empirical NTK of every class pair, K[i, j, c, c'] = <grad f_c(x_i), grad f_c'(x_j)> "
                        "(neural-tangents' trace_axes=()), saved as kernel [n, n, C, C] (not divided by C; "
                        "kernel[:, :, c, c] is the --class_index c kernel). Tsilivis & Kempe read it as the C n x C n "
                        "class-major matrix K.transpose([3, 1, 2, 0]).reshape(C n, C n) (ntk.full_matrix), whose "
                        "spectrum is printed. Not with --arch, a --class_index other than -1, or --method structured")
    p.add_argument("--show_progress", action="store_true",
                   help="also print the engine's plan (layer forms, chunk and panel sizes); the progress "
                        "bar is shown unless --no_progress")
    p.add_argument("--bonus_dir", default=".",
                   help="sub-directory of the checkpoint's directory for the output (with --arch: of the current "
                        "directory)")
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
    g = cli.add_architecture_args(p)
    g.add_argument("--kernel", choices=("ntk", "nngp"), default="ntk", help="which infinite-width kernel")
    return p


def output_path(model_path, bonus_dir, save_name, class_index, n, full=False):
    return os.path.join(cli.output_dir(model_path, bonus_dir), f"{save_name}{cli.class_suffix(class_index, n, full)}.pkl")


# What a kernel is made from: the keys of a kernel file that must agree for a rerun to replace it.
# ("full" is recorded by full kernels only, so the files of other kernels keep their inputs.)
INPUT_KEYS = ("model_path", "use_linear_params", "class_index", "dataset_size", "random_seed", "dataset", "model",
              "width", "full")


def kernel_inputs(args, net):
    """What a kernel file is made from (its 'inputs'), the checkpoint by content (utils.file_record);
    a full kernel (--full) also records full = True."""
    import utils
    inputs = {"model_path": utils.file_record(args.model_path), "use_linear_params": bool(args.use_linear_params),
              "class_index": args.class_index, "dataset_size": args.dataset_size, "random_seed": args.random_seed,
              "dataset": net.dataset, "model": net.model, "width": net.width}
    if getattr(args, "full", False):
        inputs["full"] = True
    return inputs


def check_output(out_path, inputs, keys=INPUT_KEYS, way_out=None):
    """The reference's file name is kept, but a kernel of other inputs there (another checkpoint
    of the same run, another seed, another architecture) is never replaced: one line says so and
    how to keep both."""
    import utils
    if way_out is None:
        stem = os.path.splitext(os.path.basename(inputs["model_path"]["path"]))[0].replace("parameters_", "")
        way_out = (f"to keep both, name this one with --save_name (e.g. --save_name saved_kernel_{stem}) or "
                   f"--bonus_dir")
    if not inputs.get("full"):  # a full kernel's inputs name full; those of other kernels do not
        recorded = utils.recorded_inputs(out_path, keys) if os.path.lexists(out_path) else None
        if isinstance(recorded, dict) and recorded.get("full"):
            raise UserError(f"{out_path} already holds a full kernel (--full, every class pair): it is not "
                            f"replaced; {way_out}")
    utils.check_outputs([out_path], inputs, "a full kernel" if inputs.get("full") else "a kernel", way_out,
                        keys=keys)


def run(args):
    """Compute and save the kernel; returns the saved dict plus 'path'."""
    import checkpoints
    import ntk
    import utils

    if args.dataset_size < 1:
        raise UserError(f"--dataset_size must be >= 1, got {args.dataset_size}")
    if not args.memory_gb > 0:
        raise UserError(f"--memory_gb must be > 0, got {args.memory_gb}")
    if args.full:
        if args.arch is not None:
            raise UserError("--full is the empirical NTK of a checkpoint (--model_path); every logit of an "
                            "infinite-width network (--arch) has the same kernel and no class pair is coupled")
        if args.class_index != -1:
            raise UserError(f"--full covers every class pair: give no --class_index (got {args.class_index})")
        if args.method == "structured":
            raise UserError("--full takes every layer in the direct form: use --method auto, direct or jacobian, "
                            "not structured")
    if args.arch is not None:
        return run_infinite(args)
    if args.model_path is None:
        raise UserError("give --model_path (a checkpoint's empirical NTK) or --arch (an infinite-width kernel)")
    for flag in ("depth", "kernel", "float64"):
        if getattr(args, flag) != build_parser().get_default(flag):
            raise UserError(f"--{flag} is for infinite-width kernels (--arch); a checkpoint's kernel is its empirical NTK")
    net = checkpoints.open_network(args.model_path, model=args.model, width=args.width, dataset=args.dataset)
    cli.check_class_index(args.class_index, net.num_classes, net.dataset)
    x, labels, indices = ntk.kernel_images(net.dataset, net.num_classes, args.dataset_size, args.random_seed,
                                           args.data_dir, net.input_shape, net.path)
    out_path = output_path(args.model_path, args.bonus_dir, args.save_name, args.class_index, args.dataset_size,
                           args.full)
    inputs = kernel_inputs(args, net)
    check_output(out_path, inputs)
    utils.check_writable_dir(os.path.dirname(out_path), "--bonus_dir")
    f, params = net.kernel_fn(args.use_linear_params)
    if args.show_progress:
        print(ntk.describe_plan(ntk.make_plan(f, params, net.input_shape, net.num_classes, args.class_index,
                                              args.memory_gb, args.method, n=len(x), full=args.full)))
    which = ("every class pair (full kernel)" if args.full else
             "mean over logits" if args.class_index == -1 else f"class {args.class_index}")
    print(f"NTK of {net.model} (width {net.width}) on {len(x)} {net.dataset} training images, {which}, at "
          f"{'lin_params' if args.use_linear_params else 'params'}")
    stats = {}
    t0 = time.time()
    kernel = ntk.empirical_ntk(f, params, x, class_index=args.class_index, memory_gb=args.memory_gb,
                               method=args.method, progress=not args.no_progress, stats=stats, full=args.full)
    seconds = time.time() - t0
    if not np.all(np.isfinite(kernel)):
        raise UserError(f"the kernel of {args.model_path} holds non-finite values: the checkpoint's parameters or "
                        f"BatchNorm statistics are not finite")

    result = {"kernel": kernel, "labels": labels, "indices": indices, "dataset": net.dataset,
              "class_index": args.class_index, "model": net.model, "width": net.width, "num_classes": net.num_classes,
              "use_linear_params": bool(args.use_linear_params), "dataset_size": len(x),
              "random_seed": args.random_seed, "model_path": os.path.abspath(args.model_path), "seconds": seconds,
              "engine": stats, "inputs": inputs}
    if args.full:
        result["full"] = True
    return save_kernel(out_path, result, f" ({stats['example_gradients']} image gradients)")


def save_kernel(out_path, result, counts=""):
    """Write `result` to out_path and report its kernel's size, time (and `counts`) and spectrum
    (a full kernel's: that of its C n x C n matrix, ntk.full_matrix); returns `result` plus 'path'."""
    import ntk
    import utils
    utils.atomic_pickle(out_path, result)
    kernel, n = result["kernel"], len(result["kernel"])
    if kernel.ndim == 4:
        c = kernel.shape[2]
        kernel = ntk.full_matrix(kernel)
        size = f"{n} x {n} x {c} x {c} kernel (a {c * n} x {c * n} class-major matrix)"
    else:
        size = f"{n} x {n} kernel"
    evals = np.linalg.eigvalsh(kernel)
    print(f"{size} in {result['seconds']:.1f} s{counts}; eigenvalues {evals[-1]:.4g} .. {evals[0]:.4g}, "
          f"trace {np.trace(kernel):.4g}")
    print(f"wrote {out_path}")
    result["path"] = out_path
    return result


def run_infinite(args):
    """The analytic infinite-width kernel of --arch on the kernel images; saved like run()."""
    import data
    import infinite
    import ntk
    import utils

    dataset = args.dataset or "cifar10"
    num_classes = data.num_classes_of(dataset)
    cli.check_class_index(args.class_index, num_classes, dataset)
    net, record = infinite.network_from_args(args, data.INPUT_SHAPES[dataset])
    width = record["width"]
    x, labels, indices = ntk.kernel_images(dataset, num_classes, args.dataset_size, args.random_seed, args.data_dir)
    out_path = os.path.normpath(os.path.join(os.path.abspath(args.bonus_dir),
                                             f"{args.save_name}{cli.class_suffix(args.class_index, args.dataset_size)}.pkl"))
    inputs = {"model_path": None, "use_linear_params": False, "class_index": args.class_index,
              "dataset_size": args.dataset_size, "random_seed": args.random_seed, "dataset": dataset,
              "model": f"infinite-{args.arch}", "width": width, "architecture": record, "kernel_type": args.kernel}
    check_output(out_path, inputs, keys=INPUT_KEYS + ("architecture", "kernel_type"),
                 way_out="to keep both, name this one with --save_name or --bonus_dir")
    utils.check_writable_dir(os.path.dirname(out_path), "--bonus_dir")
    print(f"infinite-width {args.kernel.upper()} of {args.arch} depth {args.depth} ({args.parameterization}, W_std "
          f"{args.W_std:g}, b_std {args.b_std:g}) on {len(x)} {dataset} training images")
    stats = {}
    t0 = time.time()
    kernel = net.kernel_fn(x, get=args.kernel, memory_gb=args.memory_gb, dtype="float64" if args.float64 else "float32",
                           progress=not args.no_progress, stats=stats)
    seconds = time.time() - t0
    if not np.all(np.isfinite(kernel)):
        raise UserError("the infinite-width kernel holds non-finite values: check --W_std and --b_std")
    result = {**inputs, "kernel": np.asarray(kernel, np.float64), "labels": labels, "indices": indices,
              "num_classes": num_classes, "seconds": seconds, "engine": stats, "inputs": inputs}
    return save_kernel(out_path, result)


def main(argv=None):
    from utils import run_main
    return run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
