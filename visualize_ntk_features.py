"""Draw the images whose tangent features line up with the NTK's eigenvectors.

For a kernel file written by calculate_kernel.py (K[i, j] = <grad_theta f_c(x_i), grad_theta f_c(x_j)>
over n training images X) and the checkpoint it was computed from:

1. eigendecompose K = sum_k lambda_k u_k u_k^T, eigenvalues in descending order;
2. for each of the top `--n_images` eigenvectors u, form the parameter-space direction
   v = sum_j u[j] grad_theta f_c(x_j) over the SAME images X;
3. start from a mid-grey image (0.5) and take `--steps` signed steps on cos(grad_theta f_c(x), v):
   ascent gives the "positive" image, descent the "negative" one, each the iterate with the best
   cosine (the reference kept the last). Every iterate's cosine is saved (`*_cos_history`);
4. one more ascent whose v uses the kernel-regression weights w = K^{-1} y_c
   (y_c[j] = 1 if label_j == c else 0) instead of an eigenvector.

`--class_index -1` (the mean kernel over the C logits): the tangent features of all C logits are
stacked, and the `w` image uses W = K^{-1} Y with Y the one-hot label matrix [n, C]. The
tangent-feature maths (one vjp per step, the loops) is tangent_features.py's, the linear algebra
kernel_analysis.py's, the figure plots.py's.

Outputs, under dirname(model_path)/bonus_dir/: `{save_name}_class_{c}_{n}.pkl` (or
`{save_name}_{n}.pkl` for class -1, as calculate_kernel.py names its files) holding
pos_images / neg_images [n_images, H, W, C], w_image [H, W, C] (NHWC, in [0, 1]), the final
cosines and the eigenvalues; and a PNG with the same stem showing the images and the
kernel's eigenvalue spectrum.

The reference script crashed (hard-coded image paths of another project, a model built
without a class count, swapped arguments for the negative and w images, undefined names);
this one uses the kernel's own images and the checkpoint's model.
"""
from __future__ import annotations

import os

import numpy as np

import cli
import utils
from utils import UserError

# K is treated as ill-conditioned (and gets the ridge) above this condition number: the
# kernel comes from float32 gradients, so smaller eigenvalues than ~1e-8 lambda_max are noise.
MAX_CONDITION = 1e8


EXAMPLES = [
    "python visualize_ntk_features.py --model_path runs/phase1_AC/parameters_final.pkl "
    "--kernel_path runs/phase1_AC/saved_kernel_class_0_100.pkl --n_images 4",
    "python visualize_ntk_features.py --model_path runs/phase1_AC/parameters_final.pkl "
    "--kernel_path runs/phase1_AC/saved_kernel_class_0_100.pkl --steps 100 --step_size 0.01",
]


def build_parser():
    p = cli.parser("Images whose NTK tangent features align with the kernel's top eigenvectors "
                   "(positive: ascent, negative: descent) and with the kernel-regression weights "
                   "K^-1 y_c. Writes a pickle and a PNG under dirname(model_path)/bonus_dir.", EXAMPLES)
    p.add_argument("--model_path", default=None,
                   help="checkpoint the kernel was computed from (none for a kernel of calculate_kernel.py --arch)")
    p.add_argument("--kernel_path", required=True,
                   help="kernel file written by calculate_kernel.py (its images, class and model are used)")
    p.add_argument("--dataset_size", type=int, default=None,
                   help="number of images in the kernel; must match the kernel file (default: the file's)")
    p.add_argument("--save_name", default="ntk_eig_images", help="stem of the output files")
    cli.add_class_index(p, default=None, help_extra="; must match the kernel file (default: the file's)")
    p.add_argument("--n_images", type=int, default=3, help="number of top eigenvectors to draw")
    p.add_argument("--steps", type=int, default=600, help="signed-gradient steps per image")
    p.add_argument("--step_size", type=float, default=0.001, help="size of each signed step (pixels in [0,1])")
    p.add_argument("--ridge", type=float, default=1e-4,
                   help="for w = K^-1 y_c only: when K is singular or ill-conditioned (condition number "
                        f"> {MAX_CONDITION:g}) solve (K + ridge * mean(diag K) * I) w = y_c instead; "
                        "the ridge used is printed and saved. 0 = refuse ill-conditioned kernels")
    p.add_argument("--loop", default="auto", choices=("auto", "fori", "host"),
                   help="how the steps run: 'fori' = one jitted lax.fori_loop; 'host' = the jitted step "
                        "dispatched from Python (XLA:CPU runs weight-gradient convolutions several times "
                        "slower inside a loop, jax-ml/jax#12868); auto = host on CPU, fori elsewhere")
    p.add_argument("--bonus_dir", default=".",
                   help="sub-directory of dirname(model_path) for the outputs (of dirname(kernel_path) for an "
                        "infinite-width kernel)")
    cli.add_network_args(p)
    p.add_argument("--random_seed", type=cli.seed, default=None,
                   help="seed the kernel's images were drawn with; checked against the kernel file "
                        "(the images themselves come from the file's indices)")
    cli.add_no_progress(p)
    return p


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------
def kernel_weights(evals, evecs, targets, ridge):
    """Kernel-regression weights w = K^{-1} targets from K's eigendecomposition, solved by
    kernel_analysis.eigen_predictor (the kernel predictor's solve).

    `targets` is [n] or [n, m]. A ridge r = ridge * mean(eigenvalues) (= ridge * mean(diag K))
    is added only when K is singular or its condition number exceeds MAX_CONDITION.
    Returns (w with the shape of targets, r or None when no ridge was needed). Raises
    UserError when K needs a ridge and `ridge` is 0, or when K + r I is not positive definite.
    """
    import kernel_analysis
    lam_max, lam_min = float(evals[0]), float(evals[-1])
    if lam_max <= 0:
        raise UserError("the kernel has no positive eigenvalue: it is zero or corrupt")
    shift = None
    if lam_min <= lam_max / MAX_CONDITION:
        if ridge <= 0:
            raise UserError(f"the kernel is singular or ill-conditioned (eigenvalues {lam_max:.3g} .. "
                            f"{lam_min:.3g}); pass --ridge > 0 to solve for w")
        shift = float(ridge * np.mean(evals))
    try:
        return kernel_analysis.eigen_predictor(evals, evecs, targets, shift or 0.0)["alpha"], shift
    except ValueError:  # K + shift I is not positive definite
        raise UserError(f"the kernel has eigenvalues down to {lam_min:.3g}, too negative for "
                        f"--ridge {ridge:g}; pass a larger --ridge") from None


def _resolve(what, *sources):
    """The one value that all non-None `sources` ((label, value) pairs) agree on, else UserError."""
    given = [(label, value) for label, value in sources if value is not None]
    for label, value in given[1:]:
        if value != given[0][1]:
            raise UserError(f"{what} mismatch: {given[0][0]} says {given[0][1]!r} but {label} says {value!r}")
    return given[0][1] if given else None


def check_kernel_source(kfile, model_path):
    """The kernel must have been computed from --model_path: the same file contents (its record,
    wherever either file now lies), or for kernel files of earlier versions the same path."""
    kernel_ckpt = kfile.get("model_path")
    recorded = (kfile.get("inputs") or {}).get("model_path")
    if isinstance(recorded, dict) and "sha256" in recorded:
        same = utils.same_input(recorded, utils.file_record(model_path))
    else:
        same = not (kernel_ckpt and os.path.exists(kernel_ckpt)) or os.path.samefile(kernel_ckpt, model_path)
    if not same:
        raise UserError(f"the kernel was computed from {kernel_ckpt}, not from --model_path {model_path}")


def output_stem(args, class_index, n):
    folder = cli.output_dir(args.model_path or args.kernel_path, args.bonus_dir)
    return os.path.join(folder, args.save_name + cli.class_suffix(class_index, n))


def open_inputs(args):
    """Check the kernel file, the checkpoint and the flags against each other, before any work.
    Returns (kernel file dict, Network, class_index, the kernel's images [n, H, W, C])."""
    import checkpoints
    import data
    import ntk_inputs
    kfile = ntk_inputs.load_kernel_file(args.kernel_path)
    n = len(kfile["kernel"])
    class_index = _resolve("class_index", ("the kernel file", kfile["class_index"]),
                           ("--class_index", args.class_index))
    _resolve("dataset_size", ("the kernel file's dataset_size", kfile["dataset_size"]),
             ("the kernel matrix", n), ("--dataset_size", args.dataset_size))
    _resolve("random_seed", ("the kernel file", kfile.get("random_seed")), ("--random_seed", args.random_seed))
    if args.n_images < 1 or args.n_images > n:
        raise UserError(f"--n_images {args.n_images} must be between 1 and the kernel's n={n}")
    if args.steps < 0 or not 0 < args.step_size < float("inf") or not 0 <= args.ridge < float("inf"):
        raise UserError("--steps must be >= 0, --step_size > 0 and --ridge >= 0 (both finite)")

    if kfile.get("architecture") is not None:   # calculate_kernel.py --arch: no checkpoint
        if args.model_path is not None:
            raise UserError(f"{args.kernel_path} is the infinite-width kernel of an architecture, not of a checkpoint: "
                            f"drop --model_path")
        _resolve("model", ("the kernel file", kfile["architecture"]["arch"]), ("--model", args.model))
        meta = {"input_shape": None}
        agreed = {key: _resolve(key, ("the kernel file", kfile[key]), (f"--{key}", getattr(args, key)))
                  for key in ("dataset", "width")}
        num_classes = kfile["num_classes"]
    else:
        if args.model_path is None:
            raise UserError(f"{args.kernel_path} is a checkpoint's empirical NTK: give that checkpoint as --model_path")
        checkpoints.check_file(args.model_path)
        ckpt = checkpoints.load_checkpoint(args.model_path)
        meta = ckpt["meta"]
        check_kernel_source(kfile, args.model_path)
        agreed = {key: _resolve(key, ("the kernel file", kfile[key]), ("the checkpoint", meta.get(key)),
                                (f"--{key}", getattr(args, key))) for key in ("dataset", "model", "width")}
        if agreed["dataset"] is None or agreed["model"] is None:
            raise UserError("say --dataset and --model: neither the kernel file nor the checkpoint names them")
        num_classes = _resolve("num_classes", ("the kernel file", kfile["num_classes"]),
                               ("the checkpoint", meta.get("num_classes")),
                               (f"dataset {agreed['dataset']}", data.num_classes_of(agreed["dataset"])))
    if not -1 <= class_index < num_classes:
        raise UserError(f"class_index {class_index} is not -1 or a class of {agreed['dataset']} (0..{num_classes - 1})")
    dataset = data.load_dataset(agreed["dataset"], args.data_dir)
    _resolve("input_shape", ("the checkpoint", None if meta.get("input_shape") is None else tuple(meta["input_shape"])),
             (f"dataset {agreed['dataset']}", dataset.input_shape))
    idx = kfile["indices"]
    if idx.min() < 0 or idx.max() >= len(dataset.x_train):
        raise UserError(f"the kernel's indices reach {idx.max()}, beyond the {len(dataset.x_train)} "
                        f"training images of {agreed['dataset']} in {args.data_dir}")
    if not np.array_equal(dataset.y_train[idx], kfile["labels"]):
        raise UserError(f"the kernel's labels differ from those of its indices in {agreed['dataset']}'s training "
                        f"split under {args.data_dir}: not the images the kernel was computed on")
    net = (ntk_inputs.KernelNetwork(kfile, num_classes) if args.model_path is None
           else checkpoints.Network(ckpt, args.model_path, **agreed))
    return kfile, net, class_index, dataset.x_train[idx]


# --------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------
def draw_images(args, kfile, net, class_index, x_kernel):
    """The work on the checked inputs: K's spectrum, the regression weights w (`kernel_weights`)
    and the ascent/descent images (tangent_features.eigen_images). Returns the result's computed
    entries, 'pos_images' to 'seconds'."""
    import kernel_analysis
    import tangent_features
    use_lin = bool(kfile["use_linear_params"])
    evals, evecs = kernel_analysis.eigh_desc(kfile["kernel"], fix_signs=True)   # host, float64
    classes = tuple(range(net.num_classes)) if class_index == -1 else (class_index,)
    targets = (kfile["labels"][:, None] == np.asarray(classes)[None, :]).astype(np.float64)  # [n, k]
    w, ridge_used = kernel_weights(evals, evecs, targets, args.ridge)
    if ridge_used is not None:
        print(f"K is ill-conditioned (eigenvalues {evals[0]:.3g} .. {evals[-1]:.3g}): solving for w "
              f"with ridge {ridge_used:.3g} (= {args.ridge:g} * mean diag K)")
    if args.model_path is None:   # an infinite-width kernel file
        tools, params = net.tools(classes, args.loop, x_kernel)
    else:
        f, params = net.kernel_fn(use_lin)
        tools = tangent_features.make_tangent_fns(f, classes, loop=args.loop)
    images, seconds = tangent_features.eigen_images(tools, params, x_kernel, evecs, w, args.n_images, args.steps,
                                                    args.step_size, progress=not args.no_progress)
    n, k = len(x_kernel), len(classes)
    return {**images, "eigenvalues": evals, "eigenvectors": evecs[:, :args.n_images],
            "w": w.reshape(n, k) if k > 1 else w[:, 0], "ridge": ridge_used, "class_index": class_index,
            "classes": list(classes), "steps": args.steps, "step_size": args.step_size, "loop": tools.loop,
            "use_linear_params": use_lin, "dataset": net.dataset, "model": net.model, "width": net.width,
            "num_classes": net.num_classes, "kernel_path": os.path.abspath(args.kernel_path),
            "model_path": args.model_path and os.path.abspath(args.model_path), "architecture": kfile.get("architecture"),
            "indices": kfile["indices"], "labels": kfile["labels"],
            "seconds": seconds}


def run(args):
    """Check inputs, draw the eigen-images, write the pickle and PNG. Returns the result dict
    (also saved) with 'pkl_path' and 'png_path' added."""
    import plots
    kfile, net, class_index, x_kernel = open_inputs(args)
    n = len(x_kernel)
    stem = output_stem(args, class_index, n)
    inputs = {"kernel_path": utils.file_record(args.kernel_path),
              "model_path": args.model_path and utils.file_record(args.model_path),
              "n_images": args.n_images, "steps": args.steps, "step_size": args.step_size, "ridge": args.ridge}
    # the images of another kernel (or other --steps, ...) under the same name are not replaced
    utils.check_outputs([stem + ".pkl", stem + ".png"], inputs, "eigen-images",
                        "give another --save_name or --bonus_dir, or delete those files")
    utils.check_writable_dir(os.path.dirname(stem), "--bonus_dir")
    result = {**draw_images(args, kfile, net, class_index, x_kernel), "config": utils.run_config(args),
              "inputs": inputs}
    pkl_path, png_path = stem + ".pkl", stem + ".png"
    utils.atomic_pickle(pkl_path, result)
    which = "mean over logits" if class_index == -1 else f"class {class_index}"
    title = (f"NTK eigen-images: {net.model}" + (f" (width {net.width})" if net.model == "resnet18" else "")
             + (f" depth {result['architecture']['depth']}, infinite width {net.kernel_type.upper()}"
                if result["architecture"] else "")
             + f", {net.dataset}, {which}, n={n}, {args.steps} steps of {args.step_size:g}"
             + (", lin_params" if result["use_linear_params"] else ""))
    utils.atomic_write_bytes(png_path, plots.eigen_images_figure(result, title))

    m = args.n_images
    for i in range(m):
        print(f"u{i + 1}: eigenvalue {result['eigenvalues'][i]:.4g}  cos+ {result['pos_cos'][i]:+.3f}  "
              f"cos- {result['neg_cos'][i]:+.3f}  (mid-grey start {result['pos_cos_history'][i, 0]:+.3f})")
    print(f"w: cos {result['w_cos']:+.3f} (mid-grey start {result['w_cos_history'][0]:+.3f}); "
          f"{2 * m + 1} images in {result['seconds']:.1f} s")
    print(f"wrote {pkl_path}")
    print(f"wrote {png_path}")
    result["pkl_path"], result["png_path"] = pkl_path, png_path
    return result


def main(argv=None):
    utils.run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
